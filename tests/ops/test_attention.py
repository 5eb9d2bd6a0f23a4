"""The attention ops on every backend against eager PyTorch: masked additive attention
against the unfused composition (seqfuse.reference), masked scaled dot-product attention
against the unfused bmm + masked softmax + bmm (reference) and against torch's
F.scaled_dot_product_attention. Outputs, weights, the saved softmax statistics and every
gradient over odd shapes (several tiles), Q=1, K=1 and every accepted mask form (tests/
cases.py); rows with no key; dropout (the reference's hash); strided inputs; float16/
bfloat16 error within 2x of eager's own; gradcheck; opcheck; torch.export; torch.compile;
argument checks; autocast. Then what only one backend has: the Triton dropout hash past
32-bit indices, determinism on a GPU.

The compiled kernels take the full shape tables in float32 and float64; Triton (under the
interpreter without a GPU, whose tiles are 16 wide) the small ones, in float32."""
import pytest
import torch
import torch.nn.functional as F
from cases import (ADD_SHAPES, ADD_SHAPES_SMALL, ATTN_TOL, EXACT_DTYPES, HALF_FLOOR, SDPA_SHAPES,
                   SDPA_SHAPES_SMALL, add_masks, add_shapes, backend_op, raw_op, sdpa_masks,
                   sdpa_reference_lse, sdpa_shapes)
from conftest import backend_params

from seqfuse import reference

CUDA = torch.cuda.is_available()
ADD, SDPA = "additive_attention", "scaled_dot_product_attention"
ADD_BOTH = backend_params("native", "triton", op=ADD)
SDPA_BOTH = backend_params("native", "triton", op=SDPA)


def grads_of(outputs, leaves, seed=1):
    """Gradients of a fixed random weighting of `outputs` with respect to `leaves`."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        dt = torch.float64 if o.dtype == torch.float64 else torch.float32
        loss = loss + (o.to(dt) * torch.randn(o.shape, generator=g, dtype=dt).to(o.device)).sum()
    return torch.autograd.grad(loss, leaves)


def assert_match(ours, ref, tol, what):
    """tol: {"atol", "rtol"} (cases.ATTN_TOL)."""
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, \
            f"{what}[{i}]: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert torch.isfinite(a).all(), f"{what}[{i}] has non-finite values"
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"],
                                   msg=lambda m: f"{what}[{i}]: {m}")


def randn(shape, device, dtype=torch.float32, requires_grad=True):
    return torch.randn(*shape, dtype=dtype).to(device).requires_grad_(requires_grad)


def leaves(shapes, device, dtype=torch.float32, requires_grad=True):
    return [randn(s, device, dtype, requires_grad) for s in shapes]


def to_device(kw, device):
    """Masks and lengths on the inputs' device (every backend takes valid_lens there)."""
    return {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}


def exact_cases(shapes: dict) -> dict:
    """backend -> [(shape, dtype)]: the backend's shapes in each of its same-dtype dtypes."""
    return {b: [(s, dt) for dt in EXACT_DTYPES[b] for s in ss] for b, ss in shapes.items()}


# ---------------------------------------------------------------------------------------
# Additive attention
# ---------------------------------------------------------------------------------------

ADD_CASES = {"native": ADD_SHAPES, "triton": ADD_SHAPES_SMALL}


@pytest.mark.parametrize("backend,shape,dtype", backend_params(
    "native", "triton", op=ADD, cases=exact_cases(ADD_CASES)))
def test_additive_matches_reference(backend, shape, dtype, device):
    op, tol = backend_op(backend, ADD), ATTN_TOL[backend, dtype]
    B, Q, K, A, Dv = shape
    for name, lens, mask in add_masks(B, Q, K):
        lens = None if lens is None else lens.to(device)
        mask = None if mask is None else mask.to(device)
        args = leaves(add_shapes(*shape), device, dtype)
        ours = op(*args, lens, mask)
        ref = reference.additive_attention(*args, lens, mask)
        assert_match(ours, ref, tol, f"{name} outputs")
        # gradients through both the context and the weights
        assert_match(grads_of(ours, args), grads_of(ref, args), tol, f"{name} gradients")
        # inference (no autograd) gives the same outputs
        with torch.no_grad():
            assert_match(op(*args, lens, mask), ref, tol, f"{name} no_grad")


@pytest.mark.parametrize("backend", ADD_BOTH)
def test_additive_rows_without_keys_are_zero_with_zero_gradients(backend, device):
    op = backend_op(backend, ADD)
    B, Q, K, A, Dv = 3, 4, 20, 16, 5
    args = leaves(add_shapes(B, Q, K, A, Dv), device)
    lens = torch.tensor([[0, 2, 0, 20], [3, 0, 1, 0], [20, 20, 20, 20]], device=device)
    ctx, w = op(*args, lens)
    empty = lens == 0
    assert (ctx[empty] == 0).all() and (w[empty] == 0).all()
    ones = torch.ones(int((~empty).sum()), device=device)
    assert torch.allclose(w[~empty].sum(-1), ones)
    torch.testing.assert_close(w[~empty].sum(-1), ones)
    # masked keys get exactly zero weight
    assert (w * (torch.arange(K, device=device) >= lens[..., None]) == 0).all()
    gq = torch.autograd.grad(ctx.sum() + (w * torch.randn_like(w)).sum(), args[0])[0]
    assert torch.isfinite(gq).all() and (gq[empty] == 0).all() and (gq[~empty] != 0).any()
    # no key anywhere: everything zero, no NaN
    ctx, w = op(*args, torch.zeros(B, dtype=torch.long, device=device))
    grads = torch.autograd.grad((ctx * torch.randn_like(ctx)).sum() + w.sum(), args)
    assert (ctx == 0).all() and (w == 0).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", backend_params("native", op=ADD))  # Triton has no float64
def test_additive_gradcheck_float64(backend, device):
    op = backend_op(backend, ADD)
    args = leaves(add_shapes(2, 3, 5, 7, 4), device, torch.float64)
    lens = torch.tensor([[5, 1, 0], [3, 2, 4]], device=device)
    assert torch.autograd.gradcheck(lambda *a: op(*a, lens, None), tuple(args))
    mask = torch.rand(2, 1, 5, device=device) > 0.3
    assert torch.autograd.gradcheck(lambda *a: op(*a, None, mask), tuple(args))


@pytest.mark.parametrize("backend", ADD_BOTH)
def test_additive_strided_inputs(backend, device):
    op, tol = backend_op(backend, ADD), ATTN_TOL[backend, torch.float32]
    B, Q, K, A, Dv = 2, 6, 19, 12, 5
    qk = randn((B, Q + K, 2 * A), device)  # query and key as slices of one buffer
    query, key = qk[:, :Q, :A], qk[:, Q:, A:]
    w_v = randn((2 * A,), device)
    value = randn((B, Dv, K), device)
    args = [query, key, w_v[::2], value.transpose(1, 2)]
    assert not any(a.is_contiguous() for a in args)
    lens = torch.tensor([19, 4], device=device)
    ours = op(*args, lens)
    ref = reference.additive_attention(*args, lens)
    assert_match(ours, ref, tol, "strided outputs")
    assert_match(grads_of(ours, [qk, w_v, value]), grads_of(ref, [qk, w_v, value]), tol,
                 "strided gradients")


@pytest.mark.parametrize("backend", ADD_BOTH)
def test_additive_opcheck(backend, device):
    args = leaves(add_shapes(2, 3, 5, 7, 4), device)
    for lens, mask in ((None, None), (torch.tensor([5, 0], device=device), None),
                       (None, torch.rand(2, 3, 5, device=device) > 0.5)):
        torch.library.opcheck(raw_op(backend, ADD), (*args, lens, mask))
    ctx, w = backend_op(backend, ADD)(*args, torch.tensor([5, 2], device=device))
    plain = [a.detach() for a in args]
    torch.library.opcheck(raw_op(backend, ADD + "_backward"),
                          (torch.randn_like(ctx), torch.randn_like(w), *plain, w.detach()))


# torch.compile's gradients against eager's, per backend.
COMPILE_TOL = {"native": {"rtol": 1e-4, "atol": 1e-5}, "triton": ATTN_TOL["triton", torch.float32]}


@pytest.mark.parametrize("backend", ADD_BOTH)
def test_additive_torch_compile_fullgraph_forward_backward(backend, device):
    op = backend_op(backend, ADD)
    args = leaves(add_shapes(2, 3, 5, 7, 4), device)
    lens = torch.tensor([5, 2], device=device)
    fn = torch.compile(lambda *a: op(*a, lens)[0].sum(), fullgraph=True, backend="aot_eager")
    g_c = torch.autograd.grad(fn(*args), args)
    g_e = torch.autograd.grad(reference.additive_attention(*args, lens)[0].sum(), args)
    assert_match(g_c, g_e, COMPILE_TOL[backend], "compiled gradients")


ADD_BAD = [
    (lambda a: a.__setitem__(0, torch.randn(3, 4)), "query must be 3-D"),
    (lambda a: a.__setitem__(1, torch.randn(2, 5, 6)), "key must be"),
    (lambda a: a.__setitem__(2, torch.randn(6)), "w_v must be"),
    (lambda a: a.__setitem__(3, torch.randn(2, 4, 4)), "value must be"),
    (lambda a: a.__setitem__(1, torch.randn(2, 5, 7, dtype=torch.float64)), "key must have the query's dtype"),
    (lambda a: a.__setitem__(1, torch.randn(2, 5, 7, dtype=torch.float16)), "key must have the query's dtype"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 3, 7))), "query dtype must be"),
    (lambda a: a.__setitem__(4, torch.tensor([6, 1])), r"valid_lens must be in \[0, K=5\]"),
    (lambda a: a.__setitem__(4, torch.tensor([-1, 1])), r"valid_lens must be in \[0, K=5\]"),
    (lambda a: a.__setitem__(4, torch.tensor([1, 2, 3])), "valid_lens must be"),
    (lambda a: a.__setitem__(4, torch.tensor([1.0, 2.0])), "valid_lens must be an integer tensor"),
    (lambda a: a.__setitem__(5, torch.ones(2, 3, 5)), "mask must be bool"),
    (lambda a: a.__setitem__(5, torch.ones(2, 4, 5, dtype=torch.bool)), "mask must be broadcastable"),
]
_ADD_BAD_IDS = [m if i not in (4, 5) else f"{m} ({'float64' if i == 4 else 'float16'})"
                for i, (_, m) in enumerate(ADD_BAD)]


@pytest.mark.parametrize("backend", backend_params("native", "triton", "reference", op=ADD))
@pytest.mark.parametrize("mutate,message", ADD_BAD, ids=_ADD_BAD_IDS)
def test_additive_bad_arguments(backend, mutate, message, device):
    args = [*leaves(add_shapes(2, 3, 5, 7, 4), "cpu", requires_grad=False), None, None]
    mutate(args)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=message):
        backend_op(backend, ADD)(*args)


# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------

SDPA_CASES = {"native": SDPA_SHAPES, "triton": SDPA_SHAPES_SMALL}


def _stats_dtype(dtype):
    # float32 statistics for float32 and the half types; float64 ones for float64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raw_sdpa(backend, q, k, v, kw):
    return raw_op(backend, SDPA)(q, k, v, kw.get("attn_mask"), kw.get("valid_lens"),
                                 kw.get("is_causal", False), kw.get("scale"),
                                 kw.get("dropout_p", 0.0), kw.get("seed", 0))


@pytest.mark.parametrize("backend,shape,dtype", backend_params(
    "native", "triton", op=SDPA, cases=exact_cases(SDPA_CASES)))
def test_sdpa_matches_reference(backend, shape, dtype, device):
    op, tol = backend_op(backend, SDPA), ATTN_TOL[backend, dtype]
    B, H, Q, K, D, Dv = shape
    for name, kw in sdpa_masks(B, H, Q, K, dtype):
        kw = to_device(kw, device)
        args = leaves(sdpa_shapes(*shape), device, dtype)
        ours = op(*args, **kw)
        ref = reference.scaled_dot_product_attention(*args, **kw)
        assert_match([ours], [ref], tol, f"{name} output")
        assert_match(grads_of([ours], args), grads_of([ref], args), tol, f"{name} gradients")
        # the saved softmax statistics [B, H, Q, 2]: (row max, log of the sum relative to
        # it), whose sum is the logsumexp; (+inf, 0) on rows with no key
        with torch.no_grad():
            _, stats = _raw_sdpa(backend, *args, kw)
            ref_lse = sdpa_reference_lse(*args[:2], **kw).to(_stats_dtype(dtype))
        assert stats.dtype == _stats_dtype(dtype) and stats.shape == (B, H, Q, 2)
        lse = stats[..., 0] + stats[..., 1]
        assert (stats[..., 1][torch.isinf(ref_lse)] == 0).all()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{name}: rows without keys"
        finite = torch.isfinite(ref_lse)
        assert_match([lse[finite]], [ref_lse[finite]], tol, f"{name} logsumexp")


TORCH_SDPA_CASES = {"native": SDPA_SHAPES[:2] + SDPA_SHAPES[3:],  # every row has a key
                    "triton": SDPA_SHAPES_SMALL[:1]}  # the interpreter: one shape, for time


@pytest.mark.parametrize("backend,shape", backend_params(
    "native", "triton", op=SDPA, cases={b: [(s,) for s in ss] for b, ss in TORCH_SDPA_CASES.items()}))
def test_sdpa_matches_torch_sdpa(backend, shape, device):
    """Where torch's F.scaled_dot_product_attention is defined (every row has a key)."""
    op, tol = backend_op(backend, SDPA), ATTN_TOL[backend, torch.float32]
    B, H, Q, K, D, Dv = shape
    lens = torch.randint(1, K + 1, (B,), device=device)
    pad = (torch.arange(K, device=device) < lens[:, None]).view(B, 1, 1, K)
    cases = [({"attn_mask": pad}, {"attn_mask": pad}),
             ({"valid_lens": lens}, {"attn_mask": pad}),
             ({"attn_mask": torch.randn(B, 1, Q, K, device=device)},) * 2,
             ({"scale": 0.2},) * 2]
    if Q <= K:
        cases.append(({"is_causal": True},) * 2)
    for ours_kw, torch_kw in cases:
        args = leaves(sdpa_shapes(*shape), device)
        ours = op(*args, **ours_kw)
        ref = F.scaled_dot_product_attention(*args, **torch_kw)
        assert_match([ours], [ref], tol, f"{list(ours_kw)} output")
        assert_match(grads_of([ours], args), grads_of([ref], args), tol, f"{list(ours_kw)} grads")


@pytest.mark.parametrize("backend", SDPA_BOTH)
def test_sdpa_rows_without_keys_are_zero_with_zero_gradients(backend, device):
    op = backend_op(backend, SDPA)
    B, H, Q, K, D = 2, 2, 5, 20, 16
    args = leaves(sdpa_shapes(B, H, Q, K, D, D), device)
    lens = torch.tensor([[0, 3, 0, 20, 1], [0, 0, 0, 0, 0]], device=device)
    out = op(*args, valid_lens=lens)
    empty = (lens == 0)[:, None, :].expand(B, H, Q)
    assert (out[empty] == 0).all() and (out[~empty] != 0).any()
    gq, gk, gv = torch.autograd.grad((out * torch.randn_like(out)).sum(), args)
    assert torch.isfinite(gq).all() and (gq[empty] == 0).all() and (gq[~empty] != 0).any()
    assert (gk[1] == 0).all() and (gv[1] == 0).all()  # batch 1 attends to nothing
    assert (gk[0, :, 3:] != 0).any()  # ...while batch 0's row with length 20 reaches every key
    # an all-False bool mask and an all -inf float mask: zeros, zero gradients, max = +inf
    for mask in (torch.zeros(B, 1, 1, K, dtype=torch.bool), torch.full((Q, K), float("-inf"))):
        out = op(*args, attn_mask=mask.to(device))
        assert (out == 0).all()
        grads = torch.autograd.grad(out.sum(), args)
        assert all((g == 0).all() for g in grads)
        _, stats = _raw_sdpa(backend, *(a.detach() for a in args), {"attn_mask": mask.to(device)})
        row_max = stats[..., 0]
        assert torch.isinf(row_max).all() and (row_max > 0).all()


@pytest.mark.parametrize("backend", SDPA_BOTH)
def test_sdpa_dropout_uses_the_reference_hash(backend, device):
    op, tol = backend_op(backend, SDPA), ATTN_TOL[backend, torch.float32]
    B, H, Q, K, D = 2, 2, 16, 40, 8
    q, k, v = leaves(sdpa_shapes(B, H, Q, K, D, D), device, requires_grad=False)
    v = torch.ones_like(v)  # each output is then the sum of its row's kept weights / (1 - p)
    outs = {}
    for seed in (0, 1, -7, 2**40 + 5):
        ours = op(q, k, v, dropout_p=0.25, seed=seed)
        ref = reference.scaled_dot_product_attention(q, k, v, dropout_p=0.25, seed=seed)
        assert_match([ours], [ref], tol, f"seed {seed}")
        outs[seed] = ours
    assert not torch.equal(outs[0], outs[1])  # different seeds drop different weights
    # only the seed's low 32 bits count, as in csrc/attention.h
    assert torch.equal(outs[2**40 + 5], op(q, k, v, dropout_p=0.25, seed=5))
    # the kept fraction is about 1 - p, so the mean output stays about 1
    assert abs(outs[0].mean().item() - 1.0) < 0.05


# float64 and 200 seeds: the compiled kernels only (Triton has no float64).
@pytest.mark.parametrize("backend", backend_params("native", op=SDPA))
def test_sdpa_dropout_matches_reference_mask_and_preserves_the_mean(backend, device):
    op, tol = backend_op(backend, SDPA), ATTN_TOL[backend, torch.float64]
    B, H, Q, K, D = 2, 2, 40, 50, 8
    args = leaves(sdpa_shapes(B, H, Q, K, D, D), device, torch.float64)
    lens = torch.tensor([50, 17], device=device)
    kw = {"valid_lens": lens, "dropout_p": 0.3, "seed": 1234}
    ours = op(*args, **kw)
    ref = reference.scaled_dot_product_attention(*args, **kw)
    assert_match([ours], [ref], tol, "dropout output")
    assert_match(grads_of([ours], args), grads_of([ref], args), tol, "dropout gradients")
    # the hash drops about p of the weights, and different seeds drop different ones
    keep = reference.sdpa_dropout_keep(1234, (B, H, Q, K), 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert (keep != reference.sdpa_dropout_keep(1235, (B, H, Q, K), 0.3)).any()
    # statistically unbiased: averaged over seeds, the output approaches the no-dropout one
    q, k, v = (a.detach() for a in args)
    v = torch.ones_like(v)  # then every output equals the sum of its row's kept weights
    mean = torch.stack([op(q, k, v, dropout_p=0.3, seed=s) for s in range(200)]).mean(0)
    assert abs(mean.mean().item() - 1.0) < 0.01
    plain = op(q, k, v)
    torch.testing.assert_close(plain, torch.ones_like(plain))


@pytest.mark.parametrize("backend", SDPA_BOTH)
def test_sdpa_strided_inputs(backend, device):
    """Heads split from a [B, Q, H*D] projection: query/key/value are transposed views."""
    op, tol = backend_op(backend, SDPA), ATTN_TOL[backend, torch.float32]
    B, H, Q, K, D = 2, 3, 7, 19, 8
    proj = [randn((B, T, H * D), device) for T in (Q, K, K)]
    args = [p.view(B, -1, H, D).transpose(1, 2) for p in proj]
    assert not args[0].is_contiguous()
    kw = {"attn_mask": torch.rand(B, 1, Q, K, device=device) > 0.3, "is_causal": True}
    ours = op(*args, **kw)
    ref = reference.scaled_dot_product_attention(*args, **kw)
    assert_match([ours], [ref], tol, "strided output")
    assert_match(grads_of([ours], proj), grads_of([ref], proj), tol, "strided gradients")


@pytest.mark.parametrize("backend", backend_params("native", op=SDPA))  # Triton has no float64
def test_sdpa_gradcheck_float64(backend, device):
    op = backend_op(backend, SDPA)
    args = leaves(sdpa_shapes(2, 2, 4, 6, 3, 5), device, torch.float64)
    cases = [{"valid_lens": torch.tensor([[6, 1, 0, 3], [2, 6, 6, 4]], device=device)},
             {"attn_mask": torch.rand(2, 1, 4, 6, device=device) > 0.3, "is_causal": True},
             {"attn_mask": torch.randn(4, 6, dtype=torch.float64, device=device), "dropout_p": 0.25,
              "seed": 3}]
    for kw in cases:
        assert torch.autograd.gradcheck(lambda *a: op(*a, **kw), tuple(args))


@pytest.mark.parametrize("backend", SDPA_BOTH)
def test_sdpa_opcheck(backend, device):
    q, k, v = leaves(sdpa_shapes(2, 2, 5, 7, 24, 20), device)
    raw = raw_op(backend, SDPA)
    for mask, lens, causal, scale, p in (
            (None, None, False, None, 0.0),
            (torch.rand(2, 1, 5, 7, device=device) > 0.5, torch.tensor([7, 3], device=device),
             True, 0.5, 0.1),
            (torch.randn(5, 7, device=device), None, False, None, 0.0)):
        torch.library.opcheck(raw, (q, k, v, mask, lens, causal, scale, p, 7))
    plain = [a.detach() for a in (q, k, v)]
    lens = torch.tensor([[7, 0, 3, 1, 7], [0, 0, 0, 0, 0]], device=device)
    out, stats = raw(*plain, None, lens, False, None, 0.2, 3)
    torch.library.opcheck(raw_op(backend, SDPA + "_backward"),
                          (torch.randn_like(out), *plain, None, lens, out, stats, False, None, 0.2, 3))


@pytest.mark.parametrize("backend", SDPA_BOTH)
def test_sdpa_torch_compile_fullgraph_forward_backward(backend, device):
    op = backend_op(backend, SDPA)
    args = leaves(sdpa_shapes(2, 2, 5, 7, 24, 20), device)
    mask = torch.rand(2, 1, 5, 7, device=device) > 0.3
    fn = torch.compile(lambda *a, p, seed: op(*a, attn_mask=mask, dropout_p=p, seed=seed).sum(),
                       fullgraph=True, backend="aot_eager")
    # no dropout; then dropout, where a new seed recompiles with the seed as a SymInt
    for p, seed in ((0.0, 0), (0.2, 1), (0.2, 2), (0.2, 2**40)):
        g_c = torch.autograd.grad(fn(*args, p=p, seed=seed), args)
        ref = reference.scaled_dot_product_attention(*args, attn_mask=mask, dropout_p=p, seed=seed)
        assert_match(g_c, torch.autograd.grad(ref.sum(), args), COMPILE_TOL[backend],
                     f"compiled gradients, p {p}, seed {seed}")


SDPA_BAD = [
    ({"query": torch.randn(2, 5, 4)}, "query must be 4-D"),
    ({"key": torch.randn(2, 2, 7, 5)}, "key must be"),
    ({"value": torch.randn(2, 2, 6, 3)}, "value must be"),
    ({"value": torch.randn(2, 2, 7, 3, dtype=torch.float64)}, "value must have the query's dtype"),
    ({"value": torch.randn(2, 2, 7, 3, dtype=torch.float16)}, "value must have the query's dtype"),
    ({"attn_mask": torch.ones(2, 2, 5, 6, dtype=torch.bool)}, "attn_mask must be broadcastable"),
    ({"attn_mask": torch.ones(5, 7, dtype=torch.int32)}, "attn_mask must be bool"),
    ({"valid_lens": torch.tensor([8, 1])}, r"valid_lens must be in \[0, K=7\]"),
    ({"valid_lens": torch.tensor([-1, 1])}, r"valid_lens must be in \[0, K=7\]"),
    ({"valid_lens": torch.ones(2, 4, dtype=torch.long)}, "valid_lens must be"),
    ({"valid_lens": torch.tensor([1.0, 2.0])}, "valid_lens must be an integer tensor"),
    ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ({"scale": float("nan")}, "scale must be finite"),
]
_SDPA_BAD_IDS = [m if i not in (3, 4) else f"{m} ({'float64' if i == 3 else 'float16'})"
                 for i, (_, m) in enumerate(SDPA_BAD)]


def _sdpa_kwargs(change, device):
    q, k, v = leaves(sdpa_shapes(2, 2, 5, 7, 4, 3), "cpu", requires_grad=False)
    kw = {"query": q, "key": k, "value": v, **change}
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}


@pytest.mark.parametrize("backend", backend_params("native", "triton", "reference", op=SDPA))
@pytest.mark.parametrize("change,message", SDPA_BAD, ids=_SDPA_BAD_IDS)
def test_sdpa_bad_arguments(backend, change, message, device):
    with pytest.raises(RuntimeError, match=message):
        backend_op(backend, SDPA)(**_sdpa_kwargs(change, device))


@pytest.mark.parametrize("backend", backend_params("triton", op=SDPA))  # native takes float64
def test_sdpa_unsupported_dtype_raises(backend, device):
    change = {n: torch.randn(*s, dtype=torch.float64)
              for n, s in zip(("query", "key", "value"), sdpa_shapes(2, 2, 5, 7, 4, 3))}
    with pytest.raises(RuntimeError, match="query dtype must be float32, float16 or bfloat16"):
        backend_op(backend, SDPA)(**_sdpa_kwargs(change, device))


# ---------------------------------------------------------------------------------------
# Both ops: torch.export, float16/bfloat16, autocast
# ---------------------------------------------------------------------------------------

class _Sdpa(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, q, k, v, valid_lens):
        return self.op(q, k, v, valid_lens=valid_lens, is_causal=True)


class _Additive(torch.nn.Module):
    def __init__(self, op, A):
        super().__init__()
        self.op = op
        self.w_v = torch.nn.Parameter(torch.randn(A))

    def forward(self, query, key, value, valid_lens):
        return self.op(query, key, self.w_v, value, valid_lens)


@pytest.mark.parametrize("backend", SDPA_BOTH)
@pytest.mark.parametrize("which", ["sdpa", "additive"])
def test_torch_export_dynamic_shapes(backend, which, device):
    """The exported graph keeps the op (torch.export does not decompose triton_ops) and
    runs at other batch sizes and lengths."""
    Bd, Qd, Kd = (torch.export.Dim(n, min=1, max=512) for n in ("B", "Q", "K"))
    if which == "sdpa":
        m, raw = _Sdpa(backend_op(backend, SDPA)), raw_op(backend, SDPA)
        shapes = lambda B, Q, K: ((B, 2, Q, 8), (B, 2, K, 8), (B, 2, K, 8))  # noqa: E731
        dims = ({0: Bd, 2: Qd}, {0: Bd, 2: Kd}, {0: Bd, 2: Kd}, {0: Bd})
    else:
        m, raw = _Additive(backend_op(backend, ADD), 8).to(device), raw_op(backend, ADD)
        shapes = lambda B, Q, K: ((B, Q, 8), (B, K, 8), (B, K, 5))  # noqa: E731
        dims = ({0: Bd, 1: Qd}, {0: Bd, 1: Kd}, {0: Bd, 1: Kd}, {0: Bd})
    example = (*leaves(shapes(3, 4, 6), device, requires_grad=False),
               torch.tensor([6, 1, 3], device=device))
    ep = torch.export.export(m, example, dynamic_shapes=dims)
    assert any(raw.name().replace("::", ".") in str(n.target) for n in ep.graph.nodes)
    new = (*leaves(shapes(2, 1, 9), device, requires_grad=False), torch.tensor([9, 4], device=device))
    ours, ref = ep.module()(*new), m(*new)
    if which == "sdpa":
        ours, ref = [ours], [ref]
    assert len(ours) == len(ref) >= 1
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def _lowp_errors(op, ref, args32, kw, dtype):
    def cast(dt):
        return [a.detach().to(dt).requires_grad_() for a in args32]
    results = []
    for fn, dt in ((ref, torch.float32), (op, dtype), (ref, dtype)):
        args = cast(dt)
        out = fn(*args, **kw)
        out = list(out) if isinstance(out, tuple) else [out]
        results.append((out, list(grads_of(out, args))))
    return results


# float16/bfloat16: error against a float32 reference within 2x of eager's own error in
# that dtype. The compiled CPU kernels take bfloat16 only; the interpreter runs Triton's
# both (it widens bfloat16 tiles before tl.dot, see attention._dot).
LOWP_DTYPES = {"native": [torch.bfloat16], "triton": [torch.float16, torch.bfloat16]}


@pytest.mark.parametrize("backend,dtype", backend_params(
    "native", "triton", op=SDPA, cases=LOWP_DTYPES))
@pytest.mark.parametrize("which", ["additive", "sdpa"])
def test_low_precision_error_within_twice_eager(backend, which, dtype, device):
    if which == "additive":
        args32 = leaves(add_shapes(2, 5, 37, 24, 9), device)
        op, ref = backend_op(backend, ADD), reference.additive_attention
        kw = {"valid_lens": torch.tensor([37, 5], device=device)}
    else:
        args32 = leaves(sdpa_shapes(2, 2, 17, 45, 24, 8), device)
        op, ref = backend_op(backend, SDPA), reference.scaled_dot_product_attention
        kw = {"attn_mask": torch.rand(2, 1, 17, 45, device=device) > 0.3, "is_causal": True}
    (r_out, r_g), (o_out, o_g), (e_out, e_g) = _lowp_errors(op, ref, args32, kw, dtype)
    for o in o_out:
        assert o.dtype == dtype
    for name, ours, eager, truth in (("outputs", o_out, e_out, r_out), ("gradients", o_g, e_g, r_g)):
        for i, (a, e, r) in enumerate(zip(ours, eager, truth, strict=True)):
            assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}[{i}]"
            err = (a.float() - r.float()).abs().max().item()
            eager_err = (e.float() - r.float()).abs().max().item()
            floor = r.abs().max().item() * HALF_FLOOR[dtype]
            assert err <= 2 * max(eager_err, floor), f"{name}[{i}]: {err:.2e} vs eager {eager_err:.2e}"


# Autocast is registered for the compiled ops (seqfuse.ops); the Triton ops have none.
@pytest.mark.parametrize("backend", backend_params("native", op=SDPA))
def test_autocast_bfloat16_runs_the_ops_in_bfloat16(backend, device):
    sdpa, additive = backend_op(backend, SDPA), backend_op(backend, ADD)
    q, k, v = leaves(sdpa_shapes(2, 2, 5, 7, 4, 4), device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = sdpa(q, k, v, attn_mask=torch.randn(5, 7, device=device))
        ctx, w = additive(q[:, 0], k[:, 0], torch.randn(4, device=device), v[:, 0])
    assert out.dtype == ctx.dtype == w.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------
# Triton only
# ---------------------------------------------------------------------------------------

try:  # the kernel below calls the attention kernels' hash (Triton resolves its globals)
    import triton
    import triton.language as tl

    from seqfuse.triton.attention import _dropout_keep, _dropout_row
except ImportError:  # its test skips (backend_params: triton is not installed)
    triton = None

if triton is not None:
    @triton.jit(do_not_specialize=["seed", "threshold"])
    def _keep_kernel(Base, Keep, n, seed, threshold, BLOCK: tl.constexpr):
        """Keep[i, j] for flat index Base[i] + j (j < BLOCK), as the attention kernels call it."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK)
        lo, hi = _dropout_row(tl.load(Base + rows, mask=rows < n, other=0))
        keep = _dropout_keep(lo[:, None], hi[:, None], cols[None, :], seed, threshold)
        tl.store(Keep + rows[:, None] * BLOCK + cols[None, :], keep.to(tl.int8), mask=rows[:, None] < n)


@pytest.mark.parametrize("backend", backend_params("triton", op=SDPA))
def test_triton_dropout_hash_matches_reference_past_32_bit_indices(backend, device):
    """The kernels' hash on flat indices past 2^32 (tensors too large to build here), rows
    whose keys cross a 2^32 boundary included: as reference._fmix32 / csrc/attention.h."""
    block = 32
    base = torch.cat([torch.arange(0, 64 * block, block), torch.arange(2**32 - 40, 2**32 + 8, 3),
                      torch.randint(2**33, 2**40, (40,)), torch.tensor([2**36 - 7])])
    index = base[:, None] + torch.arange(block)
    assert ((index >> 32) != (base[:, None] >> 32)).any()  # some rows carry into the high half
    for seed, p in ((0, 0.1), (1234, 0.5), (-3, 0.9), (2**31 + 5, 0.3), (2**40 + 7, 0.5)):
        threshold = int(p * 16777216.0 + 0.5)
        keep = torch.empty(index.shape, dtype=torch.int8, device=device)
        _keep_kernel[(triton.cdiv(len(base), block),)](
            base.to(device), keep, len(base), seed, threshold, BLOCK=block)
        s = reference._fmix32(torch.tensor((seed & 0xFFFFFFFF) ^ 0x9E3779B9))
        h = reference._fmix32((index & 0xFFFFFFFF) ^ reference._fmix32((index >> 32) ^ s))
        expected = (h >> 8) >= threshold
        assert torch.equal(keep.cpu().bool(), expected), f"seed {seed}, p {p}"
        assert 0 < expected.sum() < expected.numel()


@pytest.mark.parametrize("backend", backend_params("triton", op=SDPA))
@pytest.mark.skipif(not CUDA, reason="needs a GPU: the interpreter is deterministic by construction")
def test_triton_gradients_are_deterministic_on_gpu(backend, device):
    sdpa, additive = backend_op(backend, SDPA), backend_op(backend, ADD)
    q, k, v = leaves(((4, 8, 300, 64), (4, 8, 517, 64), (4, 8, 517, 64)), device, torch.bfloat16)
    lens = torch.randint(1, 518, (4,), device=device)
    runs = [torch.autograd.grad(sdpa(q, k, v, valid_lens=lens, dropout_p=0.1, seed=3).float().sum(),
                                (q, k, v))
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    args = leaves(add_shapes(4, 64, 200, 128, 64), device, torch.bfloat16)
    runs = [torch.autograd.grad(additive(*args, lens.clamp(max=200))[0].float().sum(), args)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
