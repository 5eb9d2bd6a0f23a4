"""Functional forms of seqfuse's layers: each picks the backend (backend.py) and calls
the compiled op (seqfuse.ops), the Triton op (seqfuse.triton) or the reference
(reference.py).

Arguments are checked alike whatever the backend: the compiled ops check theirs in C++
(csrc/*_checks.cpp); the Triton ops and the reference (eager PyTorch, which would
otherwise accept some bad arguments silently or fail with messages about its internals)
through seqfuse.ops.checks, with the same messages."""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops, reference
from .backend import get_backend, implementation, resolve
from .ops import checks
from .ops.checks import REFERENCE_DTYPES


def _autocast(t: Tensor) -> bool:
    # Under autocast the reference's torch ops cast mixed dtypes themselves (as the compiled
    # ops' autocast registration does before their checks).
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _impl(backend: str, op: str, first_name: str, first) -> tuple[object, bool]:
    """(implementation module, whether it is the reference)."""
    if not isinstance(first, Tensor):
        raise TypeError(f"{op}: {first_name} must be a Tensor, got {type(first).__name__}")
    impl = implementation(backend, op, first.device.type)  # resolves the backend once
    return impl, impl is reference


def _packed(impl, op: str, packed_weights: Tensor | None) -> tuple:
    """packed_weights (ops.pack_recurrent_weights) as the trailing argument of the native
    op; the other backends read the weights themselves and refuse it."""
    if packed_weights is None:
        return ()
    if impl.__name__ != "seqfuse.ops":
        raise ValueError(f"{op}: packed_weights serve the native CPU kernels; this call runs on "
                         f"{impl.__name__}")
    return (packed_weights,)


def _meta_lengths(input: Tensor, lengths: Tensor | None) -> Tensor | None:
    # On the meta device nothing is computed: the shapes do not depend on the lengths, and
    # the reference's packing would need their values.
    return None if input.device.type == "meta" else lengths


# ---------------------------------------------------------------------------------
# The functional forms
# ---------------------------------------------------------------------------------


def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
    packed_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer (shapes in ops.lstm_layer) on the chosen backend."""
    impl, is_ref = _impl(backend, "lstm_layer", "input", input)
    if is_ref:
        checks.require_tensors("lstm_layer", weight_ih=weight_ih, weight_hh=weight_hh, bias=bias,
                               hx=hx, cx=cx, lengths=lengths)
        checks.layer_args("lstm_layer", 4, input, weight_ih, weight_hh, {"bias": bias}, hx, cx,
                          lengths, REFERENCE_DTYPES, not _autocast(input))
        lengths = _meta_lengths(input, lengths)
    return impl.lstm_layer(input, weight_ih, weight_hh, bias, hx, cx, lengths,
                           *_packed(impl, "lstm_layer", packed_weights))


def lstm_proj_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, weight_hr: Tensor,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer with a projection (shapes in ops.lstm_proj_layer) on the chosen
    backend. It has a compiled CPU kernel only: elsewhere "auto" runs the reference, and
    "triton" raises."""
    if not isinstance(input, Tensor):
        raise TypeError(f"lstm_proj_layer: input must be a Tensor, got {type(input).__name__}")
    name = resolve(backend, "lstm_proj_layer", input.device.type)
    if name == "triton":
        if backend == "triton" or (backend == "auto" and get_backend() == "triton"):
            raise RuntimeError("seqfuse: backend 'triton' has no lstm_proj_layer kernel (LSTM with "
                               "proj_size); use backend 'native' on CPU or 'reference'")
        name = "reference"
    if name == "native":
        return ops.lstm_proj_layer(input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths)
    checks.require_tensors("lstm_proj_layer", weight_ih=weight_ih, weight_hh=weight_hh, bias=bias,
                           weight_hr=weight_hr, hx=hx, cx=cx, lengths=lengths)
    checks.lstm_proj_args(input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths,
                          REFERENCE_DTYPES, not _autocast(input))
    return reference.lstm_proj_layer(input, weight_ih, weight_hh, bias, weight_hr, hx, cx,
                                     _meta_lengths(input, lengths))


def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
    packed_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer (shapes in ops.gru_layer) on the chosen backend."""
    impl, is_ref = _impl(backend, "gru_layer", "input", input)
    if is_ref:
        checks.require_tensors("gru_layer", weight_ih=weight_ih, weight_hh=weight_hh,
                               bias_ih=bias_ih, bias_hh=bias_hh, hx=hx, lengths=lengths)
        checks.layer_args("gru_layer", 3, input, weight_ih, weight_hh,
                          {"bias_ih": bias_ih, "bias_hh": bias_hh}, hx, None, lengths,
                          REFERENCE_DTYPES, not _autocast(input))
        lengths = _meta_lengths(input, lengths)
    return impl.gru_layer(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths,
                          *_packed(impl, "gru_layer", packed_weights))


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh", backend: str = "auto",
    packed_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer (shapes in ops.rnn_layer) on the chosen backend."""
    impl, is_ref = _impl(backend, "rnn_layer", "input", input)
    if is_ref:
        checks.nonlinearity("rnn_layer", nonlinearity)
        checks.require_tensors("rnn_layer", weight_ih=weight_ih, weight_hh=weight_hh, bias=bias,
                               hx=hx, lengths=lengths)
        checks.layer_args("rnn_layer", 1, input, weight_ih, weight_hh, {"bias": bias}, hx, None,
                          lengths, REFERENCE_DTYPES, not _autocast(input))
        lengths = _meta_lengths(input, lengths)
    return impl.rnn_layer(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity,
                          *_packed(impl, "rnn_layer", packed_weights))


def additive_attention(
    query: Tensor, key: Tensor, w_v: Tensor, value: Tensor, valid_lens: Tensor | None = None,
    mask: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Masked additive attention (shapes in ops.additive_attention) on the chosen backend.
    Returns (context [B, Q, Dv], weights [B, Q, K])."""
    impl, is_ref = _impl(backend, "additive_attention", "query", query)
    if is_ref:
        checks.require_tensors("additive_attention", key=key, w_v=w_v, value=value,
                               valid_lens=valid_lens, mask=mask)
        checks.additive_args(query, key, w_v, value, valid_lens, mask, REFERENCE_DTYPES,
                             not _autocast(query))
    return impl.additive_attention(query, key, w_v, value, valid_lens, mask)


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    valid_lens: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    dropout_p: float = 0.0, seed: int = 0, backend: str = "auto",
) -> Tensor:
    """Masked scaled dot-product attention (shapes in ops.scaled_dot_product_attention) on
    the chosen backend. Returns output [B, H, Q, Dv]."""
    impl, is_ref = _impl(backend, "scaled_dot_product_attention", "query", query)
    if is_ref:
        checks.require_tensors("scaled_dot_product_attention", key=key, value=value,
                               attn_mask=attn_mask, valid_lens=valid_lens)
        checks.sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p,
                         REFERENCE_DTYPES, not _autocast(query))
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)  # as the compiled op converts it
    return impl.scaled_dot_product_attention(query, key, value, attn_mask, valid_lens, is_causal,
                                             scale, dropout_p, seed)
