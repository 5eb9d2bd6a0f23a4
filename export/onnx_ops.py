"""ONNX translations of seqfuse's custom ops, in standard ONNX ops only, so that stock
onnxruntime (or any ONNX runtime) serves the exported model without seqfuse.

Passed to torch.onnx.export as `custom_translation_table`: `translations(opset)` for
the opset being exported (TRANSLATIONS is the table for the default OPSET).

Nodes are built with opset 18's definitions; an exporter at a higher opset stamps the
model with its own version, which is fine because none of the ops used here changed
meaning since 18. Only `Attention` (opset 23) is newer, so the SDPA translation is the
one entry that depends on the opset.
"""
from __future__ import annotations

import math

import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript import opset23
from torch.onnx._internal.exporter._torchlib.ops.hop import call_op

import seqfuse  # noqa: F401  (registers torch.ops.seqfuse)

OPSET = 18
ATTENTION_OPSET = 23  # first opset with the fused `Attention` op

_FLOAT, _INT64, _BOOL = 1, 7, 9  # ONNX TensorProto data types


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


class _Subgraph:
    """Nodes of an ONNX subgraph (a Scan body) built by hand: the translation functions'
    `op.*` calls record into the outer graph, a body must not. Outer-scope values (the
    weights) are used by reference, as ONNX allows. Names carry a per-graph prefix: ONNX
    wants every name unique across a graph and its subgraphs."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inputs, self._n = prefix, [], [], 0

    def input(self, name: str, dtype, shape: list):
        v = ir.Value(name=f"{self.prefix}_{name}", type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(v)
        return v

    def op(self, op_type: str, *inputs, _outputs: int = 1, **attributes):
        self._n += 1
        node = ir.Node("", op_type, inputs=list(inputs), num_outputs=_outputs,
                       attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()],
                       name=f"{self.prefix}_n{self._n}", version=OPSET)
        for i, out in enumerate(node.outputs):
            out.name = f"{self.prefix}_{op_type.lower()}{self._n}_{i}"
        self.nodes.append(node)
        return node.outputs[0] if _outputs == 1 else node.outputs

    def graph(self, outputs: list) -> ir.Graph:
        return ir.Graph(self.inputs, outputs, nodes=self.nodes, name=self.prefix)


_scan_bodies = iter(range(1 << 62))  # unique name prefixes


def _lstm_proj_direction(xg, valid, h0, c0, R_t, W_hr_t, H: int, P: int, reverse: bool, dtype):
    """One direction of an LSTM with a projection as an ONNX Scan over time.
    xg [T, B, 4H]: input projection plus bias; valid [T, B, 1] bool (False past a row's
    length) or None; h0 [B, P]; c0 [B, H]; R_t = W_hh^T [P, 4H]; W_hr_t = W_hr^T [H, P].
    A row's state is held where it is not valid: the forward direction keeps its state past
    its length, and the reverse direction, scanning from T-1, starts at its last valid step,
    as the fused kernel does. Returns (y [T, B, P], zero where not valid; h_n; c_n)."""
    body = _Subgraph(f"seqfuse_lstm_proj{next(_scan_bodies)}")
    h, c = body.input("h", dtype, [None, P]), body.input("c", dtype, [None, H])
    x = body.input("xg", dtype, [None, 4 * H])
    keep = body.input("valid", ir.DataType.BOOL, [None, 1]) if valid is not None else None
    gates = body.op("Add", x, body.op("MatMul", h, R_t))
    gi, gf, gg, go = body.op("Split", gates, _outputs=4, num_outputs=4, axis=1)
    c_new = body.op("Add", body.op("Mul", body.op("Sigmoid", gf), c),
                    body.op("Mul", body.op("Sigmoid", gi), body.op("Tanh", gg)))
    m = body.op("Mul", body.op("Sigmoid", go), body.op("Tanh", c_new))
    h_new = body.op("MatMul", m, W_hr_t)
    if keep is not None:
        zero = body.op("CastLike", body.op("Constant", value_float=0.0), h_new)
        y = body.op("Where", keep, h_new, zero)
        h_new = body.op("Where", keep, h_new, h)
        c_new = body.op("Where", keep, c_new, c)
    else:
        y = body.op("Identity", h_new)
    scanned = [xg] + ([valid] if valid is not None else [])
    direction = 1 if reverse else 0
    # onnxscript's op.Scan declares one output; torch's own Scan translation (of
    # torch.ops.higher_order.scan) records a node of any number through call_op.
    h_n, c_n, out = call_op("Scan", h0, c0, *scanned, _num_outputs=3,
                            body=body.graph([h_new, c_new, y]), num_scan_inputs=len(scanned),
                            scan_input_directions=[direction] * len(scanned),
                            scan_output_directions=[direction])
    return out, h_n, c_n


def lstm_proj_layer(input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths,
                    keep_activations: bool = True):
    """seqfuse::lstm_proj_layer (torch.nn.LSTM's proj_size) -> one ONNX Scan per direction:
    ONNX's LSTM has no projection. input [T, B, I]; weight_ih [D, 4H, I]; weight_hh
    [D, 4H, P]; bias [D, 4H]; weight_hr [D, P, H]; hx [D, B, P]; cx [D, B, H]; lengths [B].
    The input projection of every step is one MatMul before the Scan, as in the kernel."""
    D, P, H = weight_hr.shape
    valid = None
    if lengths is not None:  # [T, B, 1]: step t < lengths[b]
        steps = op.Range(_int_scalar(0), _dim(input, 0), _int_scalar(1))
        valid = op.Unsqueeze(op.Less(op.Unsqueeze(steps, op.Constant(value_ints=[1])),
                                     op.Unsqueeze(lengths, op.Constant(value_ints=[0]))),
                             op.Constant(value_ints=[2]))
    outs, hs, cs = [], [], []
    for d in range(D):
        pick = op.Constant(value_ints=[d])
        w_ih = op.Squeeze(op.Gather(weight_ih, pick, axis=0), op.Constant(value_ints=[0]))
        xg = op.MatMul(input, op.Transpose(w_ih, perm=[1, 0]))
        if bias is not None:
            xg = op.Add(xg, op.Squeeze(op.Gather(bias, pick, axis=0), op.Constant(value_ints=[0])))
        R_t = op.Transpose(op.Squeeze(op.Gather(weight_hh, pick, axis=0), op.Constant(value_ints=[0])), perm=[1, 0])
        W_hr_t = op.Transpose(op.Squeeze(op.Gather(weight_hr, pick, axis=0), op.Constant(value_ints=[0])), perm=[1, 0])
        h0 = op.Squeeze(op.Gather(hx, pick, axis=0), op.Constant(value_ints=[0]))
        c0 = op.Squeeze(op.Gather(cx, pick, axis=0), op.Constant(value_ints=[0]))
        out, h_n, c_n = _lstm_proj_direction(xg, valid, h0, c0, R_t, W_hr_t, H, P, d == 1, input.dtype)
        outs.append(out)
        hs.append(op.Unsqueeze(h_n, op.Constant(value_ints=[0])))
        cs.append(op.Unsqueeze(c_n, op.Constant(value_ints=[0])))
    out = op.Concat(*outs, axis=2) if D == 2 else outs[0]
    h_n = op.Concat(*hs, axis=0) if D == 2 else hs[0]
    c_n = op.Concat(*cs, axis=0) if D == 2 else cs[0]
    # gates/cells: training-only outputs, pruned from inference graphs (as lstm_layer's).
    # Values of their own: the exporter stamps each output with its traced shape ([0]).
    return out, h_n, c_n, op.Unsqueeze(out, op.Constant(value_ints=[3])), op.Identity(out)


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


# ---------------------------------------------------------------------------------
# Attention (shapes and mask conventions in csrc/attention.h)
# ---------------------------------------------------------------------------------

def _scalar_like(value: float, like):
    return op.CastLike(op.Constant(value_float=value), like)


def _int_scalar(value: int):
    return op.Constant(value_int=value)  # int64, rank 0


def _dim(x, axis: int):
    """x.shape[axis] as an int64 scalar (rank 0, as Range wants)."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1))


def _lens_keep(valid_lens, key_len):
    """valid_lens [B] or [B, Q] -> bool [B, 1 or Q, K], True where k < valid_lens."""
    lens = op.Reshape(op.Cast(valid_lens, to=_INT64), op.Constant(value_ints=[0, -1, 1]))
    return op.Less(op.Range(_int_scalar(0), key_len, _int_scalar(1)), lens)


def _is_bool(x) -> bool:
    return x.dtype == ir.DataType.BOOL


def _is_float_mask(attn_mask) -> bool:
    return attn_mask is not None and not _is_bool(attn_mask)


def _and(a, b):
    return b if a is None else a if b is None else op.And(a, b)


def _row_any(keep):
    """keep [..., K] bool -> [..., 1] bool: does the row keep any key? (ReduceMax takes
    bool only from opset 20, hence the float round trip.)"""
    return op.Cast(op.ReduceMax(op.Cast(keep, to=_FLOAT), op.Constant(value_ints=[-1]), keepdims=1),
                   to=_BOOL)


def _masked_softmax(scores, keep):
    """Softmax over the last axis where `keep` (bool, broadcastable to scores [..., K]).
    Returns (weights, filled scores, row_any): a row that keeps nothing gets all-zero
    scores (so that no NaN is ever formed) and then zero weights, like
    seqfuse.reference._masked_softmax."""
    if keep is None:
        return op.Softmax(scores, axis=-1), scores, None
    row_any = _row_any(keep)
    filled = op.Where(keep, scores, _scalar_like(-math.inf, scores))
    filled = op.Where(row_any, filled, _scalar_like(0.0, scores))
    weights = op.Where(keep, op.Softmax(filled, axis=-1), _scalar_like(0.0, scores))
    return weights, filled, row_any


def additive_attention(query, key, w_v, value, valid_lens=None, mask=None):
    """seqfuse::additive_attention -> Add/Tanh/MatMul scores, a masked Softmax, MatMul.

    query [B, Q, A], key [B, K, A], w_v [A], value [B, K, Dv]; valid_lens [B] or [B, Q]
    int64 -> Less(Range(K), valid_lens); mask bool broadcastable to [B, Q, K].
    Returns context [B, Q, Dv], weights [B, Q, K] (zero rows where no key is kept). The
    [B, Q, K, A] tanh features the fused kernel avoids are formed here: ONNX has no op
    for the pairwise form.
    """
    features = op.Tanh(op.Add(op.Unsqueeze(query, op.Constant(value_ints=[2])),
                              op.Unsqueeze(key, op.Constant(value_ints=[1]))))
    scores = op.MatMul(features, w_v)  # [B, Q, K]
    keep = mask
    if valid_lens is not None:
        keep = _and(_lens_keep(valid_lens, _dim(key, 1)), keep)
    weights, _, _ = _masked_softmax(scores, keep)
    return op.MatMul(weights, value), weights


def _sdpa_keep(query, key, attn_mask, valid_lens, is_causal: bool):
    """Every boolean condition on (b, h, q, k), combined, as bool [B, 1 or H, Q, K]; None
    when nothing can mask a key. A floating attn_mask masks where it is -inf."""
    keep = None
    if attn_mask is not None:
        keep = (attn_mask if _is_bool(attn_mask)
                else op.Greater(attn_mask, _scalar_like(-math.inf, attn_mask)))
    if valid_lens is not None:
        lens = op.Unsqueeze(_lens_keep(valid_lens, _dim(key, 2)), op.Constant(value_ints=[1]))
        keep = _and(keep, lens)
    if is_causal:
        q_idx = op.Unsqueeze(op.Range(_int_scalar(0), _dim(query, 2), _int_scalar(1)),
                             op.Constant(value_ints=[1]))
        k_idx = op.Range(_int_scalar(0), _dim(key, 2), _int_scalar(1))
        keep = _and(keep, op.LessOrEqual(k_idx, q_idx))  # [Q, K], top-left aligned
    if keep is None:
        return None
    # [B, 1, Q, K], or [B, H, Q, K] when a mask has heads (Expand broadcasts both ways):
    # onnxruntime's Attention rejects a mask with a broadcast query axis ([B, 1, 1, K]).
    shape = op.Concat(op.Shape(query, start=0, end=1), op.Constant(value_ints=[1]),
                      op.Shape(query, start=2, end=3), op.Shape(key, start=2, end=3), axis=0)
    return op.Expand(keep, shape)


def _check_sdpa(query, key, value, dropout_p: float):
    if dropout_p != 0.0:
        raise ValueError(
            f"seqfuse::scaled_dot_product_attention: dropout_p must be 0 in an exported "
            f"(inference) graph, got {dropout_p}; export the model in eval mode")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.shape is not None and len(x.shape) != 4:
            raise ValueError(f"seqfuse::scaled_dot_product_attention: {name} must be 4-D "
                             f"[B, H, L, D], got shape {x.shape}")


def _sdpa_scores(query, key, attn_mask, scale):
    """Scaled scores [B, H, Q, K] (plus a floating attn_mask)."""
    if scale is None:
        scale = op.Div(_scalar_like(1.0, query),
                       op.Sqrt(op.CastLike(op.Shape(query, start=3, end=4), query)))
    else:
        scale = _scalar_like(float(scale), query)
    scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])), scale)
    if _is_float_mask(attn_mask):
        scores = op.Add(scores, op.CastLike(attn_mask, scores))
    return scores


def _sdpa_logsumexp(filled, row_any):
    """Log-sum-exp over keys of the masked scaled scores [B, H, Q]; +inf where the row
    keeps no key (as the kernel). A training-only output: inference graphs prune it."""
    lse = op.ReduceLogSumExp(filled, op.Constant(value_ints=[-1]), keepdims=0)
    if row_any is None:
        return lse
    return op.Where(op.Squeeze(row_any, op.Constant(value_ints=[-1])), lse,
                    _scalar_like(math.inf, lse))


def sdpa_decomposed(query, key, value, attn_mask=None, valid_lens=None, is_causal: bool = False,
                    scale=None, dropout_p: float = 0.0, seed: int = 0):
    """seqfuse::scaled_dot_product_attention at opset < 23 -> MatMul, a masked Softmax,
    MatMul (the form of seqfuse.reference).

    query [B, H, Q, D], key [B, H, K, D], value [B, H, K, Dv]; attn_mask bool (True =
    attend) or floating (added), broadcastable to [B, H, Q, K]; valid_lens [B] or [B, Q].
    Returns output [B, H, Q, Dv] (zeros where no key is kept) and logsumexp [B, H, Q].
    """
    _check_sdpa(query, key, value, dropout_p)
    scores = _sdpa_scores(query, key, attn_mask, scale)
    keep = _sdpa_keep(query, key, attn_mask, valid_lens, is_causal)
    weights, filled, row_any = _masked_softmax(scores, keep)
    return op.MatMul(weights, value), _sdpa_logsumexp(filled, row_any)


def _sdpa_logsumexp_recomputed(query, key, attn_mask, valid_lens, is_causal, scale):
    # The Attention op does not expose its log-sum-exp; recompute it from the scores.
    # Unused (always, in inference graphs), these nodes are removed by the optimizer.
    scores = _sdpa_scores(query, key, attn_mask, scale)
    _, filled, row_any = _masked_softmax(
        scores, _sdpa_keep(query, key, attn_mask, valid_lens, is_causal))
    return _sdpa_logsumexp(filled, row_any)


def sdpa_attention(query, key, value, attn_mask=None, valid_lens=None, is_causal: bool = False,
                   scale=None, dropout_p: float = 0.0, seed: int = 0):
    """seqfuse::scaled_dot_product_attention at opset >= 23 -> one ONNX `Attention` node.

    Same shapes as sdpa_decomposed. A causal mask alone is the is_causal attribute;
    combined with another mask it is folded into that mask (the ONNX spec allows only
    one of the two). The mask handed to Attention is [B, 1 or H, Q, K]; a row that keeps
    no key gets an all-attend row there (no NaN inside the op) and its output is then
    replaced by zeros.
    """
    _check_sdpa(query, key, value, dropout_p)
    scale_attr = None if scale is None else float(scale)
    logsumexp = _sdpa_logsumexp_recomputed(query, key, attn_mask, valid_lens, is_causal, scale)
    if attn_mask is None and valid_lens is None:
        # No key mask: causal rows always keep key 0, so no row can be empty.
        out, _, _, _ = opset23.Attention(query, key, value, is_causal=int(is_causal),
                                         scale=scale_attr)
        return out, logsumexp
    keep = _sdpa_keep(query, key, attn_mask, valid_lens, is_causal)
    row_any = _row_any(keep)  # [B, 1 or H, Q, 1]
    if _is_float_mask(attn_mask):
        bias = op.CastLike(attn_mask, query)
        bias = op.Where(keep, bias, _scalar_like(-math.inf, query))
        mask = op.Where(row_any, bias, _scalar_like(0.0, query))
    else:
        mask = op.Or(keep, op.Not(row_any))
    out, _, _, _ = opset23.Attention(query, key, value, mask, scale=scale_attr)
    return op.Where(row_any, out, _scalar_like(0.0, out)), logsumexp


def translations(opset: int = OPSET) -> dict:
    """The custom_translation_table for torch.onnx.export(..., opset_version=opset)."""
    return {
        torch.ops.seqfuse.lstm_layer.default: lstm_layer,
        torch.ops.seqfuse.lstm_proj_layer.default: lstm_proj_layer,
        torch.ops.seqfuse.gru_layer.default: gru_layer,
        torch.ops.seqfuse.rnn_layer.default: rnn_layer,
        torch.ops.seqfuse.additive_attention.default: additive_attention,
        torch.ops.seqfuse.scaled_dot_product_attention.default:
            sdpa_attention if opset >= ATTENTION_OPSET else sdpa_decomposed,
    }


TRANSLATIONS = translations(OPSET)
