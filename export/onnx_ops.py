"""ONNX translations of seqfuse's custom ops, in standard ONNX ops only, so that stock
onnxruntime (or any ONNX runtime) serves the exported model without seqfuse.

Passed to torch.onnx.export as `custom_translation_table` (see TRANSLATIONS).
"""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

import seqfuse  # noqa: F401  (registers torch.ops.seqfuse)

OPSET = 18


def _reorder_ifgo_to_iofc(w, H: int):
    """PyTorch stacks LSTM gates as i, f, g, o along axis 1; ONNX wants i, o, f, c.
    Single-output Slices (not Split), so that constant folding bakes the reordered
    weights into the file instead of reordering them at every inference."""
    def gate(k):
        return op.Slice(w, op.Constant(value_ints=[k * H]), op.Constant(value_ints=[(k + 1) * H]),
                        op.Constant(value_ints=[1]))
    return op.Concat(gate(0), gate(3), gate(1), gate(2), axis=1)


def lstm_layer(input, weight_ih, weight_hh, bias, hx, cx, lengths, keep_activations: bool = True):
    """seqfuse::lstm_layer -> one ONNX LSTM node (direction forward or bidirectional).

    input [T, B, I] -> X; weight_ih [D, 4H, I] -> W; weight_hh [D, 4H, H] -> R;
    bias [D, 4H] -> B = [bias, 0] ([D, 8H]); lengths [B] int64 -> sequence_lens int32.
    ONNX's Y is [T, D, B, H]; seqfuse's output is [T, B, D*H]. keep_activations only
    says whether a backward may follow: it does not change the served outputs.
    """
    D = weight_ih.shape[0]
    H = weight_hh.shape[2]
    W = _reorder_ifgo_to_iofc(weight_ih, H)
    R = _reorder_ifgo_to_iofc(weight_hh, H)
    if bias is not None:
        b = _reorder_ifgo_to_iofc(bias, H)
        B = op.Concat(b, op.Sub(b, b), axis=1)
    else:
        B = None
    seq_lens = op.Cast(lengths, to=6) if lengths is not None else None  # INT32
    Y, Y_h, Y_c = op.LSTM(
        input, W, R, B, seq_lens, hx, cx,
        direction="bidirectional" if D == 2 else "forward", hidden_size=H)
    # [T, D, B, H] -> [T, B, D, H] -> [T, B, D*H]
    Yt = op.Transpose(Y, perm=[0, 2, 1, 3])
    out = op.Reshape(Yt, op.Concat(op.Shape(Yt, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))
    # gates/cells are training-only outputs; inference graphs never read them, and they
    # are pruned. Something of the right rank keeps the graph well-formed.
    return out, Y_h, Y_c, op.Unsqueeze(Yt, op.Constant(value_ints=[3])), Yt


def _reorder_rzn_to_zrn(w, H: int):
    """PyTorch stacks GRU gates as r, z, n along axis 1; ONNX wants z, r, h."""
    def gate(k):
        return op.Slice(w, op.Constant(value_ints=[k * H]), op.Constant(value_ints=[(k + 1) * H]),
                        op.Constant(value_ints=[1]))
    return op.Concat(gate(1), gate(0), gate(2), axis=1)


def gru_layer(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths,
              keep_activations: bool = True):
    """seqfuse::gru_layer -> one ONNX GRU node with linear_before_reset=1, which is
    PyTorch's formula (the reset gate multiplies W_hn h + b_hn).

    weight_ih [D, 3H, I] -> W; weight_hh [D, 3H, H] -> R; B = [b_ih, b_hh] ([D, 6H]), each
    reordered r, z, n -> z, r, h; lengths -> sequence_lens int32.
    """
    D = weight_ih.shape[0]
    H = weight_hh.shape[2]
    W = _reorder_rzn_to_zrn(weight_ih, H)
    R = _reorder_rzn_to_zrn(weight_hh, H)
    if bias_ih is not None or bias_hh is not None:
        b_ih = _reorder_rzn_to_zrn(bias_ih, H) if bias_ih is not None else None
        b_hh = _reorder_rzn_to_zrn(bias_hh, H) if bias_hh is not None else None
        if b_ih is None:
            b_ih = op.Sub(b_hh, b_hh)
        if b_hh is None:
            b_hh = op.Sub(b_ih, b_ih)
        B = op.Concat(b_ih, b_hh, axis=1)
    else:
        B = None
    seq_lens = op.Cast(lengths, to=6) if lengths is not None else None  # INT32
    Y, Y_h = op.GRU(
        input, W, R, B, seq_lens, hx,
        direction="bidirectional" if D == 2 else "forward", hidden_size=H, linear_before_reset=1)
    Yt = op.Transpose(Y, perm=[0, 2, 1, 3])
    out = op.Reshape(Yt, op.Concat(op.Shape(Yt, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))
    # gates is a training-only output, pruned from inference graphs.
    return out, Y_h, op.Unsqueeze(Yt, op.Constant(value_ints=[3]))


def rnn_layer(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity: str = "tanh"):
    """seqfuse::rnn_layer -> one ONNX RNN node with activations Tanh or Relu.

    weight_ih [D, H, I] -> W; weight_hh [D, H, H] -> R; bias [D, H] -> B = [bias, 0]
    ([D, 2H]); lengths -> sequence_lens int32.
    """
    D = weight_ih.shape[0]
    H = weight_hh.shape[2]
    B = op.Concat(bias, op.Sub(bias, bias), axis=1) if bias is not None else None
    seq_lens = op.Cast(lengths, to=6) if lengths is not None else None  # INT32
    act = {"tanh": "Tanh", "relu": "Relu"}[nonlinearity]
    Y, Y_h = op.RNN(
        input, weight_ih, weight_hh, B, seq_lens, hx, activations=[act] * D,
        direction="bidirectional" if D == 2 else "forward", hidden_size=H)
    Yt = op.Transpose(Y, perm=[0, 2, 1, 3])
    out = op.Reshape(Yt, op.Concat(op.Shape(Yt, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))
    return out, Y_h


TRANSLATIONS = {
    torch.ops.seqfuse.lstm_layer.default: lstm_layer,
    torch.ops.seqfuse.gru_layer.default: gru_layer,
    torch.ops.seqfuse.rnn_layer.default: rnn_layer,
}
