"""Hostile input to every public entry point: the compiled ops called directly
(torch.ops.seqfuse.*), their wrappers (seqfuse.ops), the functional forms on the native and
reference backends, the seqfuse.nn modules, the zoo models and the `seqfuse` command line.

Each hostile case expects either a clear exception (a given type, its message naming the
offending argument) or a defined result (what eager PyTorch gives, an empty result for an
empty batch, the same result as the contiguous copy of a strided or overlapping input),
never a crash, a hang or garbage.

The cases that could crash the interpreter (raw op calls with bad arguments, empty and
huge sizes, meta tensors) run in child interpreters: the `sandbox` fixture runs the whole
table in one child, restarting it after the case that killed it (a signal, or a hang past
its time limit), so a crash fails that one case. The numerical edge cases (huge scores,
fully masked rows, saturated gates, NaN and inf) and the command line run in process.

Decisions recorded here (a defined result rather than an error):
  * recurrent layers: T = 0 and B = 0 are errors (torch.nn.LSTM also refuses T = 0;
    tests/nn pins the module's "empty batch" error);
  * attention modules (AdditiveAttention, DotProductAttention, MultiheadAttention,
    TransformerEncoderLayer): an empty batch or no queries give an empty result of the
    right shape, as torch.nn.MultiheadAttention does; no keys at all (K = 0) is an error;
  * the ops themselves refuse empty sizes (the kernels are not written for them);
  * additive_attention with Dv = 0 gives an empty context and the usual weights;
  * an input with I = 0 features runs (the recurrence on the biases alone), as torch.nn;
  * a meta `lengths` beside a meta input is accepted (shapes only), refused beside data;
  * huge sizes through expand(): a clear error before any 32-bit index could overflow
    (I, H >= 2^31), or the allocator's "can't allocate memory" error for results that
    cannot exist; flash attention with B*H*Q*K > 2^32 (no [Q, K] matrix) is computed
    exactly, dropout's 64-bit index included.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from seqfuse import functional, ops, reference
from seqfuse import nn as snn
from seqfuse.zoo.models import MODELS

HERE = Path(__file__).resolve()
NATIVE = ops.has_native_kernel("lstm_layer", "cpu")
pytestmark = pytest.mark.skipif(not NATIVE, reason="seqfuse._C was not built with CPU kernels")

ALLOC = r"can't allocate memory|out of memory|not enough memory"  # the allocator refusing

# name -> a zero-argument check, run in the sandbox (an AssertionError or an unexpected
# exception fails it)
CASES: dict[str, Callable[[], None]] = {}


def case(name: str, fn: Callable[[], None]) -> None:
    assert name not in CASES, name
    CASES[name] = fn


def raising(exc, pattern: str, call: Callable[[], object]) -> Callable[[], None]:
    def check():
        with pytest.raises(exc, match=pattern):
            call()
    return check


def _close(got, want, atol=1e-5, rtol=1e-5):
    """Equal within tolerance, NaN where `want` has NaN, same shapes."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        assert g.shape == w.shape, (tuple(g.shape), tuple(w.shape))
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        if g.device.type == "meta":
            continue
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True)


def _r(*shape, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, dtype=dtype) * scale


# =====================================================================================
# Recurrent layer ops: torch.ops.seqfuse.*, seqfuse.ops.*, functional.* (native, reference)
# =====================================================================================


@dataclass(frozen=True)
class Rec:
    name: str
    op: str
    NG: int
    biases: tuple[str, ...]
    states: tuple[str, ...]
    n_out: int  # outputs the wrappers return

    def args(self, T=5, B=3, I=4, H=6, D=2, dtype=torch.float32) -> dict:
        a = {"input": _r(T, B, I, dtype=dtype), "weight_ih": _r(D, self.NG * H, I, dtype=dtype, scale=0.4),
             "weight_hh": _r(D, self.NG * H, H, dtype=dtype, scale=0.4)}
        for b in self.biases:
            a[b] = _r(D, self.NG * H, dtype=dtype, scale=0.4)
        for s in self.states:
            a[s] = _r(D, B, H, dtype=dtype)
        a["lengths"] = None
        if self.name == "rnn":
            a["nonlinearity"] = "tanh"
        return a

    def names(self) -> list[str]:
        return ["input", "weight_ih", "weight_hh", *self.biases, *self.states, "lengths"]

    def call(self, entry: str, a: dict):
        pos = [a[n] for n in self.names()]
        extra = [a["nonlinearity"]] if self.name == "rnn" else []
        if entry == "raw":
            op = getattr(torch.ops.seqfuse, self.op).default
            return tuple(op(*pos, *(extra or [False])))[: self.n_out]
        if entry == "ops":
            return tuple(getattr(ops, self.op)(*pos, *extra))
        return tuple(getattr(functional, self.op)(*pos, *extra, backend=entry))


RECS = [Rec("lstm", "lstm_layer", 4, ("bias",), ("hx", "cx"), 3),
        Rec("gru", "gru_layer", 3, ("bias_ih", "bias_hh"), ("hx",), 2),
        Rec("rnn", "rnn_layer", 1, ("bias",), ("hx",), 2)]
ENTRIES = ("raw", "ops", "native", "reference")


def _set(**kw):
    """A mutation: kw values are functions of (kind, args) giving the new argument."""
    def mutate(k: Rec, a: dict):
        for name, f in kw.items():
            a[name] = f(k, a)
    return mutate


def _states(f):
    def mutate(k: Rec, a: dict):
        for s in k.states:
            a[s] = f(k, a, s)
    return mutate


def _both(*mutations):
    def mutate(k, a):
        for m in mutations:
            m(k, a)
    return mutate


def _hidden_zero(k: Rec, a: dict):
    D, I = a["weight_ih"].shape[0], a["input"].shape[2]
    a["weight_ih"], a["weight_hh"] = torch.zeros(D, 0, I), torch.zeros(D, 0, 0)
    for b in k.biases:
        a[b] = torch.zeros(D, 0)
    for s in k.states:
        a[s] = torch.zeros(D, a["input"].shape[1], 0)


def _huge_features(k: Rec, a: dict):
    I = 2**31 + 1  # a weight row longer than a 32-bit int: expand() allocates nothing
    T, B, _ = a["input"].shape
    a["input"] = torch.zeros(1, 1, 1).expand(T, B, I)
    a["weight_ih"] = torch.zeros(1, 1, 1).expand(a["weight_ih"].shape[0], a["weight_ih"].shape[1], I)


def _huge_batch_time(k: Rec, a: dict):
    T = B = 2**20  # T*B*H far past 2^31 (and past any memory: the output cannot exist)
    a["input"] = torch.zeros(1, 1, 1).expand(T, B, a["input"].shape[2])
    for s in k.states:
        a[s] = torch.zeros(1, 1, 1).expand(a[s].shape[0], B, a[s].shape[2])


def _huge_hidden(k: Rec, a: dict):
    T = B = 2**10
    H, G = 2**21, k.NG * 2**21  # T*B*H = 2^41, W_hh 2^42+ elements: none of it can exist
    z = torch.zeros(1, 1, 1)
    a["input"] = z.expand(T, B, 4)
    a["weight_ih"], a["weight_hh"] = z.expand(1, G, 4), z.expand(1, G, H)
    for b in k.biases:
        a[b] = z[0].expand(1, G)
    for s in k.states:
        a[s] = z.expand(1, B, H)


# (id, mutation, exception, message pattern: {op}, {bias} and {G} are filled in)
REC_BAD = [
    ("input-2d", _set(input=lambda k, a: a["input"][0]), RuntimeError, r"{op}: input must be 3-D"),
    ("input-4d", _set(input=lambda k, a: a["input"][None]), RuntimeError, r"{op}: input must be 3-D"),
    ("input-int64", _set(input=lambda k, a: a["input"].long()), RuntimeError, r"{op}: input dtype must be"),
    ("input-bool", _set(input=lambda k, a: a["input"] > 0), RuntimeError, r"{op}: input dtype must be"),
    ("input-list", _set(input=lambda k, a: a["input"].tolist()), (TypeError, RuntimeError),
     r"argument 'input'|input must be a Tensor"),
    ("weight_ih-float64", _set(weight_ih=lambda k, a: a["weight_ih"].double()), RuntimeError,
     r"{op}: weight_ih must have the input's dtype"),
    ("hx-float64", _set(hx=lambda k, a: a["hx"].double()), RuntimeError, r"{op}: hx must have the input's dtype"),
    ("bias-float64", lambda k, a: a.update({k.biases[0]: a[k.biases[0]].double()}), RuntimeError,
     r"{op}: {bias} must have the input's dtype"),
    ("weight_ih-wrong-features", _set(weight_ih=lambda k, a: _r(2, k.NG * 6, 5)), RuntimeError,
     r"{op}: weight_ih must be \[2, {G}, 4\]"),
    ("weight_ih-2d", _set(weight_ih=lambda k, a: a["weight_ih"][0]), RuntimeError, r"{op}: weight_ih must be \[D,"),
    ("weight_ih-3-directions", _set(weight_ih=lambda k, a: _r(3, k.NG * 6, 4)), RuntimeError,
     r"{op}: weight_ih must be .*with D in \{{1, 2\}}"),
    ("weight_hh-not-square", _set(weight_hh=lambda k, a: _r(2, k.NG * 6, 7)), RuntimeError,
     r"{op}: weight_hh must be"),
    ("weight_hh-directions", _set(weight_hh=lambda k, a: a["weight_hh"][:1]), RuntimeError,
     r"{op}: weight_hh must be \[D=2"),
    ("hidden-size-0", _hidden_zero, RuntimeError, r"{op}: weight_hh must be"),
    ("hx-wrong-batch", _set(hx=lambda k, a: _r(2, 4, 6)), RuntimeError, r"{op}: hx must be \[2, 3, 6\]"),
    ("hx-2d", _set(hx=lambda k, a: a["hx"][0]), RuntimeError, r"{op}: hx must be \[2, 3, 6\]"),
    ("bias-wrong-size", lambda k, a: a.update({k.biases[0]: _r(2, k.NG * 6 + 1)}), RuntimeError,
     r"{op}: {bias} must be \[2, {G}\]"),
    ("weight_ih-meta", _set(weight_ih=lambda k, a: a["weight_ih"].to("meta")), RuntimeError,
     r"{op}: weight_ih must be on the input's device cpu, got meta"),
    ("hx-meta", _set(hx=lambda k, a: a["hx"].to("meta")), RuntimeError,
     r"{op}: hx must be on the input's device cpu, got meta"),
    ("bias-meta", lambda k, a: a.update({k.biases[0]: a[k.biases[0]].to("meta")}), RuntimeError,
     r"{op}: {bias} must be on the input's device cpu, got meta"),
    ("lengths-negative", _set(lengths=lambda k, a: torch.tensor([5, -1, 2])), RuntimeError,
     r"{op}: every length must be >= 1"),
    ("lengths-zero", _set(lengths=lambda k, a: torch.tensor([5, 0, 2])), RuntimeError,
     r"{op}: every length must be >= 1"),
    ("lengths-past-T", _set(lengths=lambda k, a: torch.tensor([5, 6, 2])), RuntimeError,
     r"{op}: every length must be <= T=5"),
    ("lengths-2^40", _set(lengths=lambda k, a: torch.tensor([1 << 40, 1, 1])), RuntimeError,
     r"{op}: every length must be <= T=5"),
    ("lengths-float", _set(lengths=lambda k, a: torch.tensor([5.0, 2.0, 3.0])), RuntimeError,
     r"{op}: lengths must be int64"),
    ("lengths-nan", _set(lengths=lambda k, a: torch.tensor([5.0, math.nan, 3.0])), RuntimeError,
     r"{op}: lengths must be int64"),
    ("lengths-int32", _set(lengths=lambda k, a: torch.tensor([5, 2, 3], dtype=torch.int32)), RuntimeError,
     r"{op}: lengths must be int64"),
    ("lengths-count", _set(lengths=lambda k, a: torch.tensor([5, 2])), RuntimeError, r"{op}: lengths must be \[B=3\]"),
    ("lengths-2d", _set(lengths=lambda k, a: torch.tensor([[5, 2, 3]])), RuntimeError,
     r"{op}: lengths must be \[B=3\]"),
    ("lengths-meta", _set(lengths=lambda k, a: torch.tensor([5, 2, 3], device="meta")), RuntimeError,
     r"{op}: lengths must be a CPU tensor, got device meta"),
    ("lengths-list", _set(lengths=lambda k, a: [5, 2, 3]), (TypeError, RuntimeError),
     r"argument 'lengths'|lengths must be a Tensor"),
    ("T-0", _set(input=lambda k, a: a["input"][:0]), RuntimeError, r"{op}: input must have at least one time step"),
    ("B-0", _both(_set(input=lambda k, a: a["input"][:, :0]), _states(lambda k, a, s: a[s][:, :0])),
     RuntimeError, r"{op}: input must have a batch of at least 1"),
]
REC_BAD_NATIVE_ONLY = [  # the compiled kernels' own limits (the reference has none)
    ("input-float16", _set(input=lambda k, a: a["input"].half()), RuntimeError,
     r"{op}: input dtype must be .*float16 on CUDA"),
    ("features-2^31", _huge_features, RuntimeError, r"{op}: input must have fewer than 2\^31 features"),
]

for k in RECS:
    bad = REC_BAD + [("nonlinearity-gelu", _set(nonlinearity=lambda k, a: "gelu"), RuntimeError,
                      r"{op}: nonlinearity must be 'tanh' or 'relu', got 'gelu'")] * (k.name == "rnn")
    for entry in ENTRIES:
        rows = bad + (REC_BAD_NATIVE_ONLY if entry != "reference" else [])
        for cid, mutate, exc, pattern in rows:
            pat = pattern.format(op=k.op, bias=k.biases[0], G=k.NG * 6)

            def call(k=k, entry=entry, mutate=mutate):
                a = k.args()
                mutate(k, a)
                return k.call(entry, a)
            case(f"{k.name}/{entry}/{cid}", raising(exc, pat, call))
        # An input on the meta device beside CPU weights: the device check names the first
        # argument on another device; the native backend has no meta kernel at all.
        meta_pat = (f"backend 'native' has no {k.op} kernel for device 'meta'" if entry == "native"
                    else f"{k.op}: weight_ih must be on the input's device meta, got cpu")

        def call_meta(k=k, entry=entry):
            a = k.args()
            a["input"] = a["input"].to("meta")
            return k.call(entry, a)
        case(f"{k.name}/{entry}/input-meta", raising(RuntimeError, meta_pat, call_meta))
        # A result that cannot exist: the allocator refuses it, nothing overflows. (Not on
        # the reference: eager PyTorch's own kernels decide there.)
        for cid, make_huge in (("batch-time-hidden-2^41", _huge_hidden), ("batch-time-2^40", _huge_batch_time)):
            if entry == "reference" or (cid == "batch-time-2^40" and entry != "raw"):
                continue

            def call_huge(k=k, entry=entry, make_huge=make_huge):
                a = k.args()
                make_huge(k, a)
                return k.call(entry, a)
            case(f"{k.name}/{entry}/{cid}", raising(RuntimeError, ALLOC, call_huge))


# -- defined results: strided and overlapping memory, I = 0, NaN and inf --------------

def _rec_same(k: Rec, entry: str, transform: Callable[[dict], dict], lengths=None):
    """entry on the transformed arguments == entry on their contiguous copies."""
    def check():
        a = k.args()
        a["lengths"] = lengths
        b = transform(dict(a))
        assert any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in b.values())
        c = {n: (t.contiguous() if isinstance(t, torch.Tensor) else t) for n, t in b.items()}
        _close(k.call(entry, b), k.call(entry, c), atol=1e-6, rtol=1e-6)
    return check


def _strided(a):
    out = dict(a)
    out["input"] = a["input"].transpose(0, 1).contiguous().transpose(0, 1)       # batch-major memory
    out["weight_ih"] = a["weight_ih"].transpose(1, 2).contiguous().transpose(1, 2)
    out["weight_hh"] = torch.cat([a["weight_hh"], a["weight_hh"]], 2)[..., ::2]  # a strided slice
    out["hx"] = a["hx"].transpose(0, 2).contiguous().transpose(0, 2)
    return out


def _overlapping(a):
    out = dict(a)
    T, B, I = a["input"].shape
    out["input"] = a["input"][:, :1].expand(T, B, I)        # every batch row the same memory
    out["hx"] = a["hx"][:, :1].expand_as(a["hx"])
    out["weight_hh"] = a["weight_hh"][:, :1, :].expand_as(a["weight_hh"])  # stride 0 over rows
    return out


def _strided_lengths(a):
    out = dict(a)
    out["lengths"] = torch.tensor([5, 0, 2, 0, 4])[::2]
    return out


def _overlapping_lengths(a):
    out = dict(a)
    out["lengths"] = torch.tensor([4]).expand(3)
    return out


def _rec_vs_reference(k: Rec, entry: str, make: Callable[[Rec], dict], atol=1e-5):
    """entry == the reference (eager PyTorch), NaN positions included."""
    def check():
        a = make(k)
        _close(k.call(entry, a), k.call("reference", a), atol=atol, rtol=1e-5)
    return check


def _features_zero(k):
    a = k.args()
    a["input"], a["weight_ih"] = a["input"][..., :0], a["weight_ih"][..., :0]
    return a


def _grad_through(call, x0, views):
    """d(weighted sum of call(view(x0)))/d x0 for each view: they must agree."""
    grads = []
    for view in views:
        out = call(view(x0))
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads.append(torch.autograd.grad((out * weights).sum(), x0)[0])
    _close(grads[0], grads[1], atol=1e-6, rtol=1e-6)


def _rec_grad_overlapping(k: Rec):
    """Gradients through an expanded (stride 0) and a transposed input: as through copies."""
    def check():
        a = k.args()
        x0 = a["input"][:, :1].clone().requires_grad_()
        call = lambda x: k.call("ops", dict(a, input=x))[0]  # noqa: E731
        _grad_through(call, x0, [lambda t: t.expand(5, 3, 4), lambda t: t.expand(5, 3, 4).contiguous()])
        x1 = a["input"].transpose(0, 1).clone().requires_grad_()  # [B, T, I]
        _grad_through(call, x1, [lambda t: t.transpose(0, 1), lambda t: t.transpose(0, 1).contiguous()])
    return check


for k in RECS:
    case(f"{k.name}/ops/overlapping-and-strided-gradients", _rec_grad_overlapping(k))
    for entry in ("raw", "ops", "native"):
        case(f"{k.name}/{entry}/strided", _rec_same(k, entry, _strided))
        case(f"{k.name}/{entry}/overlapping", _rec_same(k, entry, _overlapping))
        case(f"{k.name}/{entry}/lengths-strided", _rec_same(k, entry, _strided_lengths))
        case(f"{k.name}/{entry}/lengths-overlapping", _rec_same(k, entry, _overlapping_lengths))
        case(f"{k.name}/{entry}/features-0", _rec_vs_reference(k, entry, _features_zero))


# =====================================================================================
# Attention ops
# =====================================================================================

def add_args(B=2, Q=3, K=5, A=8, Dv=4) -> dict:
    return {"query": _r(B, Q, A), "key": _r(B, K, A), "w_v": _r(A), "value": _r(B, K, Dv),
            "valid_lens": None, "mask": None}


def add_call(entry: str, a: dict):
    pos = [a[n] for n in ("query", "key", "w_v", "value", "valid_lens", "mask")]
    if entry == "raw":
        return tuple(torch.ops.seqfuse.additive_attention.default(*pos))
    if entry == "ops":
        return tuple(ops.additive_attention(*pos))
    return tuple(functional.additive_attention(*pos, backend=entry))


def sdpa_args(B=2, H=3, Q=4, K=6, D=8, Dv=5) -> dict:
    return {"query": _r(B, H, Q, D), "key": _r(B, H, K, D), "value": _r(B, H, K, Dv),
            "attn_mask": None, "valid_lens": None, "is_causal": False, "scale": None,
            "dropout_p": 0.0, "seed": 0}


SDPA_NAMES = ("query", "key", "value", "attn_mask", "valid_lens", "is_causal", "scale", "dropout_p", "seed")


def sdpa_call(entry: str, a: dict):
    pos = [a[n] for n in SDPA_NAMES]
    if entry == "raw":
        return torch.ops.seqfuse.scaled_dot_product_attention.default(*pos)[0]
    if entry == "ops":
        return ops.scaled_dot_product_attention(*pos)
    return functional.scaled_dot_product_attention(*pos, backend=entry)


def _a(**kw):
    def mutate(a):
        for name, f in kw.items():
            a[name] = f(a)
        return a
    return mutate


LENS_BAD = [  # valid_lens of either op (K = 5 for additive, 6 for SDPA)
    ("valid_lens-negative", _a(valid_lens=lambda a: torch.tensor([-1, 2])), r"{op}: valid_lens must be in \[0, K={K}\]"),
    ("valid_lens-past-K", _a(valid_lens=lambda a: torch.tensor([2, 99])), r"{op}: valid_lens must be in \[0, K={K}\]"),
    ("valid_lens-float", _a(valid_lens=lambda a: torch.tensor([1.0, 2.0])), r"{op}: valid_lens must be an integer tensor"),
    ("valid_lens-nan", _a(valid_lens=lambda a: torch.tensor([math.nan, 2.0])), r"{op}: valid_lens must be an integer tensor"),
    ("valid_lens-bool", _a(valid_lens=lambda a: torch.tensor([True, False])), r"{op}: valid_lens must be an integer tensor"),
    ("valid_lens-count", _a(valid_lens=lambda a: torch.tensor([1, 2, 3])), r"{op}: valid_lens must be \[B=2\] or"),
    ("valid_lens-3d", _a(valid_lens=lambda a: torch.ones(2, 1, 1, dtype=torch.long)), r"{op}: valid_lens must be \[B=2\] or"),
    ("valid_lens-meta", _a(valid_lens=lambda a: torch.tensor([1, 2], device="meta")), r"{op}: valid_lens must be on the"),
]

ADD_BAD = [
    ("query-2d", _a(query=lambda a: a["query"][0]), RuntimeError, r"additive_attention: query must be 3-D"),
    ("query-int64", _a(query=lambda a: a["query"].long()), RuntimeError, r"additive_attention: query dtype must be"),
    ("query-list", _a(query=lambda a: a["query"].tolist()), (TypeError, RuntimeError),
     r"argument 'query'|query must be a Tensor"),
    ("key-batch", _a(key=lambda a: _r(3, 5, 8)), RuntimeError, r"additive_attention: key must be \[B=2, K>=1, A=8\]"),
    ("key-features", _a(key=lambda a: _r(2, 5, 7)), RuntimeError, r"additive_attention: key must be \[B=2, K>=1, A=8\]"),
    ("key-K-0", _a(key=lambda a: _r(2, 0, 8), value=lambda a: _r(2, 0, 4)), RuntimeError,
     r"additive_attention: key must be \[B=2, K>=1"),
    ("w_v-2d", _a(w_v=lambda a: a["w_v"][None]), RuntimeError, r"additive_attention: w_v must be \[A=8\]"),
    ("w_v-short", _a(w_v=lambda a: _r(1)), RuntimeError, r"additive_attention: w_v must be \[A=8\]"),
    ("value-K", _a(value=lambda a: _r(2, 4, 4)), RuntimeError, r"additive_attention: value must be \[B=2, K=5"),
    ("value-2d", _a(value=lambda a: _r(2, 5)), RuntimeError, r"additive_attention: value must be \[B=2, K=5"),
    ("key-float64", _a(key=lambda a: a["key"].double()), RuntimeError,
     r"additive_attention: key must have the query's dtype"),
    ("value-float64", _a(value=lambda a: a["value"].double()), RuntimeError,
     r"additive_attention: value must have the query's dtype"),
    ("key-meta", _a(key=lambda a: a["key"].to("meta")), RuntimeError, r"additive_attention: key must be on the"),
    ("w_v-meta", _a(w_v=lambda a: a["w_v"].to("meta")), RuntimeError, r"additive_attention: w_v must be on the"),
    ("mask-int", _a(mask=lambda a: torch.ones(2, 3, 5, dtype=torch.long)), RuntimeError,
     r"additive_attention: mask must be bool"),
    ("mask-shape", _a(mask=lambda a: torch.ones(2, 4, 5, dtype=torch.bool)), RuntimeError,
     r"additive_attention: mask must be broadcastable to \[2, 3, 5\]"),
    ("mask-5d", _a(mask=lambda a: torch.ones(1, 1, 2, 3, 5, dtype=torch.bool)), RuntimeError,
     r"additive_attention: mask must be broadcastable"),
    ("mask-meta", _a(mask=lambda a: torch.ones(2, 3, 5, dtype=torch.bool, device="meta")), RuntimeError,
     r"additive_attention: mask must be on the"),
    ("B-0", _a(query=lambda a: a["query"][:0], key=lambda a: a["key"][:0], value=lambda a: a["value"][:0]),
     RuntimeError, r"additive_attention: query must have B, Q, A >= 1"),
    ("Q-0", _a(query=lambda a: a["query"][:, :0]), RuntimeError, r"additive_attention: query must have B, Q, A >= 1"),
    ("A-0", _a(query=lambda a: a["query"][..., :0], key=lambda a: a["key"][..., :0], w_v=lambda a: a["w_v"][:0]),
     RuntimeError, r"additive_attention: query must have B, Q, A >= 1"),
] + [(cid, m, RuntimeError, p.format(op="additive_attention", K=5)) for cid, m, p in LENS_BAD]

ADD_BAD_NATIVE_ONLY = [
    ("query-float16", _a(query=lambda a: a["query"].half()), RuntimeError,
     r"additive_attention: query dtype must be .*float16 on CUDA"),
    ("weights-2^44", _a(query=lambda a: torch.zeros(1, 1, 1).expand(2**4, 2**20, 1),
                        key=lambda a: torch.zeros(1, 1, 1).expand(2**4, 2**20, 1), w_v=lambda a: _r(1),
                        value=lambda a: torch.zeros(1, 1, 1).expand(2**4, 2**20, 1)), RuntimeError, ALLOC),
]

SDPA_BAD = [
    ("query-3d", _a(query=lambda a: a["query"][0]), RuntimeError, r"scaled_dot_product_attention: query must be 4-D"),
    ("query-int64", _a(query=lambda a: a["query"].long()), RuntimeError,
     r"scaled_dot_product_attention: query dtype must be"),
    ("key-heads", _a(key=lambda a: _r(2, 2, 6, 8)), RuntimeError,
     r"scaled_dot_product_attention: key must be \[B=2, H=3, K>=1, D=8\]"),
    ("key-dim", _a(key=lambda a: _r(2, 3, 6, 7)), RuntimeError,
     r"scaled_dot_product_attention: key must be \[B=2, H=3, K>=1, D=8\]"),
    ("key-K-0", _a(key=lambda a: _r(2, 3, 0, 8), value=lambda a: _r(2, 3, 0, 5)), RuntimeError,
     r"scaled_dot_product_attention: key must be \[B=2, H=3, K>=1"),
    ("value-K", _a(value=lambda a: _r(2, 3, 5, 5)), RuntimeError,
     r"scaled_dot_product_attention: value must be \[B=2, H=3, K=6"),
    ("value-Dv-0", _a(value=lambda a: _r(2, 3, 6, 0)), RuntimeError,
     r"scaled_dot_product_attention: value must be \[B=2, H=3, K=6, Dv>=1\]"),
    ("key-float64", _a(key=lambda a: a["key"].double()), RuntimeError,
     r"scaled_dot_product_attention: key must have the query's dtype"),
    ("value-meta", _a(value=lambda a: a["value"].to("meta")), RuntimeError,
     r"scaled_dot_product_attention: value must be on the"),
    ("attn_mask-int", _a(attn_mask=lambda a: torch.ones(4, 6, dtype=torch.long)), RuntimeError,
     r"scaled_dot_product_attention: attn_mask must be bool .*or floating"),
    ("attn_mask-shape", _a(attn_mask=lambda a: torch.ones(5, 6, dtype=torch.bool)), RuntimeError,
     r"scaled_dot_product_attention: attn_mask must be broadcastable to \[2, 3, 4, 6\]"),
    ("attn_mask-meta", _a(attn_mask=lambda a: torch.ones(4, 6, dtype=torch.bool, device="meta")), RuntimeError,
     r"scaled_dot_product_attention: attn_mask must be on the"),
    ("scale-nan", _a(scale=lambda a: math.nan), RuntimeError, r"scaled_dot_product_attention: scale must be finite"),
    ("scale-inf", _a(scale=lambda a: math.inf), RuntimeError, r"scaled_dot_product_attention: scale must be finite"),
    ("dropout_p-negative", _a(dropout_p=lambda a: -0.1), RuntimeError,
     r"scaled_dot_product_attention: dropout_p must be in \[0, 1\)"),
    ("dropout_p-1", _a(dropout_p=lambda a: 1.0), RuntimeError, r"scaled_dot_product_attention: dropout_p must be in \[0, 1\)"),
    ("dropout_p-nan", _a(dropout_p=lambda a: math.nan), RuntimeError,
     r"scaled_dot_product_attention: dropout_p must be in \[0, 1\)"),
    ("B-0", _a(query=lambda a: a["query"][:0], key=lambda a: a["key"][:0], value=lambda a: a["value"][:0]),
     RuntimeError, r"scaled_dot_product_attention: query must have B, H, Q, D >= 1"),
    ("Q-0", _a(query=lambda a: a["query"][:, :, :0]), RuntimeError,
     r"scaled_dot_product_attention: query must have B, H, Q, D >= 1"),
    ("D-0", _a(query=lambda a: a["query"][..., :0], key=lambda a: a["key"][..., :0]), RuntimeError,
     r"scaled_dot_product_attention: query must have B, H, Q, D >= 1"),
] + [(cid, m, RuntimeError, p.format(op="scaled_dot_product_attention", K=6)) for cid, m, p in LENS_BAD]

SDPA_BAD_NATIVE_ONLY = [
    ("query-float16", _a(query=lambda a: a["query"].half()), RuntimeError,
     r"scaled_dot_product_attention: query dtype must be .*float16 on CUDA"),
    ("output-2^42", _a(query=lambda a: torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 2**10, 1),
                       key=lambda a: torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 1, 1),
                       value=lambda a: torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 1, 1)), RuntimeError, ALLOC),
]

for opname, bad, native_only, make, call in (
        ("additive", ADD_BAD, ADD_BAD_NATIVE_ONLY, add_args, add_call),
        ("sdpa", SDPA_BAD, SDPA_BAD_NATIVE_ONLY, sdpa_args, sdpa_call)):
    for entry in ENTRIES:
        for cid, mutate, exc, pattern in bad + (native_only if entry != "reference" else []):
            def run(entry=entry, mutate=mutate, make=make, call=call):
                a = make()
                mutate(a)
                return call(entry, a)
            case(f"{opname}/{entry}/{cid}", raising(exc, pattern, run))


# -- defined results --------------------------------------------------------------

def _att_same(make, call, entry, transform):
    def check():
        a = make()
        b = transform(dict(a))
        assert any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in b.values())
        c = {n: (t.contiguous() if isinstance(t, torch.Tensor) else t) for n, t in b.items()}
        _close(call(entry, b), call(entry, c), atol=1e-6, rtol=1e-6)
    return check


def _att_vs_reference(make, call, entry, transform, atol=1e-5):
    def check():
        a = transform(make())
        _close(call(entry, a), call("reference", a), atol=atol)
    return check


def _add_strided(a):
    a["query"] = a["query"].transpose(0, 1).contiguous().transpose(0, 1)
    a["key"] = a["key"].transpose(1, 2).contiguous().transpose(1, 2)
    a["w_v"] = torch.stack([a["w_v"], a["w_v"]], 1)[:, 0]
    a["value"] = a["value"].transpose(0, 2).contiguous().transpose(0, 2)
    a["valid_lens"] = torch.tensor([[3, 9], [5, 9]])[:, 0]
    a["mask"] = (torch.rand(2, 5, 3) > 0.3).transpose(1, 2)
    return a


def _add_overlapping(a):
    a["query"] = a["query"][:, :1].expand(2, 3, 8)
    a["key"] = a["key"][:1].expand(2, 5, 8)
    a["value"] = a["value"][:, :, :1].expand(2, 5, 4)
    a["valid_lens"] = torch.tensor([4]).expand(2)
    a["mask"] = (torch.rand(1, 1, 5) > 0.3).expand(2, 3, 5)
    return a


def _sdpa_strided(a):
    a["query"] = a["query"].transpose(1, 2).contiguous().transpose(1, 2)   # [B, Q, H, D] memory
    a["key"] = a["key"].transpose(2, 3).contiguous().transpose(2, 3)
    a["value"] = a["value"].permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    a["attn_mask"] = (torch.rand(6, 4) > 0.3).t()
    a["valid_lens"] = torch.tensor([[3, 9, 9, 9], [6, 9, 9, 9]])[:, 0]
    return a


def _sdpa_overlapping(a):
    a["query"] = a["query"][:, :1].expand(2, 3, 4, 8)
    a["key"] = a["key"][:, :, :1].expand(2, 3, 6, 8)
    a["value"] = a["value"][:1].expand(2, 3, 6, 5)
    a["attn_mask"] = torch.randn(1, 1, 1, 6).expand(2, 3, 4, 6)
    a["valid_lens"] = torch.tensor([5]).expand(2)
    return a


def _add_value_empty(a):
    a["value"] = a["value"][..., :0]
    return a


def _nan(name, index, value=math.nan):
    def transform(a):
        a[name] = a[name].clone()
        a[name][index] = value
        return a
    return transform


for entry in ("raw", "ops", "native"):
    case(f"additive/{entry}/strided", _att_same(add_args, add_call, entry, _add_strided))
    case(f"additive/{entry}/overlapping", _att_same(add_args, add_call, entry, _add_overlapping))
    case(f"additive/{entry}/value-Dv-0", _att_vs_reference(add_args, add_call, entry, _add_value_empty))
    case(f"additive/{entry}/valid_lens-int32",
         _att_vs_reference(add_args, add_call, entry,
                           _a(valid_lens=lambda a: torch.tensor([0, 5], dtype=torch.int32))))
    case(f"sdpa/{entry}/strided", _att_same(sdpa_args, sdpa_call, entry, _sdpa_strided))
    case(f"sdpa/{entry}/overlapping", _att_same(sdpa_args, sdpa_call, entry, _sdpa_overlapping))
    case(f"sdpa/{entry}/scale-0", _att_vs_reference(sdpa_args, sdpa_call, entry, _a(scale=lambda a: 0.0)))
    case(f"sdpa/{entry}/attn_mask-float64",
         _att_vs_reference(sdpa_args, sdpa_call, entry,
                           _a(attn_mask=lambda a: torch.randn(4, 6, dtype=torch.float64))))
    case(f"sdpa/{entry}/attn_mask-nan",
         _att_vs_reference(sdpa_args, sdpa_call, entry, _a(attn_mask=lambda a: torch.tensor(
             [[0.0, math.nan, 0.0, 0.0, 0.0, 0.0]]).expand(4, 6))))


def _att_grad_overlapping():
    a = add_args()
    q0 = a["query"][:, :1].clone().requires_grad_()
    _grad_through(lambda q: add_call("ops", dict(a, query=q))[0], q0,
                  [lambda t: t.expand(2, 3, 8), lambda t: t.expand(2, 3, 8).contiguous()])
    b = sdpa_args()
    k0 = b["key"][:, :, :1].clone().requires_grad_()
    _grad_through(lambda k: sdpa_call("ops", dict(b, key=k)), k0,
                  [lambda t: t.expand(2, 3, 6, 8), lambda t: t.expand(2, 3, 6, 8).contiguous()])


case("additive+sdpa/ops/overlapping-gradients", _att_grad_overlapping)


def _sdpa_index_past_2_32():
    """B*H*Q*K > 2^32 with no [Q, K] matrix: the flash kernel is exact, and its dropout
    decision hashes the full 64-bit index of (q, k). Only the last two query rows see any
    key (valid_lens [B, Q]), so this is cheap; keys and queries are one expanded value,
    so each row's weights are uniform over the keys it keeps."""
    Q, K, p, seed = 8192, 2**20, 0.5, 7
    q = torch.ones(1, 1, 1, 1).expand(1, 1, Q, 1)
    k = torch.ones(1, 1, 1, 1).expand(1, 1, K, 1)
    v = torch.randn(1, 1, K, 1, dtype=torch.float64)
    lens = torch.zeros(1, Q, dtype=torch.long)
    lens[0, -2:] = K
    out = ops.scaled_dot_product_attention(q.double(), k.double(), v, None, lens, dropout_p=p, seed=seed)
    assert (out[0, 0, :-2] == 0).all()
    s = reference._fmix32(torch.tensor((seed & 0xFFFFFFFF) ^ 0x9E3779B9, dtype=torch.int64))
    for row in (Q - 2, Q - 1):
        index = row * K + torch.arange(K, dtype=torch.int64)
        assert int(index[-1]) > 2**32
        h = reference._fmix32((index & 0xFFFFFFFF) ^ reference._fmix32((index >> 32) ^ s))
        keep = (h >> 8) >= int(p * 16777216.0 + 0.5)
        expected = (v[0, 0, :, 0] * keep).sum() / K / (1 - p)
        torch.testing.assert_close(out[0, 0, row, 0], expected, rtol=1e-9, atol=1e-12)


case("sdpa/ops/index-past-2^32", _sdpa_index_past_2_32)


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
# Zoo models
# =====================================================================================

ZOO_V, ZOO_TGT_V = 13, 11
# Tiny configs, a copy of tests/conftest.py's ZOO_CONFIGS: this file also runs as a script
# (the sandbox's child interpreter), where that conftest is not importable.
ZOO = {
    "lstm-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3, num_layers=2,
                            bidirectional=True),
    "bilstm-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3),
    "bilstm-attention": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3, attention_size=5),
    "bigru-classifier": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_classes=3),
    "transformer-classifier": dict(vocab_size=ZOO_V, d_model=12, num_classes=3, nhead=3, num_layers=2,
                                   dim_feedforward=13, max_len=16, dropout=0.0),
    "lstm-tagger": dict(vocab_size=ZOO_V, embed_dim=7, hidden_size=9, num_tags=5),
}
DENSE = {"lstm-rows": (dict(hidden_size=9, num_classes=3, rows=7, cols=5), "images"),
         "lstm-regressor": (dict(num_features=5, hidden_size=9, num_layers=2, dropout=0.0), "x")}


def _model(name, cfg, backend="auto"):
    torch.manual_seed(0)
    return MODELS[name](**cfg, backend=backend).eval()


ids = lambda *rows: torch.tensor(rows)  # noqa: E731
for name, cfg in ZOO.items():
    m = lambda name=name, cfg=cfg: _model(name, cfg)  # noqa: E731
    vocab = rf"input_ids must be token ids in \[0, vocab_size={ZOO_V}\)"
    case(f"{name}/token-past-vocab", raising(ValueError, vocab, lambda m=m: m()(ids([1, 2, ZOO_V]))))
    case(f"{name}/token-negative", raising(ValueError, vocab, lambda m=m: m()(ids([1, -1, 2]))))
    case(f"{name}/batch-0", raising(ValueError, r"input_ids must have at least one row and one token",
                                    lambda m=m: m()(torch.zeros(0, 3, dtype=torch.long))))
    case(f"{name}/tokens-0", raising(ValueError, r"input_ids must have at least one row and one token",
                                     lambda m=m: m()(torch.zeros(2, 0, dtype=torch.long))))
    case(f"{name}/ids-float", raising(TypeError, r"input_ids must hold integer token ids",
                                      lambda m=m: m()(torch.ones(2, 3))))
    case(f"{name}/ids-3d", raising(ValueError, r"input_ids must be a \[B, T\] tensor",
                                   lambda m=m: m()(torch.ones(2, 3, 1, dtype=torch.long))))
    case(f"{name}/lengths-past-T", raising(ValueError, r"lengths must be in \[1, T=3\]",
                                           lambda m=m: m()(ids([1, 2, 3], [4, 5, 0]), torch.tensor([3, 4]))))
    case(f"{name}/lengths-meta", raising(ValueError, r"lengths is a meta tensor .*input_ids is on cpu",
                                         lambda m=m: m()(ids([1, 2, 3], [4, 5, 0]), torch.tensor([3, 2], device="meta"))))
    case(f"{name}/lengths-float", raising(TypeError, r"lengths must be an int64 tensor",
                                          lambda m=m: m()(ids([1, 2, 3], [4, 5, 0]), torch.tensor([3.0, 2.0]))))

S2S = dict(src_vocab_size=ZOO_V, tgt_vocab_size=ZOO_TGT_V, embed_dim=7, hidden_size=9, attention_size=5,
           max_decode_len=6)
s2s = lambda: _model("seq2seq-attention", S2S)  # noqa: E731
case("seq2seq-attention/src-past-vocab", raising(ValueError, rf"src_ids must be token ids in \[0, vocab_size={ZOO_V}\)",
                                                 lambda: s2s()(ids([1, 99]), None, ids([2, 3]))))
case("seq2seq-attention/tgt-past-vocab", raising(ValueError, rf"tgt_in must be token ids in \[0, vocab_size={ZOO_TGT_V}\)",
                                                 lambda: s2s()(ids([1, 5]), None, ids([2, ZOO_TGT_V]))))
case("seq2seq-attention/tgt-0", raising(ValueError, r"tgt_in must have at least one row and one token",
                                        lambda: s2s()(ids([1, 5]), None, torch.zeros(1, 0, dtype=torch.long))))
case("seq2seq-attention/src-batch-0", raising(ValueError, r"src_ids must have at least one row and one token",
                                              lambda: s2s()(torch.zeros(0, 2, dtype=torch.long), None, ids([2, 3]))))
case("seq2seq-attention/batch-mismatch", raising(ValueError, r"tgt_in must have the batch size of src_ids \(2\), got 3",
                                                 lambda: s2s()(ids([1, 5], [2, 3]), None, ids([2, 3], [2, 3], [2, 3]))))
case("seq2seq-attention/greedy-max_len-0", raising(ValueError, r"max_len must be a positive integer, got 0",
                                                   lambda: s2s().greedy_decode(ids([1, 5]), None, 0)))
case("seq2seq-attention/greedy-max_len-negative", raising(ValueError, r"max_len must be a positive integer, got -1",
                                                          lambda: s2s().greedy_decode(ids([1, 5]), None, -1)))
for name, (cfg, arg) in DENSE.items():
    m = lambda name=name, cfg=cfg: _model(name, cfg)  # noqa: E731
    case(f"{name}/batch-0", raising(ValueError, rf"{arg} must have at least one row and one step",
                                    lambda m=m: m()(torch.zeros(0, 7, 5))))
    case(f"{name}/steps-0", raising(ValueError, rf"{arg} must have at least one row and one step",
                                    lambda m=m: m()(torch.zeros(2, 0, 5))))
    case(f"{name}/int64", raising(TypeError, rf"{arg} must be a floating-point tensor",
                                  lambda m=m: m()(torch.zeros(2, 7, 5, dtype=torch.long))))
    case(f"{name}/features", raising(ValueError, rf"{arg} must be \[B, T, 5\]", lambda m=m: m()(torch.zeros(2, 7, 4))))
    case(f"{name}/batch-time-2^40", raising(RuntimeError, ALLOC, lambda m=m: m()(torch.zeros(1, 1, 5).expand(2**20, 2**20, 5))))


# =====================================================================================
# The sandbox: every case above in a child interpreter
# =====================================================================================

CASE_TIMEOUT = 15    # seconds for one case: past it the child dumps its stacks and exits
CHILD_TIMEOUT = 300  # seconds for one child run, in case even that fails

def _child(start: int) -> None:
    import faulthandler

    warnings.filterwarnings("ignore")
    names = list(CASES)
    for i in range(start, len(names)):
        print(f"@@START {i}", flush=True)
        torch.manual_seed(0)
        faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
        try:
            CASES[names[i]]()
            result = {"ok": True}
        except BaseException as exc:  # noqa: BLE001  (pytest's Failed is a BaseException)
            text = str(exc).strip()
            result = {"ok": False, "error": f"{type(exc).__name__}: {text[:3000]}"}
        faulthandler.cancel_dump_traceback_later()
        print(f"@@DONE {i} {json.dumps(result)}", flush=True)


@pytest.fixture(scope="module")
def sandbox() -> dict[str, dict]:
    names = list(CASES)
    results: dict[str, dict] = {}
    start = 0
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    while start < len(names):
        try:
            proc = subprocess.run([sys.executable, str(HERE), str(start)], capture_output=True,
                                  text=True, timeout=CHILD_TIMEOUT, env=env)
            out, err, how = proc.stdout, proc.stderr, f"exited with status {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
            out, err, how = decode(exc.stdout), decode(exc.stderr), f"hung (killed after {CHILD_TIMEOUT} s)"
        started = None
        for line in out.splitlines():
            if line.startswith("@@START "):
                started = int(line.split()[1])
            elif line.startswith("@@DONE "):
                _, i, payload = line.split(" ", 2)
                results[names[int(i)]] = json.loads(payload)
                started = None
        if len(results) == len(names):
            break
        tail = "\n".join(err.strip().splitlines()[-15:])
        if started is None:  # died outside any case (at start-up): nothing more to learn
            for n in names[start:]:
                results.setdefault(n, {"ok": False, "error": f"the child interpreter {how}:\n{tail}"})
            break
        results[names[started]] = {"ok": False, "error": f"the interpreter {how} in this case:\n{tail}"}
        start = started + 1
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_sandboxed(name, sandbox):
    result = sandbox[name]
    assert result["ok"], result["error"]


# =====================================================================================
# Numerical edge cases against eager PyTorch (in process: nothing here can crash)
# =====================================================================================

def _finite_where(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 1e-5) -> None:
    """Wherever eager PyTorch is finite, seqfuse is finite and equal; NaN where it is NaN."""
    finite = want.isfinite()
    assert got[finite].isfinite().all(), "seqfuse gives NaN/inf where eager PyTorch is finite"
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=rtol)
    assert torch.equal(got.isnan(), want.isnan()), (
        f"NaN at other positions than eager PyTorch: {int(got.isnan().sum())} vs {int(want.isnan().sum())}")


def _grads(fn, inputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out.detach(), *torch.autograd.grad((out * weights).sum(), inputs)]


def _eps(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e4, 1e10, 1e30])
def test_additive_attention_huge_queries(scale, dtype):
    """tanh saturates: the scores stay bounded by |w_v|_1, the weights finite."""
    torch.manual_seed(0)
    q, k, w, v = _r(2, 3, 8, dtype=dtype) * scale, _r(2, 5, 8, dtype=dtype), _r(8, dtype=dtype), _r(2, 5, 4, dtype=dtype)
    lens = torch.tensor([5, 0])  # and a row with no key
    ours = _grads(lambda *t: ops.additive_attention(*t, lens), [q, k, w, v])
    eager = _grads(lambda *t: reference.additive_attention(*t, lens), [q, k, w, v])
    for got, want in zip(ours, eager):
        _finite_where(got, want, atol=_eps(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e4, 1e10, 1e15, 1e30])
def test_sdpa_huge_scores(scale, dtype):
    """Scores up to ~1e30 (finite in float32): the online softmax subtracts the running
    maximum, so the weights (near one-hot) and every gradient stay finite. Errors scale
    with the scores (a rounding of s by eps*|s| moves the weights), hence the tolerance."""
    torch.manual_seed(0)
    q, k, v = _r(1, 2, 3, 8, dtype=dtype) * scale, _r(1, 2, 300, 8, dtype=dtype), _r(1, 2, 300, 4, dtype=dtype)
    smax = float((q @ k.transpose(-1, -2)).abs().max())
    ours = _grads(lambda *t: ops.scaled_dot_product_attention(*t), [q, k, v])
    eager = _grads(lambda *t: reference.scaled_dot_product_attention(*t), [q, k, v])
    for got, want in zip(ours, eager):
        assert want.isfinite().all()
        _finite_where(got, want, atol=_eps(dtype) * max(1.0, smax))


MASKS = {
    # every key of a row masked, by each mechanism: zeros (the ops' documented result)
    "bool-row": lambda: torch.ones(1, 1, 3, 300, dtype=torch.bool).index_fill(2, torch.tensor([1]), False),
    "float-row-inf": lambda: torch.zeros(1, 1, 3, 300).index_fill(2, torch.tensor([1]), -math.inf),
    # large finite negatives are not a mask: eager gives uniform weights there, so must we
    "float-all-1e9": lambda: torch.full((1, 2, 3, 300), -1e9),
    "float-all-1e30": lambda: torch.full((1, 2, 3, 300), -1e30),
    "float-all-max": lambda: torch.full((1, 2, 3, 300), -torch.finfo(torch.float32).max),
    # the first key blocks all masked: the online softmax starts from a -inf maximum
    "float-first-blocks-inf": lambda: torch.zeros(1, 1, 3, 300).index_fill(3, torch.arange(200), -math.inf),
}


@pytest.mark.parametrize("mask,scale", [pytest.param(m, s, id=f"{m}-{s:g}")
                                        for m in MASKS for s in (1.0, 1e10)])
def test_sdpa_masked_rows(mask, scale):
    """Every key of a row masked (zeros), or every key under the same huge finite value,
    where the scores are all equal and the weights uniform. The backward must not take
    its weights from the saved logsumexp there: m + log(K) rounds to m when |m| >> 1, which
    once made every gradient of such a row K times too large."""
    torch.manual_seed(0)
    q, k, v = _r(1, 2, 3, 8) * scale, _r(1, 2, 300, 8), _r(1, 2, 300, 4)
    smax = float((q @ k.transpose(-1, -2)).abs().max())
    m = MASKS[mask]()
    ours = _grads(lambda *t: ops.scaled_dot_product_attention(*t, attn_mask=m), [q, k, v])
    eager = _grads(lambda *t: reference.scaled_dot_product_attention(*t, attn_mask=m), [q, k, v])
    for got, want in zip(ours, eager):
        assert want.isfinite().all()
        _finite_where(got, want, atol=1e-5 * max(1.0, smax))
    if mask in ("bool-row", "float-row-inf"):
        assert (ours[0][:, :, 1] == 0).all() and (ours[1][:, :, 1] == 0).all()


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("what", ["inputs-1e30", "weights-1e4", "both"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn-tanh", "rnn-relu"])
def test_recurrent_saturated_gates(kind, what, dtype):
    """Gates pushed to their limits (sigmoid 0/1, tanh +-1): eager PyTorch is finite, so
    seqfuse must be, and equal; gradients likewise. (relu does not saturate: its inputs
    are scaled by 1e3 only, so that eager stays finite.) With weights of 1e4, gates sit a
    few ulps from 1, where 1 - tanh^2 changes by ~1e-3 relative per ulp of tanh: float32
    gradients then agree to ~1e-2 only (eager's own float32 error), float64 tightly."""
    torch.manual_seed(0)
    k = {r.name: r for r in RECS}[kind.split("-")[0]]
    a = k.args(dtype=dtype)
    if kind.startswith("rnn"):
        a["nonlinearity"] = kind.split("-")[1]
    if what in ("inputs-1e30", "both"):
        a["input"] = a["input"] * (1e30 if kind != "rnn-relu" else 1e3)
    if what in ("weights-1e4", "both"):
        a["weight_ih"], a["weight_hh"] = a["weight_ih"] * 1e4, a["weight_hh"] * 1e4
    a["lengths"] = torch.tensor([5, 2, 4])
    names = [n for n in k.names() if n != "lengths" and a[n] is not None]

    def run(entry):
        def fn(*ts):
            return k.call(entry, dict(a, **dict(zip(names, ts))))[0]
        return _grads(fn, [a[n] for n in names])
    tol = 1e-2 if what != "inputs-1e30" and dtype == torch.float32 else _eps(dtype)
    for got, want in zip(run("ops"), run("reference")):
        assert want.isfinite().all()
        _finite_where(got, want, atol=tol * max(1.0, float(want.abs().max())))


# -- NaN and inf propagate as in eager PyTorch -----------------------------------------

def _rec_nan_params():
    out = []
    for kind in ("lstm", "gru", "rnn-tanh", "rnn-relu"):
        for value in (math.nan, math.inf, -math.inf):
            for dtype in (torch.float32, torch.float64):
                out.append(pytest.param(kind, value, dtype, id=f"{kind}-{value}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("kind,value,dtype", _rec_nan_params())
def test_recurrent_nan_inf_like_eager(kind, value, dtype):
    torch.manual_seed(0)
    k = {r.name: r for r in RECS}[kind.split("-")[0]]
    a = k.args(dtype=dtype)
    if kind.startswith("rnn"):
        a["nonlinearity"] = kind.split("-")[1]
    a["input"][2, 1, 0] = value
    a["lengths"] = torch.tensor([5, 4, 3])
    for got, want in zip(k.call("ops", a), k.call("reference", a)):
        _finite_where(got, want, atol=_eps(dtype))


NAN_DTYPES = (torch.float32, torch.float64)


@pytest.mark.parametrize("dtype", NAN_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("where", ["query", "key", "w_v", "value"])
def test_additive_attention_nan_like_eager(where, dtype):
    """A NaN score makes its row of weights NaN, as eager's softmax does (the vectorised
    max and exp once dropped it, giving finite rows); outputs and gradients."""
    torch.manual_seed(0)
    a = {n: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in add_args().items()}
    a[where] = a[where].clone()
    a[where].view(-1)[1] = math.nan
    names = ["query", "key", "w_v", "value"]

    def run(entry):
        return _grads(lambda *t: add_call(entry, dict(a, **dict(zip(names, t))))[0], [a[n] for n in names])
    for got, want in zip(run("ops"), run("reference")):
        _finite_where(got, want, atol=_eps(dtype))


@pytest.mark.parametrize("dtype", NAN_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("where", ["query", "key", "value", "attn_mask"])
def test_sdpa_nan_like_eager(where, dtype):
    """A NaN score makes its row NaN; a NaN in a floating mask is a masked key (the
    reference's `mask > -inf`), whatever the ISA's vector paths. Outputs and gradients."""
    torch.manual_seed(0)
    a = {n: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in sdpa_args().items()}
    if where == "attn_mask":
        a["attn_mask"] = torch.zeros(2, 3, 4, 6, dtype=dtype)
    a[where] = a[where].clone()
    a[where][1, 2, 3, 4] = math.nan
    names = ["query", "key", "value"]

    def run(entry):
        return _grads(lambda *t: sdpa_call(entry, dict(a, **dict(zip(names, t)))), [a[n] for n in names])
    for got, want in zip(run("ops"), run("reference")):
        _finite_where(got, want, atol=_eps(dtype))


@pytest.mark.parametrize("name", ["lstm-rows", "lstm-regressor"])
def test_dense_models_nan_like_eager(name):
    cfg, _ = DENSE[name]
    x = _r(2, 7, 5)
    x[1, 3, 2] = math.nan
    got, want = _model(name, cfg)(x), _model(name, cfg, backend="reference")(x)
    _finite_where(got, want, atol=1e-5)
    assert got[0].isfinite().all() and got[1].isnan().all()


# =====================================================================================
# The command line: exit status 2 (1 where documented), one line on stderr naming the
# argument, never a traceback
# =====================================================================================

def _cli(capsys, *argv) -> tuple[int, str, str]:
    from seqfuse.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def dense_artifact(tmp_path_factory):
    """An untrained lstm-regressor checkpoint and its ONNX artifact (no data needed)."""
    from seqfuse.zoo.export import export_checkpoint
    from seqfuse.zoo.train import save_checkpoint

    root = tmp_path_factory.mktemp("hostile-cli")
    torch.manual_seed(0)
    model = MODELS["lstm-regressor"](num_features=5, hidden_size=4, num_layers=1, dropout=0.0)
    ckpt = save_checkpoint(model, "lstm-regressor", {}, root / "ckpt")
    export_checkpoint(ckpt, root / "art", formats=("onnx",), use_data=False)
    return ckpt, root / "art"


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "a-file.bin").write_bytes(b"\xff\xfe\x00 not text")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    return tmp_path


CLI_BAD = [  # (argv with {file}, {dir}, {tmp} placeholders, exit status, stderr pattern)
    (["train", "no-such-model"], 2, r"seqfuse train: unknown model 'no-such-model'"),
    (["train", "lstm-regressor", "--epochs", "-1", "--out", "{tmp}/o"], 2, r"epochs must be a positive integer"),
    (["train", "lstm-regressor", "--epochs", "0", "--out", "{tmp}/o"], 2, r"epochs must be a positive integer"),
    (["train", "lstm-regressor", "--batch-size", "0", "--out", "{tmp}/o"], 2, r"batch_size must be a positive integer"),
    (["train", "lstm-regressor", "--lr", "nan", "--out", "{tmp}/o"], 2, r"--lr must be a finite number > 0, got nan"),
    (["train", "lstm-regressor", "--lr", "inf", "--out", "{tmp}/o"], 2, r"--lr must be a finite number > 0, got inf"),
    (["train", "lstm-regressor", "--lr", "-1", "--out", "{tmp}/o"], 2, r"--lr must be a finite number > 0"),
    (["train", "lstm-regressor", "--max-minutes", "nan", "--out", "{tmp}/o"], 2, r"max_minutes must be > 0"),
    (["train", "lstm-regressor", "--max-minutes", "-1", "--out", "{tmp}/o"], 2, r"max_minutes must be > 0"),
    (["train", "lstm-regressor", "--epochs", "abc"], 2, r"argument --epochs: invalid int value"),
    (["train", "lstm-regressor", "--limit", "0", "--out", "{tmp}/o"], 2, r"limit must be >= 1, got 0"),
    (["train", "lstm-regressor", "--backend", "nope", "--out", "{tmp}/o"], 2, r"backend must be one of"),
    (["train", "lstm-regressor", "--device", "nope", "--out", "{tmp}/o"], 2, r"--device must be cpu or cuda\[:N\], got 'nope'"),
    (["train", "lstm-regressor", "--device", "meta", "--out", "{tmp}/o"], 2, r"--device must be cpu or cuda\[:N\], got 'meta'"),
    (["train", "lstm-regressor", "--out", "{file}"], 2, r"--out: .*a-file exists and is not a folder"),
    (["evaluate", "{tmp}/nope"], 2, r"seqfuse evaluate: checkpoint folder .*nope does not exist"),
    (["evaluate", "{file}"], 2, r"seqfuse evaluate: .*a-file"),
    (["evaluate", "{dir}"], 2, r"seqfuse evaluate: checkpoint folder .*empty-dir has no config.json"),
    (["evaluate", "{dir}", "--device", "meta"], 2, r"--device must be cpu or cuda\[:N\], got 'meta'"),
    (["evaluate", "{dir}", "--device", "gpu7"], 2, r"--device must be cpu or cuda\[:N\], got 'gpu7'"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x"], 2, r"seqfuse export: checkpoint folder .*nope does not exist"),
    (["export", "{dir}", "--out", "{tmp}/x"], 2, r"seqfuse export: checkpoint folder .*empty-dir has no config.json"),
    (["export", "{tmp}/nope", "--out", "{file}"], 2, r"seqfuse export: --out: .*a-file exists and is not a folder"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x", "--formats", "nope"], 2, r"--formats: unknown \['nope'\]"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x", "--formats", ","], 2, r"--formats: unknown"),
    (["export", "{tmp}/nope"], 2, r"the following arguments are required: --out"),
    (["predict", "{tmp}/nope", "x"], 2, r"seqfuse predict: .*nope"),
    (["predict", "{file}", "x"], 2, r"seqfuse predict: .*a-file"),
    (["predict", "{dir}", "x"], 2, r"seqfuse predict: .*empty-dir .*manifest.json"),
    (["predict", "{dir}"], 2, r"seqfuse predict: give inputs"),
    (["predict", "{dir}", "--file", "{tmp}/missing.txt"], 2, r"seqfuse predict: --file: .*missing.txt"),
    (["predict", "{dir}", "--file", "{dir}"], 2, r"seqfuse predict: --file: .*empty-dir"),
    (["predict", "{dir}", "--file", "{tmp}/empty.txt"], 2, r"seqfuse predict: give inputs"),
    (["predict", "{dir}", "--file", "{tmp}/binary.bin"], 2, r"seqfuse predict: --file: .*binary.bin is not UTF-8 text"),
    (["bench", "--threshold", "nan"], 2, r"seqfuse bench: --threshold must be > 0"),
    (["bench", "--threshold", "0"], 2, r"seqfuse bench: --threshold must be > 0"),
    (["bench", "--only", "nope"], 2, r"seqfuse bench: unknown suite \['nope'\]"),
    (["bench", "--from-json", "{tmp}/nope.json"], 2, r"seqfuse bench: .*nope.json"),
    (["bench", "--from-json", "{dir}"], 2, r"seqfuse bench: .*empty-dir"),
    (["models", "extra"], 2, r"unrecognized arguments: extra"),
    (["no-such-command"], 2, r"invalid choice: 'no-such-command'"),
]


def _fill(argv, tmp):
    return [a.format(file=tmp / "a-file", dir=tmp / "empty-dir", tmp=tmp) for a in argv]


@pytest.mark.parametrize("argv,status,pattern", CLI_BAD, ids=[" ".join(a) for a, _, _ in CLI_BAD])
def test_cli_bad_arguments(argv, status, pattern, paths, capsys):
    rc, out, err = _cli(capsys, *_fill(argv, paths))
    assert rc == status, (rc, out, err)
    assert re.search(pattern, err), err
    assert "Traceback" not in err and out == ""
    if "usage:" not in err:  # argparse's own errors come with the usage line
        assert len(err.strip().splitlines()) == 1, err
    assert (paths / "a-file").read_text() == "not a folder\n"  # a file given as --out is left alone


def _dense_inputs(tmp):
    good = np.zeros((30, 5), np.float32)
    nan, inf = good.copy(), good.copy()
    nan[3, 2], inf[0, 0] = np.nan, np.inf
    np.save(tmp / "inf.npy", inf)
    np.save(tmp / "good.npy", good)
    return {"nan-json": json.dumps(nan.tolist()), "inf-npy": str(tmp / "inf.npy"),
            "good": str(tmp / "good.npy")}


@pytest.mark.parametrize("what,pattern", [
    ("nan-json", r"contains NaN or infinity"),
    ("inf-npy", r"contains NaN or infinity"),
    ("wrong-shape", r"expected shape \[30, 5\]"),
    ("not-an-array", r"expected a .npy file or a JSON array"),
    ("batch-size-0", r"batch_size must be >= 1, got 0"),
    ("batch-size-negative", r"batch_size must be >= 1, got -3"),
])
def test_cli_predict_bad_dense_input(what, pattern, dense_artifact, tmp_path, capsys):
    _, art = dense_artifact
    inputs = _dense_inputs(tmp_path)
    item = {"wrong-shape": "[[1, 2], [3, 4]]", "not-an-array": "hello"}.get(what) or inputs.get(what)
    extra = {"batch-size-0": ["--batch-size", "0"], "batch-size-negative": ["--batch-size", "-3"]}.get(what, [])
    rc, out, err = _cli(capsys, "predict", art, item or inputs["good"], *extra)
    assert rc == 2 and re.search(pattern, err) and "Traceback" not in err and out == "", (rc, err)
    rc, out, err = _cli(capsys, "predict", art, inputs["good"], "--json")  # and the artifact is fine
    assert rc == 0 and len(json.loads(out)) == 1, err


def test_cli_export_bad_numbers(dense_artifact, tmp_path, capsys):
    ckpt, _ = dense_artifact
    for argv, pattern in ((["--opset", "5"], r"opset must be an integer in \[18, 23\], got 5"),
                          (["--atol", "nan"], r"atol must be > 0, got nan"),
                          (["--atol", "-1"], r"atol must be > 0")):
        rc, out, err = _cli(capsys, "export", ckpt, "--out", tmp_path / "x", *argv)
        assert rc == 2 and re.search(pattern, err) and "Traceback" not in err, (argv, rc, err)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,pattern", [
    (["train", "lstm-regressor", "--device", "meta"], r"--device must be cpu or cuda"),
    (["evaluate", "{dir}", "--device", "nope"], r"--device must be cpu or cuda"),
    (["predict", "{dir}", "--file", "{file}.bin"], r"--file: .* is not UTF-8 text"),
])
def test_cli_process_exits_cleanly(argv, pattern, paths):
    """The real entry point: status 2, the message, no traceback from the interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "seqfuse.cli", *_fill(argv, paths)], capture_output=True,
                       text=True, timeout=120, env=env, cwd=paths)
    assert r.returncode == 2, r.stderr
    assert re.search(pattern, r.stderr) and "Traceback" not in r.stderr, r.stderr


if __name__ == "__main__":  # the sandbox's child: run the cases from index argv[1]
    _child(int(sys.argv[1]))
