"""Hostile input to the seqfuse.nn modules. What a case expects and how the sandbox runs
them: hostile_common.py.

Decisions recorded here (a defined result rather than an error):
  * recurrent modules: T = 0 is an error, as in the ops (test_ops_hostile.py) and in
    torch.nn; B = 0 gives empty results, as torch.nn does (tests/nn/test_rnnbase_api.py);
  * attention modules (AdditiveAttention, DotProductAttention, MultiheadAttention,
    TransformerEncoderLayer): an empty batch or no queries give an empty result of the
    right shape, as torch.nn.MultiheadAttention does; no keys at all (K = 0) is an error;
  * a meta `lengths` beside a meta input is accepted (shapes only), refused beside data.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from seqfuse import nn as snn

from .hostile_common import ALLOC, NATIVE_KERNELS, _close, _r, case_table, raising, run_child

pytestmark = NATIVE_KERNELS

CASES, case = case_table()


# =====================================================================================
# Modules
# =====================================================================================

REC_MODULES = {"LSTM": snn.LSTM, "GRU": snn.GRU, "RNN": snn.RNN}


def _rec_module(cls, **kw):
    return cls(4, 6, num_layers=2, bidirectional=True, **kw)


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    out = []
    for y in x:
        out += _flat(y) if y is not None else []
    return out


def _module_same(make_module, strided_inputs):
    def check():
        m = make_module().eval()
        inputs = strided_inputs()
        assert any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in inputs)
        _close(_flat(m(*inputs)), _flat(m(*[t.contiguous() if isinstance(t, torch.Tensor) else t
                                            for t in inputs])), atol=1e-6, rtol=1e-6)
    return check


def x():
    return _r(5, 3, 4)


for mname, cls in REC_MODULES.items():
    case(f"nn.{mname}/lengths-meta", raising(ValueError, r"lengths is a meta tensor .*input is on cpu",
                                              lambda cls=cls: _rec_module(cls)(x(), lengths=torch.tensor([5, 2, 3], device="meta"))))
    case(f"nn.{mname}/params-meta", raising(ValueError, rf"input is on cpu but the {mname}'s parameters are on meta",
                                            lambda cls=cls: _rec_module(cls, device="meta")(x())))
    case(f"nn.{mname}/input-meta", raising(ValueError, rf"input is on meta but the {mname}'s parameters are on cpu",
                                           lambda cls=cls: _rec_module(cls)(x().to("meta"))))
    case(f"nn.{mname}/input-int64", raising(TypeError, r"input dtype torch.int64 does not match",
                                            lambda cls=cls: _rec_module(cls)(x().long())))
    case(f"nn.{mname}/input-float16", raising(TypeError, r"input dtype torch.float16 does not match",
                                              lambda cls=cls: _rec_module(cls)(x().half())))
    hx_shape = (4, 3, 6)

    def hx_of(t, cls=cls):
        return (t, torch.zeros(hx_shape)) if cls is snn.LSTM else t
    case(f"nn.{mname}/hx-float64", raising(TypeError, r"hx: h_0 dtype torch.float64 does not match",
                                           lambda cls=cls, hx_of=hx_of: _rec_module(cls)(x(), hx_of(torch.zeros(hx_shape, dtype=torch.float64)))))
    case(f"nn.{mname}/hx-meta", raising(ValueError, r"hx: h_0 is on meta but input is on cpu",
                                        lambda cls=cls, hx_of=hx_of: _rec_module(cls)(x(), hx_of(torch.zeros(hx_shape, device="meta")))))

    def lengths_list(cls=cls):
        m, xx = _rec_module(cls).eval(), x()
        _close(_flat(m(xx, lengths=[5, 2, 3])), _flat(m(xx, lengths=torch.tensor([5, 2, 3]))))
    case(f"nn.{mname}/lengths-list", lengths_list)

    def meta_shapes(cls=cls):
        """A module on the meta device computes shapes only: lengths on meta are fine."""
        out, _ = _rec_module(cls, device="meta")(_r(5, 3, 4).to("meta"), lengths=torch.tensor([5, 2, 3], device="meta"))
        assert out.device.type == "meta" and out.shape == (5, 3, 12)
    case(f"nn.{mname}/all-meta-with-lengths", meta_shapes)
    case(f"nn.{mname}/batch-first-strided",
         _module_same(lambda cls=cls: _rec_module(cls, batch_first=True),
                      lambda: (_r(5, 3, 4).transpose(0, 1),)))
    case(f"nn.{mname}/overlapping", _module_same(lambda cls=cls: _rec_module(cls),
                                                 lambda: (_r(5, 1, 4).expand(5, 3, 4),)))
    if mname != "RNN":  # (the RNN's hang on this is rnn/raw/batch-time-2^40's)
        case(f"nn.{mname}/batch-time-2^40", raising(RuntimeError, ALLOC, lambda cls=cls: _rec_module(cls)(
            torch.zeros(1, 1, 1).expand(2**20, 2**20, 4))))

# AdditiveAttention / DotProductAttention


def _q(B=2, Q=3, F=5):
    return _r(B, Q, F)


ADD = lambda **kw: snn.AdditiveAttention(4, 5, 6, **kw)  # noqa: E731  key_size 4, query_size 5
DOT = lambda: snn.DotProductAttention()  # noqa: E731
case("nn.AdditiveAttention/queries-float64", raising(TypeError, r"queries dtype torch.float64 does not match the AdditiveAttention's parameters",
                                                     lambda: ADD()(_q().double(), _r(2, 7, 4), _r(2, 7, 3))))
case("nn.AdditiveAttention/values-float64", raising(TypeError, r"values dtype torch.float64 does not match",
                                                    lambda: ADD()(_q(), _r(2, 7, 4), _r(2, 7, 3).double())))
case("nn.AdditiveAttention/queries-int64", raising(TypeError, r"queries dtype torch.int64 does not match",
                                                   lambda: ADD()(_q().long(), _r(2, 7, 4), _r(2, 7, 3))))
case("nn.AdditiveAttention/queries-meta", raising(ValueError, r"queries is on meta but the AdditiveAttention's parameters are on cpu",
                                                  lambda: ADD()(_q().to("meta"), _r(2, 7, 4), _r(2, 7, 3))))
case("nn.AdditiveAttention/valid_lens-meta", raising(ValueError, r"valid_lens is a meta tensor",
                                                     lambda: ADD()(_q(), _r(2, 7, 4), _r(2, 7, 3), torch.tensor([1, 2], device="meta"))))
case("nn.AdditiveAttention/keys-K-0", raising(ValueError, r"keys must hold at least one key \(K >= 1\)",
                                              lambda: ADD()(_q(), _r(2, 0, 4), _r(2, 0, 3))))
case("nn.DotProductAttention/keys-K-0", raising(ValueError, r"keys must hold at least one key \(K >= 1\)",
                                                lambda: DOT()(_q(), _r(2, 0, 5), _r(2, 0, 3))))
case("nn.DotProductAttention/valid_lens-meta", raising(ValueError, r"valid_lens is a meta tensor",
                                                       lambda: DOT()(_q(), _r(2, 7, 5), _r(2, 7, 3), torch.tensor([1, 2], device="meta"))))


def _empty_result(make, inputs, shape, weights_shape=None):
    def check():
        m = make().eval()
        out = m(*inputs())
        assert out.shape == shape, (tuple(out.shape), shape)
        if weights_shape is not None:
            assert m.attention_weights.shape == weights_shape
    return check


case("nn.AdditiveAttention/batch-0", _empty_result(ADD, lambda: (_q(B=0), _r(0, 7, 4), _r(0, 7, 3), torch.zeros(0, dtype=torch.long)),
                                                   (0, 3, 3), (0, 3, 7)))
case("nn.AdditiveAttention/queries-0", _empty_result(ADD, lambda: (_q(Q=0), _r(2, 7, 4), _r(2, 7, 3)), (2, 0, 3), (2, 0, 7)))
case("nn.DotProductAttention/batch-0", _empty_result(DOT, lambda: (_q(B=0), _r(0, 7, 5), _r(0, 7, 3)), (0, 3, 3), (0, 3, 7)))
case("nn.DotProductAttention/queries-0", _empty_result(DOT, lambda: (_q(Q=0), _r(2, 7, 5), _r(2, 7, 3)), (2, 0, 3), (2, 0, 7)))
case("nn.AdditiveAttention/overlapping", _module_same(ADD, lambda: (_q()[:, :1].expand(2, 3, 5), _r(1, 7, 4).expand(2, 7, 4),
                                                                    _r(2, 7, 3).transpose(0, 1).contiguous().transpose(0, 1))))
case("nn.DotProductAttention/overlapping", _module_same(DOT, lambda: (_q()[:, :1].expand(2, 3, 5), _r(1, 7, 5).expand(2, 7, 5),
                                                                      _r(2, 3, 7).transpose(1, 2))))

# MultiheadAttention / TransformerEncoderLayer: drop-ins for torch's, compared with them


def _mha_pair(**kw):
    torch.manual_seed(1)
    ours = snn.MultiheadAttention(8, 2, **kw).eval()
    theirs = torch.nn.MultiheadAttention(8, 2, **kw).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _mha_like_torch(shape_q, shape_kv, **kw):
    """Shapes (and values) as torch.nn.MultiheadAttention, empty sizes included."""
    def check():
        ours, theirs = _mha_pair(batch_first=True)
        q, kv = _r(*shape_q), _r(*shape_kv)
        got, want = ours(q, kv, kv, **kw), theirs(q, kv, kv, **kw)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                assert g.shape == w.shape, (tuple(g.shape), tuple(w.shape))
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)
    return check


case("nn.MultiheadAttention/batch-0", _mha_like_torch((0, 3, 8), (0, 4, 8)))
case("nn.MultiheadAttention/queries-0", _mha_like_torch((2, 0, 8), (2, 4, 8)))
case("nn.MultiheadAttention/queries-0-keys-0", _mha_like_torch((2, 0, 8), (2, 0, 8)))
def _mha_nan():
    ours, theirs = _mha_pair(batch_first=True)
    q, kv = _r(2, 3, 8), _r(2, 4, 8)
    q[1, 2, 5] = math.nan  # one query row: NaN in that row only (torch: the same)
    got, want = ours(q, kv, kv)[0], theirs(q, kv, kv)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert got.isnan().any(dim=-1).tolist() == [[False] * 3, [False, False, True]]


case("nn.MultiheadAttention/nan-query", _mha_nan)


case("nn.MultiheadAttention/keys-0", raising(ValueError, r"key has no time steps",
                                             lambda: snn.MultiheadAttention(8, 2, batch_first=True)(_r(2, 3, 8), _r(2, 0, 8), _r(2, 0, 8))))
case("nn.MultiheadAttention/query-meta", raising(ValueError, r"query is on meta but the MultiheadAttention's parameters are on cpu",
                                                 lambda: snn.MultiheadAttention(8, 2)(*[_r(3, 2, 8).to("meta")] * 3)))
case("nn.MultiheadAttention/params-meta", raising(ValueError, r"query is on cpu but the MultiheadAttention's parameters are on meta",
                                                  lambda: snn.MultiheadAttention(8, 2, device="meta")(*[_r(3, 2, 8)] * 3)))
case("nn.MultiheadAttention/key_padding_mask-meta", raising(ValueError, r"key_padding_mask is on meta but query is on cpu",
                                                            lambda: snn.MultiheadAttention(8, 2)(*[_r(3, 2, 8)] * 3, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool, device="meta"))))
case("nn.MultiheadAttention/attn_mask-meta", raising(ValueError, r"attn_mask is on meta but query is on cpu",
                                                     lambda: snn.MultiheadAttention(8, 2)(*[_r(3, 2, 8)] * 3, attn_mask=torch.zeros(3, 3, dtype=torch.bool, device="meta"))))
case("nn.MultiheadAttention/valid_lens-meta", raising(ValueError, r"valid_lens is a meta tensor",
                                                      lambda: snn.MultiheadAttention(8, 2)(*[_r(3, 2, 8)] * 3, valid_lens=torch.tensor([1, 2], device="meta"))))
case("nn.MultiheadAttention/key_padding_mask-int", raising(TypeError, r"key_padding_mask must be bool or floating point",
                                                           lambda: snn.MultiheadAttention(8, 2)(*[_r(3, 2, 8)] * 3, key_padding_mask=torch.zeros(2, 3, dtype=torch.long))))


def _encoder_like_torch(shape):
    def check():
        torch.manual_seed(1)
        ours = snn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).eval()
        theirs = torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).eval()
        theirs.load_state_dict(ours.state_dict())
        src = _r(*shape)
        with torch.no_grad():
            got, want = ours(src), theirs(src)
        assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return check


case("nn.TransformerEncoderLayer/batch-0", _encoder_like_torch((0, 3, 8)))
case("nn.TransformerEncoderLayer/sequence-0", _encoder_like_torch((2, 0, 8)))
case("nn.TransformerEncoderLayer/src-meta", raising(ValueError, r"is on meta but the MultiheadAttention's parameters are on cpu",
                                                    lambda: snn.TransformerEncoderLayer(8, 2, 16)(_r(3, 2, 8).to("meta"))))


# =====================================================================================
# The sandbox: every case above in a child interpreter
# =====================================================================================

@pytest.mark.parametrize("name", list(CASES))
def test_sandboxed(name, sandbox):
    result = sandbox[name]
    assert result["ok"], result["error"]


# =====================================================================================
# Numerical edge cases against eager PyTorch (in process: nothing here can crash)
# =====================================================================================

def test_fully_masked_rows_through_the_modules():
    """Rows with no key: zeros and zero gradients, no NaN (torch's module gives NaN)."""
    torch.manual_seed(0)
    m = snn.MultiheadAttention(8, 2, batch_first=True)
    q = _r(2, 3, 8, scale=1e4).requires_grad_()
    out, w = m(q, q, q, key_padding_mask=torch.tensor([[True] * 3, [False, True, True]]))
    assert (out[0] == m.out_proj.bias).all() and w[0].eq(0).all() and out.isfinite().all()
    (g,) = torch.autograd.grad(out.sum(), q)
    assert g.isfinite().all()
    a = snn.AdditiveAttention(8, 8, 6)
    ctx = a(q, q, q, torch.tensor([0, 2]))
    assert ctx[0].eq(0).all() and ctx.isfinite().all()
    assert torch.autograd.grad(ctx.sum(), q)[0].isfinite().all()


if __name__ == "__main__":  # the sandbox's child: run the cases from index argv[1]
    run_child(CASES, int(sys.argv[1]))
