"""seqfuse: fused recurrent and attention kernels for PyTorch, and a dependable path
from a trained model to ONNX / TorchScript serving.

Importing seqfuse loads the compiled ops (`seqfuse._C`). If the extension was not
built, the pure-PyTorch "reference" backend still works and `backend="native"` raises
an error that says how to build it.
"""
import torch  # noqa: F401  (libtorch must be loaded before seqfuse._C)

from . import nn, ops
from .backend import available_backends, get_backend, use_backend

__version__ = "0.1.0"

__all__ = ["nn", "ops", "use_backend", "get_backend", "available_backends", "__version__"]
