"""gkd: distill object detectors with global knowledge, then ship them.

The installed package holds the whole toolkit under one import name:

* ``gkd.kd``: training (data, detectors, distillation, the C++/CUDA operator); never imports the two below;
* ``gkd.export``: ONNX / TensorRT export, runners, parity; imports ``gkd.kd`` only;
* ``gkd.bench``: latency and accuracy harnesses, the study;
* ``gkd.cli`` and ``gkd.pipeline``: the ``gkd`` command and the one-command pipeline, on top of all three.

The public Python API is :mod:`gkd.api`: ``from gkd.api import synth, train, distill, evaluate, export, run``
(``gkd.export`` is the export package, so the API is not re-exported at the top level). ``import gkd`` is light.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
