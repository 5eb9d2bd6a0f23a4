"""Backend selection: which implementation a seqfuse module runs.

  "auto"       the compiled kernel for the tensor's device when there is one, else the
               Triton kernel on a GPU when triton is installed, else the reference
  "native"     the compiled kernel (C++ on CPU, CUDA C++ on GPU); a clear error if it
               was not built for that device
  "triton"     the Triton kernels (seqfuse.triton): CUDA tensors, or CPU tensors under
               Triton's interpreter (TRITON_INTERPRET=1, for tests); a clear error otherwise
  "reference"  pure PyTorch ops (always available; the test oracle)

A module's own `backend=` argument wins over the context set by `use_backend`, unless
the module's is "auto".
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

BACKENDS = ("auto", "native", "triton", "reference")

# A plain global rather than a ContextVar: torch.compile traces through a dict lookup
# (and guards on it), but not through ContextVar.get.
_state = {"backend": "auto"}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend set by the innermost `use_backend` (default "auto")."""
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """Run seqfuse modules inside the block on backend `name`.

    >>> with seqfuse.use_backend("reference"):
    ...     y, _ = lstm(x)
    """
    previous = _state["backend"]
    _state["backend"] = check_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton backend cannot run on `device_type`, or None when it can."""
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("Triton kernels run on CUDA tensors; CPU tensors only under Triton's interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported)")
    return f"Triton kernels do not run on device type '{device_type}'"


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on `device_type` in this build."""
    from . import ops

    names = ["reference"]
    if triton_unavailable_reason(device_type) is None:
        names.insert(0, "triton")
    if ops.has_native_kernel("lstm_layer", device_type):
        names.insert(0, "native")
    return names


def resolve(module_backend: str, op_name: str, device_type: str) -> str:
    """Pick "native", "triton" or "reference" for one call of op `op_name` on
    `device_type`."""
    from . import ops

    name = module_backend if module_backend != "auto" else get_backend()
    if name == "reference":
        return "reference"
    if name == "triton":
        reason = triton_unavailable_reason(device_type)
        if reason is not None:
            raise RuntimeError(f"seqfuse: backend 'triton' cannot run {op_name} on "
                               f"'{device_type}': {reason}")
        return "triton"
    has_kernel = ops.has_native_kernel(op_name, device_type)
    if name == "native" and not has_kernel:
        raise RuntimeError(
            f"seqfuse: backend 'native' has no {op_name} kernel for device '{device_type}'. "
            + ops.build_hint(device_type)
        )
    if has_kernel:
        return "native"
    # "auto" without a compiled kernel: Triton on a GPU (never the slow interpreter).
    if device_type == "cuda" and triton_unavailable_reason("cuda") is None:
        return "triton"
    return "reference"


def backend_for(module_backend: str, x) -> str:
    """A module's backend for one call whose input is x: torch.nn's layers run float16 on
    the CPU and the compiled CPU kernels do not (nor Triton there), so such a call runs on
    the reference, torch's own kernels, as torch.nn would."""
    import torch

    return "reference" if x.dtype == torch.float16 and x.device.type == "cpu" else module_backend


def implementation(module_backend: str, op_name: str, device_type: str):
    """The module whose `op_name` function runs this call: seqfuse.ops (compiled),
    seqfuse.triton or seqfuse.reference. They share signatures and semantics."""
    name = resolve(module_backend, op_name, device_type)
    if name == "triton":
        from . import triton  # imports triton itself: only once asked for

        return triton
    from . import ops, reference

    return ops if name == "native" else reference
