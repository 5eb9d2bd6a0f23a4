"""seqfuse.nn attention modules against eager references holding the same weights:
MultiheadAttention / TransformerEncoderLayer / TransformerEncoder against torch.nn's, and
AdditiveAttention / DotProductAttention against the classic unfused d2l modules. Outputs,
attention weights and the gradients of every input and parameter, over every mask form,
odd sizes, layouts, dropout, bfloat16, state_dict round trips, convert() and bad
arguments; each on the reference backend and (when built) the native kernels."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from torch import nn

import seqfuse
from seqfuse.nn import (
    LSTM,
    AdditiveAttention,
    DotProductAttention,
    MultiheadAttention,
    TransformerEncoder,
    TransformerEncoderLayer,
    convert,
)

# torch's own warnings about its masks and its nested-tensor fast path
pytestmark = pytest.mark.filterwarnings(
    "ignore:Support for mismatched", "ignore:The PyTorch API of nested tensors",
    "ignore:enable_nested_tensor is True")


def _backends(op):
    native = pytest.mark.skipif(
        not seqfuse.ops.has_native_kernel(op, "cpu"),
        reason=f"seqfuse._C was not built with a CPU {op} kernel (run `make install`)")
    return [pytest.param("reference"), pytest.param("native", marks=native)]


SDPA_BACKENDS = _backends("scaled_dot_product_attention")
ADDITIVE_BACKENDS = _backends("additive_attention")
F32 = TOL[torch.float32]


@pytest.fixture(params=SDPA_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=ADDITIVE_BACKENDS)
def add_backend(request):
    return request.param


def close(a, b, msg=None, atol=F32["out_atol"]):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=msg)


def grads_close(got, want, names):
    for g, w, name in zip(got, want, names, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, rtol=F32["grad_rtol"], atol=F32["grad_atol"], msg=name)


def randomize(module, scale=0.3):
    """Non-zero biases (torch initialises them to zero, which would hide bias mistakes)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name and "norm" not in name:
                p.normal_(0, scale)


def loss_of(outputs):
    """A fixed, different weighting of every element of every output."""
    total = 0
    for i, o in enumerate(outputs):
        if o is not None:
            w = torch.linspace(-1, 1 + i, o.numel(), dtype=torch.float32).view(o.shape)
            total = total + (o.float() * w).sum()
    return total


def all_grads(outputs, leaves, module):
    names, params = zip(*module.named_parameters(), strict=True)
    g = torch.autograd.grad(loss_of(outputs), list(leaves) + list(params), allow_unused=True)
    return list(g), [f"input {i}" for i in range(len(leaves))] + list(names)


# ---------------------------------------------------------------------------------
# MultiheadAttention
# ---------------------------------------------------------------------------------

E, HEADS, N, L, S = 24, 3, 2, 5, 7  # head_dim 8, odd number of heads


def mha_pair(backend, *args, **kw):
    ref = nn.MultiheadAttention(*args, **kw)
    randomize(ref)
    m = MultiheadAttention(*args, **kw, backend=backend)
    m.load_state_dict(ref.state_dict(), strict=True)
    return ref, m


def check_mha(ref, m, inputs, leaves, **kw):
    """Output, weights and all gradients of `m` against torch's `ref`."""
    out_r = ref(*inputs, **kw)
    out = m(*inputs, **kw)
    assert out[0].shape == out_r[0].shape
    close(out[0], out_r[0], "output")
    if kw.get("need_weights", True):
        assert out[1].shape == out_r[1].shape
        close(out[1], out_r[1], "weights")
    else:
        assert out[1] is None and out_r[1] is None
    g, names = all_grads(out, leaves, m)
    g_r, _ = all_grads(out_r, leaves, ref)
    grads_close(g, g_r, names)


def kpm_mask(kind, n=N, s=S):
    """A key padding mask with key 0 always kept (torch gives NaN for a row with none)."""
    pad = torch.rand(n, s) < 0.4
    pad[:, 0] = False
    if kind == "bool":
        return pad
    return torch.zeros(n, s).masked_fill(pad, float("-inf")) + 0.1 * torch.randn(n, s)


def attn_mask(kind, dims, n=N, q=L, s=S, heads=HEADS):
    shape = (q, s) if dims == 2 else (n * heads, q, s)
    banned = torch.rand(shape) < 0.4
    banned[..., 0] = False
    if kind == "bool":
        return banned
    return torch.zeros(shape).masked_fill(banned, float("-inf")) + 0.5 * torch.randn(shape)


MASK_CASES = {
    "none": lambda: {},
    "kpm-bool": lambda: {"key_padding_mask": kpm_mask("bool")},
    "kpm-float": lambda: {"key_padding_mask": kpm_mask("float")},
    "attn2d-bool": lambda: {"attn_mask": attn_mask("bool", 2)},
    "attn2d-float": lambda: {"attn_mask": attn_mask("float", 2)},
    "attn3d-bool": lambda: {"attn_mask": attn_mask("bool", 3)},
    "attn3d-float": lambda: {"attn_mask": attn_mask("float", 3)},
    "both-bool": lambda: {"attn_mask": attn_mask("bool", 3), "key_padding_mask": kpm_mask("bool")},
    "both-mixed": lambda: {"attn_mask": attn_mask("bool", 2), "key_padding_mask": kpm_mask("float")},
}


@pytest.mark.parametrize("masks", list(MASK_CASES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_cross_attention_every_mask_form(backend, masks, batch_first):
    ref, m = mha_pair(backend, E, HEADS, batch_first=batch_first)
    shape = (lambda t: (N, t, E)) if batch_first else (lambda t: (t, N, E))
    q, k, v = (torch.randn(shape(t), requires_grad=True) for t in (L, S, S))
    kw = MASK_CASES[masks]()
    weights_form = {"need_weights": True} if masks != "kpm-bool" else {"need_weights": False}
    if masks == "attn3d-float":
        weights_form["average_attn_weights"] = False
    check_mha(ref, m, (q, k, v), (q, k, v), **kw, **weights_form)


@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_self_attention_is_causal(backend, with_kpm, need_weights):
    ref, m = mha_pair(backend, E, HEADS)
    x = torch.randn(S, N, E, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    kw = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights}
    if with_kpm:
        kw["key_padding_mask"] = kpm_mask("float")
    check_mha(ref, m, (x, x, x), (x,), **kw)
    # the hint is trusted: the mask is not read (torch's SDPA path does the same)
    out, _ = m(x, x, x, attn_mask=torch.zeros(S, S), is_causal=True, need_weights=False)
    close(out, m(x, x, x, attn_mask=causal, need_weights=False)[0])


@pytest.mark.parametrize("config", [
    dict(kdim=10, vdim=13),                     # separate q/k/v projection weights
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=10, vdim=13),
])
def test_mha_constructor_options(backend, config):
    ref, m = mha_pair(backend, E, HEADS, **config)
    assert list(m.state_dict()) == list(ref.state_dict())
    kd, vd = config.get("kdim", E), config.get("vdim", E)
    q = torch.randn(L, N, E, requires_grad=True)
    k = torch.randn(S, N, kd, requires_grad=True)
    v = torch.randn(S, N, vd, requires_grad=True)
    kw = {"key_padding_mask": kpm_mask("bool"), "attn_mask": attn_mask("float", 2),
          "average_attn_weights": False}
    check_mha(ref, m, (q, k, v), (q, k, v), **kw)
    check_mha(ref, m, (q, k, v), (q, k, v))
    lens = torch.tensor([S, 2])  # folded into the mask when a key row is appended
    out = m(q, k, v, valid_lens=lens, attn_mask=kw["attn_mask"])
    out_r = ref(q, k, v, key_padding_mask=torch.arange(S) >= lens[:, None], attn_mask=kw["attn_mask"])
    close(out[0], out_r[0])
    close(out[1], out_r[1])


def test_mha_odd_sizes_and_length_one(backend):
    for embed, heads, q_len, k_len, n in ((24, 3, 1, 1, 1), (9, 9, 1, 4, 3), (6, 1, 3, 1, 2)):
        ref, m = mha_pair(backend, embed, heads, batch_first=True)
        q = torch.randn(n, q_len, embed, requires_grad=True)
        kv = torch.randn(n, k_len, embed, requires_grad=True)
        check_mha(ref, m, (q, kv, kv), (q, kv))


def test_mha_unbatched(backend):
    ref, m = mha_pair(backend, E, HEADS, batch_first=True)  # batch_first is ignored
    q = torch.randn(L, E, requires_grad=True)
    kv = torch.randn(S, E, requires_grad=True)
    check_mha(ref, m, (q, kv, kv), (q, kv), key_padding_mask=kpm_mask("bool", n=1)[0])
    check_mha(ref, m, (q, kv, kv), (q, kv), attn_mask=attn_mask("float", 3, n=1),
              average_attn_weights=False)
    out, w = m(q, kv, kv, valid_lens=torch.tensor(3))
    out_r, w_r = ref(q, kv, kv, key_padding_mask=torch.arange(S) >= 3)
    close(out, out_r)
    close(w, w_r)


def test_mha_valid_lens_equal_the_masks(backend):
    ref, m = mha_pair(backend, E, HEADS, batch_first=True)
    q = torch.randn(N, L, E, requires_grad=True)
    kv = torch.randn(N, S, E, requires_grad=True)
    lens = torch.tensor([S, 2])
    check = dict(need_weights=True, average_attn_weights=False)
    out = m(q, kv, kv, valid_lens=lens, **check)
    out_r = ref(q, kv, kv, key_padding_mask=torch.arange(S) >= lens[:, None], **check)
    close(out[0], out_r[0])
    close(out[1], out_r[1])
    # [B, Q] lengths: a per-query mask, as a 3-D attn_mask repeated over heads
    lens2 = torch.tensor([[1, 2, 3, 7, 5], [4, 4, 1, 2, 6]])
    banned = (torch.arange(S) >= lens2[..., None]).repeat_interleave(HEADS, 0)
    for extra in ({}, {"key_padding_mask": kpm_mask("bool")}):
        out = m(q, kv, kv, valid_lens=lens2, **extra)
        out_r = ref(q, kv, kv, attn_mask=banned, **extra)
        close(out[0], out_r[0])
        close(out[1], out_r[1])
        g, names = all_grads(out, (q, kv), m)
        g_r, _ = all_grads(out_r, (q, kv), ref)
        grads_close(g, g_r, names)
    # int32 lengths (d2l's data pipeline makes them) are accepted
    close(m(q, kv, kv, valid_lens=lens.int())[0], m(q, kv, kv, valid_lens=lens)[0])


def test_mha_fully_masked_rows_give_zeros_not_nan(backend):
    """torch gives NaN for a query that may see no key; we give a zero attention output."""
    ref, m = mha_pair(backend, E, HEADS, batch_first=True)
    q = torch.randn(3, L, E, requires_grad=True)
    kv = torch.randn(3, S, E, requires_grad=True)
    lens = torch.tensor([0, 4, 1])
    out, w = m(q, kv, kv, valid_lens=lens, average_attn_weights=False)
    assert torch.count_nonzero(w[0]) == 0
    close(out[0], m.out_proj.bias.expand(L, E))
    out_r, w_r = ref(q[1:], kv[1:], kv[1:], key_padding_mask=torch.arange(S) >= lens[1:, None],
                     average_attn_weights=False)
    close(out[1:], out_r)
    close(w[1:], w_r)
    # a float mask of -inf everywhere, and a fully padded key_padding_mask, likewise
    full = torch.ones(3, S, dtype=torch.bool)
    out2, _ = m(q, kv, kv, key_padding_mask=full)
    close(out2, m.out_proj.bias.expand(3, L, E))
    g, names = all_grads((out, w, out2), (q, kv), m)
    assert all(torch.isfinite(t).all() for t in g if t is not None), names


def test_mha_same_init_and_state_dict_round_trip():
    for kw in ({}, {"kdim": 10, "vdim": 7}, {"add_bias_kv": True, "bias": False}):
        torch.manual_seed(3)
        ref = nn.MultiheadAttention(E, HEADS, **kw)
        torch.manual_seed(3)
        m = MultiheadAttention(E, HEADS, **kw)
        assert isinstance(m.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
        sd, sd_r = m.state_dict(), ref.state_dict()
        assert list(sd) == list(sd_r)
        for key in sd:
            assert torch.equal(sd[key], sd_r[key]), key  # same initialisation, same RNG draws
        back = nn.MultiheadAttention(E, HEADS, **kw)
        randomize(m)
        back.load_state_dict(m.state_dict(), strict=True)
        q = torch.randn(L, N, E)
        k = torch.randn(S, N, kw.get("kdim", E))
        v = torch.randn(S, N, kw.get("vdim", E))
        close(m(q, k, v)[0], back(q, k, v)[0])


# ---------------------------------------------------------------------------------
# TransformerEncoderLayer / TransformerEncoder
# ---------------------------------------------------------------------------------

def layer_pair(backend, *args, **kw):
    ref = nn.TransformerEncoderLayer(*args, **kw)
    randomize(ref)
    m = TransformerEncoderLayer(*args, **kw, backend=backend)
    m.load_state_dict(ref.state_dict(), strict=True)
    return ref, m


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "callable"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_layer_matches_torch(backend, norm_first, activation, batch_first):
    act = (lambda x: torch.tanh(x) * 2) if activation == "callable" else activation
    ref, m = layer_pair(backend, E, HEADS, dim_feedforward=37, dropout=0.0, activation=act,
                        batch_first=batch_first, norm_first=norm_first, layer_norm_eps=1e-4)
    assert list(m.state_dict()) == list(ref.state_dict())
    x = torch.randn((N, S, E) if batch_first else (S, N, E), requires_grad=True)
    masks = {"src_mask": attn_mask("bool", 2, q=S), "src_key_padding_mask": kpm_mask("bool")}
    for kw in ({}, masks, {"src_mask": nn.Transformer.generate_square_subsequent_mask(S),
                           "is_causal": True}):
        y, y_r = m(x, **kw), ref(x, **kw)
        close(y, y_r)
        g, names = all_grads([y], [x], m)
        g_r, _ = all_grads([y_r], [x], ref)
        grads_close(g, g_r, names)


def test_encoder_layer_eval_unbatched_and_valid_lens(backend):
    # even heads, batch_first, eval, no grad: torch takes its fused fast path here
    ref, m = layer_pair(backend, 16, 2, dim_feedforward=20, batch_first=True)
    ref.eval(), m.eval()
    x = torch.randn(3, S, 16)
    lens = torch.tensor([7, 3, 1])
    with torch.no_grad():
        close(m(x, valid_lens=lens), ref(x, src_key_padding_mask=torch.arange(S) >= lens[:, None]))
        close(m(x[0]), ref(x[0]))  # unbatched
        close(m(x[1, :3]), ref(x[1, :3]))


def encoder_pair(backend, num_layers=2, norm=True, **kw):
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=31, **kw)
    ref = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(E) if norm else None)
    randomize(ref)
    with torch.no_grad():
        for p in ref.parameters():  # layers differ from each other, as after training
            p.add_(0.05 * torch.randn_like(p))
    m = convert(ref, backend)
    assert type(m) is TransformerEncoder
    assert all(type(layer) is TransformerEncoderLayer for layer in m.layers)
    return ref, m


def test_encoder_matches_torch_training_and_causal_detection(backend):
    ref, m = encoder_pair(backend, dropout=0.0)
    x = torch.randn(S, N, E, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    for kw in ({"src_key_padding_mask": kpm_mask("bool")}, {"mask": causal},
               {"mask": causal, "is_causal": True}, {"mask": attn_mask("float", 3, q=S)}):
        y, y_r = m(x, **kw), ref(x, **kw)
        close(y, y_r)
        g, names = all_grads([y], [x], m)
        g_r, _ = all_grads([y_r], [x], ref)
        grads_close(g, g_r, names)
    # a causal mask is detected as torch does: the op's causal mask then replaces it
    m2 = TransformerEncoder(m.layers[0], 1)
    m2.layers[0].self_attn.forward = _spy(m2.layers[0].self_attn.forward, seen := [])
    m2(x, mask=causal)
    assert seen == [True]


def _spy(forward, seen):
    def wrapped(*args, **kw):
        seen.append(kw["is_causal"])
        return forward(*args, **kw)
    return wrapped


def test_encoder_eval_padding_valid_positions_match_torch(backend):
    """Eval + no grad + padding mask: torch's nested-tensor path zeroes padded positions;
    ours computes them as torch's training mode does. Valid positions agree."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=20, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2)
    randomize(ref)
    ref.eval()
    m = convert(ref, backend)
    x = torch.randn(3, S, 16)
    lens = torch.tensor([7, 3, 1])
    pad = torch.arange(S) >= lens[:, None]
    with torch.no_grad():
        y, y_r = m(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad)
        assert torch.count_nonzero(y_r[pad]) == 0  # torch's nested path really was taken
        close(y[~pad], y_r[~pad])
        close(m(x, valid_lens=lens), y)
        ref.train()  # torch's slow path: padded positions too
        close(y, ref(x, src_key_padding_mask=pad))


def test_encoder_layer_state_dict_round_trip_and_init():
    for norm_first in (False, True):
        torch.manual_seed(5)
        ref = nn.TransformerEncoderLayer(E, HEADS, 40, norm_first=norm_first, bias=norm_first)
        torch.manual_seed(5)
        m = TransformerEncoderLayer(E, HEADS, 40, norm_first=norm_first, bias=norm_first)
        assert list(m.state_dict()) == list(ref.state_dict())
        for key, value in m.state_dict().items():
            assert torch.equal(value, ref.state_dict()[key]), key
        randomize(m)
        back = nn.TransformerEncoderLayer(E, HEADS, 40, norm_first=norm_first, bias=norm_first)
        back.load_state_dict(m.state_dict(), strict=True)
        m.eval(), back.eval()
        x = torch.randn(S, N, E)
        close(m(x), back(x))
        enc = TransformerEncoder(m, 2, norm=nn.LayerNorm(E))
        enc_r = nn.TransformerEncoder(back, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
        enc_r.load_state_dict(enc.state_dict(), strict=True)
        enc.load_state_dict(enc_r.state_dict(), strict=True)
        close(enc(x), enc_r(x))


# ---------------------------------------------------------------------------------
# convert()
# ---------------------------------------------------------------------------------

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(E, E, batch_first=True)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True, kdim=10, vdim=10)
        self.layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.2, activation="gelu",
                                                batch_first=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True, norm_first=True), 2,
            norm=nn.LayerNorm(E))

    def forward(self, x, mem, pad):
        y, _ = self.rnn(x)
        y = y + self.attn(y, mem, mem, need_weights=False)[0]
        return self.encoder(self.layer(y, src_key_padding_mask=pad), src_key_padding_mask=pad)


class MyMHA(nn.MultiheadAttention):
    pass


def test_convert_replaces_attention_modules():
    model = Model()
    randomize(model)
    model.eval()
    model.layer.dropout1.train()  # modes are kept per submodule
    model.layer.dropout1.p = 0.0
    x, mem = torch.randn(N, S, E), torch.randn(N, 4, 10)
    pad = kpm_mask("bool")
    pad[:, -1] = True  # not left-aligned: torch's nested path is not taken either
    with torch.no_grad():
        before = model(x, mem, pad)
    converted = convert(model)
    assert converted is model
    assert type(model.rnn) is LSTM and type(model.attn) is MultiheadAttention
    assert type(model.layer) is TransformerEncoderLayer and type(model.encoder) is TransformerEncoder
    assert model.layer.activation is F.gelu and model.layer.dropout.p == 0.2
    assert model.attn.batch_first and model.encoder.layers[1].norm_first
    assert not model.layer.training and model.layer.dropout1.training
    with torch.no_grad():
        close(model(x, mem, pad), before)
    # a bare module is returned converted; subclasses are left alone
    assert type(convert(nn.MultiheadAttention(E, HEADS))) is MultiheadAttention
    holder = nn.Sequential(MyMHA(E, HEADS))
    assert type(convert(holder)[0]) is MyMHA


def test_convert_transformer_with_decoder():
    """nn.Transformer: the encoder is replaced; the decoder layers stay torch's, calling
    our MultiheadAttention."""
    ref = nn.Transformer(E, HEADS, 1, 1, 30, dropout=0.0, batch_first=True)
    randomize(ref)
    src, tgt = torch.randn(N, S, E), torch.randn(N, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    before = ref(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    m = convert(ref)
    assert type(m.encoder) is TransformerEncoder
    assert type(m.decoder.layers[0].multihead_attn) is MultiheadAttention
    close(m(src, tgt, tgt_mask=causal, tgt_is_causal=True), before)


def test_torch_compile_and_export_encoder(backend):
    layer = TransformerEncoderLayer(E, HEADS, 40, batch_first=True, backend=backend)
    enc = TransformerEncoder(layer, 2).eval()
    x, lens = torch.randn(N, S, E), torch.tensor([S, 3])
    want = enc(x, valid_lens=lens)
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    close(compiled(x, valid_lens=lens), want)
    ep = torch.export.export(enc, (x,), {"valid_lens": lens})
    close(ep.module()(x, valid_lens=lens), want)


# ---------------------------------------------------------------------------------
# The classic modules against d2l's unfused composition
# ---------------------------------------------------------------------------------

def d2l_masked_softmax(X, valid_lens):
    if valid_lens is None:
        return F.softmax(X, dim=-1)
    shape = X.shape
    if valid_lens.dim() == 1:
        valid_lens = torch.repeat_interleave(valid_lens, shape[1])
    else:
        valid_lens = valid_lens.reshape(-1)
    X = X.reshape(-1, shape[-1])
    keep = torch.arange(shape[-1])[None, :] < valid_lens[:, None]
    X = X.masked_fill(~keep, -1e6)
    return F.softmax(X.reshape(shape), dim=-1)


class D2LAdditiveAttention(nn.Module):
    def __init__(self, key_size, query_size, num_hiddens, dropout):
        super().__init__()
        self.W_k = nn.Linear(key_size, num_hiddens, bias=False)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=False)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values, valid_lens):
        queries, keys = self.W_q(queries), self.W_k(keys)
        features = torch.tanh(queries.unsqueeze(2) + keys.unsqueeze(1))
        scores = self.w_v(features).squeeze(-1)
        self.attention_weights = d2l_masked_softmax(scores, valid_lens)
        return torch.bmm(self.dropout(self.attention_weights), values)


class D2LDotProductAttention(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values, valid_lens=None):
        scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(queries.shape[-1])
        self.attention_weights = d2l_masked_softmax(scores, valid_lens)
        return torch.bmm(self.dropout(self.attention_weights), values)


LENS = {"none": None, "B": torch.tensor([1, 6, 3]), "BQ": torch.tensor([[1, 2, 6, 5]] * 3)}


@pytest.mark.parametrize("lens", list(LENS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_additive_attention_matches_d2l(add_backend, lens, dropout):
    ref = D2LAdditiveAttention(7, 5, 11, dropout)
    m = AdditiveAttention(7, 5, 11, dropout, backend=add_backend)
    m.load_state_dict(ref.state_dict(), strict=True)
    q = torch.randn(3, 4, 5, requires_grad=True)
    k = torch.randn(3, 6, 7, requires_grad=True)
    v = torch.randn(3, 6, 9, requires_grad=True)
    torch.manual_seed(11)  # same dropout mask: both draw one nn.Dropout mask on the weights
    out = m(q, k, v, LENS[lens])
    torch.manual_seed(11)
    out_r = ref(q, k, v, LENS[lens])
    close(out, out_r)
    close(m.attention_weights, ref.attention_weights)
    g, names = all_grads([out, m.attention_weights], [q, k, v], m)
    g_r, _ = all_grads([out_r, ref.attention_weights], [q, k, v], ref)
    grads_close(g, g_r, names)
    m.eval(), ref.eval()
    close(m(q, k, v, LENS[lens]), ref(q, k, v, LENS[lens]))


def test_additive_attention_length_zero_and_one(add_backend):
    m = AdditiveAttention(4, 4, 8, backend=add_backend)
    q, k, v = torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 3)
    out = m(q, k, v, torch.tensor([0, 1], dtype=torch.int32))
    assert torch.count_nonzero(out[0]) == 0  # d2l: uniform weights over the masked keys
    close(out[1], v[1])
    close(m.attention_weights, torch.tensor([[[0.0]], [[1.0]]]))


def test_additive_attention_forward_with_weights_leaves_the_module_alone(add_backend):
    # What AttentionPooling uses: this call's weights, so that threads sharing the module
    # cannot read each other's (the race tests/reliability/test_modules_threads.py caught).
    ref = D2LAdditiveAttention(7, 5, 11, 0.0)
    m = AdditiveAttention(7, 5, 11, backend=add_backend)
    m.load_state_dict(ref.state_dict(), strict=True)
    q, k, v = torch.randn(3, 4, 5), torch.randn(3, 6, 7), torch.randn(3, 6, 9)
    context, weights = m.forward_with_weights(q, k, v, LENS["B"])
    assert m.attention_weights is None
    close(context, ref(q, k, v, LENS["B"]))
    close(weights, ref.attention_weights)


@pytest.mark.parametrize("lens", list(LENS))
def test_dot_product_attention_matches_d2l(backend, lens):
    ref, m = D2LDotProductAttention(0.0), DotProductAttention(0.0, backend=backend)
    assert m.attention_weights is None
    q = torch.randn(3, 4, 8, requires_grad=True)
    k = torch.randn(3, 6, 8, requires_grad=True)
    v = torch.randn(3, 6, 5, requires_grad=True)
    out, out_r = m(q, k, v, LENS[lens]), ref(q, k, v, LENS[lens])
    close(out, out_r)
    close(m.attention_weights, ref.attention_weights)
    grads_close(torch.autograd.grad(loss_of([out, m.attention_weights]), [q, k, v]),
                torch.autograd.grad(loss_of([out_r, ref.attention_weights]), [q, k, v]),
                ["q", "k", "v"])


# ---------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------

def test_dropout_keeps_the_mean_and_is_off_in_eval(backend):
    p = 0.3
    m = DotProductAttention(p, backend=backend)
    q, k = torch.randn(64, 16, 8), torch.randn(64, 32, 8)
    ones = torch.ones(64, 32, 1)  # output = the row's (dropped, rescaled) weight sum
    y = m(q, k, ones)
    assert not torch.allclose(y, torch.ones_like(y))
    assert abs(y.mean().item() - 1.0) < 0.03
    torch.manual_seed(1)
    y1 = m(q, k, ones)
    torch.manual_seed(1)
    close(m(q, k, ones), y1, atol=0)  # torch.manual_seed makes it repeatable
    assert not torch.equal(m(q, k, ones), y1)
    m.eval()
    close(m(q, k, ones), torch.ones(64, 16, 1))
    close(m(q, k, k), DotProductAttention(0.0, backend=backend)(q, k, k), atol=0)


def test_mha_dropout_weights_match_output(backend):
    ref, m = mha_pair(backend, E, HEADS, dropout=0.4, batch_first=True)
    x = torch.randn(N, S, E)
    out, w = m(x, x, x, average_attn_weights=False, key_padding_mask=kpm_mask("bool"))
    v = F.linear(x, m.in_proj_weight[2 * E:], m.in_proj_bias[2 * E:])
    heads = w @ v.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2)  # [N, H, S, hd]
    close(out, m.out_proj(heads.transpose(1, 2).reshape(N, S, E)))
    assert (w == 0).float().mean() > 0.3
    m.eval(), ref.eval()
    out_eval = m(x, x, x)[0]
    close(out_eval, m(x, x, x)[0], atol=0)
    close(out_eval, ref(x, x, x)[0])
    layer_ref, layer = layer_pair(backend, E, HEADS, 30, dropout=0.5)
    layer.eval(), layer_ref.eval()
    close(layer(x.transpose(0, 1)), layer_ref(x.transpose(0, 1)))
    layer.train()
    assert not torch.allclose(layer(x.transpose(0, 1)), layer_ref(x.transpose(0, 1)))


# ---------------------------------------------------------------------------------
# bfloat16: error within 2x eager bfloat16's own error against float32
# ---------------------------------------------------------------------------------

def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def run_case(module, make_inputs, call, dtype):
    module = module.to(dtype)
    inputs = [t.detach().to(dtype).requires_grad_() for t in make_inputs()]
    outs = [o for o in call(module, inputs) if o is not None]
    params = list(module.parameters())
    grads = torch.autograd.grad(loss_of(outs), inputs + params)
    return outs + list(grads)


def assert_bf16_error_within_twice_eager(ref, ours, inputs, call):
    ours.load_state_dict(ref.state_dict())
    truth = run_case(ref, lambda: inputs, call, torch.float32)
    eager = run_case(ref, lambda: inputs, call, torch.bfloat16)
    got = run_case(ours, lambda: inputs, call, torch.bfloat16)
    for i, (a, e, r) in enumerate(zip(got, eager, truth, strict=True)):
        assert a.dtype == torch.bfloat16
        err, eager_err = max_err(a, r), max_err(e, r)
        floor = r.abs().max().item() * 2 ** -9  # half a bf16 ulp: both may round exactly
        assert err <= 2 * max(eager_err, floor), f"[{i}]: {err:.2e} vs eager bf16 {eager_err:.2e}"


@pytest.mark.parametrize("which", ["mha", "layer"])
def test_bfloat16_error_within_twice_eager(backend, which):
    pad = kpm_mask("bool", s=9)
    if which == "mha":
        ref, ours = mha_pair(backend, E, HEADS)

        def call(mod, t):
            return mod(t[0], t[0], t[0], key_padding_mask=pad)
    else:
        ref, ours = layer_pair(backend, E, HEADS, dim_feedforward=40, dropout=0.0)

        def call(mod, t):
            return [mod(t[0], src_key_padding_mask=pad)]
    assert_bf16_error_within_twice_eager(ref, ours, [torch.randn(9, N, E)], call)


def test_bfloat16_additive_error_within_twice_eager(add_backend):
    ref = D2LAdditiveAttention(7, 5, 11, 0.0)
    ours = AdditiveAttention(7, 5, 11, backend=add_backend)
    lens = torch.tensor([1, 6, 3])
    inputs = [torch.randn(3, 4, 5), torch.randn(3, 6, 7), torch.randn(3, 6, 9)]
    assert_bf16_error_within_twice_eager(ref, ours, inputs, lambda mod, t: [mod(*t, lens)])


def test_autocast_mha(backend):
    _, m = mha_pair(backend, E, HEADS)
    x = torch.randn(S, N, E, requires_grad=True)
    pad = kpm_mask("float")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, w = m(x, x, x, key_padding_mask=pad)
    assert y.dtype == torch.bfloat16
    y32, _ = m(x, x, x, key_padding_mask=pad)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert max_err(y, y32) < 0.1


# ---------------------------------------------------------------------------------
# Native kernel actually used; bad arguments
# ---------------------------------------------------------------------------------

@pytest.mark.skipif(not seqfuse.ops.has_native_kernel("scaled_dot_product_attention", "cpu"),
                    reason="seqfuse._C was not built with a CPU scaled_dot_product_attention kernel")
def test_native_op_is_in_the_exported_graph():
    m = MultiheadAttention(E, HEADS, batch_first=True, backend="native").eval()
    x = torch.randn(N, S, E)
    ep = torch.export.export(m, (x, x, x), {"need_weights": False})
    assert any("seqfuse.scaled_dot_product_attention" in str(n.target) for n in ep.graph.nodes)


def _mha():
    return MultiheadAttention(E, HEADS)


q3, kv3 = torch.randn(L, N, E), torch.randn(S, N, E)


@pytest.mark.parametrize("call,error,message", [
    (lambda: MultiheadAttention(24, 5), ValueError, "embed_dim must be divisible by num_heads"),
    (lambda: MultiheadAttention(0, 1), ValueError, "embed_dim must be a positive integer"),
    (lambda: MultiheadAttention(24, 3, dropout=1.5), ValueError, "dropout must be a number in [0, 1]"),
    (lambda: MultiheadAttention(24, 3, backend="gpu"), ValueError, "backend must be one of"),
    (lambda: _mha()(torch.randn(1, L, N, E), kv3, kv3), ValueError, "query must be 3-D"),
    (lambda: _mha()(q3, kv3[0], kv3), ValueError, "key and value must be 3-D"),
    (lambda: _mha()(q3[..., :20], kv3, kv3), ValueError, "expected embed_dim=24"),
    (lambda: _mha()(q3, kv3[:, :1], kv3[:, :1]), ValueError, "the same batch size"),
    (lambda: _mha()(q3, kv3, kv3[:3]), ValueError, "the same sequence length"),
    (lambda: _mha()(q3.double(), kv3, kv3), TypeError, "does not match the MultiheadAttention"),
    (lambda: _mha()(q3, kv3, kv3, key_padding_mask=torch.zeros(N, S - 1, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape [2, 7]"),
    (lambda: _mha()(q3, kv3, kv3, key_padding_mask=torch.zeros(N, S, dtype=torch.int64)),
     TypeError, "key_padding_mask must be bool or floating point"),
    (lambda: _mha()(q3, kv3, kv3, attn_mask=torch.zeros(S, L)), ValueError,
     "attn_mask must have shape [5, 7] or [6, 5, 7]"),
    (lambda: _mha()(q3, kv3, kv3, is_causal=True), RuntimeError, "Need attn_mask"),
    (lambda: _mha()(q3, kv3, kv3, valid_lens=torch.tensor([1.0, 2.0])), TypeError,
     "valid_lens must be an integer tensor"),
    (lambda: _mha()(q3, kv3, kv3, valid_lens=torch.tensor([1, 8])), ValueError,
     "valid_lens must be <= K=7"),
    (lambda: _mha()(q3, kv3, kv3, valid_lens=torch.tensor([1, -1])), ValueError,
     "valid_lens must be >= 0"),
    (lambda: _mha()(q3, kv3, kv3, valid_lens=torch.tensor([1, 2, 3])), ValueError,
     "valid_lens must have shape [B=2] or [B, Q]=[2, 5]"),
    (lambda: TransformerEncoderLayer(24, 3, activation="tanh"), ValueError,
     "activation must be 'relu', 'gelu' or a callable, got 'tanh'"),
    (lambda: TransformerEncoderLayer(24, 3, dim_feedforward=0), ValueError,
     "dim_feedforward must be a positive integer"),
    (lambda: TransformerEncoder(TransformerEncoderLayer(24, 3), 0), ValueError,
     "num_layers must be a positive integer"),
    (lambda: AdditiveAttention(4, 4, 8)(torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 1)),
     ValueError, "queries must be 3-D"),
    (lambda: AdditiveAttention(4, 5, 8)(torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 1)),
     ValueError, "queries have 4 features, expected 5"),
    (lambda: AdditiveAttention(4, 4, 8)(torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(2, 2, 1)),
     ValueError, "keys and values must have the same number of keys"),
    (lambda: DotProductAttention()(torch.randn(2, 1, 4), torch.randn(2, 3, 5), torch.randn(2, 3, 1)),
     ValueError, "queries and keys must have the same feature size"),
    (lambda: DotProductAttention(dropout=-0.1), ValueError, "dropout must be a number in [0, 1]"),
])
def test_bad_arguments_name_the_argument(call, error, message):
    with pytest.raises(error) as exc:
        call()
    assert message in str(exc.value)


# ---------------------------------------------------------------------------------
# empty_rows="uniform": d2l's semantics for a row with no valid key
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kind", ["additive", "dot"])
@pytest.mark.parametrize("lens", [[0, 5, 2], [[0, 5], [3, 0], [1, 1]]], ids=["lens[B]", "lens[B,Q]"])
def test_uniform_empty_rows_match_d2l(backend, kind, lens):
    """d2l's masked_softmax fills -1e6: a row with valid_lens 0 spreads uniformly over all
    keys. With empty_rows="uniform" seqfuse's modules give the same outputs, weights and
    gradients; the default gives zeros there."""
    import textbook_models as d2l

    torch.manual_seed(0)
    if kind == "additive":
        theirs = d2l.AdditiveAttention(6, 0.0)
        for name in ("W_k", "W_q", "w_v"):  # d2l's LazyLinear: sized by a first call
            setattr(theirs, name, nn.Linear(4 if name != "w_v" else 6, 6 if name != "w_v" else 1, bias=False))
        ours = AdditiveAttention(4, 4, 6, backend=backend, empty_rows="uniform")
        ours.load_state_dict(theirs.state_dict())
        default = AdditiveAttention(4, 4, 6, backend=backend)
        default.load_state_dict(theirs.state_dict())
    else:
        theirs = d2l.DotProductAttention(0.0)
        ours = DotProductAttention(backend=backend, empty_rows="uniform")
        default = DotProductAttention(backend=backend)
    q = torch.randn(3, 2, 4, requires_grad=True)
    k = torch.randn(3, 5, 4, requires_grad=True)
    v = torch.randn(3, 5, 7, requires_grad=True)
    valid = torch.tensor(lens)
    want, got = theirs(q, k, v, valid), ours(q, k, v, valid)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.attention_weights, theirs.attention_weights, atol=1e-6, rtol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    empty = (valid == 0).reshape(3, -1, 1).expand(3, 2, 7)
    assert torch.count_nonzero(default(q, k, v, valid)[empty]) == 0
    assert "empty_rows='uniform'" in repr(ours)


def test_empty_rows_is_checked():
    with pytest.raises(ValueError, match="empty_rows must be one of"):
        AdditiveAttention(4, 4, 6, empty_rows="mean")
    with pytest.raises(ValueError, match="empty_rows must be one of"):
        DotProductAttention(empty_rows=None)


def test_float16_on_cpu_runs_as_torch_nn_does():
    """torch.nn's attention layers run float16 on the CPU; the compiled CPU kernels take
    float32/float64/bfloat16, so seqfuse's modules run such a call on the reference (torch's
    own kernels) instead of refusing it, and convert() of a float16 model succeeds."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8).half()
    for theirs in (nn.MultiheadAttention(8, 2, batch_first=True),
                   nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)):
        theirs = theirs.half().eval()
        ours = seqfuse.nn.convert(nn.Sequential(theirs))[0]
        assert type(ours).__module__.startswith("seqfuse")
        with torch.no_grad():
            want = theirs(x, x, x)[0] if isinstance(theirs, nn.MultiheadAttention) else theirs(x)
            got = ours(x, x, x)[0] if isinstance(theirs, nn.MultiheadAttention) else ours(x)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    add = AdditiveAttention(8, 8, 6).half()
    assert add(x, x, x, torch.tensor([5, 2])).dtype == torch.float16
