"""seqfuse.nn.LSTM / GRU / RNN as drop-ins for torch.nn.LSTM / GRU / RNN: every option of
PyTorch's modules, against PyTorch's module holding the same weights (outputs, final
states, and the gradients of the input, the initial states and every weight)."""
import subprocess
import sys

import pytest
import torch
from conftest import TOL, requires_native
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import seqfuse
from seqfuse.nn import GRU, LSTM, RNN, convert

pytestmark = requires_native

# name -> (torch class, seqfuse class, extra constructor arguments)
KINDS = {
    "lstm": (torch.nn.LSTM, LSTM, {}),
    "gru": (torch.nn.GRU, GRU, {}),
    "rnn-tanh": (torch.nn.RNN, RNN, {}),
    "rnn-relu": (torch.nn.RNN, RNN, {"nonlinearity": "relu"}),
}
I, H = 37, 53  # not multiples of the vector width


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param


def pair(kind, input_size=I, hidden_size=H, **kw):
    torch_cls, cls, extra = KINDS[kind]
    ref = torch_cls(input_size, hidden_size, **extra, **kw)
    m = convert(ref)
    assert type(m) is cls
    return ref, m


def states(kind, shape, requires_grad=False):
    """An initial state of the module's form: (h_0, c_0) for the LSTM, h_0 otherwise."""
    h = torch.randn(*shape, requires_grad=requires_grad)
    if kind == "lstm":
        return h, torch.randn(*shape, requires_grad=requires_grad)
    return h


def flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def assert_same_outputs(got, want, atol=TOL[torch.float32]["out_atol"]):
    (y, h), (yr, hr) = got, want
    if isinstance(y, PackedSequence):
        assert torch.equal(y.batch_sizes, yr.batch_sizes)
        y, yr = y.data, yr.data
    torch.testing.assert_close(y, yr, atol=atol, rtol=0)
    for a, b in zip(flat(h), flat(hr), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def assert_grads_close(m, ref, extra=()):
    tol = TOL[torch.float32]
    for (name, p), (name_r, q) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        assert name == name_r
        torch.testing.assert_close(p.grad, q.grad, rtol=tol["grad_rtol"], atol=tol["grad_atol"], msg=name)
    for a, b in extra:
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"])


def loss_of(out):
    """A loss that weights every output and final state differently."""
    y, h = out
    y = y.data if isinstance(y, PackedSequence) else y
    return (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(s.sum() * 0.7 for s in flat(h))


def backward_both(out, out_r, leaves):
    """Gradients of `leaves` from both models; parameter grads accumulate in .grad."""
    g = torch.autograd.grad(loss_of(out), leaves, retain_graph=True)
    g_r = torch.autograd.grad(loss_of(out_r), leaves, retain_graph=True)
    loss_of(out).backward(retain_graph=True)  # a packed input's graph is shared by both
    loss_of(out_r).backward()
    return zip(g, g_r)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_padded_input_matches_torch(kind, num_layers, bidirectional, batch_first, with_hx, bias):
    ref, m = pair(kind, num_layers=num_layers, bidirectional=bidirectional,
                  batch_first=batch_first, bias=bias)
    assert list(m.state_dict()) == list(ref.state_dict())
    T, B, D = 6, 3, 2 if bidirectional else 1
    x = torch.randn((B, T, I) if batch_first else (T, B, I), requires_grad=True)
    hx = states(kind, (num_layers * D, B, H), requires_grad=True) if with_hx else None
    out, out_r = m(x, hx), ref(x, hx)
    assert_same_outputs(out, out_r)
    assert_grads_close(m, ref, backward_both(out, out_r, [x] + (flat(hx) if with_hx else [])))


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_matches_torch(kind, enforce_sorted, bidirectional):
    ref, m = pair(kind, num_layers=2, bidirectional=bidirectional)
    lengths = torch.tensor([7, 5, 5, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 5])
    x = torch.randn(7, 4, I, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    hx = states(kind, (2 * (2 if bidirectional else 1), 4, H))
    out, out_r = m(packed, hx), ref(packed, hx)
    assert isinstance(out[0], PackedSequence)
    if not enforce_sorted:
        assert torch.equal(out[0].unsorted_indices, out_r[0].unsorted_indices)
    assert_same_outputs(out, out_r)
    assert_grads_close(m, ref, backward_both(out, out_r, [x]))


def test_lengths_keyword_equals_packing(kind):
    ref, m = pair(kind, bidirectional=True, batch_first=True)
    lengths = torch.tensor([1, 6, 4])
    x = torch.randn(3, 6, I)
    y, h = m(x, lengths=lengths)
    yr, hr = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    yr, _ = pad_packed_sequence(yr, batch_first=True, total_length=6)
    assert_same_outputs((y, h), (yr, hr))
    assert torch.count_nonzero(y[0, 1:]) == 0


def test_length_one_sequences_and_batch_of_one(kind):
    ref, m = pair(kind, num_layers=2, bidirectional=True)
    for x in (torch.randn(1, 4, I), torch.randn(9, 1, I), torch.randn(1, 1, I)):
        assert_same_outputs(m(x), ref(x))
    x = torch.randn(5, 3, I)
    ones = torch.tensor([1, 1, 1])
    y, h = m(x, lengths=ones)
    yr, hr = ref(pack_padded_sequence(x, ones))
    assert_same_outputs((y[:1], h), (pad_packed_sequence(yr)[0], hr))
    assert torch.count_nonzero(y[1:]) == 0


def test_unbatched_input(kind):
    ref, m = pair(kind, bidirectional=True)
    x = torch.randn(5, I)
    hx = states(kind, (2, H))
    for args in ((x,), (x, hx)):
        out, out_r = m(*args), ref(*args)
        assert out[0].shape == out_r[0].shape == (5, 2 * H)
        assert_same_outputs(out, out_r)


def test_non_contiguous_and_expanded_inputs_work(kind):
    ref, m = pair(kind, num_layers=2, bidirectional=True)
    x = torch.randn(3, 6, I).transpose(0, 1)              # non-contiguous [T, B, I]
    h0 = torch.randn(4, 1, H).expand(4, 3, H)             # expanded batch
    hx = (h0, h0.flip(0)) if kind == "lstm" else h0
    assert not x.is_contiguous() and h0.stride(1) == 0
    assert_same_outputs(m(x, hx), ref(x, hx))
    x_exp = torch.randn(6, 1, I).expand(6, 3, I)          # expanded input
    assert_same_outputs(m(x_exp), ref(x_exp))


def test_dropout_between_layers_in_training(kind):
    """Inverted dropout between layers: reproducible for a seed, new masks for a new seed,
    none in eval (where torch's outputs are matched exactly). The masks are drawn with
    uniform_ rather than torch's bernoulli_ (faster on CPU), so training outputs match
    torch's in distribution, not bit for bit: test_inter_layer_dropout_mask checks it."""
    ref, m = pair(kind, num_layers=3, dropout=0.4, bidirectional=True)
    ref.train(), m.train()
    x = torch.randn(5, 2, I)
    torch.manual_seed(7)
    out = m(x)
    torch.manual_seed(7)
    again = m(x)
    assert_same_outputs(out, again)
    torch.manual_seed(8)
    assert not torch.allclose(m(x)[0], out[0]), "a new seed must draw new masks"
    m.eval(), ref.eval()
    assert_same_outputs(m(x), ref(x))  # no dropout in eval
    torch.testing.assert_close(m(x)[0], m(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("p", [0.1, 0.4, 0.75])
def test_inter_layer_dropout_mask(p):
    from seqfuse.nn.rnn import _dropout

    x = torch.rand(200, 50, 40) + 0.5  # no zeros of its own
    x.requires_grad_(True)
    torch.manual_seed(0)
    y = _dropout(x, p)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p), rtol=1e-6, atol=0)
    assert (_dropout(x, 1.0) == 0).all()


def test_state_dict_round_trip_strict(kind):
    torch_cls, cls, extra = KINDS[kind]
    ref = torch_cls(8, 16, num_layers=2, bidirectional=True, **extra)
    m = cls(8, 16, num_layers=2, bidirectional=True, **extra)
    m.load_state_dict(ref.state_dict(), strict=True)
    back = torch_cls(8, 16, num_layers=2, bidirectional=True, **extra)
    back.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(4, 2, 8)
    assert_same_outputs(m(x), back(x))
    assert [p.shape for p in m.parameters()] == [p.shape for p in ref.parameters()]


def test_backends_agree_and_native_is_used(kind):
    _, m = pair(kind, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, I)
    with seqfuse.use_backend("reference"):
        y_ref = m(x)[0]
    torch.testing.assert_close(m(x)[0], y_ref, atol=1e-5, rtol=0)
    op = {"lstm": "lstm_layer", "gru": "gru_layer"}.get(kind, "rnn_layer")
    ep = torch.export.export(m, (x,))
    assert any(f"seqfuse.{op}" in str(n.target) for n in ep.graph.nodes)


def test_torch_compile_module_fullgraph(kind):
    _, m = pair(kind, 8, 16, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 8)
    lengths = torch.tensor([5, 2, 3])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, lengths=lengths)[0], m(x, lengths=lengths)[0])


def test_convert_replaces_nested_layers():
    model = torch.nn.ModuleDict({
        "lstm": torch.nn.LSTM(4, 8, batch_first=True),
        "gru": torch.nn.GRU(4, 8),
        "rnn": torch.nn.RNN(4, 8, nonlinearity="relu", num_layers=2, dropout=0.1),
    })
    model.eval()
    x = torch.randn(5, 2, 4)
    before = {k: model[k](x)[0] for k in model}
    converted = convert(model)
    assert [type(v) for v in converted.values()] == [LSTM, GRU, RNN]
    assert converted["rnn"].nonlinearity == "relu" and converted["rnn"].dropout == 0.1
    assert not converted["rnn"].training
    for k in model:
        torch.testing.assert_close(converted[k](x)[0], before[k], atol=1e-5, rtol=0)


def test_rnn_nonlinearity_is_checked():
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        RNN(4, 8, nonlinearity="gelu")
    assert "nonlinearity='relu'" in repr(RNN(4, 8, nonlinearity="relu"))


@pytest.mark.parametrize("call,message", [
    (lambda k, m: m(torch.randn(2, 3, 5, 8)), "input must be 3-D"),
    (lambda k, m: m(torch.randn(5, 2, 7)), "expected input_size=8"),
    (lambda k, m: m(torch.randn(5, 2, 8, dtype=torch.float64)), "does not match the"),
    (lambda k, m: m([1, 2, 3]), "input must be a Tensor or a PackedSequence"),
    # hx for the wrong number of layers, of directions, or the wrong batch
    (lambda k, m: m(torch.randn(5, 2, 8), states(k, (1, 2, 16))), "h_0 must have shape (4, 2, 16)"),
    (lambda k, m: m(torch.randn(5, 2, 8), states(k, (2, 2, 16))), "h_0 must have shape (4, 2, 16)"),
    (lambda k, m: m(torch.randn(5, 2, 8), states(k, (4, 3, 16))), "h_0 must have shape (4, 2, 16)"),
    (lambda k, m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5, 0])), "lengths must be >= 1"),
    (lambda k, m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5, -1])), "lengths must be >= 1"),
    (lambda k, m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5, 6])), "lengths must be <= T=5"),
    (lambda k, m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5])), "lengths must have shape [B=2]"),
    (lambda k, m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5.0, 2.0])), "lengths must be an int64"),
    (lambda k, m: m(torch.randn(0, 2, 8)), "no time steps"),
    # a PackedSequence whose batch_sizes do not describe its data
    (lambda k, m: m(PackedSequence(torch.randn(9, 8), torch.tensor([3, 3, 2]))),
     "batch_sizes sum to 8 but its data has 9 rows"),
    (lambda k, m: m(PackedSequence(torch.randn(8, 8), torch.tensor([2, 3, 3]))),
     "batch_sizes must not increase"),
    (lambda k, m: m(pack_padded_sequence(torch.randn(5, 2, 8), torch.tensor([5, 2])),
                    lengths=torch.tensor([5, 2])), "lengths must not be given with a PackedSequence"),
])
def test_bad_input_names_the_argument(kind, call, message):
    _, cls, extra = KINDS[kind]
    m = cls(8, 16, num_layers=2, bidirectional=True, **extra)
    # RuntimeError as torch.nn raises; ValueError/TypeError as seqfuse did before (both).
    with pytest.raises(RuntimeError) as exc:
        call(kind, m)
    assert isinstance(exc.value, (ValueError, TypeError))
    assert message in str(exc.value)


def test_lstm_hx_must_be_a_pair():
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        LSTM(8, 16)(torch.randn(5, 2, 8), torch.zeros(1, 2, 16))


def test_bad_input_never_crashes_the_interpreter():
    """Each bad call in a fresh interpreter: a Python exception, never a signal."""
    script = r"""
import torch, seqfuse
from seqfuse import ops
x = torch.randn(5, 2, 4)
h = torch.zeros(1, 2, 6)
weights = {
    "lstm": (torch.randn(1, 24, 4), torch.randn(1, 24, 6), torch.randn(1, 24)),
    "gru": (torch.randn(1, 18, 4), torch.randn(1, 18, 6), torch.randn(1, 18), torch.randn(1, 18)),
    "rnn": (torch.randn(1, 6, 4), torch.randn(1, 6, 6), torch.randn(1, 6)),
}
calls = {
    "lstm": lambda x, w, h, L: ops.lstm_layer(x, *w, h, h, L),
    "gru": lambda x, w, h, L: ops.gru_layer(x, *w, h, L),
    "rnn": lambda x, w, h, L: ops.rnn_layer(x, *w, h, L, "relu"),
}
bad = []
for name, w in weights.items():
    f = calls[name]
    bad += [
        lambda f=f, w=w: f(x, w, h, torch.tensor([5, 0])),
        lambda f=f, w=w: f(x, w, h, torch.tensor([5, 99])),
        lambda f=f, w=w: f(x, w, h, torch.tensor([-3, 2])),
        lambda f=f, w=w: f(x, w, h, torch.tensor([5, 2, 1])),
        lambda f=f, w=w: f(x, w, torch.zeros(1, 3, 6), None),
        lambda f=f, w=w: f(x, (torch.randn(1, w[0].shape[1], 5),) + w[1:], h, None),
        lambda f=f, w=w: f(x[:0], w, h, None),
        lambda f=f, w=w: f(x, w, h.to("meta"), None),
    ]
bad.append(lambda: ops.rnn_layer(x, *weights["rnn"], h, None, "gelu"))
bad.append(lambda: seqfuse.nn.LSTM(4, 6)(torch.randn(5, 2, 4), lengths=torch.tensor([1 << 40, 1])))
for f in bad:
    try:
        f()
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        pass
    else:
        raise SystemExit("a bad call did not raise")
print("all raised", len(bad))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "all raised 26" in proc.stdout
