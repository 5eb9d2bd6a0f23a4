"""seqfuse.nn.LSTM as a drop-in for torch.nn.LSTM."""
import subprocess
import sys

import pytest
import torch
from conftest import TOL, requires_native
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfuse
from seqfuse.nn import LSTM, convert

pytestmark = requires_native


def pair(I=37, H=53, **kw):
    ref = torch.nn.LSTM(I, H, **kw)
    return ref, convert(ref)


def assert_grads_close(m, ref, tol):
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol["grad_rtol"], atol=tol["grad_atol"], msg=name)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_padded_input_matches_torch(num_layers, bidirectional, batch_first, with_hx):
    ref, m = pair(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    assert list(m.state_dict()) == list(ref.state_dict())
    T, B = 6, 3
    x = torch.randn((B, T, 37) if batch_first else (T, B, 37), requires_grad=True)
    D = 2 if bidirectional else 1
    hx = (torch.randn(num_layers * D, B, 53), torch.randn(num_layers * D, B, 53)) if with_hx else None
    y, (h, c) = m(x, hx)
    yr, (hr, cr) = ref(x, hx)
    tol = TOL[torch.float32]
    for a, b in ((y, yr), (h, hr), (c, cr)):
        torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
    gx = torch.autograd.grad((y * yr.detach().cos()).sum() + h.sum() + c.sum(), x)[0]
    (yr * yr.detach().cos()).sum().add(hr.sum() + cr.sum()).backward()
    torch.testing.assert_close(gx, x.grad, rtol=tol["grad_rtol"], atol=tol["grad_atol"])


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_matches_torch(enforce_sorted, bidirectional):
    ref, m = pair(num_layers=2, bidirectional=bidirectional)
    lengths = torch.tensor([7, 5, 5, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 5])
    x = torch.randn(7, 4, 37)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    y, (h, c) = m(packed)
    yr, (hr, cr) = ref(packed)
    assert isinstance(y, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(y.batch_sizes, yr.batch_sizes)
    torch.testing.assert_close(y.data, yr.data, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, cr, atol=1e-5, rtol=0)
    y.data.sum().backward()
    yr.data.sum().backward()
    assert_grads_close(m, ref, TOL[torch.float32])


def test_lengths_keyword_equals_packing():
    ref, m = pair(bidirectional=True, batch_first=True)
    lengths = torch.tensor([1, 6, 4])
    x = torch.randn(3, 6, 37)
    y, (h, c) = m(x, lengths=lengths)
    yr, (hr, cr) = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    yr, _ = pad_packed_sequence(yr, batch_first=True, total_length=6)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)
    assert torch.count_nonzero(y[0, 1:]) == 0


def test_unbatched_input():
    ref, m = pair(bidirectional=True)
    x = torch.randn(5, 37)
    y, (h, c) = m(x)
    yr, (hr, cr) = ref(x)
    assert y.shape == yr.shape and h.shape == hr.shape
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=0)


def test_state_dict_round_trip_strict():
    ref = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True)
    m = LSTM(8, 16, num_layers=2, bidirectional=True)
    m.load_state_dict(ref.state_dict(), strict=True)
    ref2 = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True)
    ref2.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(4, 2, 8)
    torch.testing.assert_close(m(x)[0], ref(x)[0], atol=1e-5, rtol=0)
    assert [p.shape for p in m.parameters()] == [p.shape for p in ref.parameters()]


def test_dropout_between_layers_only_in_training():
    m = LSTM(8, 16, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 8)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    b = m(x)[0]
    assert not torch.allclose(a, b)


def test_backends_agree_and_native_is_used():
    ref, m = pair(num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 37)
    with seqfuse.use_backend("reference"):
        y_ref = m(x)[0]
    m.backend = "native"
    torch.testing.assert_close(m(x)[0], y_ref, atol=1e-5, rtol=0)
    assert "native" in seqfuse.available_backends("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        seqfuse.use_backend("fast").__enter__()


def test_convert_replaces_nested_lstm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LSTM(8, 8, batch_first=True))
    x = torch.randn(2, 5, 4)
    before = model(x)  # Sequential feeds the LSTM's tuple out
    converted = convert(model)
    assert isinstance(converted[1], LSTM)
    torch.testing.assert_close(converted(x)[0], before[0], atol=1e-5, rtol=0)


def test_proj_size_not_implemented():
    with pytest.raises(NotImplementedError, match="proj_size"):
        LSTM(4, 8, proj_size=2)


@pytest.mark.parametrize("call,message", [
    (lambda m: m(torch.randn(2, 3, 5, 8)), "input must be 3-D"),
    (lambda m: m(torch.randn(5, 2, 7)), "expected input_size=8"),
    (lambda m: m(torch.randn(5, 2, 8, dtype=torch.float64)), "does not match the LSTM's parameters"),
    (lambda m: m(torch.randn(5, 2, 8), (torch.zeros(1, 2, 16), torch.zeros(2, 2, 16))), "hx: h_0 must have shape (2, 2, 16)"),
    (lambda m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5, 0])), "lengths must be >= 1"),
    (lambda m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5, -1])), "lengths must be >= 1"),
    (lambda m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5, 6])), "lengths must be <= T=5"),
    (lambda m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5])), "lengths must have shape [B=2]"),
    (lambda m: m(torch.randn(5, 2, 8), lengths=torch.tensor([5.0, 2.0])), "lengths must be an int64"),
    (lambda m: m(torch.randn(0, 2, 8)), "no time steps"),
])
def test_bad_input_names_the_argument(call, message):
    m = LSTM(8, 16, bidirectional=True)
    with pytest.raises((ValueError, TypeError)) as exc:
        call(m)
    assert message in str(exc.value)


def test_bad_input_never_crashes_the_interpreter():
    """Each bad call in a fresh interpreter: a Python exception, never a signal."""
    script = r"""
import torch, seqfuse
from seqfuse import ops
x = torch.randn(5, 2, 4)
w_ih, w_hh, b = torch.randn(1, 24, 4), torch.randn(1, 24, 6), torch.randn(1, 24)
h = torch.zeros(1, 2, 6)
bad = [
    lambda: ops.lstm_layer(x, w_ih, w_hh, b, h, h, torch.tensor([5, 0])),
    lambda: ops.lstm_layer(x, w_ih, w_hh, b, h, h, torch.tensor([5, 99])),
    lambda: ops.lstm_layer(x, w_ih, w_hh, b, h, h, torch.tensor([-3, 2])),
    lambda: ops.lstm_layer(x, w_ih, w_hh, b, h, h, torch.tensor([5, 2, 1])),
    lambda: ops.lstm_layer(x, w_ih, w_hh, b, torch.zeros(1, 3, 6), h, None),
    lambda: ops.lstm_layer(x, torch.randn(1, 24, 5), w_hh, b, h, h, None),
    lambda: ops.lstm_layer(x[:0], w_ih, w_hh, b, h, h, None),
    lambda: ops.lstm_layer(x, w_ih, w_hh, b, h.to("meta"), h, None),
    lambda: seqfuse.nn.LSTM(4, 6)(torch.randn(5, 2, 4), lengths=torch.tensor([1 << 40, 1])),
]
for f in bad:
    try:
        f()
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        pass
    else:
        raise SystemExit("a bad call did not raise")
print("all raised")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "all raised" in proc.stdout


def test_torch_compile_module_fullgraph():
    m = LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 8)
    lengths = torch.tensor([5, 2, 3])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, lengths=lengths)[0], m(x, lengths=lengths)[0])
