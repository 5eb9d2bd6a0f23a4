"""Hostile input to the ops: the compiled ops called directly (torch.ops.seqfuse.*), their
wrappers (seqfuse.ops) and the functional forms on the native and reference backends. What
a case expects and how the sandbox runs them: hostile_common.py.

Decisions recorded here (a defined result rather than an error):
  * recurrent layers: T = 0 and B = 0 are errors (torch.nn.LSTM also refuses T = 0;
    tests/nn pins the module's "empty batch" error);
  * the ops themselves refuse empty sizes (the kernels are not written for them);
  * additive_attention with Dv = 0 gives an empty context and the usual weights;
  * an input with I = 0 features runs (the recurrence on the biases alone), as torch.nn;
  * huge sizes through expand(): a clear error before any 32-bit index could overflow
    (I, H >= 2^31), or the allocator's "can't allocate memory" error for results that
    cannot exist; flash attention with B*H*Q*K > 2^32 (no [Q, K] matrix) is computed
    exactly, dropout's 64-bit index included.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from seqfuse import functional, ops, reference

from .hostile_common import (
    ALLOC,
    NATIVE_KERNELS,
    _close,
    _finite_where,
    _r,
    case_table,
    raising,
    run_child,
)

pytestmark = NATIVE_KERNELS

CASES, case = case_table()


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
# The sandbox: every case above in a child interpreter
# =====================================================================================

@pytest.mark.parametrize("name", list(CASES))
def test_sandboxed(name, sandbox):
    result = sandbox[name]
    assert result["ok"], result["error"]


# =====================================================================================
# Numerical edge cases against eager PyTorch (in process: nothing here can crash)
# =====================================================================================

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


if __name__ == "__main__":  # the sandbox's child: run the cases from index argv[1]
    run_child(CASES, int(sys.argv[1]))
