"""Property tests (hypothesis) of the ops: seqfuse.functional's lstm_layer, gru_layer,
rnn_layer (tanh, relu), additive_attention and scaled_dot_product_attention on the native
and Triton backends against the reference backend, and the recurrent ops in bfloat16
against eager PyTorch's bfloat16 error. Cases, tolerances and the hypothesis profiles:
properties_common.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from seqfuse import functional as Fn

from .properties_common import (
    BF16,
    DTYPES,
    FAST,
    FILTER_WARNINGS,
    NATIVE_ADDITIVE,
    NATIVE_RNN,
    NATIVE_SDPA,
    R_IDS,
    R_KINDS,
    SEEDS,
    THREADS,
    TRITON,
    TRITON_ATTENTION_TOL,
    TRITON_DEVICE,
    TRITON_FRACTION,
    RKind,
    _lens_tensor,
    _max_err,
    additive_cases,
    broadcast_shape,
    budget,
    check_grads,
    check_outputs,
    grads_of,
    leaf,
    lengths_strategy,
    rand,
    randn,
    sdpa_cases,
    tol_for,
    torch_threads,
    weighted_loss,
)

pytestmark = FILTER_WARNINGS

# ===================================================================================
# Recurrent layer ops: lstm_layer, gru_layer, rnn_layer (tanh, relu)
# ===================================================================================


def run_layer(kind: RKind, backend: str, x, w_ih, w_hh, biases, states, lengths):
    if kind.name == "lstm":
        return Fn.lstm_layer(x, w_ih, w_hh, biases[0], states[0], states[1], lengths,
                             backend=backend)
    if kind.name == "gru":
        return Fn.gru_layer(x, w_ih, w_hh, biases[0], biases[1], states[0], lengths,
                            backend=backend)
    return Fn.rnn_layer(x, w_ih, w_hh, biases[0], states[0], lengths, kind.nonlinearity,
                        backend=backend)


@st.composite
def layer_cases(draw, kind: RKind | None = None, max_T=9, max_B=5, max_size=11,
                dtypes=("float32", "float64")):
    kind = kind or draw(st.sampled_from(R_KINDS))
    T, B = draw(st.integers(1, max_T)), draw(st.integers(1, max_B))
    n_out = 1 + kind.n_states
    use = draw(st.lists(st.booleans(), min_size=n_out, max_size=n_out).filter(any))
    return dict(
        kind=kind.name, T=T, B=B,
        I=draw(st.integers(1, max_size)), H=draw(st.integers(1, max_size)),
        D=draw(st.integers(1, 2)),
        biases=tuple(draw(st.booleans()) for _ in range(kind.n_biases)),
        lengths=lengths_strategy(draw, T, B) if draw(st.booleans()) else None,
        random_states=draw(st.booleans()),
        # which leaves require grad: input, weights (and biases), initial states
        grad=draw(st.tuples(st.booleans(), st.booleans(), st.booleans())),
        loss_uses=tuple(use),
        weight_scale=draw(st.sampled_from([0.5, 1.0])),
        dtype=draw(st.sampled_from(dtypes)),
        threads=draw(THREADS), seed=draw(SEEDS),
    )


def make_layer_args(kind: RKind, case, dtype, device="cpu"):
    """(x, w_ih, w_hh, biases, states, lengths); weights at the scale the repo's tests use
    (randn / sqrt(H), about twice torch.nn's init: a stable recurrence)."""
    g = torch.Generator().manual_seed(case["seed"])
    T, B, I, H, D = (case[k] for k in "TBIHD")
    G, s = kind.gates * H, case["weight_scale"] * H ** -0.5
    gx, gw, gs = case["grad"]
    x = randn(g, (T, B, I), dtype, device=device).requires_grad_(gx)
    w_ih = randn(g, (D, G, I), dtype, s, device).requires_grad_(gw)
    w_hh = randn(g, (D, G, H), dtype, s, device).requires_grad_(gw)
    biases = [randn(g, (D, G), dtype, s, device).requires_grad_(gw) if b else None
              for b in case["biases"]]
    states = [(randn(g, (D, B, H), dtype, device=device) if case["random_states"]
               else torch.zeros(D, B, H, dtype=dtype, device=device)).requires_grad_(gs)
              for _ in range(kind.n_states)]
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"], dtype=torch.int64)
    return x, w_ih, w_hh, biases, states, lengths


def check_layer(backend: str, case, device="cpu"):
    with torch_threads(case["threads"]):
        _check_layer(backend, case, device)


def _check_layer(backend: str, case, device="cpu"):
    kind = next(k for k in R_KINDS if k.name == case["kind"])
    dtype = DTYPES[case["dtype"]]
    tol = tol_for(dtype)
    x, w_ih, w_hh, biases, states, lengths = make_layer_args(kind, case, dtype, device)
    out = run_layer(kind, backend, x, w_ih, w_hh, biases, states, lengths)
    ref = run_layer(kind, "reference", x, w_ih, w_hh, biases, states, lengths)
    check_outputs(out, ref, tol, "outputs")
    if lengths is not None:  # zeros past each length, exactly
        for b, n in enumerate(case["lengths"]):
            assert torch.count_nonzero(out[0][n:, b]) == 0, f"output past length {n} of row {b}"
    # relu: a pre-activation within rounding of 0 can switch a unit on one side and not
    # the other, changing the gradient by O(1) (a kink, not an error): such examples are
    # not compared (hypothesis counts them invalid).
    assume(kind.nonlinearity != "relu" or torch.equal(out[0] > 0, ref[0] > 0))
    with torch.no_grad():  # the inference path (no activations kept, fused projection)
        check_outputs(run_layer(kind, backend, x, w_ih, w_hh, biases, states, lengths), ref,
                      tol, "no_grad outputs")
    named = [("input", x), ("weight_ih", w_ih), ("weight_hh", w_hh)]
    named += [(f"bias{i}", b) for i, b in enumerate(biases) if b is not None]
    named += [(f"state{i}", s) for i, s in enumerate(states)]
    named = [(n, t) for n, t in named if t.requires_grad]
    if not named:
        return
    names, leaves = zip(*named)
    g_out = grads_of(
        weighted_loss(out, torch.Generator().manual_seed(1), case["loss_uses"]), leaves)
    g_ref = grads_of(
        weighted_loss(ref, torch.Generator().manual_seed(1), case["loss_uses"]), leaves)
    check_grads(g_out, g_ref, tol, names)


@NATIVE_RNN
@pytest.mark.parametrize("kind", R_KINDS, ids=R_IDS)
@budget(FAST)
@given(data=st.data())
def test_layer_op_native_matches_reference(kind, data):
    """ops.{lstm,gru,rnn}_layer: T 1..9, B 1..5, I, H 1..11, one or two directions, with
    or without lengths (any in [1, T]) and biases (each GRU bias alone too), zero or random
    initial states, float32/float64; outputs, final states (also under no_grad), exact zeros
    past each length, and the gradients of whichever leaves require grad, for a loss on any
    non-empty subset of the outputs."""
    check_layer("native", data.draw(layer_cases(kind), label="case"))


@TRITON
@budget(TRITON_FRACTION)
@given(case=layer_cases(max_T=4, max_B=3, max_size=6, dtypes=("float32",)))
def test_layer_op_triton_matches_reference(case):
    """As test_layer_op_native_matches_reference, on the Triton kernels (float32, tiny
    shapes; the op kind is drawn too)."""
    check_layer("triton", case, TRITON_DEVICE)


# -- padding contents ----------------------------------------------------------------

GARBAGE = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30, -3e38, 0.0])


def check_padding_contents(backend: str, case, garbage: float, device="cpu"):
    """Whatever the steps past each length hold, no output and no gradient changes (NaN
    there made every weight_ih gradient NaN): the same backend on clean and on poisoned
    padding, bit for bit for the native kernels."""
    kind = next(k for k in R_KINDS if k.name == case["kind"])
    dtype = DTYPES[case["dtype"]]
    results = []
    for poison in (False, True):
        x, w_ih, w_hh, biases, states, lengths = make_layer_args(kind, case, dtype, device)
        x = x.detach().clone()
        if poison:
            for b, n in enumerate(case["lengths"]):
                x[n:, b] = garbage
        x.requires_grad_()
        leaves = [t for t in (x, w_ih, w_hh, *biases, *states) if t is not None and t.requires_grad]
        out = run_layer(kind, backend, x, w_ih, w_hh, biases, states, lengths)
        loss = weighted_loss(out, torch.Generator().manual_seed(1), case["loss_uses"])
        results.append((out, grads_of(loss, leaves)))
    (out, grads), (out_p, grads_p) = results
    exact = backend == "native"
    for a, b in zip([*out_p, *grads_p], [*out, *grads]):
        assert torch.isfinite(a).all() == torch.isfinite(b).all()
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@NATIVE_RNN
@pytest.mark.parametrize("kind", R_KINDS, ids=R_IDS)
@budget(FAST)
@given(data=st.data(), garbage=GARBAGE)
def test_layer_op_native_padding_contents_change_nothing(kind, data, garbage):
    """ops.{lstm,gru,rnn}_layer over the cases of test_layer_op_native_matches_reference,
    with lengths: NaN, +-Inf, huge or zero values past each length change no output and
    no gradient, bit for bit."""
    case = data.draw(layer_cases(kind).filter(lambda c: c["lengths"] is not None), label="case")
    check_padding_contents("native", case, garbage)


@TRITON
@budget(TRITON_FRACTION)
@given(case=layer_cases(max_T=4, max_B=3, max_size=6, dtypes=("float32",)).filter(
    lambda c: c["lengths"] is not None), garbage=GARBAGE)
def test_layer_op_triton_padding_contents_change_nothing(case, garbage):
    """As test_layer_op_native_padding_contents_change_nothing, on the Triton kernels."""
    check_padding_contents("triton", case, garbage, TRITON_DEVICE)


# -- bfloat16 ------------------------------------------------------------------------


class _RoundBoth(torch.autograd.Function):
    """Rounds to bfloat16 (and back to float32) in the forward and the backward: what a
    bfloat16 result, and the bfloat16 gradient that reaches it, go through."""

    @staticmethod
    def forward(ctx, x):
        return x.bfloat16().float()

    @staticmethod
    def backward(ctx, grad):
        return grad.bfloat16().float()


class _RoundForward(torch.autograd.Function):
    """Rounds to bfloat16 in the forward only (an operand rounded for a product)."""

    @staticmethod
    def forward(ctx, x):
        return x.bfloat16().float()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ActFromRoundedOutput(torch.autograd.Function):
    """tanh / relu whose derivative is taken from the bfloat16-rounded output, as eager
    bfloat16 autograd (and the RNN kernel, which saves nothing but its output) does."""

    @staticmethod
    def forward(ctx, z, nonlinearity):
        y = torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)
        ctx.save_for_backward(y.bfloat16().float())
        ctx.nonlinearity = nonlinearity
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * ((1 - y * y) if ctx.nonlinearity == "tanh" else (y > 0).to(grad)), None


def rnn_bf16_arithmetic(nonlinearity, x, w_ih, w_hh, bias, hx, lengths):
    """The Elman RNN layer in float32 with the kernel's bfloat16 roundings (csrc: bfloat16
    tiles multiply bfloat16 operands, state and cell math stay float32, the backward reads
    the bfloat16 output): arguments already rounded, the state rounded for its product,
    the activation's derivative from the rounded output, results rounded."""
    T, B, _ = x.shape
    D = w_ih.shape[0]
    valid = (torch.ones(T, B, dtype=torch.bool) if lengths is None
             else torch.arange(T)[:, None] < lengths[None, :]).unsqueeze(-1)
    outputs, finals = [], []
    for d in range(D):
        h, ys = hx[d], [None] * T
        for t in (range(T) if d == 0 else reversed(range(T))):
            z = x[t] @ w_ih[d].T + _RoundForward.apply(h) @ w_hh[d].T
            z = z + bias[d] if bias is not None else z
            y = _ActFromRoundedOutput.apply(z, nonlinearity)
            h = torch.where(valid[t], y, h)   # the reverse direction starts at each length
            ys[t] = torch.where(valid[t], y, torch.zeros_like(y))
        outputs.append(torch.stack(ys))
        finals.append(h)
    return _RoundBoth.apply(torch.cat(outputs, -1)), _RoundBoth.apply(torch.stack(finals))


def bf16_errors(kind: RKind, case):
    """[(what, error, yardstick, floor)] for outputs (grad mode and no_grad) and every
    gradient, errors against float32 arithmetic on the float32 arguments. The yardstick
    is the largest error of: eager PyTorch in bfloat16 (tests/test_bfloat16.py's), exact
    arithmetic on the bfloat16-rounded arguments with rounded results and incoming
    gradients (what no kernel taking and giving bfloat16 avoids), and for the RNN its
    designed bfloat16 arithmetic (rnn_bf16_arithmetic); on tiny shapes any one of them
    can land near the truth by luck, hence the largest."""
    x, w_ih, w_hh, biases, states, lengths = make_layer_args(kind, case, torch.float32)

    def cast(dtype, through_bf16=False):
        def c(t):
            if t is None:
                return None
            t = t.detach()
            return (t.bfloat16() if through_bf16 else t).to(dtype).requires_grad_()
        return [c(x), c(w_ih), c(w_hh), [c(b) for b in biases], [c(s) for s in states]]

    def run(fn, args, wrap=lambda o: o):
        x, w_ih, w_hh, bs, ss = args
        leaves = [x, w_ih, w_hh, *[b for b in bs if b is not None], *ss]
        out = [wrap(o) for o in fn(*args)]
        loss = weighted_loss([o.float() for o in out], torch.Generator().manual_seed(1))
        return list(out), list(grads_of(loss, leaves))

    def layer(backend):
        return lambda *args: run_layer(kind, backend, *args, lengths)

    truth_out, truth_g = run(layer("reference"), cast(torch.float32))
    bf = cast(torch.bfloat16)
    ours_out, ours_g = run(layer("native"), bf)
    assert all(t.dtype == torch.bfloat16 for t in ours_out + ours_g)
    with torch.no_grad():
        infer_out = list(run_layer(kind, "native", *bf, lengths))
    if kind.nonlinearity == "relu":
        # relu kinks (see _check_layer): the bfloat16 forward may switch a unit the float32
        # truth does not; such examples are not compared.
        assume(torch.equal(ours_out[0] > 0, truth_out[0] > 0))
    sticks = [run(layer("reference"), cast(torch.bfloat16)),
              run(layer("reference"), cast(torch.float32, through_bf16=True), _RoundBoth.apply)]
    if kind.nonlinearity:
        sticks.append(run(lambda x, w_ih, w_hh, bs, ss: rnn_bf16_arithmetic(
            kind.nonlinearity, x, w_ih, w_hh, bs[0], ss[0], lengths),
            cast(torch.float32, through_bf16=True)))
    rows = []
    for what, ours, truth, which in (("outputs", ours_out, truth_out, 0),
                                     ("no_grad outputs", infer_out, truth_out, 0),
                                     ("gradients", ours_g, truth_g, 1)):
        for i, (a, r) in enumerate(zip(ours, truth, strict=True)):
            assert torch.isfinite(a.float()).all(), f"{what}[{i}] non-finite"
            yardstick = max(_max_err(stick[which][i].bfloat16(), r) for stick in sticks)
            # one bfloat16 ulp of the largest value (tests/test_bfloat16.py takes a quarter
            # of it, on large tensors, whose largest error is never a single rounding)
            floor = (r.abs().max().item() if r.numel() else 0.0) * 2 ** -7
            rows.append((f"{what}[{i}]", _max_err(a, r), yardstick, floor))
    return rows


@NATIVE_RNN
@pytest.mark.parametrize("kind", R_KINDS, ids=R_IDS)
@budget(BF16)
@given(data=st.data())
def test_layer_op_bfloat16_error_within_twice_eager(kind, data):
    """bfloat16 inputs, weights and states on the native kernels (float32 accumulation):
    the error of outputs (also under no_grad: bfloat16 tiles) and of every gradient
    against float32 arithmetic is at most twice the larger of eager PyTorch's bfloat16
    error, that of exact arithmetic on the bfloat16-rounded arguments and (RNN) that of
    its designed bfloat16 arithmetic, with a floor of one bfloat16 ulp of the largest
    value (bf16_errors): tests/test_bfloat16.py's rule, made robust on tiny shapes."""
    case = data.draw(layer_cases(kind, dtypes=("float32",)), label="case")
    case["grad"], case["loss_uses"] = (True, True, True), (True,) * (1 + kind.n_states)
    with torch_threads(case["threads"]):
        rows = bf16_errors(kind, case)
    for what, err, yardstick, floor in rows:
        assert err <= 2 * max(yardstick, floor), (
            f"{what}: error {err:.3e} > 2 x max(yardstick {yardstick:.3e}, floor {floor:.3e})")


# ===================================================================================
# Additive attention: the op
# ===================================================================================


def _keep(B, Q, K, lens, mask, device="cpu"):
    """The [B, Q, K] bool of attended keys (valid_lens and a bool mask), for the
    empty-row checks."""
    keep = torch.ones(B, Q, K, dtype=torch.bool, device=device)
    if lens is not None:
        keep = keep & (torch.arange(K, device=device) < lens.reshape(B, -1, 1).to(device))
    if mask is not None:
        keep = keep & mask
    return keep


def check_additive(backend, case, tol=None, device="cpu"):
    with torch_threads(case["threads"]):
        _check_additive(backend, case, tol, device)


def _check_additive(backend, case, tol=None, device="cpu"):
    dtype = DTYPES[case["dtype"]]
    tol = tol or tol_for(dtype)
    g = torch.Generator().manual_seed(case["seed"])
    B, Q, K, A, Dv = (case[k] for k in ("B", "Q", "K", "A", "Dv"))
    q, k, w_v, v = (leaf(randn(g, s, dtype, device=device), case["strided"])
                    for s in ((B, Q, A), (B, K, A), (A,), (B, K, Dv)))
    lens = _lens_tensor(case, B, Q)
    mask = None
    if case["mask_shape"] is not None:
        mask = (rand(g, case["mask_shape"]) < case["mask_keep"]).to(device)
    out = Fn.additive_attention(q, k, w_v, v, lens, mask, backend=backend)
    ref = Fn.additive_attention(q, k, w_v, v, lens, mask, backend="reference")
    check_outputs(out, ref, tol, "context, weights")
    with torch.no_grad():
        check_outputs(Fn.additive_attention(q, k, w_v, v, lens, mask, backend=backend), ref, tol,
                      "no_grad context, weights")
    empty = ~_keep(B, Q, K, lens, mask, device).any(-1)  # [B, Q]: rows with no key
    ctx, w = out
    assert (ctx[empty] == 0).all() and (w[empty] == 0).all(), "rows with no key must be zero"
    g_out = grads_of(weighted_loss(out, torch.Generator().manual_seed(1),
                                              case["loss_uses"]), (q, k, w_v, v))
    g_ref = grads_of(weighted_loss(ref, torch.Generator().manual_seed(1),
                                              case["loss_uses"]), (q, k, w_v, v))
    check_grads(g_out, g_ref, tol, ["query", "key", "w_v", "value"])
    assert (g_out[0][empty] == 0).all(), "a row with no key must get a zero query gradient"


@NATIVE_ADDITIVE
@budget(FAST)
@given(case=additive_cases())
def test_additive_attention_op_native_matches_reference(case):
    """ops.additive_attention: B 1..4, Q 1..6, K 1..9, A 1..11, Dv 1..7; valid_lens none,
    [B] or [B, Q] (int64 or int32, 0 included) and a bool mask of any broadcastable shape
    and density; contiguous or strided inputs; float32/float64. Context and weights (also
    under no_grad), zeros on rows with no key, and the gradients of query, key, w_v and
    value for a loss on the context, the weights or both (zero query gradient on empty rows,
    never NaN)."""
    check_additive("native", case)


@TRITON
@budget(TRITON_FRACTION)
@given(case=additive_cases(max_B=2, max_Q=4, max_K=6, max_A=8, max_Dv=5, dtypes=("float32",)))
def test_additive_attention_op_triton_matches_reference(case):
    """As the native property, on the Triton kernels (float32, small)."""
    check_additive("triton", case, TRITON_ATTENTION_TOL, TRITON_DEVICE)


# ===================================================================================
# Scaled dot-product attention: the op
# ===================================================================================


def make_sdpa_mask(g, case, dtype, device="cpu"):
    if case["mask_kind"] is None:
        return None
    shape = case["mask_shape"]
    keep = rand(g, shape) < case["mask_keep"]
    if case["mask_kind"] == "bool":
        return keep.to(device)
    fill = torch.finfo(dtype).min if case["mask_fill"] == "finfo.min" else float(case["mask_fill"])
    mask = randn(g, shape, dtype).masked_fill(~keep, fill)
    if case["mask_empty_rows"] and len(shape) >= 2:
        rows = rand(g, shape[:-1]) < 0.5
        mask[rows] = fill
    return mask.to(device)


def check_sdpa(backend, case, tol=None, device="cpu"):
    with torch_threads(case["threads"]):
        _check_sdpa(backend, case, tol, device)


def _check_sdpa(backend, case, tol=None, device="cpu"):
    dtype = DTYPES[case["dtype"]]
    tol = tol or tol_for(dtype)
    g = torch.Generator().manual_seed(case["seed"])
    B, H, Q, K, D, Dv = (case[k] for k in ("B", "H", "Q", "K", "D", "Dv"))
    q, k, v = (leaf(randn(g, s, dtype, device=device), case["strided"])
               for s in ((B, H, Q, D), (B, H, K, D), (B, H, K, Dv)))
    mask = make_sdpa_mask(g, case, dtype, device)
    lens = _lens_tensor(case, B, Q)
    kw = dict(attn_mask=mask, valid_lens=lens, is_causal=case["is_causal"], scale=case["scale"],
              dropout_p=case["dropout_p"], seed=case["dropout_seed"])
    out = Fn.scaled_dot_product_attention(q, k, v, **kw, backend=backend)
    ref = Fn.scaled_dot_product_attention(q, k, v, **kw, backend="reference")
    check_outputs([out], [ref], tol, "output")
    with torch.no_grad():
        check_outputs([Fn.scaled_dot_product_attention(q, k, v, **kw, backend=backend)], [ref],
                      tol, "no_grad output")
    # rows with no key: zeros and a zero query gradient, never NaN
    keep = torch.ones(B, H, Q, K, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & (mask if mask.dtype == torch.bool else mask > float("-inf"))
    if lens is not None:
        keep = keep & (torch.arange(K, device=device) < lens.reshape(B, 1, -1, 1).to(device))
    if case["is_causal"]:
        keep = keep & torch.ones(Q, K, dtype=torch.bool, device=device).tril()
    empty = ~keep.any(-1)
    assert (out[empty] == 0).all(), "rows with no key must be zero"
    g_out = grads_of(weighted_loss([out], torch.Generator().manual_seed(1)), (q, k, v))
    g_ref = grads_of(weighted_loss([ref], torch.Generator().manual_seed(1)), (q, k, v))
    check_grads(g_out, g_ref, tol, ["query", "key", "value"])
    assert (g_out[0][empty] == 0).all(), "a row with no key must get a zero query gradient"


@NATIVE_SDPA
@budget(FAST)
@given(case=sdpa_cases())
def test_sdpa_op_native_matches_reference(case):
    """ops.scaled_dot_product_attention: B 1..3, H 1..3, Q 1..7, K 1..9, D 1..11, Dv
    1..7; no mask, a bool mask or a float (additive) mask of any broadcastable shape, with
    -inf or finfo.min as the masked value and possibly whole rows masked; valid_lens none,
    [B] or [B, Q] (0 included, int32/int64); is_causal; scale None or any in [-2, 2];
    dropout (the reference hashes the same keep mask); strided inputs; float32/float64.
    Output (also under no_grad), zeros on rows with no key, and the gradients of query, key
    and value (zero query gradient on empty rows, never NaN)."""
    check_sdpa("native", case)


@TRITON
@budget(TRITON_FRACTION)
@given(case=sdpa_cases(max_B=2, max_H=2, max_Q=5, max_K=7, max_D=8, max_Dv=5,
                       dtypes=("float32",)))
def test_sdpa_op_triton_matches_reference(case):
    """As the native property, on the Triton kernels (float32, small)."""
    check_sdpa("triton", case, TRITON_ATTENTION_TOL, TRITON_DEVICE)


# -- rows masked by a large finite additive value -------------------------------------

LARGE_FILLS = ("finfo.min", "-1e9", "-1e6", "-1e4")


@st.composite
def large_mask_cases(draw, **kw):
    """Float masks whose every entry is a large negative finite value (HF-style
    finfo.min, -1e9, ...): all scores are then (nearly) equal and the reference gives
    (nearly) uniform weights over the keys, as eager softmax does."""
    case = draw(sdpa_cases(dropout=False, fills=LARGE_FILLS, **kw))
    K = max(case["K"], 2)
    return dict(case, K=K, mask_kind="float", mask_keep=0.0, mask_empty_rows=False,
                mask_shape=broadcast_shape(draw, (case["B"], case["H"], case["Q"], K)),
                lens_form=None, lens=None, is_causal=False)


@NATIVE_SDPA
@budget(FAST)
@given(case=large_mask_cases())
def test_sdpa_op_native_large_finite_masks_match_reference(case):
    """As test_sdpa_op_native_matches_reference with every key of every row masked by a
    large finite additive value (finfo.min, -1e9, -1e6, -1e4), K >= 2. (Found: the
    backward took its weights from lse = m + log(l), where log(l) rounds away when |m| is
    huge: gradients up to K times too large. It now recomputes each row's softmax.)"""
    check_sdpa("native", case)


@TRITON
@budget(TRITON_FRACTION)
@given(case=large_mask_cases(max_B=2, max_H=2, max_Q=5, max_K=7, max_D=8, max_Dv=5,
                             dtypes=("float32",)))
def test_sdpa_op_triton_large_finite_masks_match_reference(case):
    """As test_sdpa_op_native_large_finite_masks_match_reference on the Triton kernels.
    (Found: the scores were scaled by log2(e) before the maximum was subtracted, so a
    finfo.min mask overflowed to -inf and the row came out as having no key; and the
    backward, like the native one, lost log(l) in the saved m + log(l).)"""
    check_sdpa("triton", case, TRITON_ATTENTION_TOL, TRITON_DEVICE)
