"""Whole models built on seqfuse's attention modules export to standard ONNX as a user
would export a trained model (eval mode, dynamic batch and sequence length, the
translations of export/onnx_ops.py), and onnxruntime gives the eager outputs at shapes
other than the traced one:

  * a Transformer text classifier (seqfuse.nn.TransformerEncoder, masked mean pooling),
    padding given as src_key_padding_mask or as valid_lens, post- and pre-norm, opset 18
    (decomposed SDPA) and 23 (one ONNX `Attention` node per layer);
  * a BiGRU + additive-attention classifier (lengths to the GRU's `lengths=`, and to
    AdditiveAttention as valid_lens);
  * seqfuse.nn.MultiheadAttention alone (cross-attention, key_padding_mask,
    need_weights=False), batch_first both ways;
  * the torch.nn.TransformerEncoder / MultiheadAttention versions after seqfuse.nn.convert,
    against the torch model's own eager outputs at valid positions.
"""
import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import requires_native
from torch import nn

import seqfuse
from seqfuse.export.onnx_ops import ATTENTION_OPSET, OPSET, translations

pytestmark = [
    requires_native,
    pytest.mark.skipif(not hasattr(torch.ops.seqfuse, "scaled_dot_product_attention"),
                       reason="seqfuse._C does not declare the attention ops (run `make install`)"),
]

ATOL = 1e-4  # fp32, whole models (observed: < 1e-6)
VOCAB, D_MODEL, NHEAD, FFN, CLASSES = 30, 24, 3, 40, 4
EXAMPLE_T, EXAMPLE_LENGTHS = 7, [7, 2, 5]  # the traced example
# (T, lengths) at run time: B = 1 and T = 1, a single short row, all rows full, all
# rows of length 1, mixed lengths with 1 and T.
CASES = [(EXAMPLE_T, EXAMPLE_LENGTHS), (1, [1]), (9, [1]), (9, [9]), (1, [1] * 5),
         (13, [13, 1, 4, 9]), (20, [3, 20, 1, 17, 8, 20])]


# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------

def _train_like(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter (LayerNorm gains, zero-initialised biases...), so that the
    weights look trained rather than freshly initialised; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _batch(T: int, lengths, seed: int = 0):
    """tokens [B, T] int64 (0 = padding past each length) and lengths [B] int64."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    tokens = torch.randint(1, VOCAB, (len(lengths), T), generator=gen)
    tokens[torch.arange(T) >= lengths.unsqueeze(1)] = 0
    return tokens, lengths


def _keep(T: int, lengths: torch.Tensor) -> torch.Tensor:
    return torch.arange(T) < lengths.unsqueeze(1)  # [B, T], True at valid positions


def _export(model, example, dynamic_shapes, input_names, opset, path):
    assert not model.training, "export the model in eval mode"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, example, dynamo=True, opset_version=opset,
            custom_translation_table=translations(opset), input_names=input_names,
            dynamic_shapes=dynamic_shapes)
    prog.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return proto, sess


def _dims(*names):
    return {n: torch.export.Dim(n, min=1, max=4096) for n in names}


def _token_export(model, opset, path):
    """Export forward(tokens [B, T], lengths [B]) with B and T dynamic."""
    d = _dims("B", "T")
    return _export(model, _batch(EXAMPLE_T, EXAMPLE_LENGTHS), ({0: d["B"], 1: d["T"]}, {0: d["B"]}),
                   ["tokens", "lengths"], opset, path)


def _run(sess, feeds: dict):
    return [torch.from_numpy(np.asarray(o))
            for o in sess.run(None, {k: v.numpy() for k, v in feeds.items()})]


def _assert_close(got, expected):
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=ATOL, rtol=0)


def _op_types(proto):
    return [n.op_type for n in proto.graph.node]


def _input_dims(proto):
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input]


def _check_graph(proto, opset, attention_nodes):
    """Standard domain only, the requested opset, and SDPA as `attention_nodes` ONNX
    Attention nodes at opset >= 23 (none below); the training-only logsumexp pruned."""
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), \
        sorted({(n.domain, n.op_type) for n in proto.graph.node})
    assert proto.opset_import[0].version == opset
    ops = _op_types(proto)
    expected = attention_nodes if opset >= ATTENTION_OPSET else 0
    assert ops.count("Attention") == expected
    if opset < ATTENTION_OPSET and attention_nodes:
        assert "Softmax" in ops
    assert "ReduceLogSumExp" not in ops


# ---------------------------------------------------------------------------------
# 1. Transformer text classifier
# ---------------------------------------------------------------------------------

class TransformerClassifier(nn.Module):
    """Embedding -> encoder -> mean over valid positions -> linear. Returns (logits [B, C],
    encoder output [B, T, D_MODEL])."""

    def __init__(self, encoder: nn.Module, mask_form: str = "key_padding_mask"):
        super().__init__()
        self.mask_form = mask_form
        self.embedding = nn.Embedding(VOCAB, D_MODEL, padding_idx=0)
        self.encoder = encoder
        self.head = nn.Linear(D_MODEL, CLASSES)

    def forward(self, tokens, lengths):
        keep = torch.arange(tokens.shape[1], device=tokens.device) < lengths.unsqueeze(1)
        x = self.embedding(tokens)
        if self.mask_form == "valid_lens":
            h = self.encoder(x, valid_lens=lengths)
        else:
            h = self.encoder(x, src_key_padding_mask=~keep)
        w = keep.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(dim=1) / lengths.unsqueeze(1).to(h.dtype)
        return self.head(pooled), h


def _seqfuse_encoder(norm_first: bool, final_norm: bool = False):
    layer = seqfuse.nn.TransformerEncoderLayer(
        d_model=D_MODEL, nhead=NHEAD, dim_feedforward=FFN, batch_first=True, dropout=0.1,
        norm_first=norm_first)
    return seqfuse.nn.TransformerEncoder(layer, num_layers=2,
                                         norm=nn.LayerNorm(D_MODEL) if final_norm else None)


def _torch_encoder(norm_first: bool, final_norm: bool = False):
    layer = nn.TransformerEncoderLayer(
        d_model=D_MODEL, nhead=NHEAD, dim_feedforward=FFN, batch_first=True, dropout=0.1,
        norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor with norm_first
        return nn.TransformerEncoder(layer, num_layers=2,
                                     norm=nn.LayerNorm(D_MODEL) if final_norm else None)


# mask form x opset x norm_first, as an orthogonal array: every pair of settings of any
# two factors occurs once (the full product costs twice the export time).
TRANSFORMER_VARIANTS = [("key_padding_mask", OPSET, False), ("key_padding_mask", ATTENTION_OPSET, True),
                        ("valid_lens", OPSET, True), ("valid_lens", ATTENTION_OPSET, False)]


@pytest.fixture(scope="module", params=TRANSFORMER_VARIANTS,
                ids=lambda p: f"{p[0]}-opset{p[1]}-{'pre' if p[2] else 'post'}norm")
def transformer(request, tmp_path_factory):
    mask_form, opset, norm_first = request.param
    torch.manual_seed(0)
    model = _train_like(TransformerClassifier(_seqfuse_encoder(norm_first), mask_form), seed=1)
    proto, sess = _token_export(model, opset, tmp_path_factory.mktemp("transformer") / "m.onnx")
    return model, opset, proto, sess


def test_transformer_graph(transformer):
    _, opset, proto, _ = transformer
    _check_graph(proto, opset, attention_nodes=2)  # one per layer
    assert _input_dims(proto) == [["B", "T"], ["B"]]
    assert len(proto.graph.output) == 2  # logits and the encoder output


@pytest.mark.parametrize("T,lengths", CASES)
def test_transformer_onnxruntime_matches_eager(transformer, T, lengths):
    model, _, _, sess = transformer
    tokens, lengths = _batch(T, lengths, seed=T * 31 + len(lengths))
    with torch.no_grad():
        logits, h = model(tokens, lengths)
    got_logits, got_h = _run(sess, {"tokens": tokens, "lengths": lengths})
    _assert_close(got_logits, logits)
    _assert_close(got_h, h)  # padded positions too: both compute the same thing there


# The torch model, converted: same weights, and the torch model's own eager outputs.
@pytest.fixture(scope="module", params=[(OPSET, False), (ATTENTION_OPSET, True)],
                ids=lambda p: f"opset{p[0]}-{'prenorm+final-norm' if p[1] else 'postnorm'}")
def converted_transformer(request, tmp_path_factory):
    opset, norm_first = request.param
    torch.manual_seed(0)
    torch_model = _train_like(
        TransformerClassifier(_torch_encoder(norm_first, final_norm=norm_first)), seed=2)
    model = seqfuse.nn.convert(copy.deepcopy(torch_model)).eval()
    assert type(model.encoder) is seqfuse.nn.TransformerEncoder
    assert all(type(m) is seqfuse.nn.TransformerEncoderLayer for m in model.encoder.layers)
    proto, sess = _token_export(model, opset, tmp_path_factory.mktemp("converted") / "m.onnx")
    return torch_model, model, opset, proto, sess


def test_converted_transformer_graph(converted_transformer):
    _, _, opset, proto, _ = converted_transformer
    _check_graph(proto, opset, attention_nodes=2)
    assert _input_dims(proto) == [["B", "T"], ["B"]]


@pytest.mark.parametrize("T,lengths", CASES)
def test_converted_transformer_matches_torch(converted_transformer, T, lengths):
    torch_model, model, _, _, sess = converted_transformer
    tokens, lengths = _batch(T, lengths, seed=T * 17 + len(lengths))
    keep = _keep(T, lengths)
    with torch.no_grad():  # torch's inference fast path (nested tensors when post-norm)
        logits, h = torch_model(tokens, lengths)
        ours_logits, ours_h = model(tokens, lengths)
    got_logits, got_h = _run(sess, {"tokens": tokens, "lengths": lengths})
    _assert_close(ours_logits, logits)
    _assert_close(got_logits, logits)
    _assert_close(got_h[keep], h[keep])  # torch zeroes padded positions on its fast path
    _assert_close(got_h, ours_h)


# ---------------------------------------------------------------------------------
# 2. BiGRU + additive attention classifier
# ---------------------------------------------------------------------------------

class BiGRUAttentionClassifier(nn.Module):
    """Embedding -> BiGRU (lengths=) -> a learned query attends over the GRU outputs
    (AdditiveAttention, valid_lens = lengths) -> linear. Returns (logits [B, C], attention
    weights [B, 1, T])."""

    def __init__(self, emb=10, hidden=12, query_size=16, num_hiddens=9):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, emb, padding_idx=0)
        self.gru = seqfuse.nn.GRU(emb, hidden, bidirectional=True, batch_first=True)
        self.query = nn.Parameter(torch.randn(query_size))
        self.attention = seqfuse.nn.AdditiveAttention(
            key_size=2 * hidden, query_size=query_size, num_hiddens=num_hiddens, dropout=0.1)
        self.head = nn.Linear(2 * hidden, CLASSES)

    def forward(self, tokens, lengths):
        out, _ = self.gru(self.embedding(tokens), lengths=lengths)  # [B, T, 2H]
        query = self.query.expand(tokens.shape[0], 1, -1)  # [B, 1, query_size]
        context = self.attention(query, out, out, lengths)  # [B, 1, 2H]
        return self.head(context.squeeze(1)), self.attention.attention_weights


@pytest.fixture(scope="module", params=[OPSET, ATTENTION_OPSET], ids=lambda o: f"opset{o}")
def bigru(request, tmp_path_factory):
    opset = request.param
    torch.manual_seed(0)
    model = _train_like(BiGRUAttentionClassifier(), seed=3)
    proto, sess = _token_export(model, opset, tmp_path_factory.mktemp("bigru") / "m.onnx")
    return model, opset, proto, sess


def test_bigru_graph(bigru):
    _, opset, proto, _ = bigru
    _check_graph(proto, opset, attention_nodes=0)
    assert _input_dims(proto) == [["B", "T"], ["B"]]
    grus = [n for n in proto.graph.node if n.op_type == "GRU"]
    assert len(grus) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in grus[0].attribute}
    assert attrs["direction"] == b"bidirectional" and attrs["linear_before_reset"] == 1
    assert grus[0].input[4], "sequence_lens must be wired"
    assert {"Tanh", "Softmax"} <= set(_op_types(proto))  # the additive attention


@pytest.mark.parametrize("T,lengths", CASES)
def test_bigru_onnxruntime_matches_eager(bigru, T, lengths):
    model, _, _, sess = bigru
    tokens, lengths = _batch(T, lengths, seed=T * 13 + len(lengths))
    with torch.no_grad():
        logits, weights = model(tokens, lengths)
    got_logits, got_weights = _run(sess, {"tokens": tokens, "lengths": lengths})
    _assert_close(got_logits, logits)
    _assert_close(got_weights, weights)
    assert (got_weights[~_keep(T, lengths).unsqueeze(1)] == 0).all()
    np.testing.assert_allclose(got_weights.sum(-1).numpy(), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------
# 3. MultiheadAttention alone
# ---------------------------------------------------------------------------------

E_MHA, H_MHA = 12, 3


class CrossAttention(nn.Module):
    """mha(query, key, value, key_padding_mask, need_weights=False); a float mask is made
    from the bool one inside the model (-inf where True), as float-mask users do."""

    def __init__(self, mha: nn.Module, float_mask: bool = False):
        super().__init__()
        self.mha = mha
        self.float_mask = float_mask

    def forward(self, query, key, value, key_padding_mask):
        if self.float_mask:
            key_padding_mask = torch.zeros(key_padding_mask.shape, dtype=query.dtype).masked_fill(
                key_padding_mask, float("-inf"))
        out, weights = self.mha(query, key, value, key_padding_mask=key_padding_mask,
                                need_weights=False)
        assert weights is None
        return out


def _mha_inputs(batch_first, N, L, S, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn((N, L, E_MHA) if batch_first else (L, N, E_MHA), generator=gen)
    k = torch.randn((N, S, E_MHA) if batch_first else (S, N, E_MHA), generator=gen)
    v = torch.randn((N, S, E_MHA) if batch_first else (S, N, E_MHA), generator=gen)
    kpm = torch.rand(N, S, generator=gen) < 0.4
    kpm[-1] = False  # a row that keeps every key
    if N > 1:
        kpm[0] = True  # a row that keeps none: seqfuse gives zeros (torch: NaN)
    return q, k, v, kpm


def _mha_export(model, batch_first, opset, path):
    d = _dims("N", "L", "S")
    tb = (0, 1) if batch_first else (1, 0)  # (batch axis, time axis)
    shapes = ({tb[0]: d["N"], tb[1]: d["L"]}, {tb[0]: d["N"], tb[1]: d["S"]},
              {tb[0]: d["N"], tb[1]: d["S"]}, {0: d["N"], 1: d["S"]})
    return _export(model, _mha_inputs(batch_first, 3, 5, 6, seed=0), shapes,
                   ["query", "key", "value", "key_padding_mask"], opset, path)


MHA_SHAPES = [(3, 5, 6), (1, 1, 1), (2, 4, 9), (4, 7, 2), (5, 1, 11)]  # (N, L, S)
# batch_first x opset, float masks on the diagonal
MHA_VARIANTS = [(True, ATTENTION_OPSET, False), (False, OPSET, False),
                (False, ATTENTION_OPSET, True), (True, OPSET, True)]


@pytest.fixture(scope="module", params=MHA_VARIANTS,
                ids=lambda p: f"batch_first={p[0]}-opset{p[1]}-{'float' if p[2] else 'bool'}")
def mha(request, tmp_path_factory):
    batch_first, opset, float_mask = request.param
    torch.manual_seed(0)
    model = _train_like(CrossAttention(
        seqfuse.nn.MultiheadAttention(E_MHA, H_MHA, dropout=0.1, batch_first=batch_first),
        float_mask), seed=4)
    proto, sess = _mha_export(model, batch_first, opset, tmp_path_factory.mktemp("mha") / "m.onnx")
    return model, batch_first, opset, proto, sess


def test_mha_graph(mha):
    _, batch_first, opset, proto, _ = mha
    _check_graph(proto, opset, attention_nodes=1)
    q_dims = ["N", "L", E_MHA] if batch_first else ["L", "N", E_MHA]
    assert _input_dims(proto)[0] == q_dims and _input_dims(proto)[3] == ["N", "S"]


@pytest.mark.parametrize("N,L,S", MHA_SHAPES)
def test_mha_onnxruntime_matches_eager(mha, N, L, S):
    model, batch_first, _, _, sess = mha
    q, k, v, kpm = _mha_inputs(batch_first, N, L, S, seed=N * 100 + L * 10 + S)
    with torch.no_grad():
        expected = model(q, k, v, kpm)
    (got,) = _run(sess, {"query": q, "key": k, "value": v, "key_padding_mask": kpm})
    _assert_close(got, expected)


@pytest.fixture(scope="module")
def converted_mha(tmp_path_factory):
    torch.manual_seed(0)
    torch_model = _train_like(CrossAttention(
        nn.MultiheadAttention(E_MHA, H_MHA, dropout=0.1, batch_first=False)), seed=5)
    model = seqfuse.nn.convert(copy.deepcopy(torch_model)).eval()
    assert type(model.mha) is seqfuse.nn.MultiheadAttention
    proto, sess = _mha_export(model, False, ATTENTION_OPSET,
                              tmp_path_factory.mktemp("converted_mha") / "m.onnx")
    return torch_model, proto, sess


@pytest.mark.parametrize("N,L,S", MHA_SHAPES)
def test_converted_mha_matches_torch(converted_mha, N, L, S):
    torch_model, proto, sess = converted_mha
    _check_graph(proto, ATTENTION_OPSET, attention_nodes=1)
    q, k, v, kpm = _mha_inputs(False, N, L, S, seed=N * 100 + L * 10 + S + 1)
    with torch.no_grad():
        expected = torch_model(q, k, v, kpm)  # [L, N, E]
    (got,) = _run(sess, {"query": q, "key": k, "value": v, "key_padding_mask": kpm})
    rows = ~kpm.all(dim=1)  # batch rows with a key left (torch gives NaN for the others)
    _assert_close(got[:, rows], expected[:, rows])


# ---------------------------------------------------------------------------------
# Export in training mode
# ---------------------------------------------------------------------------------

def test_export_in_training_mode_says_to_use_eval(tmp_path):
    model = CrossAttention(seqfuse.nn.MultiheadAttention(E_MHA, H_MHA, dropout=0.1,
                                                         batch_first=True)).train()
    with pytest.raises(Exception, match="dropout_p must be 0 in an exported"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, _mha_inputs(True, 2, 3, 4, seed=0), dynamo=True,
                              opset_version=ATTENTION_OPSET,
                              custom_translation_table=translations(ATTENTION_OPSET))
