"""seqfuse.ops.additive_attention / scaled_dot_product_attention export to standard ONNX
(SDPA as one `Attention` node from opset 23, MatMul/Softmax below), with dynamic batch and
lengths, and onnxruntime matches seqfuse.reference at shapes other than the traced one,
fully masked rows included (zeros, not NaN)."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import seqfuse
from seqfuse import reference
from seqfuse.export.onnx_ops import ATTENTION_OPSET, OPSET, translations

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.seqfuse, "scaled_dot_product_attention"),
    reason="seqfuse._C does not declare the attention ops (run `make install`)")

ATOL = 1e-5  # fp32 outputs
A, H, D, DV = 5, 2, 7, 3  # static feature sizes (odd on purpose)
# (B, Q, K) at run time; the traced example is (3, 5, 6). Q > K and Q < K check the
# top-left alignment of is_causal.
SHAPES = [(3, 5, 6), (1, 1, 1), (2, 1, 9), (4, 6, 1), (5, 13, 11), (2, 9, 4), (2, 4, 9)]


def _lens(B, K, Q=None, gen=None):
    """valid_lens [B] (or [B, Q]) in 0..K, with a 0 and a full length whenever B > 1."""
    shape = (B,) if Q is None else (B, Q)
    lens = torch.randint(0, K + 1, shape, generator=gen)
    if B > 1:
        lens[0] = 0
        lens[-1] = K
    return lens


def _bool_mask(shape, gen):
    m = torch.rand(shape, generator=gen) < 0.6
    m.view(-1, shape[-1])[0] = False  # one fully masked row
    return m


def _float_mask(shape, gen):
    m = torch.randn(shape, generator=gen)
    m[torch.rand(shape, generator=gen) < 0.3] = float("-inf")
    m.view(-1, shape[-1])[0] = float("-inf")  # one fully masked row
    return m


# ---------------------------------------------------------------------------------
# Modules: each variant takes exactly the inputs it uses (no None inputs in a graph).
# ---------------------------------------------------------------------------------

class Additive(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.w_v = torch.nn.Parameter(torch.randn(A))

    def forward(self, query, key, value, *extra):
        valid_lens = extra[0] if self.kind in ("lens", "lens2d", "lens+mask") else None
        mask = extra[-1] if self.kind in ("mask", "lens+mask") else None
        return seqfuse.ops.additive_attention(query, key, self.w_v, value, valid_lens, mask)


def additive_inputs(kind, B, Q, K, gen):
    q, k, v = torch.randn(B, Q, A, generator=gen), torch.randn(B, K, A, generator=gen), \
        torch.randn(B, K, DV, generator=gen)
    extra = {"none": (), "lens": (_lens(B, K, gen=gen),), "lens2d": (_lens(B, K, Q, gen),),
             "mask": (_bool_mask((B, Q, K), gen),),
             "lens+mask": (_lens(B, K, gen=gen), _bool_mask((B, Q, K), gen))}[kind]
    return (q, k, v, *extra)


# name -> (sdpa keyword arguments, extra inputs maker)
SDPA_KINDS = {
    "none": ({}, lambda B, Q, K, g: ()),
    "lens": ({}, lambda B, Q, K, g: (_lens(B, K, gen=g),)),
    "lens2d": ({}, lambda B, Q, K, g: (_lens(B, K, Q, g),)),
    "bool-mask": ({}, lambda B, Q, K, g: (_bool_mask((B, 1, Q, K), g),)),
    # key padding [B, 1, 1, K]: the shape onnxruntime's Attention rejects as given
    "bool-key-pad": ({}, lambda B, Q, K, g: (_bool_mask((B, 1, 1, K), g),)),
    "float-mask": ({}, lambda B, Q, K, g: (_float_mask((B, H, Q, K), g),)),
    "causal": ({"is_causal": True}, lambda B, Q, K, g: ()),
    "causal+lens": ({"is_causal": True}, lambda B, Q, K, g: (_lens(B, K, gen=g),)),
    "scale+float-mask+lens": ({"scale": 0.3}, lambda B, Q, K, g: (_float_mask((B, 1, Q, K), g),
                                                                 _lens(B, K, gen=g))),
}


class SDPA(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.kwargs = SDPA_KINDS[kind][0]

    def forward(self, query, key, value, *extra):
        attn_mask = extra[0] if "mask" in self.kind or "pad" in self.kind else None
        valid_lens = extra[-1] if "lens" in self.kind else None
        return seqfuse.ops.scaled_dot_product_attention(
            query, key, value, attn_mask, valid_lens, **self.kwargs)

    def reference(self, query, key, value, *extra):
        attn_mask = extra[0] if "mask" in self.kind or "pad" in self.kind else None
        valid_lens = extra[-1] if "lens" in self.kind else None
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, valid_lens, **self.kwargs)


def sdpa_inputs(kind, B, Q, K, gen):
    q, k = torch.randn(B, H, Q, D, generator=gen), torch.randn(B, H, K, D, generator=gen)
    v = torch.randn(B, H, K, DV, generator=gen)
    return (q, k, v, *SDPA_KINDS[kind][1](B, Q, K, gen))


# ---------------------------------------------------------------------------------
# Export and run
# ---------------------------------------------------------------------------------

def _dynamic_shapes(layout):
    """layout: per input, {axis: dim name B, Q or K}; forward(query, key, value, *extra)
    wants the extras' shapes as one nested tuple."""
    dims = {n: torch.export.Dim(n, min=1, max=4096) for n in ("B", "Q", "K")}
    shapes = [{ax: dims[name] for ax, name in axes.items()} for axes in layout]
    return (*shapes[:3], tuple(shapes[3:])) if len(shapes) > 3 else tuple(shapes)


def _export(model, inputs, layout, opset, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model.eval(), inputs, dynamo=True, opset_version=opset,
            custom_translation_table=translations(opset),
            input_names=[f"in{i}" for i in range(len(inputs))],
            dynamic_shapes=_dynamic_shapes(layout))
    prog.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return proto, sess


def _run(sess, inputs):
    return [torch.from_numpy(np.asarray(o))
            for o in sess.run(None, {f"in{i}": t.numpy() for i, t in enumerate(inputs)})]


def _assert_close(got, expected):
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=ATOL, rtol=0)


def _assert_standard(proto):
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), \
        sorted({(n.domain, n.op_type) for n in proto.graph.node})


ADDITIVE_LAYOUT = [{0: "B", 1: "Q"}, {0: "B", 1: "K"}, {0: "B", 1: "K"}]


@pytest.fixture(scope="module", params=["none", "lens", "lens2d", "mask", "lens+mask"])
def additive(request, tmp_path_factory):
    kind = request.param
    torch.manual_seed(0)
    model = Additive(kind)
    gen = torch.Generator().manual_seed(1)
    example = additive_inputs(kind, 3, 5, 6, gen)
    layout = ADDITIVE_LAYOUT + {
        "none": [], "lens": [{0: "B"}], "lens2d": [{0: "B", 1: "Q"}],
        "mask": [{0: "B", 1: "Q", 2: "K"}],
        "lens+mask": [{0: "B"}, {0: "B", 1: "Q", 2: "K"}]}[kind]
    path = tmp_path_factory.mktemp("additive") / "model.onnx"
    proto, sess = _export(model, example, layout, OPSET, path)
    return kind, model, proto, sess


def test_additive_graph_is_standard(additive):
    _, _, proto, _ = additive
    _assert_standard(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Tanh", "MatMul", "Softmax"} <= ops
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input]
    assert dims[0] == ["B", "Q", A] and dims[1] == ["B", "K", A]


@pytest.mark.parametrize("B,Q,K", SHAPES)
def test_additive_onnxruntime_matches_reference(additive, B, Q, K):
    kind, model, _, sess = additive
    gen = torch.Generator().manual_seed(B * 100 + Q * 10 + K)
    inputs = additive_inputs(kind, B, Q, K, gen)
    q, k, v, *extra = inputs
    valid_lens = extra[0] if kind in ("lens", "lens2d", "lens+mask") else None
    mask = extra[-1] if kind in ("mask", "lens+mask") else None
    with torch.no_grad():
        context, weights = reference.additive_attention(q, k, model.w_v, v, valid_lens, mask)
    got_context, got_weights = _run(sess, inputs)
    _assert_close(got_context, context)
    _assert_close(got_weights, weights)
    if valid_lens is not None and B > 1:  # row 0 has length 0
        assert (got_context[0] == 0).all() and (got_weights[0] == 0).all()


SDPA_LAYOUT = [{0: "B", 2: "Q"}, {0: "B", 2: "K"}, {0: "B", 2: "K"}]
SDPA_EXTRA_LAYOUT = {
    "none": [], "lens": [{0: "B"}], "lens2d": [{0: "B", 1: "Q"}],
    "bool-mask": [{0: "B", 2: "Q", 3: "K"}], "bool-key-pad": [{0: "B", 3: "K"}],
    "float-mask": [{0: "B", 2: "Q", 3: "K"}], "causal": [], "causal+lens": [{0: "B"}],
    "scale+float-mask+lens": [{0: "B", 2: "Q", 3: "K"}, {0: "B"}],
}


@pytest.fixture(scope="module",
                params=[(k, o) for o in (OPSET, ATTENTION_OPSET) for k in SDPA_KINDS],
                ids=lambda p: f"{p[0]}-opset{p[1]}")
def sdpa(request, tmp_path_factory):
    kind, opset = request.param
    model = SDPA(kind)
    gen = torch.Generator().manual_seed(2)
    example = sdpa_inputs(kind, 3, 5, 6, gen)
    path = tmp_path_factory.mktemp("sdpa") / "model.onnx"
    proto, sess = _export(model, example, SDPA_LAYOUT + SDPA_EXTRA_LAYOUT[kind], opset, path)
    return kind, opset, model, proto, sess


def test_sdpa_graph(sdpa):
    kind, opset, model, proto, _ = sdpa
    _assert_standard(proto)
    assert proto.opset_import[0].version == opset
    nodes = [n for n in proto.graph.node if n.op_type == "Attention"]
    if opset < ATTENTION_OPSET:
        assert not nodes
        assert "Softmax" in {n.op_type for n in proto.graph.node}
        return
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    if "scale" in model.kwargs:
        assert attrs["scale"] == pytest.approx(model.kwargs["scale"])
    else:
        assert "scale" not in attrs
    # A causal mask alone is the attribute; with another mask it is folded into it.
    assert attrs.get("is_causal", 0) == int(kind == "causal")
    has_mask = len(nodes[0].input) > 3 and nodes[0].input[3]
    assert bool(has_mask) == (kind not in ("none", "causal"))
    # Only the output: the training-only logsumexp must not survive in the graph.
    assert len(proto.graph.output) == 1
    assert "ReduceLogSumExp" not in {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("B,Q,K", SHAPES)
def test_sdpa_onnxruntime_matches_reference(sdpa, B, Q, K):
    kind, _, model, _, sess = sdpa
    gen = torch.Generator().manual_seed(B * 100 + Q * 10 + K)
    inputs = sdpa_inputs(kind, B, Q, K, gen)
    with torch.no_grad():
        expected = model.reference(*inputs)
    (got,) = _run(sess, inputs)
    _assert_close(got, expected)
    if "lens" in kind and B > 1:  # row 0 has length 0
        assert (got[0] == 0).all()


def test_translations_depend_on_opset():
    sdpa_op = torch.ops.seqfuse.scaled_dot_product_attention.default
    low, high = translations(OPSET), translations(ATTENTION_OPSET)
    assert low[sdpa_op] is not high[sdpa_op]
    assert set(low) == set(high)
    assert translations(22)[sdpa_op] is low[sdpa_op]
    assert translations(24)[sdpa_op] is high[sdpa_op]


def test_sdpa_dropout_is_rejected_at_export(tmp_path):
    class Dropout(torch.nn.Module):
        def forward(self, q, k, v):
            return seqfuse.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    inputs = sdpa_inputs("none", 2, 3, 4, torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match="dropout_p must be 0 in an exported"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Dropout(), inputs, dynamo=True, opset_version=OPSET,
                              custom_translation_table=translations(OPSET))
