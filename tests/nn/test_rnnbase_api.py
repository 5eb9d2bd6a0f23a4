"""torch.nn.RNNBase's API and edge cases on seqfuse.nn's LSTM, GRU and RNN (issue 23):
what code written for torch.nn reads, calls or catches behaves as it does there."""
import warnings

import pytest
import torch
from torch import nn

from seqfuse.nn import GRU, LSTM, RNN, convert

PAIRS = {"lstm": (LSTM, nn.LSTM), "gru": (GRU, nn.GRU), "rnn": (RNN, nn.RNN)}


def _pair(kind, *args, **kwargs):
    ours, theirs = PAIRS[kind]
    torch.manual_seed(0)
    a = ours(*args, **kwargs)
    b = theirs(*args, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def _flat(x):
    return [x] if isinstance(x, torch.Tensor) else [t for y in x for t in _flat(y)]


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("bias", [True, False])
def test_flat_weights_and_all_weights_as_torch(kind, bias):
    a, b = _pair(kind, 3, 4, num_layers=2, bidirectional=True, bias=bias)
    assert a._flat_weights_names == b._flat_weights_names
    assert [t is getattr(a, n) for t, n in zip(a._flat_weights, a._flat_weights_names)] == \
        [True] * len(a._flat_weights_names)
    assert [[p.shape for p in w] for w in a.all_weights] == [[p.shape for p in w] for w in b.all_weights]
    for ws_a, ws_b in zip(a.all_weights, b.all_weights):
        for p, q in zip(ws_a, ws_b):
            torch.testing.assert_close(p, q)


class _CallsFlatten(nn.Module):
    """The pattern of many public models: flatten_parameters() in forward."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, batch_first=True, bidirectional=True)

    def forward(self, x):
        self.rnn.flatten_parameters()
        return self.rnn(x)[0]


def test_flatten_parameters_in_forward_after_convert():
    torch.manual_seed(0)
    model = _CallsFlatten()
    x = torch.randn(2, 6, 3)
    want = model(x)
    converted = convert(model)
    assert isinstance(converted.rnn, LSTM)
    torch.testing.assert_close(converted(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_gives_empty_results(kind, batch_first):
    a, b = _pair(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(0, 5, 3) if batch_first else torch.randn(5, 0, 3)
    got, want = a(x), b(x)
    assert [t.shape for t in _flat(got)] == [t.shape for t in _flat(want)]
    # with hx given, and gradients through an empty batch
    hx = torch.zeros(4, 0, 4, requires_grad=True)
    state = (hx, torch.zeros(4, 0, 4)) if kind == "lstm" else hx
    out, final = a(x.requires_grad_(), state)
    (out.sum() + sum(t.sum() for t in _flat(final))).backward()
    assert x.grad.shape == x.shape and hx.grad.shape == hx.shape


@pytest.mark.parametrize("kind", list(PAIRS))
def test_float16_on_cpu_runs_as_torch_does(kind):
    a, b = _pair(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    a, b = a.half(), b.half()
    x = torch.randn(2, 6, 3).half()
    for got, want in zip(_flat(a(x)), _flat(b(x))):
        assert got.dtype == torch.float16
        # torch.nn runs all layers in one call, seqfuse's reference layer by layer: float16
        # rounding apart (one ulp is ~1e-3 here)
        torch.testing.assert_close(got, want, atol=3e-3, rtol=1e-2)
    lengths = torch.tensor([6, 1])
    out, _ = a(x, lengths=lengths)
    assert out.dtype == torch.float16 and bool((out[1, 1:] == 0).all())


@pytest.mark.parametrize("kind", ["gru", "rnn"])
@pytest.mark.parametrize("value", [0, 2])
def test_proj_size_on_gru_and_rnn_is_torchs_error(kind, value):
    ours, theirs = PAIRS[kind]
    with pytest.raises(ValueError) as want:
        theirs(3, 4, proj_size=value)
    with pytest.raises(ValueError) as got:
        ours(3, 4, proj_size=value)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_dropout_with_one_layer_warns_as_torch(kind):
    ours, theirs = PAIRS[kind]
    with warnings.catch_warnings(record=True) as want:
        warnings.simplefilter("always")
        theirs(3, 4, dropout=0.3)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        ours(3, 4, dropout=0.3)
    assert [str(w.message) for w in got] == [str(w.message) for w in want]
    assert got[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(3, 4, num_layers=2, dropout=0.3)


BAD_CALLS = [
    ("features", lambda m: m(torch.randn(5, 2, 7))),
    ("no steps", lambda m: m(torch.randn(0, 2, 3))),
    ("hx batch", lambda m: m(torch.randn(5, 2, 3), _state(m, (1, 3, 4)))),
    ("hx layers", lambda m: m(torch.randn(5, 2, 3), _state(m, (2, 2, 4)))),
    ("4-D input", lambda m: m(torch.randn(5, 2, 3, 1))),
    ("dtype", lambda m: m(torch.randn(5, 2, 3).double())),
]


def _state(m, shape):
    t = torch.zeros(shape)
    return (t, torch.zeros(shape)) if isinstance(m, (nn.LSTM, LSTM)) else t


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
def test_errors_are_of_torchs_types(kind, name, call):
    """Whatever torch.nn raises for a bad call, seqfuse's error is an instance of it, so an
    `except RuntimeError` (or ValueError) written for torch.nn still catches it."""
    a, b = _pair(kind, 3, 4)
    with pytest.raises(Exception) as want:
        call(b)
    with pytest.raises(Exception) as got:
        call(a)
    assert isinstance(got.value, type(want.value)), (type(got.value).__mro__, type(want.value))


def _keep_flags(graph) -> list[bool]:
    """keep_activations of every seqfuse layer op in a TorchScript graph."""
    flags = []
    for node in graph.nodes():
        if node.kind() in ("seqfuse::lstm_layer", "seqfuse::gru_layer"):
            # keep_activations is their input 7 (rnn_layer keeps only its output: no flag)
            flags.append(bool(node.inputsAt(7).toIValue()))
    return flags


@pytest.mark.parametrize("kind", list(PAIRS))
def test_jit_trace_passes_its_own_check_and_trains(kind):
    """torch.jit.trace's default check_trace re-traces under no_grad; the graph must not
    depend on the grad mode ("Graphs differed across invocations" before). A trace of a
    module whose parameters require grad keeps activations: its backward is eager's."""
    a, _ = _pair(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    a.eval()
    x = torch.randn(2, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(a, (x,))  # check_trace=True
    assert _keep_flags(traced.graph) == ([] if kind == "rnn" else [True, True])
    traced(x)[0].square().sum().backward()
    got = [p.grad.clone() for p in a.parameters()]
    a.zero_grad()
    a(x)[0].square().sum().backward()
    for g, p in zip(got, a.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


def test_exported_torchscript_is_an_inference_graph(tmp_path):
    """seqfuse.export traces with the parameters frozen: no activations kept, and the
    user's parameters still require grad afterwards."""
    from seqfuse.export.exporter import export_torchscript

    m = LSTM(3, 4, num_layers=2, batch_first=True).eval()
    x = torch.randn(2, 5, 3)
    export_torchscript(m, (x,), tmp_path / "m.ts")
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    assert _keep_flags(loaded.graph) == [False, False]
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], m(x)[0])
