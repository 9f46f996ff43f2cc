"""gkd training side: data, detectors, global-knowledge distillation and the prototype-projection operator.

Installed as ``gkd.kd`` (the folder is ``kd/``; see setup.py). ``import gkd.kd`` is light: it loads torch but none
of the optional backends (tensorrt, pycuda, onnxruntime, pycocotools), and never imports ``gkd.export`` or
``gkd.bench``.
"""
from pathlib import Path

from gkd.core.errors import GkdError

from .. import __version__

__all__ = ["GkdError", "__version__", "CONFIG_DIR"]

#: the configs shipped with gkd (``kd/configs`` in the repository, ``gkd/kd/configs`` in an installed wheel)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
