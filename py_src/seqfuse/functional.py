"""Functional forms of seqfuse's layers: each picks the backend (backend.py) and calls
the compiled op (ops.py), the Triton op (triton/) or the reference (reference.py).

Arguments are checked alike whatever the backend: the compiled ops check theirs in C++
(csrc/*_checks.cpp), the Triton ops in Python with the same messages, and the reference
(eager PyTorch, which would otherwise accept some bad arguments silently or fail with
messages about its internals) is checked here, again with the same messages."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .backend import implementation, resolve

# ---------------------------------------------------------------------------------
# Argument checks for the reference backend: the messages of csrc/layer_checks.cpp and
# csrc/attention_checks.cpp (RuntimeError, as TORCH_CHECK raises).
# ---------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _require_tensors(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")


def _fail(op: str, cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"{op}: {msg}")


def _has_values(t: Tensor) -> bool:
    """Whether t's values can be read here (not a meta or fake tensor, not while tracing)."""
    if t.device.type == "meta" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def _autocast(t: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _check_same(op: str, ref_name: str, ref: Tensor, **tensors) -> None:
    # Under autocast the reference's torch ops cast mixed dtypes themselves (as the
    # compiled ops' autocast registration does before their checks).
    same_dtype = not _autocast(ref)
    for name, t in tensors.items():
        if t is None:
            continue
        _fail(op, not same_dtype or t.dtype == ref.dtype,
              f"{name} must have the {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
        _fail(op, t.device == ref.device,
              f"{name} must be on the {ref_name}'s device {ref.device}, got {t.device}")


def _check_layer_args(op: str, NG: int, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                      biases: dict, hx: Tensor, cx: Tensor | None, lengths: Tensor | None) -> None:
    _fail(op, input.dim() == 3, f"input must be 3-D [T, B, I], got {input.dim()}-D with shape "
                                f"{list(input.shape)}")
    _fail(op, input.dtype in _FLOAT_DTYPES,
          f"input dtype must be float32, float64, bfloat16 or float16, got {input.dtype}")
    T, B, I = input.shape
    _fail(op, T >= 1, f"input must have at least one time step, got T={T}")
    _fail(op, B >= 1, f"input must have a batch of at least 1, got B={B}")
    _fail(op, weight_ih.dim() == 3 and weight_ih.shape[0] in (1, 2),
          f"weight_ih must be [D, {NG}H, I] with D in {{1, 2}}, got {list(weight_ih.shape)}")
    D = weight_ih.shape[0]
    _fail(op, weight_hh.dim() == 3 and weight_hh.shape[0] == D and weight_hh.shape[2] >= 1
          and weight_hh.shape[1] == NG * weight_hh.shape[2],
          f"weight_hh must be [D={D}, {NG}H, H], got {list(weight_hh.shape)}")
    H = weight_hh.shape[2]
    _fail(op, tuple(weight_ih.shape[1:]) == (NG * H, I),
          f"weight_ih must be [{D}, {NG * H}, {I}] for input features I={I} and hidden size H={H}, "
          f"got {list(weight_ih.shape)}")
    _fail(op, tuple(hx.shape) == (D, B, H), f"hx must be [{D}, {B}, {H}], got {list(hx.shape)}")
    if cx is not None:
        _fail(op, tuple(cx.shape) == (D, B, H), f"cx must be [{D}, {B}, {H}], got {list(cx.shape)}")
    _check_same(op, "input", input, weight_ih=weight_ih, weight_hh=weight_hh, hx=hx, cx=cx, **biases)
    for name, b in biases.items():
        if b is not None:
            _fail(op, tuple(b.shape) == (D, NG * H), f"{name} must be [{D}, {NG * H}], got {list(b.shape)}")
    if lengths is not None:
        _fail(op, lengths.dtype == torch.int64, f"lengths must be int64, got {lengths.dtype}")
        _fail(op, lengths.device.type == "cpu" or (lengths.device.type == input.device.type == "meta"),
              f"lengths must be a CPU tensor, got device {lengths.device}")
        _fail(op, lengths.dim() == 1 and lengths.shape[0] == B,
              f"lengths must be [B={B}], got shape {list(lengths.shape)}")
        if _has_values(lengths):
            lo, hi = int(lengths.min()), int(lengths.max())
            _fail(op, lo >= 1, f"every length must be >= 1, got min(lengths)={lo}")
            _fail(op, hi <= T, f"every length must be <= T={T}, got max(lengths)={hi}")


def _check_query_dtype(op: str, query: Tensor) -> None:
    _fail(op, query.dtype in _FLOAT_DTYPES,
          f"query dtype must be float32, float64, bfloat16 or float16, got {query.dtype}")


def _check_valid_lens(op: str, lens: Tensor, query: Tensor, B: int, Q: int, K: int) -> None:
    _fail(op, not (lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool),
          f"valid_lens must be an integer tensor, got {lens.dtype}")
    _fail(op, lens.device == query.device,
          f"valid_lens must be on the query's device {query.device}, got {lens.device}")
    _fail(op, tuple(lens.shape) in ((B,), (B, Q)),
          f"valid_lens must be [B={B}] or [B, Q]=[{B}, {Q}], got shape {list(lens.shape)}")
    if lens.numel() and _has_values(lens):
        lo, hi = int(lens.min()), int(lens.max())
        _fail(op, lo >= 0 and hi <= K, f"valid_lens must be in [0, K={K}], got values in [{lo}, {hi}]")


def _check_mask(op: str, name: str, mask: Tensor, query: Tensor, target: tuple[int, ...]) -> None:
    _fail(op, mask.device == query.device,
          f"{name} must be on the query's device {query.device}, got {mask.device}")
    ok = mask.dim() <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target)))
    _fail(op, ok, f"{name} must be broadcastable to {list(target)}, got shape {list(mask.shape)}")


def _check_additive_args(query, key, w_v, value, valid_lens, mask) -> None:
    op = "additive_attention"
    _fail(op, query.dim() == 3, f"query must be 3-D [B, Q, A], got shape {list(query.shape)}")
    _check_query_dtype(op, query)
    B, Q, A = query.shape
    _fail(op, B >= 1 and Q >= 1 and A >= 1, f"query must have B, Q, A >= 1, got shape {list(query.shape)}")
    _fail(op, key.dim() == 3 and key.shape[0] == B and key.shape[2] == A and key.shape[1] >= 1,
          f"key must be [B={B}, K>=1, A={A}], got shape {list(key.shape)}")
    K = key.shape[1]
    _fail(op, w_v.dim() == 1 and w_v.shape[0] == A, f"w_v must be [A={A}], got shape {list(w_v.shape)}")
    _fail(op, value.dim() == 3 and tuple(value.shape[:2]) == (B, K),
          f"value must be [B={B}, K={K}, Dv], got shape {list(value.shape)}")
    _check_same(op, "query", query, key=key, w_v=w_v, value=value)
    if valid_lens is not None:
        _check_valid_lens(op, valid_lens, query, B, Q, K)
    if mask is not None:
        _fail(op, mask.dtype == torch.bool, f"mask must be bool (True = attend), got {mask.dtype}")
        _check_mask(op, "mask", mask, query, (B, Q, K))


def _check_sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p) -> None:
    op = "scaled_dot_product_attention"
    _fail(op, query.dim() == 4, f"query must be 4-D [B, H, Q, D], got shape {list(query.shape)}")
    _check_query_dtype(op, query)
    B, H, Q, D = query.shape
    _fail(op, min(B, H, Q, D) >= 1, f"query must have B, H, Q, D >= 1, got shape {list(query.shape)}")
    _fail(op, key.dim() == 4 and tuple(key.shape[:2]) == (B, H) and key.shape[2] >= 1
          and key.shape[3] == D, f"key must be [B={B}, H={H}, K>=1, D={D}], got shape {list(key.shape)}")
    K = key.shape[2]
    _fail(op, value.dim() == 4 and tuple(value.shape[:3]) == (B, H, K) and value.shape[3] >= 1,
          f"value must be [B={B}, H={H}, K={K}, Dv>=1], got shape {list(value.shape)}")
    _check_same(op, "query", query, key=key, value=value)
    if attn_mask is not None:
        _fail(op, attn_mask.dtype == torch.bool or attn_mask.is_floating_point(),
              "attn_mask must be bool (True = attend) or floating (added to the scores), got "
              f"{attn_mask.dtype}")
        _check_mask(op, "attn_mask", attn_mask, query, (B, H, Q, K))
    if valid_lens is not None:
        _check_valid_lens(op, valid_lens, query, B, Q, K)
    _fail(op, scale is None or math.isfinite(scale), f"scale must be finite, got {scale}")
    _fail(op, 0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")


def _impl(backend: str, op: str, first_name: str, first) -> tuple[object, bool]:
    """(implementation module, whether it is the reference)."""
    if not isinstance(first, Tensor):
        raise TypeError(f"{op}: {first_name} must be a Tensor, got {type(first).__name__}")
    name = resolve(backend, op, first.device.type)
    return implementation(backend, op, first.device.type), name == "reference"


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
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer (shapes in ops.lstm_layer) on the chosen backend."""
    impl, is_ref = _impl(backend, "lstm_layer", "input", input)
    if is_ref:
        _require_tensors("lstm_layer", weight_ih=weight_ih, weight_hh=weight_hh, bias=bias, hx=hx,
                         cx=cx, lengths=lengths)
        _check_layer_args("lstm_layer", 4, input, weight_ih, weight_hh, {"bias": bias}, hx, cx, lengths)
        lengths = _meta_lengths(input, lengths)
    return impl.lstm_layer(input, weight_ih, weight_hh, bias, hx, cx, lengths)


def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One GRU layer (shapes in ops.gru_layer) on the chosen backend."""
    impl, is_ref = _impl(backend, "gru_layer", "input", input)
    if is_ref:
        _require_tensors("gru_layer", weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                         bias_hh=bias_hh, hx=hx, lengths=lengths)
        _check_layer_args("gru_layer", 3, input, weight_ih, weight_hh,
                          {"bias_ih": bias_ih, "bias_hh": bias_hh}, hx, None, lengths)
        lengths = _meta_lengths(input, lengths)
    return impl.gru_layer(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths)


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh", backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer (shapes in ops.rnn_layer) on the chosen backend."""
    impl, is_ref = _impl(backend, "rnn_layer", "input", input)
    if is_ref:
        _fail("rnn_layer", nonlinearity in ("tanh", "relu"),
              f"nonlinearity must be 'tanh' or 'relu', got '{nonlinearity}'")
        _require_tensors("rnn_layer", weight_ih=weight_ih, weight_hh=weight_hh, bias=bias, hx=hx,
                         lengths=lengths)
        _check_layer_args("rnn_layer", 1, input, weight_ih, weight_hh, {"bias": bias}, hx, None, lengths)
        lengths = _meta_lengths(input, lengths)
    return impl.rnn_layer(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity)


def additive_attention(
    query: Tensor, key: Tensor, w_v: Tensor, value: Tensor, valid_lens: Tensor | None = None,
    mask: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Masked additive attention (shapes in ops.additive_attention) on the chosen backend.
    Returns (context [B, Q, Dv], weights [B, Q, K])."""
    impl, is_ref = _impl(backend, "additive_attention", "query", query)
    if is_ref:
        _require_tensors("additive_attention", key=key, w_v=w_v, value=value, valid_lens=valid_lens,
                         mask=mask)
        _check_additive_args(query, key, w_v, value, valid_lens, mask)
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
        _require_tensors("scaled_dot_product_attention", key=key, value=value, attn_mask=attn_mask,
                         valid_lens=valid_lens)
        _check_sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p)
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)  # as the compiled op converts it
    return impl.scaled_dot_product_attention(query, key, value, attn_mask, valid_lens, is_causal,
                                             scale, dropout_p, seed)
