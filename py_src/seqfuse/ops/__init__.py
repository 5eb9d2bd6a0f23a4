"""seqfuse's ops: typed wrappers over the compiled ops (torch.ops.seqfuse.*), their fakes,
their autograd formulas and the Python check layer. Nothing outside this package and the
Triton op modules calls torch.ops.seqfuse directly.

  checks.py      argument checks of every op, for the Python backends (messages = C++)
  recurrent.py   lstm_layer, gru_layer, rnn_layer: wrappers, fakes, one autograd each
  attention.py   additive_attention, scaled_dot_product_attention: the same

Each autograd formula serves an op's compiled kernel and its Triton twin alike.
"""
from __future__ import annotations

import warnings

import torch

try:
    from .. import _C  # noqa: F401  (imported for its op registrations)

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # surfaced by build_hint() whenever "native" is asked for
    _IMPORT_ERROR = exc

_OPS = ("lstm_layer", "lstm_proj_layer", "gru_layer", "rnn_layer", "additive_attention",
        "scaled_dot_product_attention")
# Inference from a projected input, and the weights' packing for the packed_weights argument
# of every layer op (CPU, float32/float64: not autocast to bfloat16).
_INFERENCE_OPS = ("lstm_layer_projected", "gru_layer_projected", "pack_recurrent_weights",
                  "quantized_rnn_layer")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _kernel_table() -> frozenset:
    if _IMPORT_ERROR is not None:
        return frozenset()
    return frozenset(
        (op, dev)
        for op in _OPS + _INFERENCE_OPS
        for dev, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfuse::{op}", key)
    )


# Computed once: (op, device type) pairs with a compiled kernel.
NATIVE_KERNELS = _kernel_table()


def has_native_kernel(op_name: str, device_type: str) -> bool:
    return (op_name, device_type) in NATIVE_KERNELS


# Bumped by set_cpu_capability: a cached packing (nn's weight cache) is for one
# capability's vector width, so the cache keys on this.
cpu_kernels_generation = 0


def cpu_capability() -> str:
    """The capability (vector ISA) the compiled CPU kernels run with: "amx" (AMX bfloat16
    tiles for the recurrent steps, on top of AVX512-BF16), "avx512_bf16", "avx512", "avx2"
    or "default"; "unavailable" without seqfuse._C. The best the CPU supports, or the one
    SEQFUSE_CPU_CAPABILITY names (set before the first call; a capability this CPU lacks
    runs the best one below it, with a warning)."""
    if _IMPORT_ERROR is not None:
        return "unavailable"
    return torch.ops.seqfuse.cpu_capability()


def cpu_capabilities() -> list[str]:
    """Every capability this CPU and build can run, lowest first ([] without seqfuse._C)."""
    if _IMPORT_ERROR is not None:
        return []
    return list(torch.ops.seqfuse.cpu_capabilities())


def set_cpu_capability(name: str) -> str:
    """Runs the CPU kernels of capability `name` from now on (for tests and benchmarks;
    deployments set SEQFUSE_CPU_CAPABILITY) and returns the previous one. A capability this
    CPU or build lacks runs the best one below it, with a warning; an unknown name raises
    ValueError."""
    global cpu_kernels_generation
    if _IMPORT_ERROR is not None:
        raise RuntimeError(build_hint("cpu"))
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_capability: name must be a str, got {type(name).__name__}")
    previous = torch.ops.seqfuse.set_cpu_capability(name)  # ValueError for an unknown name
    cpu_kernels_generation += 1
    chosen = torch.ops.seqfuse.cpu_capability()
    if chosen != name.lower():
        warnings.warn(f"set_cpu_capability asks for the CPU capability '{name}', which this CPU or "
                      f"build does not support: running '{chosen}'", stacklevel=2)
    return previous


def build_hint(device_type: str) -> str:
    if _IMPORT_ERROR is not None:
        return (f"The compiled extension seqfuse._C failed to import ({_IMPORT_ERROR}); "
                "build it with `make install` or `python setup.py develop`.")
    if device_type == "cuda":
        return "This build has no CUDA kernels: rebuild on a machine with nvcc and a CUDA torch (SEQFUSE_CUDA=1)."
    return f"No kernels are compiled for device type '{device_type}'."


from .attention import additive_attention, scaled_dot_product_attention  # noqa: E402
from .recurrent import (NONLINEARITIES, activation_dtype, gru_layer,  # noqa: E402
                        gru_layer_projected, lstm_layer, lstm_layer_projected, lstm_proj_layer,
                        needs_backward,
                        pack_recurrent_weights, quantized_rnn_layer, rnn_layer)

if _IMPORT_ERROR is None:
    from . import attention as _attention
    from . import recurrent as _recurrent

    _recurrent.register_compiled()
    _attention.register_compiled()

    # torch.autocast("cpu", dtype=torch.bfloat16): every floating-point argument is cast to
    # bfloat16 (the kernels accumulate in float32), as autocast does for matmul-like ops.
    for _op in _OPS:
        torch.library.register_autocast(f"seqfuse::{_op}", "cpu", torch.bfloat16)

__all__ = ["lstm_layer", "lstm_proj_layer", "quantized_rnn_layer", "gru_layer", "rnn_layer", "lstm_layer_projected", "gru_layer_projected",
           "pack_recurrent_weights",
           "additive_attention",
           "scaled_dot_product_attention", "has_native_kernel", "build_hint", "NATIVE_KERNELS",
           "NONLINEARITIES", "activation_dtype", "needs_backward", "cpu_capability",
           "cpu_capabilities", "set_cpu_capability"]
