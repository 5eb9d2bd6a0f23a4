"""Shared by the property tests (hypothesis) of the ops (test_ops_properties.py) and of the
modules (test_modules_properties.py): backends, budgets, tensors drawn from a seed, the
comparisons with their tolerances, and the case strategies both files draw from. Each
property compares a seqfuse op or module against the reference backend (eager PyTorch:
seqfuse.reference, or torch.nn's own modules holding the same weights), over random shapes
(1 and odd sizes included), lengths, masks, directions, layers, layouts, thread counts and
dtypes.

Tolerances: the table of tests/conftest.py (TOL), with three documented refinements:
  * its absolute tolerances are for unit-scale tensors; a tensor whose largest magnitude
    m exceeds 1 gets them times m (_scale);
  * a float32 case outside TOL still passes when ours is as accurate as eager float32
    itself against a float64 run of the reference (check_against_truth): tiny models are
    ill-conditioned, and there two eager implementations differ by more than TOL too;
  * the Triton attention kernels get the 2x slack of tests/ops/test_attention.py, and
    bfloat16 the "within 2x of eager bfloat16's error" rule of tests/test_bfloat16.py,
    with two more yardsticks (exact arithmetic on the rounded arguments; the RNN's
    designed bfloat16 arithmetic) and a one-ulp floor, since on tiny shapes eager's error
    can be near zero by luck (test_ops_properties.bf16_errors).
Relu RNN examples whose forward switches a unit on one side only (a pre-activation within
rounding of 0: a kink, O(1) in the gradient) are rejected with assume().

Each test draws its case (shapes, flags, lengths) with hypothesis and its tensors from a
drawn seed (a torch.Generator), so a falsifying example is a short, printable dict.
Native (C++) kernels run on the CPU; the Triton kernels run on CUDA, or on CPU tensors
under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU),
with tiny shapes and few examples since the interpreter is slow; they are skipped with
the reason when triton cannot run.

Profiles (tests/reliability/conftest.py; env SEQFUSE_HYPOTHESIS):

  CI, bounded and deterministic (25 examples per test; fewer for the multi-layer modules,
  bfloat16 and the Triton interpreter; ~1 minute on 2 CPU cores for both files):
    SEQFUSE_HYPOTHESIS=ci .venv/bin/python -m pytest tests/reliability -q -k properties \\
        --hypothesis-show-statistics

  Long run (500 examples per test, scaled down the same way; random seeds; 7-15 minutes
  on 2 CPU cores, by their load), with a JSON record of the examples run and failures:
    SEQFUSE_HYPOTHESIS=long SEQFUSE_HYPOTHESIS_REPORT=artifacts/reliability-long.json \\
        .venv/bin/python -m pytest tests/reliability -q -k properties \\
        --hypothesis-show-statistics

A failure prints the falsifying case and an @reproduce_failure blob that replays it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

import seqfuse
from conftest import TOL
from seqfuse import backend as backend_mod

# The test files' pytestmark: warnings torch gives on the mask and nested-tensor paths.
FILTER_WARNINGS = pytest.mark.filterwarnings(
    "ignore:Support for mismatched", "ignore:The PyTorch API of nested tensors",
    "ignore:enable_nested_tensor is True", "ignore:Converting mask without torch.bool")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SEEDS = st.integers(0, 2**31 - 1)

# -- backends ------------------------------------------------------------------------


def _native(op):
    return pytest.mark.skipif(not seqfuse.ops.has_native_kernel(op, "cpu"),
                              reason=f"seqfuse._C has no CPU {op} kernel (run `make install`)")


NATIVE_RNN = _native("lstm_layer")
NATIVE_ADDITIVE = _native("additive_attention")
NATIVE_SDPA = _native("scaled_dot_product_attention")

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_TRITON_WHY = backend_mod.triton_unavailable_reason(TRITON_DEVICE)
TRITON = pytest.mark.skipif(_TRITON_WHY is not None,
                            reason=f"the triton backend cannot run here: {_TRITON_WHY}")


THREADS = st.sampled_from([1, 2])  # intra-op threads: the native kernels split work over them


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def budget(fraction: float, minimum: int = 3):
    """max_examples as a fraction of the profile's (for tests whose examples are slow)."""
    return settings(max_examples=max(minimum, round(settings.default.max_examples * fraction)))


# Fractions of the profile's max_examples (ci 25, long 500), by the cost of an example:
# ops and attention modules (FAST), multi-layer modules (MODULE), bfloat16 (four or five
# runs of every case), and the Triton interpreter (~0.2-1 s per op call: a handful in CI, a
# few dozen in the long run).
FAST, MODULE, BF16, TRITON_FRACTION, TRITON_MODULE_FRACTION = 1.0, 0.6, 0.5, 0.1, 0.04

# -- tensors and comparisons ---------------------------------------------------------


def randn(g: torch.Generator, shape, dtype, scale: float = 1.0, device="cpu") -> torch.Tensor:
    """Standard normal values drawn in float64 from `g` (the same numbers for every dtype)."""
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(device, dtype)


def rand(g: torch.Generator, shape) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=g)


def leaf(t: torch.Tensor, strided: bool = False) -> torch.Tensor:
    """A tensor that requires grad; with `strided`, a non-contiguous view of the same values
    (reversed memory order of the dimensions) whose gradient is still asked for by autograd."""
    if strided and t.dim() > 1:
        base = t.permute(*reversed(range(t.dim()))).contiguous().requires_grad_()
        return base.permute(*reversed(range(t.dim())))
    return t.clone().requires_grad_()


@dataclass(frozen=True)
class Tol:
    out_atol: float
    grad_rtol: float
    grad_atol: float


def tol_for(dtype) -> Tol:
    return Tol(**TOL[dtype])


# tests/ops/test_attention.py: "as the compiled ops' tests, with 2x slack for the
# exp2-domain softmax".
TRITON_ATTENTION_TOL = Tol(out_atol=2e-5, grad_rtol=1e-4, grad_atol=2e-5)


def _scale(t: torch.Tensor) -> float:
    """TOL's absolute tolerances are for unit-scale tensors: a tensor whose largest
    magnitude is m > 1 (a relu RNN's growing state, a gradient summed over many terms)
    gets them times m, so that values of float32 rounding size relative to the tensor
    (and exact zeros on one side, rounding noise on the other) are not failures."""
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


def check_outputs(got, want, tol: Tol, what: str):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        name = f"{what}[{i}]"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert torch.isfinite(a).all() or not torch.isfinite(b).all(), f"{name}: non-finite values"
        torch.testing.assert_close(a, b, atol=tol.out_atol * _scale(b), rtol=0,
                                   msg=lambda m: f"{name}: {m}")


def check_grads(got, want, tol: Tol, names):
    for a, b, name in zip(got, want, names, strict=True):
        assert (a is None) == (b is None), f"grad {name}: {a is None} vs {b is None}"
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"grad {name}: non-finite values"
        torch.testing.assert_close(a, b, rtol=tol.grad_rtol, atol=tol.grad_atol * _scale(b),
                                   msg=lambda m: f"grad {name}: {m}")


def check_against_truth(ours, ref, tol: Tol, names, truth=None):
    """ours, ref: [(outputs...), (grads...)] as lists of tensors with `names`: within TOL
    (check_outputs / check_grads). A float32 case that is not may still pass if ours is
    as accurate as eager float32 itself: max|ours - truth| <= 2 max|ref - truth| + TOL,
    with truth() the reference side in float64. Small models are ill-conditioned (a
    LayerNorm over 2-3 features, softmax over near-equal scores), and there two eager
    PyTorch implementations differ by more than TOL too (seen: seqfuse's reference
    backend against torch.nn.TransformerEncoder, 1e-3 relative)."""
    (outs, grads), (outs_r, grads_r) = ours, ref
    try:
        check_outputs(outs, outs_r, tol, "outputs")
        check_grads(grads, grads_r, tol, names)
    except AssertionError as exc:
        if truth is None or outs[0].dtype != torch.float32:
            raise
        outs_t, grads_t = truth()
        all_names = [f"outputs[{i}]" for i in range(len(outs))] + [f"grad {n}" for n in names]
        for name, a, b, t in zip(all_names, list(outs) + list(grads), list(outs_r) + list(grads_r),
                                 list(outs_t) + list(grads_t), strict=True):
            err, err_ref = _max_err(a.double(), t), _max_err(b.double(), t)
            allowed = 2 * err_ref + tol.grad_atol * _scale(t)
            assert err <= allowed, (
                f"{name}: outside TOL ({str(exc).splitlines()[0]}), and its error against float64, "
                f"{err:.3e}, exceeds 2 x eager float32's ({err_ref:.3e}) + TOL")


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def grads_of(loss, leaves, retain_graph=False):
    """d loss / d leaves; a leaf the loss does not reach gets zeros (the fused ops compute
    zeros where eager autograd has no path)."""
    gs = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)]


def weighted_loss(outputs, g: torch.Generator, use=None):
    """A fixed random weighting of the outputs in `use` (all by default), drawn from `g`
    (call with generators in the same state for both sides)."""
    total = 0
    for i, o in enumerate(outputs):
        w = randn(g, o.shape, torch.float64)
        if use is None or use[i]:
            total = total + (o.double() * w.to(o.device)).sum()
    return total


def lengths_strategy(draw, T: int, B: int, low: int = 1):
    lengths = draw(st.lists(st.integers(low, T), min_size=B, max_size=B))
    if draw(st.booleans()):  # at least one full-length row
        lengths[draw(st.integers(0, B - 1))] = T
    return lengths


def broadcast_shape(draw, full: tuple[int, ...]) -> tuple[int, ...]:
    """A shape broadcastable to `full`: any trailing rank, each size 1 or the full one."""
    rank = draw(st.integers(1, len(full)))
    return tuple(n if draw(st.booleans()) else 1 for n in full[len(full) - rank:])


# -- the recurrent kinds: ops and modules ---------------------------------------------


@dataclass(frozen=True)
class RKind:
    name: str
    gates: int
    n_biases: int          # lstm/rnn: one summed bias; gru: bias_ih and bias_hh
    n_states: int          # lstm: (hx, cx)
    nonlinearity: str | None = None
    module: str = ""       # torch.nn / seqfuse.nn class name

    def __repr__(self):
        return self.name


R_KINDS = [RKind("lstm", 4, 1, 2, module="LSTM"), RKind("gru", 3, 2, 1, module="GRU"),
           RKind("rnn-tanh", 1, 1, 1, "tanh", "RNN"), RKind("rnn-relu", 1, 1, 1, "relu", "RNN")]
R_IDS = [k.name for k in R_KINDS]


# -- attention cases: the ops, and the modules built on them --------------------------


@st.composite
def additive_cases(draw, max_B=4, max_Q=6, max_K=9, max_A=11, max_Dv=7,
                   dtypes=("float32", "float64")):
    B, Q, K = draw(st.integers(1, max_B)), draw(st.integers(1, max_Q)), draw(st.integers(1, max_K))
    lens_form = draw(st.sampled_from([None, "B", "BQ"]))
    lens = None
    if lens_form:
        n = B if lens_form == "B" else B * Q
        lens = draw(st.lists(st.integers(0, K), min_size=n, max_size=n))
    mask_shape = broadcast_shape(draw, (B, Q, K)) if draw(st.booleans()) else None
    return dict(
        B=B, Q=Q, K=K, A=draw(st.integers(1, max_A)), Dv=draw(st.integers(1, max_Dv)),
        lens_form=lens_form, lens=lens, lens_dtype=draw(st.sampled_from(["int64", "int32"])),
        mask_shape=mask_shape, mask_keep=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        strided=draw(st.booleans()),
        loss_uses=draw(st.tuples(st.booleans(), st.booleans()).filter(any)),
        dtype=draw(st.sampled_from(dtypes)), threads=draw(THREADS), seed=draw(SEEDS),
    )


def _lens_tensor(case, B, Q, device="cpu"):
    if case["lens"] is None:
        return None
    t = torch.tensor(case["lens"], dtype=getattr(torch, case["lens_dtype"]), device=device)
    return t.view(B, Q) if case["lens_form"] in ("BQ", "NL") else t


@st.composite
def sdpa_cases(draw, max_B=3, max_H=3, max_Q=7, max_K=9, max_D=11, max_Dv=7,
               dtypes=("float32", "float64"), dropout=True, fills=("-inf",)):
    B, H = draw(st.integers(1, max_B)), draw(st.integers(1, max_H))
    Q, K = draw(st.integers(1, max_Q)), draw(st.integers(1, max_K))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    lens_form = draw(st.sampled_from([None, "B", "BQ"]))
    lens = None
    if lens_form:
        n = B if lens_form == "B" else B * Q
        lens = draw(st.lists(st.integers(0, K), min_size=n, max_size=n))
    return dict(
        B=B, H=H, Q=Q, K=K, D=draw(st.integers(1, max_D)), Dv=draw(st.integers(1, max_Dv)),
        mask_kind=mask_kind,
        mask_shape=broadcast_shape(draw, (B, H, Q, K)) if mask_kind else None,
        mask_keep=draw(st.sampled_from([0.0, 0.4, 0.8, 1.0])),
        # float masks: what a masked-out entry holds, and whether whole rows are masked
        mask_fill=draw(st.sampled_from(fills)),
        mask_empty_rows=draw(st.booleans()),
        lens_form=lens_form, lens=lens, lens_dtype=draw(st.sampled_from(["int64", "int32"])),
        is_causal=draw(st.booleans()),
        scale=draw(st.none() | st.floats(-2.0, 2.0, allow_nan=False, width=32)),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25, 0.6])) if dropout else 0.0,
        dropout_seed=draw(SEEDS), strided=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)), threads=draw(THREADS), seed=draw(SEEDS),
    )
