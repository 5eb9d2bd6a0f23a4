"""The CUDA kernels of the attention ops (csrc/cuda/additive_attention_cuda.cu and
csrc/cuda/sdpa_cuda.cu) against seqfuse.reference on the GPU and against the CPU kernels
on CPU copies: outputs, attention weights, logsumexp and the gradients of every
differentiable input, over odd sizes, Q=1, K=1, several query and key tiles, every
accepted mask form, rows with no key, causal, scale, dropout (exactly the reference's
hash), head dims 24/64/128/256 (the tensor-core kernels' buckets and the CUDA-core
fallback), float32, float64, bfloat16 and float16; opcheck and gradcheck on CUDA tensors;
deterministic backward passes.

float32/float64 are compared with the same-dtype reference; the half types by their error
against a float32 reference, which must stay within 2x eager PyTorch's own error in that
dtype, both measured on the same rounded inputs (flash-attention's criterion)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from cases import ADD_SHAPES as _ADD_SHAPES
from cases import CUDA_ATTN_TOL as TOL
from cases import CUDA_HALF_EPS as HALF_EPS
from cases import SDPA_SHAPES as _SDPA_SHAPES
from cases import add_masks, add_shapes, sdpa_masks, sdpa_shapes
from cases import sdpa_reference_lse as reference_lse

from seqfuse import ops, reference


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    for op in ("additive_attention", "scaled_dot_product_attention"):
        if not ops.has_native_kernel(op, "cuda"):
            return (f"seqfuse._C has no CUDA kernel for {op}: build it on a machine with nvcc and a "
                    "CUDA torch (SEQFUSE_CUDA=1 python setup.py develop)")
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

DEV = "cuda"
EXACT = [torch.float32, torch.float64]
HALF = [torch.bfloat16, torch.float16]
# TOL: same-dtype comparisons, outputs absolute, gradients relative (and absolute near 0).
# HALF_EPS: the half types' floor of the "2x eager" bound (tests/cases.py).


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    # The float32 references must not run in TF32.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@functools.lru_cache(maxsize=None)
def _float16_accepted() -> bool:
    x = torch.randn(1, 1, 1, 8, device=DEV, dtype=torch.float16)
    try:
        ops.scaled_dot_product_attention(x, x, x)
    except RuntimeError as exc:
        if "dtype must be" in str(exc):
            return False
        raise
    return True


def need_dtype(dtype):
    if dtype == torch.float16 and not _float16_accepted():
        pytest.skip("float16 is rejected by the shared argument checks (check_floating in "
                    "csrc/attention_checks.cpp): the CUDA kernels support it once that accepts it")


def leaves(shapes, dtype, device=DEV):
    return [torch.randn(*s, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def copies(tensors, device=None, dtype=None):
    return [t.detach().to(device=device or t.device, dtype=dtype or t.dtype).requires_grad_()
            for t in tensors]


def to(kw, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def grads_of(outputs, args, seed=1):
    """Gradients of a fixed random weighting of `outputs` (the same for every dtype and
    device) with respect to `args`."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outputs)
    return list(torch.autograd.grad(loss, args))


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_match(ours, ref, dtype, what):
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert torch.isfinite(a).all(), f"{what}[{i}] has non-finite values"
        torch.testing.assert_close(a.cpu(), b.cpu(), **TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def assert_half_within_eager(op, ref, args32, kw, dtype, what):
    """op in `dtype` against ref in float32 on the same (rounded) inputs, within 2x of
    ref's own error when run in `dtype` (as flash-attention's tests): outputs and the
    gradients of every input. kw: masks in `dtype` or bool."""
    rounded = [a.detach().to(dtype) for a in args32]

    def run(fn, compute_dtype):
        args = [a.to(compute_dtype).requires_grad_() for a in rounded]
        kw_c = {k: (v.to(compute_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in kw.items()}
        out = as_list(fn(*args, **kw_c))
        return out, grads_of(out, args)
    truth_out, truth_g = run(ref, torch.float32)
    our_out, our_g = run(op, dtype)
    eager_out, eager_g = run(ref, dtype)
    for o in our_out:
        assert o.dtype == dtype
    for name, ours, eager, truth in (("outputs", our_out, eager_out, truth_out),
                                     ("gradients", our_g, eager_g, truth_g)):
        for i, (a, e, r) in enumerate(zip(ours, eager, truth, strict=True)):
            assert torch.isfinite(a).all(), f"{what} {name}[{i}] has non-finite values"
            err = (a.double() - r.double()).abs().max().item()
            eager_err = (e.double() - r.double()).abs().max().item()
            # (a gradient that is exactly 0, e.g. of a row with one key, may be 1e-7 off)
            floor = max(r.abs().max().item(), 1e-2) * HALF_EPS[dtype]
            assert err <= 2 * max(eager_err, floor), (
                f"{what} {name}[{i}]: error {err:.3e}, eager {dtype} {eager_err:.3e}, floor {floor:.3e}")


# ---------------------------------------------------------------------------------------
# Additive attention
# ---------------------------------------------------------------------------------------

ADD_SHAPES = _ADD_SHAPES + [  # B, Q, K, A, Dv: the shared shapes, then the GPU tiles
    (2, 70, 130, 100, 20),  # 64-row tiles: two query tiles, three key tiles, ragged A stages
    (1, 17, 16, 128, 8),    # Q just past the small-tile cut, K at it
]


def add_kw(lens, mask, device=DEV):
    return {"valid_lens": None if lens is None else lens.to(device),
            "mask": None if mask is None else mask.to(device)}


@pytest.mark.parametrize("dtype", EXACT, ids=str)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=str)
def test_additive_matches_reference(shape, dtype):
    for name, lens, mask in add_masks(*shape[:3]):
        args = leaves(add_shapes(*shape), dtype)
        kw = add_kw(lens, mask)
        ours = as_list(ops.additive_attention(*args, **kw))
        ref = as_list(reference.additive_attention(*args, **kw))
        assert_match(ours, ref, dtype, f"{name} context, weights")
        assert_match(grads_of(ours, args), grads_of(ref, args), dtype, f"{name} gradients")
        with torch.no_grad():
            assert_match(as_list(ops.additive_attention(*args, **kw)), ref, dtype, f"{name} no_grad")


@pytest.mark.parametrize("dtype", EXACT, ids=str)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=str)
def test_additive_matches_cpu_kernel(shape, dtype):
    for name, lens, mask in add_masks(*shape[:3]):
        args = leaves(add_shapes(*shape), dtype)
        cpu_args = copies(args, device="cpu")
        ours = as_list(ops.additive_attention(*args, **add_kw(lens, mask)))
        cpu = as_list(ops.additive_attention(*cpu_args, **add_kw(lens, mask, "cpu")))
        assert_match(ours, cpu, dtype, f"{name} context, weights")
        assert_match(grads_of(ours, args), grads_of(cpu, cpu_args), dtype, f"{name} gradients")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 37, 24, 9), (2, 70, 130, 128, 64), (2, 1, 200, 64, 32)], ids=str)
def test_additive_half_within_twice_eager(shape, dtype):
    need_dtype(dtype)
    for name, lens, mask in add_masks(*shape[:3])[:6]:
        args32 = leaves(add_shapes(*shape), torch.float32)
        assert_half_within_eager(ops.additive_attention, reference.additive_attention, args32,
                                 add_kw(lens, mask), dtype, name)


def test_additive_rows_without_keys_are_zero_with_zero_gradients():
    B, Q, K, A, Dv = 3, 4, 70, 16, 5
    args = leaves(add_shapes(B, Q, K, A, Dv), torch.float32)
    lens = torch.tensor([[0, 2, 0, 70], [3, 0, 1, 0], [70, 70, 70, 70]], device=DEV)
    ctx, w = ops.additive_attention(*args, lens)
    empty = lens == 0
    assert (ctx[empty] == 0).all() and (w[empty] == 0).all()
    torch.testing.assert_close(w[~empty].sum(-1), torch.ones(int((~empty).sum()), device=DEV))
    assert (w * (torch.arange(K, device=DEV) >= lens[..., None]) == 0).all()  # masked: exactly 0
    gq = torch.autograd.grad(ctx.sum() + w.sum(), args[0])[0]
    assert torch.isfinite(gq).all() and (gq[empty] == 0).all()
    ctx, w = ops.additive_attention(*args, torch.zeros(B, dtype=torch.long, device=DEV))
    grads = torch.autograd.grad(ctx.sum() + w.sum(), args)
    assert (ctx == 0).all() and all((g == 0).all() for g in grads)


def test_additive_gradcheck_float64():
    args = leaves(add_shapes(2, 3, 5, 7, 4), torch.float64)
    lens = torch.tensor([[5, 1, 0], [3, 2, 4]], device=DEV)
    assert torch.autograd.gradcheck(lambda *a: ops.additive_attention(*a, lens, None), tuple(args))
    mask = torch.rand(2, 1, 5, device=DEV) > 0.3
    assert torch.autograd.gradcheck(lambda *a: ops.additive_attention(*a, None, mask), tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_additive_opcheck(dtype):
    need_dtype(dtype)
    args = leaves(add_shapes(2, 3, 5, 7, 4), dtype)
    for lens, mask in ((None, None), (torch.tensor([5, 2]), None), (None, torch.rand(2, 3, 5) > 0.5)):
        kw = add_kw(lens, mask)
        torch.library.opcheck(torch.ops.seqfuse.additive_attention.default,
                              (*args, kw["valid_lens"], kw["mask"]))
    ctx, w = ops.additive_attention(*args, torch.tensor([5, 2], device=DEV))
    plain = [a.detach() for a in args]
    torch.library.opcheck(torch.ops.seqfuse.additive_attention_backward.default,
                          (torch.randn_like(ctx), torch.randn_like(w), *plain, w.detach()))


def test_additive_backward_is_deterministic_and_takes_strided_inputs():
    B, Q, K, A, Dv = 2, 70, 90, 48, 12
    base = leaves(((B, A, Q), (B, A, K), (A,), (B, Dv, K)), torch.float32)
    args = [base[0].transpose(1, 2), base[1].transpose(1, 2), base[2], base[3].transpose(1, 2)]
    lens = torch.tensor([90, 33], device=DEV)
    first = grads_of(as_list(ops.additive_attention(*args, lens)), base)
    second = grads_of(as_list(ops.additive_attention(*args, lens)), base)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    contiguous = copies([a.contiguous() for a in args])
    ref = grads_of(as_list(reference.additive_attention(*contiguous, lens)), contiguous)
    assert_match([g.transpose(1, 2) if g.dim() == 3 else g for g in first], ref, torch.float32,
                 "strided gradients")


# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------

SDPA_SHAPES = _SDPA_SHAPES + [  # B, H, Q, K, D, Dv: the shared shapes, then the head dims
    (2, 2, 130, 150, 24, 24),  # head dim 24 (bucket 32, 2-byte loads), three query tiles
    (1, 2, 97, 200, 64, 64),   # head dim 64, 16-byte loads
    (1, 2, 65, 129, 128, 96),  # head dim 128, D != Dv
    (1, 1, 33, 70, 256, 256),  # head dim 256 (tensor cores forward, CUDA cores backward)
]


def raw_sdpa(q, k, v, attn_mask=None, valid_lens=None, is_causal=False, scale=None,
             dropout_p=0.0, seed=0):
    """(output, logsumexp) of the op itself: the logsumexp is the sum of the saved
    softmax_stats [B, H, Q, 2], each row's (max, log sum)."""
    out, stats = torch.ops.seqfuse.scaled_dot_product_attention.default(
        q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed)
    assert stats.shape == (*q.shape[:3], 2), stats.shape
    return out, stats[..., 0] + stats[..., 1]


@pytest.mark.parametrize("dtype", EXACT, ids=str)
@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=str)
def test_sdpa_matches_reference(shape, dtype):
    B, H, Q, K, _, _ = shape
    for name, kw in sdpa_masks(B, H, Q, K, dtype):
        kw = to(kw, DEV)
        args = leaves(sdpa_shapes(*shape), dtype)
        ours = ops.scaled_dot_product_attention(*args, **kw)
        ref = reference.scaled_dot_product_attention(*args, **kw)
        assert_match([ours], [ref], dtype, f"{name} output")
        assert_match(grads_of([ours], args), grads_of([ref], args), dtype, f"{name} gradients")
        _, lse = raw_sdpa(*(a.detach() for a in args), **kw)
        assert lse.dtype == dtype and lse.shape == (B, H, Q)
        expected = reference_lse(*args[:2], **kw).to(dtype)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("inf")).all(), name
        torch.testing.assert_close(lse[finite], expected[finite], **TOL[dtype])


@pytest.mark.parametrize("dtype", EXACT, ids=str)
@pytest.mark.parametrize("shape", SDPA_SHAPES[:6], ids=str)
def test_sdpa_matches_cpu_kernel(shape, dtype):
    B, H, Q, K, _, _ = shape
    for name, kw in sdpa_masks(B, H, Q, K, dtype):
        args = leaves(sdpa_shapes(*shape), dtype)
        cpu_args = copies(args, device="cpu")
        ours = raw_sdpa(*args, **to(kw, DEV))
        cpu = raw_sdpa(*cpu_args, **kw)
        assert_match([ours[0]], [cpu[0]], dtype, f"{name} output")
        assert torch.equal(ours[1].isinf().cpu(), cpu[1].isinf()), f"{name} logsumexp infinities"
        finite = torch.isfinite(cpu[1])
        torch.testing.assert_close(ours[1].cpu()[finite], cpu[1][finite], **TOL[dtype])
        assert_match(grads_of([ours[0]], args), grads_of([cpu[0]], cpu_args), dtype, f"{name} gradients")


HALF_SDPA_SHAPES = [
    (2, 3, 17, 45, 16, 8),
    (2, 2, 130, 150, 24, 24),
    (2, 2, 97, 200, 64, 64),
    (1, 2, 65, 129, 128, 96),
    (1, 2, 33, 70, 256, 200),
    (2, 2, 1, 300, 64, 64),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", HALF_SDPA_SHAPES, ids=str)
def test_sdpa_half_within_twice_eager(shape, dtype):
    need_dtype(dtype)
    B, H, Q, K, _, _ = shape
    for name, kw in sdpa_masks(B, H, Q, K, dtype):
        args32 = leaves(sdpa_shapes(*shape), torch.float32)
        assert_half_within_eager(ops.scaled_dot_product_attention,
                                 reference.scaled_dot_product_attention, args32, to(kw, DEV), dtype,
                                 name)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sdpa_half_logsumexp_is_float32(dtype):
    need_dtype(dtype)
    B, H, Q, K, D = 2, 2, 70, 90, 64
    args = [a.detach() for a in leaves(sdpa_shapes(B, H, Q, K, D, D), dtype)]
    lens = torch.tensor([90, 0], device=DEV)
    _, lse = raw_sdpa(*args, valid_lens=lens)
    assert lse.dtype == torch.float32
    expected = reference_lse(*args[:2], valid_lens=lens).float()
    assert (lse[1] == float("inf")).all()
    torch.testing.assert_close(lse[0], expected[0], atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 40, 50, 8, 8), (1, 2, 130, 200, 64, 64)], ids=str)
def test_sdpa_dropout_matches_reference_hash(shape, dtype):
    need_dtype(dtype)
    B, H, Q, K, _, _ = shape
    kw = {"valid_lens": torch.tensor([K, 17])[:B].to(DEV), "dropout_p": 0.3, "seed": 1234}
    if dtype in EXACT:
        args = leaves(sdpa_shapes(*shape), dtype)
        ours = ops.scaled_dot_product_attention(*args, **kw)
        ref = reference.scaled_dot_product_attention(*args, **kw)
        assert_match([ours], [ref], dtype, "dropout output")
        assert_match(grads_of([ours], args), grads_of([ref], args), dtype, "dropout gradients")
        # the weights' normaliser is the undropped one: logsumexp ignores dropout
        plain = [a.detach() for a in args]
        _, lse_drop = raw_sdpa(*plain, **kw)
        _, lse = raw_sdpa(*plain, valid_lens=kw["valid_lens"])
        assert torch.equal(lse_drop, lse)
    else:
        assert_half_within_eager(ops.scaled_dot_product_attention,
                                 reference.scaled_dot_product_attention,
                                 leaves(sdpa_shapes(*shape), torch.float32), kw, dtype, "dropout")
    for causal in (False, True):  # a different seed drops differently; the same seed repeats
        q, k, v = (a.detach() for a in leaves(sdpa_shapes(*shape), dtype))
        a = ops.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=0.3, seed=5)
        b = ops.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=0.3, seed=5)
        c = ops.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=0.3, seed=6)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_sdpa_rows_without_keys_are_zero_with_zero_gradients():
    B, H, Q, K, D = 2, 2, 70, 80, 64
    for dtype in (torch.float32, torch.bfloat16):
        args = leaves(sdpa_shapes(B, H, Q, K, D, D), dtype)
        lens = torch.randint(1, K + 1, (B, Q), device=DEV)
        lens[0, ::3] = 0
        lens[1] = 0
        out = ops.scaled_dot_product_attention(*args, valid_lens=lens)
        empty = (lens == 0)[:, None, :].expand(B, H, Q)
        assert (out[empty] == 0).all() and (out[~empty] != 0).any()
        gq, gk, gv = torch.autograd.grad(out.float().sum(), args)
        assert torch.isfinite(gq).all() and (gq[empty] == 0).all()
        assert (gk[1] == 0).all() and (gv[1] == 0).all()  # batch 1 attends to nothing
        _, lse = raw_sdpa(*(a.detach() for a in args), valid_lens=lens)
        assert (lse[empty] == float("inf")).all() and torch.isfinite(lse[~empty]).all()
        mask = torch.zeros(B, 1, 1, K, dtype=torch.bool, device=DEV)
        out = ops.scaled_dot_product_attention(*args, attn_mask=mask)
        assert (out == 0).all()
        grads = torch.autograd.grad(out.float().sum(), args)
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("shape", [SDPA_SHAPES[1], SDPA_SHAPES[3], SDPA_SHAPES[6]], ids=str)
def test_sdpa_matches_torch_sdpa(shape):
    """Where torch's F.scaled_dot_product_attention is defined (every row has a key)."""
    B, H, Q, K, _, _ = shape
    lens = torch.randint(1, K + 1, (B,), device=DEV)
    pad = (torch.arange(K, device=DEV) < lens[:, None]).view(B, 1, 1, K)
    cases = [({"attn_mask": pad}, {"attn_mask": pad}),
             ({"valid_lens": lens}, {"attn_mask": pad}),
             ({"attn_mask": torch.randn(B, 1, Q, K, device=DEV)},) * 2,
             ({"scale": 0.2},) * 2]
    if Q <= K:
        cases.append(({"is_causal": True},) * 2)
    for ours_kw, torch_kw in cases:
        args = leaves(sdpa_shapes(*shape), torch.float32)
        ours = ops.scaled_dot_product_attention(*args, **ours_kw)
        ref = F.scaled_dot_product_attention(*args, **torch_kw)
        assert_match([ours], [ref], torch.float32, f"{list(ours_kw)} output")
        assert_match(grads_of([ours], args), grads_of([ref], args), torch.float32, f"{list(ours_kw)} grads")


def test_sdpa_gradcheck_float64():
    args = leaves(sdpa_shapes(2, 2, 4, 6, 3, 5), torch.float64)
    cases = [{"valid_lens": torch.tensor([[6, 1, 0, 3], [2, 6, 6, 4]], device=DEV)},
             {"attn_mask": torch.rand(2, 1, 4, 6, device=DEV) > 0.3, "is_causal": True},
             {"attn_mask": torch.randn(4, 6, dtype=torch.float64, device=DEV), "dropout_p": 0.25,
              "seed": 3}]
    for kw in cases:
        assert torch.autograd.gradcheck(lambda *a: ops.scaled_dot_product_attention(*a, **kw),
                                        tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_sdpa_opcheck(dtype):
    need_dtype(dtype)
    args = leaves(sdpa_shapes(2, 2, 5, 7, 16, 8), dtype)
    raw = torch.ops.seqfuse.scaled_dot_product_attention.default
    for mask, lens, causal, scale, p in ((None, None, False, None, 0.0),
                                         (torch.rand(2, 1, 5, 7) > 0.5, torch.tensor([7, 3]), True, 0.5, 0.1),
                                         (torch.randn(5, 7), None, False, None, 0.0)):
        mask = None if mask is None else mask.to(DEV)
        lens = None if lens is None else lens.to(DEV)
        torch.library.opcheck(raw, (*args, mask, lens, causal, scale, p, 7))
    plain = [a.detach() for a in args]
    lens = torch.tensor([7, 0], device=DEV)
    out, lse = raw(*plain, None, lens, False, None, 0.0, 0)
    torch.library.opcheck(torch.ops.seqfuse.scaled_dot_product_attention_backward.default,
                          (torch.randn_like(out), *plain, None, lens, out, lse, False, None, 0.0, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_backward_is_deterministic_and_takes_strided_inputs(dtype):
    B, H, Q, K, D = 2, 3, 100, 140, 64
    base = leaves(((B, Q, H, D), (B, K, H, D), (B, K, H, D)), dtype)  # [B, T, H, D] layout
    args = [t.transpose(1, 2) for t in base]
    mask = (torch.arange(K, device=DEV) < torch.tensor([140, 61], device=DEV)[:, None]).view(B, 1, 1, K)
    kw = {"attn_mask": mask, "is_causal": True, "dropout_p": 0.1, "seed": 9}
    first = grads_of([ops.scaled_dot_product_attention(*args, **kw)], base)
    second = grads_of([ops.scaled_dot_product_attention(*args, **kw)], base)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    contiguous = copies([a.contiguous() for a in args])
    ours = grads_of([ops.scaled_dot_product_attention(*contiguous, **kw)], contiguous)
    assert all(torch.equal(a.transpose(1, 2), b) for a, b in zip(first, ours, strict=True))


def test_sdpa_head_dims_past_256_are_rejected():
    q = torch.randn(1, 1, 4, 264, device=DEV)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        ops.scaled_dot_product_attention(q, q, q)
