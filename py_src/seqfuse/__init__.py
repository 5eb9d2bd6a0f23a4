"""seqfuse: fused recurrent and attention kernels for PyTorch, and a dependable path
from a trained model to ONNX / TorchScript serving.

Importing seqfuse loads the compiled ops (`seqfuse._C`). If the extension was not
built, the pure-PyTorch "reference" backend still works and `backend="native"` raises
an error that says how to build it.
"""
import os

import torch  # libtorch must be loaded before seqfuse._C

from . import nn, ops
from .backend import available_backends, get_backend, use_backend
from .nn.quantized import quantize_dynamic
from .ops import cpu_capabilities, cpu_capability, set_cpu_capability

__version__ = "0.1.0"


def _one_thread_in_forked_child() -> None:
    # OpenMP's thread team does not survive fork(): a forked child (gunicorn --preload,
    # multiprocessing's fork start method) of a process whose OpenMP threads have run
    # hangs in its first parallel region, in torch's ops as in seqfuse's. One intra-op
    # thread from the start of the child, as torch's DataLoader workers do. The compiled
    # ops do the same for a fork from C (csrc/cpu/fork_safety.h).
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_in_forked_child)

__all__ = ["nn", "ops", "cpu_capability", "cpu_capabilities", "set_cpu_capability", "quantize_dynamic", "use_backend", "get_backend", "available_backends", "__version__"]
