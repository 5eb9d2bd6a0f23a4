"""Backend selection: which implementation a seqfuse module runs.

  "auto"       the compiled kernel for the tensor's device when there is one, else the
               reference implementation
  "native"     the compiled kernel; a clear error if it was not built for that device
  "reference"  pure PyTorch ops (always available; the test oracle)

A module's own `backend=` argument wins over the context set by `use_backend`, unless
the module's is "auto".
"""
from __future__ import annotations

import contextlib

BACKENDS = ("auto", "native", "reference")

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


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on `device_type` in this build."""
    from . import ops

    names = ["reference"]
    if ops.has_native_kernel("lstm_layer", device_type):
        names.insert(0, "native")
    return names


def resolve(module_backend: str, op_name: str, device_type: str) -> str:
    """Pick "native" or "reference" for one call of op `op_name` on `device_type`."""
    from . import ops

    name = module_backend if module_backend != "auto" else get_backend()
    if name == "reference":
        return "reference"
    has_kernel = ops.has_native_kernel(op_name, device_type)
    if name == "native" and not has_kernel:
        raise RuntimeError(
            f"seqfuse: backend 'native' has no {op_name} kernel for device '{device_type}'. "
            + ops.build_hint(device_type)
        )
    return "native" if has_kernel else "reference"
