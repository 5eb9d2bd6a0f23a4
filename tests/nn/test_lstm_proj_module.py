"""seqfuse.nn.LSTM with proj_size against torch.nn.LSTM with the same weights: parameter
names and shapes, state_dict, outputs, final states and every gradient for uni- and
bidirectional stacks, batch_first, unbatched, lengths and PackedSequence inputs; eval
(the weight cache) and train; convert / to_torch; errors of the constructor and of hx
with torch.nn's exception types."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfuse.nn as snn

CONFIGS = [  # (num_layers, bidirectional, batch_first, bias)
    (1, False, False, True), (2, True, True, True), (3, True, False, False), (2, False, True, True)]


def pair(L, bidir, batch_first, bias, I=5, H=9, P=4):
    torch.manual_seed(0)
    theirs = nn.LSTM(I, H, num_layers=L, bidirectional=bidir, batch_first=batch_first, bias=bias,
                     proj_size=P)
    ours = snn.LSTM(I, H, num_layers=L, bidirectional=bidir, batch_first=batch_first, bias=bias,
                    proj_size=P)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _grads(module, x, hx, out):
    o, (h, c) = out
    gen = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in (o, h, c))
    leaves = [x] + ([*hx] if hx is not None else []) + list(module.parameters())
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("L,bidir,batch_first,bias", CONFIGS)
def test_parameters_match_torch(L, bidir, batch_first, bias):
    theirs, ours = pair(L, bidir, batch_first, bias)
    assert [(n, p.shape) for n, p in theirs.named_parameters()] == \
        [(n, p.shape) for n, p in ours.named_parameters()]
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert [[p.shape for p in w] for w in ours.all_weights] == [[p.shape for p in w] for w in theirs.all_weights]
    assert ours.proj_size == 4 and "proj_size=4" in repr(ours)


@pytest.mark.parametrize("L,bidir,batch_first,bias", CONFIGS)
@pytest.mark.parametrize("with_hx", [False, True])
def test_outputs_and_gradients_match_torch(L, bidir, batch_first, bias, with_hx):
    theirs, ours = pair(L, bidir, batch_first, bias)
    D = 2 if bidir else 1
    x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
    x.requires_grad_()
    hx = (torch.randn(L * D, 3, 4, requires_grad=True), torch.randn(L * D, 3, 9, requires_grad=True)) \
        if with_hx else None
    want, got = theirs(x, hx), ours(x, hx)
    for a, b in zip([want[0], *want[1]], [got[0], *got[1]], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for a, b in zip(_grads(theirs, x, hx, want), _grads(ours, x, hx, got), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bidir", [False, True])
def test_lengths_and_packed_inputs_match_packed_torch(bidir):
    theirs, ours = pair(2, bidir, True, True)
    x = torch.randn(4, 7, 5)
    lengths = torch.tensor([7, 1, 4, 2])  # a length-1 row, unsorted
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    want_out, (want_h, want_c) = theirs(packed)
    got_out, (got_h, got_c) = ours(packed)
    torch.testing.assert_close(got_out.data, want_out.data, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=0)
    padded, _ = pad_packed_sequence(want_out, batch_first=True, total_length=7)
    out, (h, c) = ours(x, lengths=lengths)
    torch.testing.assert_close(out, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, want_h, atol=1e-5, rtol=0)


def test_unbatched_and_eval_match_torch():
    theirs, ours = pair(2, True, False, True)
    theirs.eval(), ours.eval()
    x = torch.randn(6, 5)
    with torch.no_grad():
        for _ in range(2):  # the second call reads the weight cache
            want, got = theirs(x), ours(x)
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1][0], want[1][0], atol=1e-5, rtol=0)
        assert got[0].shape == (6, 8) and got[1][0].shape == (4, 4) and got[1][1].shape == (4, 9)
        ours.weight_hr_l1.mul_(0.5)  # an in-place change: the cache must see it
        theirs.weight_hr_l1.mul_(0.5)
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=0)


def test_empty_batch_gives_empty_results_of_the_projected_width():
    _, ours = pair(2, True, False, True)
    out, (h, c) = ours(torch.randn(5, 0, 5))
    assert out.shape == (5, 0, 8) and h.shape == (4, 0, 4) and c.shape == (4, 0, 9)


def test_convert_and_to_torch_keep_the_projection():
    theirs, _ = pair(2, True, True, True)
    model = nn.Sequential(theirs)
    x = torch.randn(3, 6, 5)
    want = model(x)[0]
    converted = snn.convert(model)
    assert type(converted[0]) is snn.LSTM and converted[0].proj_size == 4
    torch.testing.assert_close(converted(x)[0], want, atol=1e-5, rtol=0)
    back = snn.to_torch(converted)
    assert type(back[0]) is nn.LSTM and back[0].proj_size == 4
    torch.testing.assert_close(back(x)[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(proj_size=-1), dict(proj_size=9), dict(proj_size=12)])
def test_bad_proj_size_raises_what_torch_raises(kwargs):
    with pytest.raises(ValueError) as theirs:
        nn.LSTM(5, 9, **kwargs)
    with pytest.raises(type(theirs.value), match="proj_size"):
        snn.LSTM(5, 9, **kwargs)


def test_hx_of_the_wrong_width_raises_what_torch_raises():
    theirs, ours = pair(1, False, False, True)
    x = torch.randn(6, 3, 5)
    bad = (torch.randn(1, 3, 9), torch.randn(1, 3, 9))  # h must be proj_size wide
    with pytest.raises(RuntimeError):
        theirs(x, bad)
    with pytest.raises(RuntimeError, match=r"h_0 must have shape \(1, 3, 4\)"):
        ours(x, bad)
