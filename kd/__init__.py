"""gkd training side: data, detectors, global-knowledge distillation and the prototype-projection operator.

``import kd`` is light: it loads torch but none of the optional backends (tensorrt, pycuda, onnxruntime,
pycocotools), and never imports the ``export`` or ``bench`` packages.
"""
from .errors import GkdError

__all__ = ["GkdError", "__version__"]
__version__ = "0.1.0"
