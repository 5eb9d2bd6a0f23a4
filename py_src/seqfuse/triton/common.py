"""What the Triton op modules (recurrent.py, attention.py) share about where and when
their kernels run: the interpreter, the device check, launch guards."""
from __future__ import annotations

import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ..ops.checks import TRITON_DTYPES, fail, floating, is_trace_tensor  # noqa: F401


@triton.jit
def _probe():
    pass


# TRITON_INTERPRET=1 at triton's import makes @triton.jit build interpreted functions,
# which run on CPU tensors; compiled kernels need device memory.
INTERPRETED = isinstance(_probe, InterpretedFunction)


def check_device(op: str, t: Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU ones under the interpreter (meta
    tensors only allocate outputs)."""
    if t.device.type not in ("cuda", "meta") and not (INTERPRETED and t.device.type == "cpu"):
        fail(op, f"the Triton kernels need CUDA tensors, got {t.device} (without a GPU, set "
                 "TRITON_INTERPRET=1 before triton is imported to run them interpreted on CPU)")


def can_launch(t: Tensor) -> bool:
    """Whether an op's body launches its kernels for outputs like `t`. Not for meta tensors
    (shape inference only). Under the interpreter, wrap_triton hands back the interpreted
    kernel itself, which reads memory and so cannot run on a trace's tensors: the op's fake
    (its own body, as triton_op registers it) then only allocates its outputs. On a GPU it
    always launches, and wrap_triton makes the launch a traceable no-op under fake tensors."""
    return t.device.type != "meta" and not (INTERPRETED and is_trace_tensor(t))


def _opaque_under_functionalization(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


def keep_opaque_when_interpreted(*ops) -> None:
    """Under the interpreter, AOT autograd (torch.compile, opcheck's aot_dispatch test)
    keeps these ops opaque instead of decomposing them into their kernels: their bodies
    cannot be traced there (see can_launch), but they run eagerly on real tensors. On a
    GPU triton_op's own decomposition stays, so Inductor sees the kernels."""
    if not INTERPRETED:
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for op in ops:
        op.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)
