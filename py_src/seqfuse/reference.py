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
