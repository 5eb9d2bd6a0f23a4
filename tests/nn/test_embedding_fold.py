"""Embedding folding (issue 22): forward_tokens reads the first layer's input projection
from a folded table [vocab, D, G] in inference. Every result is compared with the unfolded
path (the module over embedding(input_ids)) and with eager torch.nn over a packed input;
the table must follow every kind of weight change; the projected ops refuse a gradient and
bad arguments with errors that name them."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfuse
from seqfuse import ops
from seqfuse.nn import GRU, LSTM, RNN

pytestmark = pytest.mark.skipif(not ops.has_native_kernel("lstm_layer_projected", "cpu"),
                                reason="needs the compiled CPU kernels")

VOCAB, E, H = 37, 11, 13  # odd sizes: unit-vector tails in every tile


def _models(cls, bidirectional, num_layers=1, batch_first=True, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    emb = nn.Embedding(VOCAB, E, padding_idx=0).to(dtype)
    layer = cls(E, H, num_layers=num_layers, batch_first=batch_first, bias=bias,
                bidirectional=bidirectional).to(dtype).eval()
    ref = getattr(nn, cls.__name__)(E, H, num_layers=num_layers, batch_first=batch_first,
                                    bias=bias, bidirectional=bidirectional).to(dtype)
    ref.load_state_dict(layer.state_dict())
    return emb, layer, ref


def _eager(ref, emb, ids, lengths, batch_first=True):
    x = emb(ids)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, state = ref(packed)
    out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    return out, state


def _state_parts(state):
    return state if isinstance(state, tuple) else (state,)


CASES = [(cls, bi, layers, B)
         for cls in (LSTM, GRU) for bi in (False, True) for layers in (1, 2) for B in (1, 3, 8)]


@pytest.mark.parametrize("cls,bidirectional,num_layers,B", CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_folded_matches_unfolded_and_eager(cls, bidirectional, num_layers, B):
    emb, layer, ref = _models(cls, bidirectional, num_layers)
    T = 7
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if B > 1:
        lengths[-1] = 1  # a row that is all padding but its first token
    with torch.no_grad():
        out, state = layer.forward_tokens(emb, ids, lengths=lengths)
        assert "_fold_cache" in layer.__dict__, "the folded path did not run"
        plain_out, plain_state = layer(emb(ids), lengths=lengths)
        eager_out, eager_state = _eager(ref, emb, ids, lengths)
    torch.testing.assert_close(out, plain_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for a, b, c in zip(_state_parts(state), _state_parts(plain_state), _state_parts(eager_state)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    # Padding rows are zero, as the packed path gives.
    for b in range(B):
        assert bool((out[b, lengths[b]:] == 0).all())


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_folded_float64_time_major_unbatched_and_initial_state(cls):
    emb, layer, ref = _models(cls, True, 2, batch_first=False, dtype=torch.float64)
    T, B = 5, 4
    ids = torch.randint(0, VOCAB, (T, B))
    lengths = torch.tensor([5, 1, 3, 5])
    parts = 2 if cls is LSTM else 1
    hx = tuple(torch.randn(4, B, H, dtype=torch.float64) for _ in range(parts))
    hx = hx if cls is LSTM else hx[0]
    with torch.no_grad():
        out, state = layer.forward_tokens(emb, ids, hx, lengths=lengths)
        plain_out, plain_state = layer(emb(ids), hx, lengths=lengths)
        # Unbatched [T]: the same as a batch of one.
        one, one_state = layer.forward_tokens(emb, ids[:, 0])
        one_plain, one_plain_state = layer(emb(ids[:, 0]))
    assert "_fold_cache" in layer.__dict__
    torch.testing.assert_close(out, plain_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(_state_parts(state), _state_parts(plain_state)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert one.shape == (T, 2 * H)
    torch.testing.assert_close(one, one_plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(_state_parts(one_state), _state_parts(one_plain_state)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _weight_changes(emb, layer):
    """Every way a served model's weights change, each applied in turn."""
    def no_grad_copy():
        with torch.no_grad():
            emb.weight.copy_(torch.randn_like(emb.weight))

    def optimizer_step():
        layer.train()
        opt = torch.optim.SGD(list(emb.parameters()) + list(layer.parameters()), lr=0.5)
        x = emb(torch.randint(0, VOCAB, (2, 4)))
        out, _ = layer(x)
        out.sum().backward()
        opt.step()
        layer.eval()

    def load_state_dict():
        sd = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
        layer.load_state_dict(sd)

    def init_bias():
        nn.init.normal_(layer.bias_ih_l0)

    def replace_data():
        layer.weight_ih_l0.data = torch.randn_like(layer.weight_ih_l0)

    def embedding_load():
        emb.load_state_dict({"weight": torch.randn(VOCAB, E)})

    return [no_grad_copy, optimizer_step, load_state_dict, init_bias, replace_data, embedding_load]


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_folded_table_follows_every_weight_change(cls):
    emb, layer, _ = _models(cls, True)
    ids = torch.randint(0, VOCAB, (3, 6))
    lengths = torch.tensor([6, 2, 4])
    for change in [lambda: None] + _weight_changes(emb, layer):
        change()
        with torch.no_grad():
            out, _ = layer.forward_tokens(emb, ids, lengths=lengths)
            assert "_fold_cache" in layer.__dict__
            plain, _ = layer(emb(ids), lengths=lengths)
        torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)


def test_fold_only_in_inference_and_within_budget():
    emb, layer, _ = _models(LSTM, True)
    ids = torch.randint(0, VOCAB, (2, 5))

    def folded_after(fn):
        layer.clear_weight_cache()
        fn()
        return "_fold_cache" in layer.__dict__

    # Gradient needed: the plain path, and it is differentiable.
    out, _ = layer.forward_tokens(emb, ids)
    assert "_fold_cache" not in layer.__dict__
    out.sum().backward()
    assert emb.weight.grad is not None and layer.weight_ih_l0.grad is not None
    with torch.no_grad():
        assert folded_after(lambda: layer.forward_tokens(emb, ids))
        layer.train()
        assert not folded_after(lambda: layer.forward_tokens(emb, ids))
        layer.eval()
        layer.fold_budget_bytes = VOCAB * 2 * 4 * H * 4 - 1  # one byte short of the table
        assert not folded_after(lambda: layer.forward_tokens(emb, ids))
        layer.fold_budget_bytes = VOCAB * 2 * 4 * H * 4
        assert folded_after(lambda: layer.forward_tokens(emb, ids))
        assert layer.weight_cache_bytes() >= VOCAB * 2 * 4 * H * 4
        # A budget lowered after the table was built takes effect at the next call.
        layer.fold_budget_bytes = 0
        layer.forward_tokens(emb, ids)
        layer.fold_budget_bytes = type(layer).fold_budget_bytes
        # The reference backend runs its own math, never the fused table.
        with seqfuse.use_backend("reference"):
            assert not folded_after(lambda: layer.forward_tokens(emb, ids))
        # max_norm renormalises the embedding at lookup: never folded, same result.
        renorm = nn.Embedding(VOCAB, E, max_norm=0.5)
        expected, _ = layer(renorm(ids))
        layer.clear_weight_cache()
        got, _ = layer.forward_tokens(renorm, ids)
        assert "_fold_cache" not in layer.__dict__
        torch.testing.assert_close(got, expected)


def test_rnn_has_no_fold_and_gives_the_plain_result():
    torch.manual_seed(0)
    emb, layer = nn.Embedding(VOCAB, E), RNN(E, H, batch_first=True, bidirectional=True).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        got, h = layer.forward_tokens(emb, ids)
        expected, h_ref = layer(emb(ids))
    assert "_fold_cache" not in layer.__dict__
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_forward_tokens_bad_input_names_it():
    emb, layer, _ = _models(LSTM, True)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, num_embeddings=37\)"):
            layer.forward_tokens(emb, torch.tensor([[1, 37]]))
        with pytest.raises(ValueError, match="input_ids must be token ids"):
            layer.forward_tokens(emb, torch.tensor([[-1, 3]]))
        with pytest.raises(TypeError, match="embedding must be a torch.nn.Embedding"):
            layer.forward_tokens(nn.Linear(3, 3), torch.tensor([[1, 2]]))
        with pytest.raises(ValueError, match="lengths must be <= T=2"):
            layer.forward_tokens(emb, torch.tensor([[1, 2]]), lengths=torch.tensor([3]))
        with pytest.raises(ValueError, match="input_ids must be"):
            layer.forward_tokens(emb, torch.zeros(2, 3, 4, dtype=torch.long))


# -- the projected ops themselves ---------------------------------------------------

def _projected_case(kind, D=2, T=6, B=3, dtype=torch.float32):
    torch.manual_seed(1)
    G = (4 if kind == "lstm" else 3) * H
    x = torch.randn(T, B, E, dtype=dtype)
    w_ih, w_hh = torch.randn(D, G, E, dtype=dtype) * 0.3, torch.randn(D, G, H, dtype=dtype) * 0.3
    b_ih, b_hh = torch.randn(D, G, dtype=dtype), torch.randn(D, G, dtype=dtype)
    hx = torch.randn(D, B, H, dtype=dtype)
    lengths = torch.tensor([T, 1, 4][:B])
    return x, w_ih, w_hh, b_ih, b_hh, hx, lengths


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("D", [1, 2])
def test_projected_op_matches_the_layer_op(kind, D):
    x, w_ih, w_hh, b_ih, b_hh, hx, lengths = _projected_case(kind, D)
    T, B, _ = x.shape
    with torch.no_grad():
        if kind == "lstm":
            bias = b_ih + b_hh
            proj = torch.einsum("tbi,dgi->tbdg", x, w_ih) + bias[None, None]
            expected = ops.lstm_layer(x, w_ih, w_hh, bias, hx, hx * 0.5, lengths)
            got = ops.lstm_layer_projected(proj, w_hh, hx, hx * 0.5, lengths)
        else:
            proj = torch.einsum("tbi,dgi->tbdg", x, w_ih) + b_ih[None, None]
            expected = ops.gru_layer(x, w_ih, w_hh, b_ih, b_hh, hx, lengths)
            got = ops.gru_layer_projected(proj, w_hh, b_hh, hx, lengths)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_projected_op_opcheck(kind):
    x, w_ih, w_hh, b_ih, b_hh, hx, lengths = _projected_case(kind)
    proj = torch.randn(*x.shape[:2], 2, w_hh.shape[1])
    if kind == "lstm":
        torch.library.opcheck(torch.ops.seqfuse.lstm_layer_projected.default,
                              (proj, w_hh, hx, hx, lengths),
                              test_utils=("test_schema", "test_faketensor"))
    else:
        torch.library.opcheck(torch.ops.seqfuse.gru_layer_projected.default,
                              (proj, w_hh, b_hh, hx, lengths),
                              test_utils=("test_schema", "test_faketensor"))


def test_projected_ops_refuse_gradients():
    x, w_ih, w_hh, b_ih, b_hh, hx, lengths = _projected_case("lstm")
    proj = torch.randn(*x.shape[:2], 2, w_hh.shape[1], requires_grad=True)
    with pytest.raises(NotImplementedError, match="lstm_layer_projected: has no backward"):
        ops.lstm_layer_projected(proj, w_hh, hx, hx, lengths)
    # Called directly, the op runs; a backward through it raises instead of giving None.
    out, _, _ = torch.ops.seqfuse.lstm_layer_projected(proj, w_hh, hx, hx, lengths)
    with pytest.raises(NotImplementedError, match="has no backward"):
        out.sum().backward()
    x, w_ih, w_hh, b_ih, b_hh, hx, lengths = _projected_case("gru")
    proj = torch.randn(*x.shape[:2], 2, w_hh.shape[1])
    with pytest.raises(NotImplementedError, match="gru_layer_projected: has no backward"):
        ops.gru_layer_projected(proj, w_hh.requires_grad_(), b_hh, hx, lengths)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(projected=a["projected"][0]), r"projected must be 4-D"),
    (lambda a: a.update(projected=a["projected"].double()), r"weight_hh must have the projected's dtype"),
    (lambda a: a.update(projected=a["projected"].half()), r"projected dtype must be float32 or float64"),
    (lambda a: a.update(projected=a["projected"][..., :-1]), r"projected must be \[6, 3, 2, 52\]"),
    (lambda a: a.update(weight_hh=a["weight_hh"][:1]), r"weight_hh must be \[D=2"),
    (lambda a: a.update(hx=a["hx"][:, :2]), r"hx must be \[2, 3, 13\]"),
    (lambda a: a.update(cx=a["cx"][:, :, :3]), r"cx must be \[2, 3, 13\]"),
    (lambda a: a.update(lengths=torch.tensor([7, 1, 1])), r"every length must be <= T=6"),
    (lambda a: a.update(lengths=torch.tensor([0, 1, 1])), r"every length must be >= 1"),
    (lambda a: a.update(lengths=torch.tensor([1.0, 1, 1])), r"lengths must be int64"),
    (lambda a: a.update(projected=a["projected"][:, :0]), r"projected must have a batch of at least 1"),
])
def test_projected_op_bad_arguments(mutate, message):
    x, w_ih, w_hh, b_ih, b_hh, hx, lengths = _projected_case("lstm")
    args = dict(projected=torch.randn(6, 3, 2, 4 * H), weight_hh=w_hh, hx=hx, cx=hx.clone(),
                lengths=lengths)
    mutate(args)
    with pytest.raises(RuntimeError, match="lstm_layer_projected: " + message):
        torch.ops.seqfuse.lstm_layer_projected(**args)


def test_gru_projected_bias_shape_is_checked():
    x, w_ih, w_hh, b_ih, b_hh, hx, lengths = _projected_case("gru")
    proj = torch.randn(6, 3, 2, 3 * H)
    with pytest.raises(RuntimeError, match=r"gru_layer_projected: bias_hh must be \[2, 39\]"):
        torch.ops.seqfuse.gru_layer_projected(proj, w_hh, b_hh[:, :-1], hx, lengths)
