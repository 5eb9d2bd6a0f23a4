"""The "reference" backend: seqfuse's op semantics on PyTorch's own kernels.

This is eager PyTorch (what torch.nn.LSTM runs, packing included), so it is both the
oracle of the tests and the "eager" baseline of the benchmarks. Same arguments and
results as the compiled ops in ops.py.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def _lstm_params(weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None) -> list[Tensor]:
    """Flat per-direction list in torch.nn.LSTM's (and RNN's) order: w_ih, w_hh[, b_ih, b_hh],
    with the summed bias as b_ih and zeros as b_hh."""
    params = []
    for d in range(weight_ih.shape[0]):
        params += [weight_ih[d], weight_hh[d]]
        if bias is not None:
            params += [bias[d], torch.zeros_like(bias[d])]
    return params


def _unpack_run(vf, input: Tensor, state, params: list[Tensor], has_bias: bool,
                bidirectional: bool, lengths: Tensor | None):
    """Runs one torch._VF recurrent layer (lstm, gru, rnn_tanh, rnn_relu) over a padded
    input, through packing when lengths are given. state: one [D, B, H] tensor or a tuple
    of them. Returns (output [T, B, D*H], final state(s) in the caller's batch order)."""
    tup = isinstance(state, tuple)
    if lengths is None:
        output, *final = vf(input, state, params, has_bias, 1, 0.0, False, bidirectional, False)
        return output, final
    packed = pack_padded_sequence(input, lengths.cpu(), enforce_sorted=False)
    order = packed.sorted_indices
    st = tuple(s.index_select(1, order) for s in state) if tup else state.index_select(1, order)
    data, *final = vf(packed.data, packed.batch_sizes, st, params, has_bias, 1, 0.0, False,
                      bidirectional)
    output, _ = pad_packed_sequence(
        PackedSequence(data, packed.batch_sizes, order, packed.unsorted_indices),
        total_length=input.shape[0])
    return output, [f.index_select(1, packed.unsorted_indices) for f in final]


def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for ops.lstm_layer: input [T, B, I], weight_ih [D, 4H, I], weight_hh
    [D, 4H, H], bias [D, 4H] | None, hx/cx [D, B, H], lengths [B] int64 | None.
    Returns output [T, B, D*H], h_n [D, B, H], c_n [D, B, H]."""
    params = _lstm_params(weight_ih, weight_hh, bias)
    output, (h_n, c_n) = _unpack_run(torch._VF.lstm, input, (hx, cx), params, bias is not None,
                                     weight_ih.shape[0] == 2, lengths)
    return output, h_n, c_n


def lstm_proj_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, weight_hr: Tensor,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for ops.lstm_proj_layer (torch.nn.LSTM's proj_size): weight_hh [D, 4H, P],
    weight_hr [D, P, H], hx [D, B, P], cx [D, B, H]; the rest as lstm_layer. Returns
    output [T, B, D*P], h_n [D, B, P], c_n [D, B, H]."""
    per = 4 if bias is not None else 2
    flat = _lstm_params(weight_ih, weight_hh, bias)
    params = []  # torch's order per direction: w_ih, w_hh[, b_ih, b_hh], w_hr
    for d in range(weight_ih.shape[0]):
        params += flat[d * per:(d + 1) * per] + [weight_hr[d]]
    output, (h_n, c_n) = _unpack_run(torch._VF.lstm, input, (hx, cx), params, bias is not None,
                                     weight_ih.shape[0] == 2, lengths)
    return output, h_n, c_n


def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference for ops.gru_layer: input [T, B, I], weight_ih [D, 3H, I], weight_hh
    [D, 3H, H], bias_ih/bias_hh [D, 3H] | None, hx [D, B, H], lengths [B] int64 | None.
    Returns output [T, B, D*H], h_n [D, B, H]."""
    D = weight_ih.shape[0]
    has_bias = bias_ih is not None or bias_hh is not None
    params = []
    for d in range(D):
        params += [weight_ih[d], weight_hh[d]]
        if has_bias:
            params += [bias_ih[d] if bias_ih is not None else torch.zeros_like(weight_ih[d, :, 0]),
                       bias_hh[d] if bias_hh is not None else torch.zeros_like(weight_hh[d, :, 0])]
    output, (h_n,) = _unpack_run(torch._VF.gru, input, hx, params, has_bias, D == 2, lengths)
    return output, h_n


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """Reference for ops.rnn_layer: input [T, B, I], weight_ih [D, H, I], weight_hh
    [D, H, H], bias [D, H] (b_ih + b_hh) | None, hx [D, B, H], lengths [B] int64 | None.
    Returns output [T, B, D*H], h_n [D, B, H]."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    vf = torch._VF.rnn_tanh if nonlinearity == "tanh" else torch._VF.rnn_relu
    params = _lstm_params(weight_ih, weight_hh, bias)
    output, (h_n,) = _unpack_run(vf, input, hx, params, bias is not None,
                                 weight_ih.shape[0] == 2, lengths)
    return output, h_n


# ---------------------------------------------------------------------------------
# Attention: the classic unfused compositions (masks as in csrc/attention.h)
# ---------------------------------------------------------------------------------

def _lens_mask(valid_lens: Tensor, Q: int, K: int) -> Tensor:
    """valid_lens [B] or [B, Q] -> bool [B, 1 or Q, K] (broadcastable to [B, Q, K]), True
    where k < valid_lens."""
    lens = valid_lens.reshape(valid_lens.shape[0], -1, 1)  # [B, 1 or Q, 1]
    return torch.arange(K, device=valid_lens.device) < lens


def _masked_softmax(scores: Tensor, keep: Tensor | None) -> Tensor:
    """Softmax over the last axis where `keep`; zeros (and zero gradients, no NaN) for a
    row with nothing kept. scores: [..., K]; keep: bool broadcastable to scores, or None."""
    if keep is None:
        return torch.softmax(scores, dim=-1)
    keep = keep.expand_as(scores)
    row_any = keep.any(dim=-1, keepdim=True)
    # Masked entries get -inf, except in empty rows, which get 0 so that the softmax stays
    # finite; multiplying by `keep` then zeroes them with a zero gradient.
    filled = scores.masked_fill(~keep & row_any, float("-inf")).masked_fill(~row_any, 0.0)
    return torch.softmax(filled, dim=-1) * keep


def additive_attention(
    query: Tensor, key: Tensor, w_v: Tensor, value: Tensor, valid_lens: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference for ops.additive_attention, the way the classic module computes it: the
    [B, Q, K, A] tanh features, then scores, a masked softmax and a batched matmul.
    query [B, Q, A], key [B, K, A], w_v [A], value [B, K, Dv]; returns context [B, Q, Dv],
    weights [B, Q, K]."""
    features = torch.tanh(query.unsqueeze(2) + key.unsqueeze(1))  # [B, Q, K, A]
    scores = features @ w_v                                       # [B, Q, K]
    keep = None
    if valid_lens is not None:
        keep = _lens_mask(valid_lens, query.shape[1], key.shape[1])
    if mask is not None:
        keep = mask if keep is None else keep & mask
    weights = _masked_softmax(scores, keep)
    return weights @ value, weights


def _fmix32(x: Tensor) -> Tensor:
    # murmur3's finaliser on int64 tensors holding 32-bit values (products wrap; the low
    # 32 bits are exact).
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & m
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def sdpa_dropout_keep(seed: int, shape: tuple[int, int, int, int], dropout_p: float,
                      device=None) -> Tensor:
    """The keep mask [B, H, Q, K] (bool) of the fused SDPA's dropout: the same hash of
    (seed, flat index) as csrc/attention.h's sdpa_dropout_keep."""
    n = shape[0] * shape[1] * shape[2] * shape[3]
    index = torch.arange(n, dtype=torch.int64, device=device)
    s = _fmix32(torch.tensor((seed & 0xFFFFFFFF) ^ 0x9E3779B9, dtype=torch.int64, device=device))
    h = _fmix32((index & 0xFFFFFFFF) ^ _fmix32((index >> 32) ^ s))
    threshold = int(dropout_p * 16777216.0 + 0.5)
    return ((h >> 8) >= threshold).reshape(shape)


def sdpa_weights(
    query: Tensor, key: Tensor, attn_mask: Tensor | None = None, valid_lens: Tensor | None = None,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """The attention weights [B, H, Q, K] of ops.scaled_dot_product_attention (before
    dropout), unfused: query [B, H, Q, D], key [B, H, K, D], masks as in the op."""
    Q, D = query.shape[-2:]
    K = key.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale  # [B, H, Q, K]
    keep = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
        else:
            scores = scores + attn_mask  # a learned bias gets its gradient (the fused ops refuse one)
            keep = attn_mask > float("-inf")
    if valid_lens is not None:
        lens = _lens_mask(valid_lens, Q, K).unsqueeze(1)  # [B, 1, 1 or Q, K]
        keep = lens if keep is None else keep & lens
    if is_causal:
        causal = torch.ones(Q, K, dtype=torch.bool, device=query.device).tril()
        keep = causal if keep is None else keep & causal
    return _masked_softmax(scores, keep)


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    valid_lens: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    dropout_p: float = 0.0, seed: int = 0,
) -> Tensor:
    """Reference for ops.scaled_dot_product_attention, the classic unfused form: bmm,
    masked softmax, bmm. query [B, H, Q, D], key [B, H, K, D], value [B, H, K, Dv];
    returns output [B, H, Q, Dv]."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    weights = sdpa_weights(query, key, attn_mask, valid_lens, is_causal, scale)
    if dropout_p > 0:
        kept = sdpa_dropout_keep(seed, tuple(weights.shape), dropout_p, query.device)
        weights = weights * kept / (1.0 - dropout_p)
    return weights @ value


# ---------------------------------------------------------------------------------
# int8 dynamic quantisation (ops.quantized_rnn_layer): the kernel's arithmetic in torch ops.
# ---------------------------------------------------------------------------------

def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation of each row (last dim) of a float32 tensor, as the int8
    kernels quantise activations: scale = max|row| / 127 (1 for an all-zero row),
    q = round-half-even(x * (1 / scale)) clamped to [-127, 127]. Returns q (float32, holding
    integers) and the scales [..., 1]."""
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(x * (1.0 / scale), -127.0, 127.0).round()
    return q, scale


def quantized_rnn_layer(mode: str, input: Tensor, weight_ih: Tensor, scale_ih: Tensor,
                        weight_hh: Tensor, scale_hh: Tensor, bias_ih: Tensor | None,
                        bias_hh: Tensor | None, hx: Tensor, cx: Tensor | None,
                        lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for ops.quantized_rnn_layer (csrc/quantized.h): every product of int8
    activations and weights summed exactly (in float64), then scaled in float32, and the
    cell in float32. Returns output [T, B, D*H], h_n [D, B, H], c_n [D, B, H] ([0] for the GRU)."""
    T, B, _ = input.shape
    D, G, H = weight_hh.shape
    lstm = mode == "lstm"
    x = input.float()
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = lengths.cpu()
    xq, xs = quantize_rows(x)                                                # [T, B, I], [T, B, 1]
    out = x.new_zeros(T, B, D * H)
    h_n, c_n = hx.float().clone(), (cx.float().clone() if lstm else x.new_zeros(0))
    for d in range(D):
        wi, wh = weight_ih[d].double(), weight_hh[d].double()               # [G, I], [G, H]
        pre_x = (xq.double() @ wi.t()).float() * xs * scale_ih[d]
        if bias_ih is not None:
            pre_x = pre_x + bias_ih[d]
        h, c = hx[d].float().clone(), (cx[d].float().clone() if lstm else None)
        for s in range(int(lengths.max())):
            run = lengths > s                                                # rows still running
            t = torch.where(torch.full_like(lengths, d) == 0, torch.full_like(lengths, s), lengths - 1 - s)
            rows = run.nonzero().flatten()
            ts = t[rows]
            hq, hs = quantize_rows(h[rows])
            pre_h = (hq.double() @ wh.t()).float() * hs * scale_hh[d]
            if bias_hh is not None:
                pre_h = pre_h + bias_hh[d]
            px = pre_x[ts, rows]
            if lstm:
                i, f, g, o = (px + pre_h).chunk(4, -1)
                c_new = torch.sigmoid(f) * c[rows] + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
                c[rows] = c_new
            else:
                xr, xz, xn = px.chunk(3, -1)
                hr, hz, hn = pre_h.chunk(3, -1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h_new = (1 - z) * n + z * h[rows]
            h[rows] = h_new
            out[ts, rows, d * H:(d + 1) * H] = h_new
        h_n[d] = h
        if lstm:
            c_n[d] = c
    return out, h_n, c_n
