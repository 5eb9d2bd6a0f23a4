"""The recurrent modules' inference weight cache (_RecurrentBase._op_weights): the stacked
weights of a layer are reused while no gradient can reach the parameters, give the same
bits as stacking on every call, and are rebuilt after every kind of weight change."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import seqfuse
from conftest import backend_params

KINDS = {"lstm": seqfuse.nn.LSTM, "gru": seqfuse.nn.GRU, "rnn": seqfuse.nn.RNN}
BACKENDS = backend_params("native", "reference")


def _make(kind, backend, **kw):
    torch.manual_seed(0)
    kw = {"num_layers": 2, "bidirectional": True, **kw}
    return KINDS[kind](5, 6, backend=backend, **kw).eval()


def _uncached(m, x, lengths):
    """The module's answer with the cache bypassed: stacking on every call."""
    m.clear_weight_cache()
    with torch.no_grad():
        orig, m._op_weights = m._op_weights, m._stack_weights
        try:
            return m(x, lengths=lengths)
        finally:
            del m._op_weights
            assert m._op_weights == orig


def _flat(out):
    """A module's (output, state or (h, c)), or an op's tuple: its tensors in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in _flat(part)]


def _same(a, b):
    for x, y in zip(_flat(a), _flat(b)):
        assert torch.equal(x, y)


X = torch.randn(7, 3, 5)
LENGTHS = torch.tensor([7, 2, 5])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_weights_give_the_uncached_bits(kind, backend):
    m = _make(kind, backend)
    with torch.no_grad():
        first = m(X, lengths=LENGTHS)
        assert len(m._weight_cache) == 2  # one entry per layer
        second = m(X, lengths=LENGTHS)
    with torch.inference_mode():
        third = m(X, lengths=LENGTHS)
    _same(first, second)
    _same(first, third)
    _same(first, _uncached(m, X, LENGTHS))


def test_cache_is_used_and_bounded():
    m = _make("lstm", "native")
    with torch.no_grad():
        m(X)
        entry = m._weight_cache[0][2]
        for _ in range(5):
            m(X, lengths=LENGTHS)
        assert m._weight_cache[0][2] is entry  # reused, not rebuilt
    assert len(m._weight_cache) == 2
    # 2 layers x 2 directions: weight_ih, weight_hh and b_ih + b_hh, stacked copies, and
    # the kernel's panels of both weights (units padded to whole vectors)
    G, H = 24, 6
    panels = [m._weight_cache[layer][3] for layer in (0, 1)]
    assert all(p is not None and p.dtype == torch.float32 for p in panels)
    expected = sum(2 * (G * i + G * H + G) for i in (5, 12)) * 4 + sum(p.numel() for p in panels) * 4
    assert m.weight_cache_bytes() == expected
    one_way = _make("lstm", "native", bidirectional=False)
    with torch.no_grad():
        one_way(X)
    # one direction: the cached weights are views of the parameters and count nothing;
    # the bias sum b_ih + b_hh is the entry's only memory
    entry = one_way._weight_cache[0][2]
    assert all(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
               for t, p in zip(entry[:2], (one_way.weight_ih_l0, one_way.weight_hh_l0)))
    panels = sum(one_way._weight_cache[layer][3].numel() for layer in (0, 1))
    assert one_way.weight_cache_bytes() == (2 * G + panels) * 4  # 2 layers, G float32 each


def test_training_does_not_use_the_cache():
    m = _make("gru", "native").train()
    with torch.no_grad():  # train mode without gradients (a validation pass without eval())
        m(X, lengths=LENGTHS)
    assert not m._weight_cache
    y, _ = m(X, lengths=LENGTHS)
    assert not m._weight_cache
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def _change_optimizer(m):
    # a step taken in eval mode: only the parameters' versions tell the cache
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(X)[0].square().sum().backward()
    opt.step()


def _change_load_state_dict(m):
    other = copy.deepcopy(m)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    m.load_state_dict(other.state_dict())


def _change_init(m):
    torch.nn.init.orthogonal_(m.weight_hh_l1)


def _change_no_grad_inplace(m):
    with torch.no_grad():
        m.bias_hh_l0_reverse.add_(0.3)


def _change_new_parameter(m):
    m.weight_ih_l0 = torch.nn.Parameter(torch.randn_like(m.weight_ih_l0))


def _change_data_assignment(m):
    m.weight_hh_l0.data = torch.randn_like(m.weight_hh_l0)


def _change_dtype(m):
    m.double()


def _change_state_dict_copy(m):
    # what EMA helpers do: copy_ into state_dict() tensors (detached, same version counter)
    for t in m.state_dict().values():
        t.copy_(t * 0.5)


CHANGES = [_change_optimizer, _change_load_state_dict, _change_init, _change_no_grad_inplace,
           _change_new_parameter, _change_data_assignment, _change_dtype, _change_state_dict_copy]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.removeprefix("_change_"))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_weight_change_invalidates(kind, change):
    m = _make(kind, "native")
    with torch.no_grad():
        before = m(X, lengths=LENGTHS)
    change(m)
    x = X.to(m.weight_ih_l0.dtype)
    with torch.no_grad():
        after = m(x, lengths=LENGTHS)
    fresh = _uncached(m, x, LENGTHS)
    _same(after, fresh)
    assert not torch.equal(_flat(after)[0].to(before[0].dtype), before[0])


@pytest.mark.parametrize("switch", ["eval", "train"])
def test_mode_switch_empties_the_cache(switch):
    # Weight surgery through .data is usually bracketed by train()/eval(): it is then seen.
    m = _make("lstm", "native")
    with torch.no_grad():
        m(X)
    assert m._weight_cache
    getattr(m, switch)()
    assert not m._weight_cache
    m.eval()
    m.weight_ih_l0.data.mul_(2.0)
    with torch.no_grad():
        got = m(X)
    _same(got, _uncached(m, X, None))


def test_data_write_needs_clear_weight_cache():
    # Documented limit: .data bypasses the version counter; clear_weight_cache() is the way.
    m = _make("lstm", "native")
    with torch.no_grad():
        m(X)
    m.weight_ih_l0.data.mul_(2.0)
    m.clear_weight_cache()
    with torch.no_grad():
        got = m(X)
    _same(got, _uncached(m, X, None))


def test_threads_share_the_cache_safely():
    m = _make("lstm", "native")
    want = _uncached(m, X, LENGTHS)
    errors = []

    def worker():
        try:
            for _ in range(20):
                with torch.no_grad():
                    _same(m(X, lengths=LENGTHS), want)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_cache_is_not_pickled_or_copied():
    m = _make("rnn", "native")
    with torch.no_grad():
        m(X)
    assert m._weight_cache
    assert copy.deepcopy(m)._weight_cache == {}
    assert set(m.state_dict()) == {n for n, _ in m.named_parameters()}
