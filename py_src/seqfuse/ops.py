"""Typed wrappers over the compiled ops (torch.ops.seqfuse.*), their fake
implementations and their autograd formulas. Nothing else in seqfuse calls
torch.ops.seqfuse directly.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (imported for its op registrations)

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # surfaced by build_hint() whenever "native" is asked for
    _IMPORT_ERROR = exc

_OPS = ("lstm_layer", "gru_layer", "rnn_layer", "additive_attention",
        "scaled_dot_product_attention")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _kernel_table() -> frozenset:
    if _IMPORT_ERROR is not None:
        return frozenset()
    return frozenset(
        (op, dev)
        for op in _OPS
        for dev, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfuse::{op}", key)
    )


# Computed once: (op, device type) pairs with a compiled kernel.
NATIVE_KERNELS = _kernel_table()


def has_native_kernel(op_name: str, device_type: str) -> bool:
    return (op_name, device_type) in NATIVE_KERNELS


def build_hint(device_type: str) -> str:
    if _IMPORT_ERROR is not None:
        return (f"The compiled extension seqfuse._C failed to import ({_IMPORT_ERROR}); "
                "build it with `make install` or `python setup.py develop`.")
    if device_type == "cuda":
        return "This build has no CUDA kernels: rebuild on a machine with nvcc and a CUDA torch (SEQFUSE_CUDA=1)."
    return f"No kernels are compiled for device type '{device_type}'."


# ---------------------------------------------------------------------------------
# LSTM layer
# ---------------------------------------------------------------------------------

def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one or both directions, on the compiled kernel.

    input: [T, B, I]; weight_ih: [D, 4H, I]; weight_hh: [D, 4H, H] (gate order i, f, g, o);
    bias: [D, 4H] (b_ih + b_hh) or None; hx, cx: [D, B, H];
    lengths: [B] int64 on CPU with 1 <= lengths[b] <= T, or None for all T.
    Returns output [T, B, D*H] (zero past each length), h_n and c_n [D, B, H]
    (at each sequence's last valid step; the reverse direction starts there).
    """
    keep = _needs_backward(input, weight_ih, weight_hh, bias, hx, cx)
    output, h_n, c_n, _, _ = torch.ops.seqfuse.lstm_layer.default(
        input, weight_ih, weight_hh, bias, hx, cx, lengths, keep)
    return output, h_n, c_n


def _needs_backward(*tensors: Tensor | None) -> bool:
    # Activations are only kept when a backward can follow: inference then skips writing
    # them (and the LSTM kernel folds the input projection into its recurrent tiles).
    # (getattr: a non-tensor argument then reaches the op, whose error names it.)
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


# ---------------------------------------------------------------------------------
# GRU layer
# ---------------------------------------------------------------------------------

def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer (PyTorch's formula), one or both directions, on the compiled kernel.

    input: [T, B, I]; weight_ih: [D, 3H, I]; weight_hh: [D, 3H, H] (gate order r, z, n);
    bias_ih, bias_hh: [D, 3H] or None; hx: [D, B, H];
    lengths: [B] int64 on CPU with 1 <= lengths[b] <= T, or None for all T.
    Returns output [T, B, D*H] (zero past each length) and h_n [D, B, H].
    """
    keep = _needs_backward(input, weight_ih, weight_hh, bias_ih, bias_hh, hx)
    output, h_n, _ = torch.ops.seqfuse.gru_layer.default(
        input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths, keep)
    return output, h_n


# ---------------------------------------------------------------------------------
# Elman RNN layer
# ---------------------------------------------------------------------------------

NONLINEARITIES = ("tanh", "relu")


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer, h' = act(x W_ih^T + h W_hh^T + b), one or both directions, on
    the compiled kernel.

    input: [T, B, I]; weight_ih: [D, H, I]; weight_hh: [D, H, H]; bias: [D, H] (b_ih + b_hh)
    or None; hx: [D, B, H]; lengths: [B] int64 on CPU with 1 <= lengths[b] <= T, or None;
    nonlinearity: "tanh" or "relu".
    Returns output [T, B, D*H] (zero past each length) and h_n [D, B, H].
    """
    return torch.ops.seqfuse.rnn_layer.default(input, weight_ih, weight_hh, bias, hx, lengths,
                                               nonlinearity)



# ---------------------------------------------------------------------------------
# Attention (shapes and mask conventions in csrc/attention.h)
# ---------------------------------------------------------------------------------

def additive_attention(
    query: Tensor, key: Tensor, w_v: Tensor, value: Tensor, valid_lens: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked additive (Bahdanau) attention on projected queries and keys, fused: the
    [B, Q, K, A] tanh features are never formed.

    query: [B, Q, A]; key: [B, K, A]; w_v: [A]; value: [B, K, Dv];
    valid_lens: [B] or [B, Q] int64 (row (b, q) sees keys k < valid_lens) or None;
    mask: bool broadcastable to [B, Q, K] (True = attend) or None.
    Returns context [B, Q, Dv] and weights [B, Q, K]; a row with no valid key gives zeros.
    """
    return torch.ops.seqfuse.additive_attention.default(query, key, w_v, value, valid_lens, mask)


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    valid_lens: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    dropout_p: float = 0.0, seed: int = 0,
) -> Tensor:
    """Masked scaled dot-product attention, flash-style (online softmax over key blocks).

    query: [B, H, Q, D]; key: [B, H, K, D]; value: [B, H, K, Dv];
    attn_mask: bool (True = attend) or floating (added to the scores), broadcastable to
    [B, H, Q, K], or None; valid_lens: [B] or [B, Q] int64 or None; is_causal: key k <= q;
    scale: default 1/sqrt(D); dropout_p, seed: dropout on the weights, the mask a hash of
    (seed, index) (see reference.sdpa_dropout_keep).
    Returns output [B, H, Q, Dv]; a row with no valid key gives zeros.
    """
    output, _ = torch.ops.seqfuse.scaled_dot_product_attention.default(
        query, key, value, attn_mask, valid_lens, is_causal, scale, dropout_p, seed)
    return output


def _activation_dtype(input: Tensor) -> torch.dtype:
    # Half-type layers (bfloat16; float16 on CUDA) accumulate in float32 and save their
    # activations (and SDPA its log-sum-exp) in float32.
    return torch.float32 if input.dtype in (torch.bfloat16, torch.float16) else input.dtype


if _IMPORT_ERROR is None:

    def _check_same_device(op_name, input, **tensors):
        # The dispatcher sends a call with any meta tensor to the fake: check here what
        # the device kernels check, so a meta/CPU mix fails instead of "succeeding".
        for name, t in tensors.items():
            if t is not None and t.device != input.device:
                raise RuntimeError(f"{op_name}: {name} must be on the input's device {input.device}, "
                                   f"got {t.device}")

    def _check_lengths_device(op_name, input, lengths):
        # lengths are read on the host: a CPU tensor (a meta one only alongside a meta input,
        # where nothing is computed). Without this, a meta `lengths` beside real tensors
        # sends the call here and returns uninitialised tensors.
        if lengths is not None and lengths.device.type != "cpu" and not (
                lengths.device.type == "meta" and input.device.type == "meta"):
            raise RuntimeError(f"{op_name}: lengths must be a CPU tensor, got device {lengths.device}")

    @torch.library.register_fake("seqfuse::lstm_layer")
    def _lstm_layer_fake(input, weight_ih, weight_hh, bias, hx, cx, lengths, keep_activations=True):
        _check_same_device("lstm_layer", input, weight_ih=weight_ih, weight_hh=weight_hh,
                           bias=bias, hx=hx, cx=cx)
        _check_lengths_device("lstm_layer", input, lengths)
        T, B, _ = input.shape
        D, G, _ = weight_ih.shape
        H = weight_hh.shape[2]
        act = _activation_dtype(input)
        if keep_activations:
            gates = input.new_empty(T, B, D, G, dtype=act)
            cells = input.new_empty(T, B, D, H, dtype=act)
        else:
            gates, cells = input.new_empty(0, dtype=act), input.new_empty(0, dtype=act)
        return (input.new_empty(T, B, D * H), input.new_empty(D, B, H), input.new_empty(D, B, H),
                gates, cells)

    @torch.library.register_fake("seqfuse::lstm_layer_backward")
    def _lstm_layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                                  hx, cx, lengths, output, gates, cells):
        _check_same_device("lstm_layer_backward", input, grad_output=grad_output, grad_h_n=grad_h_n,
                           grad_c_n=grad_c_n, weight_ih=weight_ih, weight_hh=weight_hh, hx=hx, cx=cx,
                           output=output, gates=gates, cells=cells)
        _check_lengths_device("lstm_layer_backward", input, lengths)
        D, G, _ = weight_ih.shape
        return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
                input.new_empty(D, G), torch.empty_like(hx), torch.empty_like(cx))

    def _lstm_setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias, hx, cx, lengths, _keep = inputs
        out, _, _, gates, cells = output
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight_ih, weight_hh, hx, cx, lengths, out, gates, cells)

    def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        input, weight_ih, weight_hh, hx, cx, lengths, out, gates, cells = ctx.saved_tensors
        # Outputs that did not reach the loss come back as None.
        grad_output = torch.zeros_like(out) if grad_output is None else grad_output
        grad_h_n = torch.zeros_like(hx) if grad_h_n is None else grad_h_n
        grad_c_n = torch.zeros_like(cx) if grad_c_n is None else grad_c_n
        gi, gw_ih, gw_hh, gb, ghx, gcx = torch.ops.seqfuse.lstm_layer_backward.default(
            grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, hx, cx, lengths,
            out, gates, cells)
        return gi, gw_ih, gw_hh, (gb if ctx.has_bias else None), ghx, gcx, None, None

    torch.library.register_autograd(
        "seqfuse::lstm_layer", _lstm_backward, setup_context=_lstm_setup_context)

    @torch.library.register_fake("seqfuse::gru_layer")
    def _gru_layer_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths,
                        keep_activations=True):
        _check_same_device("gru_layer", input, weight_ih=weight_ih, weight_hh=weight_hh,
                           bias_ih=bias_ih, bias_hh=bias_hh, hx=hx)
        _check_lengths_device("gru_layer", input, lengths)
        T, B, _ = input.shape
        D = weight_ih.shape[0]
        H = weight_hh.shape[2]
        act = _activation_dtype(input)
        gates = (input.new_empty(T, B, D, 4 * H, dtype=act) if keep_activations
                 else input.new_empty(0, dtype=act))
        return input.new_empty(T, B, D * H), input.new_empty(D, B, H), gates

    @torch.library.register_fake("seqfuse::gru_layer_backward")
    def _gru_layer_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                 output, gates):
        _check_same_device("gru_layer_backward", input, grad_output=grad_output, grad_h_n=grad_h_n,
                           weight_ih=weight_ih, weight_hh=weight_hh, hx=hx, output=output, gates=gates)
        _check_lengths_device("gru_layer_backward", input, lengths)
        D, G, _ = weight_ih.shape
        return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
                input.new_empty(D, G), input.new_empty(D, G), torch.empty_like(hx))

    def _gru_setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths, _keep = inputs
        out, _, gates = output
        ctx.has_bias = (bias_ih is not None, bias_hh is not None)
        ctx.save_for_backward(input, weight_ih, weight_hh, hx, lengths, out, gates)

    def _gru_backward(ctx, grad_output, grad_h_n, _grad_gates):
        input, weight_ih, weight_hh, hx, lengths, out, gates = ctx.saved_tensors
        grad_output = torch.zeros_like(out) if grad_output is None else grad_output
        grad_h_n = torch.zeros_like(hx) if grad_h_n is None else grad_h_n
        gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx = torch.ops.seqfuse.gru_layer_backward.default(
            grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths, out, gates)
        return (gi, gw_ih, gw_hh, gb_ih if ctx.has_bias[0] else None,
                gb_hh if ctx.has_bias[1] else None, ghx, None, None)

    torch.library.register_autograd(
        "seqfuse::gru_layer", _gru_backward, setup_context=_gru_setup_context)

    @torch.library.register_fake("seqfuse::rnn_layer")
    def _rnn_layer_fake(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity="tanh"):
        _check_same_device("rnn_layer", input, weight_ih=weight_ih, weight_hh=weight_hh,
                           bias=bias, hx=hx)
        _check_lengths_device("rnn_layer", input, lengths)
        if nonlinearity not in NONLINEARITIES:
            raise RuntimeError(f"rnn_layer: nonlinearity must be 'tanh' or 'relu', got '{nonlinearity}'")
        T, B, _ = input.shape
        D = weight_ih.shape[0]
        H = weight_hh.shape[2]
        return input.new_empty(T, B, D * H), input.new_empty(D, B, H)

    @torch.library.register_fake("seqfuse::rnn_layer_backward")
    def _rnn_layer_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                 output, nonlinearity="tanh"):
        _check_same_device("rnn_layer_backward", input, grad_output=grad_output, grad_h_n=grad_h_n,
                           weight_ih=weight_ih, weight_hh=weight_hh, hx=hx, output=output)
        _check_lengths_device("rnn_layer_backward", input, lengths)
        D, H, _ = weight_ih.shape
        return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
                input.new_empty(D, H), torch.empty_like(hx))

    def _rnn_setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity = inputs
        ctx.has_bias = bias is not None
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(input, weight_ih, weight_hh, hx, lengths, output[0])

    def _rnn_backward(ctx, grad_output, grad_h_n):
        input, weight_ih, weight_hh, hx, lengths, out = ctx.saved_tensors
        grad_output = torch.zeros_like(out) if grad_output is None else grad_output
        grad_h_n = torch.zeros_like(hx) if grad_h_n is None else grad_h_n
        gi, gw_ih, gw_hh, gb, ghx = torch.ops.seqfuse.rnn_layer_backward.default(
            grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths, out, ctx.nonlinearity)
        return gi, gw_ih, gw_hh, (gb if ctx.has_bias else None), ghx, None, None

    torch.library.register_autograd(
        "seqfuse::rnn_layer", _rnn_backward, setup_context=_rnn_setup_context)

    @torch.library.register_fake("seqfuse::additive_attention")
    def _additive_attention_fake(query, key, w_v, value, valid_lens, mask):
        _check_same_device("additive_attention", query, key=key, w_v=w_v, value=value,
                           valid_lens=valid_lens, mask=mask)
        B, Q, _ = query.shape
        K, Dv = value.shape[1], value.shape[2]
        return query.new_empty(B, Q, Dv), query.new_empty(B, Q, K)

    @torch.library.register_fake("seqfuse::additive_attention_backward")
    def _additive_attention_backward_fake(grad_context, grad_weights, query, key, w_v, value,
                                          weights):
        _check_same_device("additive_attention_backward", query, grad_context=grad_context,
                           grad_weights=grad_weights, key=key, w_v=w_v, value=value, weights=weights)
        return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(w_v),
                torch.empty_like(value))

    def _additive_setup_context(ctx, inputs, output):
        query, key, w_v, value, _valid_lens, _mask = inputs
        ctx.save_for_backward(query, key, w_v, value, output[1])

    def _additive_backward(ctx, grad_context, grad_weights):
        query, key, w_v, value, weights = ctx.saved_tensors
        if grad_context is None:
            grad_context = query.new_zeros(query.shape[0], query.shape[1], value.shape[2])
        if grad_weights is None:
            grad_weights = torch.zeros_like(weights)
        gq, gk, gw, gv = torch.ops.seqfuse.additive_attention_backward.default(
            grad_context, grad_weights, query, key, w_v, value, weights)
        return gq, gk, gw, gv, None, None

    torch.library.register_autograd(
        "seqfuse::additive_attention", _additive_backward, setup_context=_additive_setup_context)

    @torch.library.register_fake("seqfuse::scaled_dot_product_attention")
    def _sdpa_fake(query, key, value, attn_mask, valid_lens, is_causal=False, scale=None,
                   dropout_p=0.0, seed=0):
        _check_same_device("scaled_dot_product_attention", query, key=key, value=value,
                           attn_mask=attn_mask, valid_lens=valid_lens)
        B, H, Q, _ = query.shape
        return (query.new_empty(B, H, Q, value.shape[3]),
                query.new_empty(B, H, Q, dtype=_activation_dtype(query)))

    @torch.library.register_fake("seqfuse::scaled_dot_product_attention_backward")
    def _sdpa_backward_fake(grad_output, query, key, value, attn_mask, valid_lens, output,
                            logsumexp, is_causal, scale, dropout_p, seed):
        _check_same_device("scaled_dot_product_attention_backward", query, grad_output=grad_output,
                           key=key, value=value, attn_mask=attn_mask, valid_lens=valid_lens,
                           output=output, logsumexp=logsumexp)
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def _sdpa_setup_context(ctx, inputs, output):
        query, key, value, attn_mask, valid_lens, is_causal, scale, dropout_p, seed = inputs
        ctx.args = (is_causal, scale, dropout_p, seed)
        ctx.save_for_backward(query, key, value, attn_mask, valid_lens, *output)

    def _sdpa_backward(ctx, grad_output, _grad_logsumexp):
        query, key, value, attn_mask, valid_lens, out, lse = ctx.saved_tensors
        if grad_output is None:
            grad_output = torch.zeros_like(out)
        gq, gk, gv = torch.ops.seqfuse.scaled_dot_product_attention_backward.default(
            grad_output, query, key, value, attn_mask, valid_lens, out, lse, *ctx.args)
        # No gradient for a floating attn_mask: masks here are inputs, not parameters.
        return gq, gk, gv, None, None, None, None, None, None

    torch.library.register_autograd(
        "seqfuse::scaled_dot_product_attention", _sdpa_backward, setup_context=_sdpa_setup_context)

    # torch.autocast("cpu", dtype=torch.bfloat16): every floating-point argument is cast to
    # bfloat16 (the kernels accumulate in float32), as autocast does for matmul-like ops.
    for _op in _OPS:
        torch.library.register_autocast(f"seqfuse::{_op}", "cpu", torch.bfloat16)
