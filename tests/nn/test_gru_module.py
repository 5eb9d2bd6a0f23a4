"""seqfuse.nn.GRU as a drop-in for torch.nn.GRU."""
import pytest
import torch
from conftest import TOL, requires_native
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfuse
from seqfuse.nn import GRU, convert

pytestmark = requires_native


def pair(I=37, H=53, **kw):
    ref = torch.nn.GRU(I, H, **kw)
    return ref, convert(ref)


def assert_grads_close(m, ref, tol):
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol["grad_rtol"], atol=tol["grad_atol"], msg=name)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_padded_input_matches_torch(num_layers, bidirectional, batch_first, with_hx, bias):
    ref, m = pair(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                  bias=bias)
    assert isinstance(m, GRU)
    assert list(m.state_dict()) == list(ref.state_dict())
    T, B = 6, 3
    x = torch.randn((B, T, 37) if batch_first else (T, B, 37), requires_grad=True)
    D = 2 if bidirectional else 1
    hx = torch.randn(num_layers * D, B, 53) if with_hx else None
    y, h = m(x, hx)
    yr, hr = ref(x, hx)
    tol = TOL[torch.float32]
    torch.testing.assert_close(y, yr, atol=tol["out_atol"], rtol=0)
    torch.testing.assert_close(h, hr, atol=tol["out_atol"], rtol=0)
    ((y * yr.detach().cos()).sum() + h.sum()).backward()
    ((yr * yr.detach().cos()).sum() + hr.sum()).backward()
    assert_grads_close(m, ref, tol)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_matches_torch(enforce_sorted, bidirectional):
    ref, m = pair(num_layers=2, bidirectional=bidirectional)
    lengths = torch.tensor([7, 5, 5, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 5])
    packed = pack_padded_sequence(torch.randn(7, 4, 37), lengths, enforce_sorted=enforce_sorted)
    y, h = m(packed)
    yr, hr = ref(packed)
    assert isinstance(y, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(y.batch_sizes, yr.batch_sizes)
    torch.testing.assert_close(y.data, yr.data, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)
    (y.data.sum() + h.sum()).backward()
    (yr.data.sum() + hr.sum()).backward()
    assert_grads_close(m, ref, TOL[torch.float32])


def test_lengths_keyword_equals_packing():
    ref, m = pair(bidirectional=True, batch_first=True)
    lengths = torch.tensor([1, 6, 4])
    x = torch.randn(3, 6, 37)
    y, h = m(x, lengths=lengths)
    yr, hr = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    yr, _ = pad_packed_sequence(yr, batch_first=True, total_length=6)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)


def test_unbatched_input_and_batch_of_one():
    ref, m = pair(bidirectional=True)
    x = torch.randn(5, 37)
    for inp in (x, x.unsqueeze(1)):
        y, h = m(inp)
        yr, hr = ref(inp)
        torch.testing.assert_close(y, yr, atol=1e-5, rtol=0)
        torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)


def test_non_contiguous_and_expanded_inputs_work():
    ref, m = pair(num_layers=2, bidirectional=True)
    x = torch.randn(3, 6, 37).transpose(0, 1)          # non-contiguous [T, B, I]
    h0 = torch.randn(4, 1, 53).expand(4, 3, 53)        # expanded batch
    y, h = m(x, h0)
    yr, hr = ref(x, h0)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)


def test_state_dict_round_trip_strict():
    ref, m = pair(num_layers=2, bidirectional=True)
    fresh = GRU(37, 53, num_layers=2, bidirectional=True)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    back = torch.nn.GRU(37, 53, num_layers=2, bidirectional=True)
    back.load_state_dict(fresh.state_dict(), strict=True)
    x = torch.randn(4, 2, 37)
    torch.testing.assert_close(fresh(x)[0], back(x)[0], atol=1e-5, rtol=0)


def test_backends_agree_and_native_is_used():
    _, m = pair(num_layers=2)
    x = torch.randn(5, 3, 37)
    y = m(x)[0]
    with seqfuse.use_backend("reference"):
        yr = m(x)[0]
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=0)
    ep = torch.export.export(m, (x,))
    assert any("seqfuse.gru_layer" in str(n.target) for n in ep.graph.nodes)


def test_convert_replaces_nested_gru():
    model = torch.nn.Sequential(torch.nn.Linear(3, 37), torch.nn.GRU(37, 53))
    converted = convert(model)
    assert isinstance(converted[1], GRU)


@pytest.mark.parametrize("call,message", [
    (lambda m: m(torch.randn(5, 3, 36)), "input_size=37"),
    # hx for the wrong number of layers or directions, or the wrong batch
    (lambda m: m(torch.randn(5, 3, 37), torch.randn(1, 3, 53)), "h_0 must have shape (2, 3, 53)"),
    (lambda m: m(torch.randn(5, 3, 37), torch.randn(4, 3, 53)), "h_0 must have shape (2, 3, 53)"),
    (lambda m: m(torch.randn(5, 3, 37), torch.randn(2, 2, 53)), "h_0 must have shape (2, 3, 53)"),
    (lambda m: m(torch.randn(5, 3, 37), torch.randn(2, 3, 53, dtype=torch.float64)), "h_0 dtype"),
    (lambda m: m(torch.randn(5, 3, 37, dtype=torch.float64)), "GRU's parameters"),
    (lambda m: m(torch.randn(5, 3, 37), lengths=torch.tensor([5, 0, 2])), "lengths must be >= 1"),
    (lambda m: m(torch.randn(5, 3, 37), lengths=torch.tensor([5, 6, 2])), "max(lengths)=6"),
])
def test_bad_input_names_the_argument(call, message):
    _, m = pair(num_layers=2)
    with pytest.raises((ValueError, TypeError)) as exc:
        call(m)
    assert message in str(exc.value)
