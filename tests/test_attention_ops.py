"""The fused attention ops against eager PyTorch: masked additive attention against the
classic unfused composition (reference.additive_attention), masked scaled dot-product
attention against the unfused bmm + masked softmax + bmm (reference) and against
F.scaled_dot_product_attention. Outputs, weights and every gradient over odd shapes,
Q=1, K=1 and every accepted mask form; rows with no valid key; dropout; bfloat16;
gradcheck; opcheck; torch.export; torch.compile; argument checks."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL

import seqfuse
from seqfuse import ops, reference

pytestmark = pytest.mark.skipif(
    not seqfuse.ops.has_native_kernel("scaled_dot_product_attention", "cpu"),
    reason="seqfuse._C was not built with the attention kernels (run `make install`)")

DTYPES = [torch.float32, torch.float64]


def grads_of(outputs, leaves, seed=1):
    """Gradients of a fixed random weighting of `outputs` with respect to `leaves`."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, leaves)


def assert_match(ours, ref, dtype, what):
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]: {a.shape} {a.dtype}"
        assert torch.isfinite(a).all(), f"{what}[{i}] has non-finite values"
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["out_atol"] * 10,
                                   msg=lambda m: f"{what}[{i}]: {m}")


# ---------------------------------------------------------------------------------------
# Additive attention
# ---------------------------------------------------------------------------------------

ADD_SHAPES = [  # B, Q, K, A, Dv
    (3, 5, 7, 19, 6),
    (2, 1, 33, 40, 5),     # one decoder step, A with a ragged vector tail
    (2, 4, 1, 8, 3),       # a single key
    (1, 9, 17, 1, 1),
    (4, 6, 65, 32, 17),
]


def add_masks(B, Q, K):
    """(name, valid_lens, mask) for every accepted form, rows with no key included."""
    lens_b = torch.randint(0, K + 1, (B,))
    lens_b[0] = 0
    lens_bq = torch.randint(0, K + 1, (B, Q))
    return [
        ("none", None, None),
        ("lens[B]", lens_b, None),
        ("lens[B,Q]", lens_bq, None),
        ("lens full", torch.full((B,), K), None),
        ("mask[B,Q,K]", None, torch.rand(B, Q, K) > 0.4),
        ("mask[B,1,K]", None, torch.rand(B, 1, K) > 0.3),
        ("mask[K]+lens", lens_bq, torch.rand(K) > 0.2),
    ]


def add_args(B, Q, K, A, Dv, dtype, requires_grad=True):
    return [torch.randn(*s, dtype=dtype, requires_grad=requires_grad)
            for s in ((B, Q, A), (B, K, A), (A,), (B, K, Dv))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=str)
def test_additive_matches_unfused_eager(shape, dtype):
    B, Q, K, A, Dv = shape
    for name, lens, mask in add_masks(B, Q, K):
        args = add_args(B, Q, K, A, Dv, dtype)
        ours = ops.additive_attention(*args, lens, mask)
        ref = reference.additive_attention(*args, lens, mask)
        assert_match(ours, ref, dtype, f"{name} outputs")
        # gradients through both the context and the weights
        assert_match(grads_of(ours, args), grads_of(ref, args), dtype, f"{name} gradients")
        # inference (no autograd) gives the same outputs
        with torch.no_grad():
            assert_match(ops.additive_attention(*args, lens, mask), ref, dtype, f"{name} no_grad")


def test_additive_rows_without_keys_are_zero_with_zero_gradients():
    B, Q, K, A, Dv = 3, 4, 6, 16, 5
    args = add_args(B, Q, K, A, Dv, torch.float32)
    lens = torch.tensor([[0, 2, 0, 6], [3, 0, 1, 0], [6, 6, 6, 6]])
    ctx, w = ops.additive_attention(*args, lens)
    empty = lens == 0
    assert (ctx[empty] == 0).all() and (w[empty] == 0).all()
    assert torch.allclose(w[~empty].sum(-1), torch.ones(int((~empty).sum())))
    # masked keys get exactly zero weight
    assert (w * (torch.arange(K) >= lens[..., None]) == 0).all()
    gq = torch.autograd.grad(ctx.sum() + w.sum(), args[0])[0]
    assert torch.isfinite(gq).all() and (gq[empty] == 0).all()
    # no key anywhere: everything zero, no NaN
    ctx, w = ops.additive_attention(*args, torch.zeros(B, dtype=torch.long))
    grads = torch.autograd.grad(ctx.sum() + w.sum(), args)
    assert (ctx == 0).all() and all((g == 0).all() for g in grads)


def test_additive_gradcheck_float64():
    args = add_args(2, 3, 5, 7, 4, torch.float64)
    lens = torch.tensor([[5, 1, 0], [3, 2, 4]])
    assert torch.autograd.gradcheck(lambda *a: ops.additive_attention(*a, lens, None), tuple(args))
    mask = torch.rand(2, 1, 5) > 0.3
    assert torch.autograd.gradcheck(lambda *a: ops.additive_attention(*a, None, mask), tuple(args))


def test_additive_opcheck():
    args = add_args(2, 3, 5, 7, 4, torch.float32)
    for lens, mask in ((None, None), (torch.tensor([5, 2]), None), (None, torch.rand(2, 3, 5) > 0.5)):
        torch.library.opcheck(torch.ops.seqfuse.additive_attention.default, (*args, lens, mask))
    ctx, w = ops.additive_attention(*args, torch.tensor([5, 2]))
    plain = [a.detach() for a in args]
    torch.library.opcheck(torch.ops.seqfuse.additive_attention_backward.default,
                          (torch.randn_like(ctx), torch.randn_like(w), *plain, w.detach()))


class _Additive(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.w_v = torch.nn.Parameter(torch.randn(A))

    def forward(self, query, key, value, valid_lens):
        return ops.additive_attention(query, key, self.w_v, value, valid_lens)


def test_additive_torch_export_dynamic_shapes():
    m = _Additive(8)
    Bd, Qd, Kd = (torch.export.Dim(n, min=1, max=512) for n in ("B", "Q", "K"))
    ex = (torch.randn(3, 4, 8), torch.randn(3, 6, 8), torch.randn(3, 6, 5), torch.tensor([6, 1, 3]))
    ep = torch.export.export(m, ex, dynamic_shapes=({0: Bd, 1: Qd}, {0: Bd, 1: Kd}, {0: Bd, 1: Kd}, {0: Bd}))
    assert any("seqfuse.additive_attention" in str(n.target) for n in ep.graph.nodes)
    new = (torch.randn(2, 1, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 5), torch.tensor([9, 4]))
    for a, b in zip(ep.module()(*new), m(*new), strict=True):
        torch.testing.assert_close(a, b)


def test_additive_torch_compile_fullgraph_forward_backward():
    args = add_args(2, 3, 5, 7, 4, torch.float32)
    lens = torch.tensor([5, 2])
    fn = torch.compile(lambda *a: ops.additive_attention(*a, lens)[0].sum(), fullgraph=True,
                       backend="aot_eager")
    g_c = torch.autograd.grad(fn(*args), args)
    g_e = torch.autograd.grad(reference.additive_attention(*args, lens)[0].sum(), args)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


ADD_BAD = [
    (lambda a: a.__setitem__(0, torch.randn(3, 4)), "query must be 3-D"),
    (lambda a: a.__setitem__(1, torch.randn(2, 5, 6)), "key must be"),
    (lambda a: a.__setitem__(2, torch.randn(6)), "w_v must be"),
    (lambda a: a.__setitem__(3, torch.randn(2, 4, 4)), "value must be"),
    (lambda a: a.__setitem__(1, torch.randn(2, 5, 7, dtype=torch.float64)), "key must have the query's dtype"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 3, 7))), "query dtype must be"),
    (lambda a: a.__setitem__(4, torch.tensor([6, 1])), r"valid_lens must be in \[0, K=5\]"),
    (lambda a: a.__setitem__(4, torch.tensor([-1, 1])), r"valid_lens must be in \[0, K=5\]"),
    (lambda a: a.__setitem__(4, torch.tensor([1, 2, 3])), "valid_lens must be"),
    (lambda a: a.__setitem__(4, torch.tensor([1.0, 2.0])), "valid_lens must be an integer tensor"),
    (lambda a: a.__setitem__(5, torch.ones(2, 3, 5)), "mask must be bool"),
    (lambda a: a.__setitem__(5, torch.ones(2, 4, 5, dtype=torch.bool)), "mask must be broadcastable"),
]


@pytest.mark.parametrize("mutate,message", ADD_BAD, ids=[m for _, m in ADD_BAD])
def test_additive_bad_arguments(mutate, message):
    args = [*add_args(2, 3, 5, 7, 4, torch.float32, requires_grad=False), None, None]
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        ops.additive_attention(*args)


# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------

SDPA_SHAPES = [  # B, H, Q, K, D, Dv
    (2, 3, 5, 7, 8, 6),
    (1, 2, 59, 97, 17, 33),   # odd sizes, ragged tiles and vector tails
    (2, 1, 1, 1, 4, 4),       # one query, one key
    (2, 2, 1, 300, 64, 64),   # one decoder step over two key blocks
    (1, 1, 70, 520, 16, 8),   # three key blocks (online softmax rescaling)
]


def sdpa_masks(B, H, Q, K, dtype):
    """(name, kwargs) for every accepted mask form; some rows have no key."""
    lens_b = torch.randint(0, K + 1, (B,))
    lens_b[-1] = 0 if B > 1 else lens_b[-1]
    pad = torch.arange(K) < torch.randint(1, K + 1, (B,))[:, None]
    additive = torch.randn(1, H, Q, K, dtype=dtype)
    additive[..., 0, :] = float("-inf")  # first query row fully masked
    return [
        ("none", {}),
        ("lens[B]", {"valid_lens": lens_b}),
        ("lens[B,Q]", {"valid_lens": torch.randint(0, K + 1, (B, Q))}),
        ("bool[B,1,1,K]", {"attn_mask": pad.view(B, 1, 1, K)}),
        ("bool[B,1,Q,K]", {"attn_mask": torch.rand(B, 1, Q, K) > 0.3}),
        ("bool[Q,K]", {"attn_mask": torch.rand(Q, K) > 0.5}),
        ("bool[B,H,Q,K]", {"attn_mask": torch.rand(B, H, Q, K) > 0.7}),
        ("float[1,H,Q,K]", {"attn_mask": additive}),
        ("causal", {"is_causal": True}),
        ("causal+lens+scale", {"is_causal": True, "valid_lens": lens_b, "scale": 0.3}),
    ]


def sdpa_args(B, H, Q, K, D, Dv, dtype, requires_grad=True):
    return [torch.randn(*s, dtype=dtype, requires_grad=requires_grad)
            for s in ((B, H, Q, D), (B, H, K, D), (B, H, K, Dv))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=str)
def test_sdpa_matches_unfused_eager(shape, dtype):
    B, H, Q, K, D, Dv = shape
    for name, kw in sdpa_masks(B, H, Q, K, dtype):
        args = sdpa_args(B, H, Q, K, D, Dv, dtype)
        ours = ops.scaled_dot_product_attention(*args, **kw)
        ref = reference.scaled_dot_product_attention(*args, **kw)
        assert_match([ours], [ref], dtype, f"{name} output")
        assert_match(grads_of([ours], args), grads_of([ref], args), dtype, f"{name} gradients")


@pytest.mark.parametrize("shape", SDPA_SHAPES[:2] + SDPA_SHAPES[3:], ids=str)
def test_sdpa_matches_torch_sdpa(shape):
    """Where torch's F.scaled_dot_product_attention is defined (every row has a key)."""
    B, H, Q, K, D, Dv = shape
    lens = torch.randint(1, K + 1, (B,))
    pad = (torch.arange(K) < lens[:, None]).view(B, 1, 1, K)
    cases = [({"attn_mask": pad}, {"attn_mask": pad}),
             ({"valid_lens": lens}, {"attn_mask": pad}),
             ({"attn_mask": torch.randn(B, 1, Q, K)},) * 2,
             ({"scale": 0.2},) * 2]
    if Q <= K:
        cases.append(({"is_causal": True},) * 2)
    for ours_kw, torch_kw in cases:
        args = sdpa_args(B, H, Q, K, D, Dv, torch.float32)
        ours = ops.scaled_dot_product_attention(*args, **ours_kw)
        ref = F.scaled_dot_product_attention(*args, **torch_kw)
        assert_match([ours], [ref], torch.float32, f"{list(ours_kw)} output")
        assert_match(grads_of([ours], args), grads_of([ref], args), torch.float32, f"{list(ours_kw)} grads")


def test_sdpa_rows_without_keys_are_zero_with_zero_gradients():
    B, H, Q, K, D = 2, 2, 5, 8, 4
    args = sdpa_args(B, H, Q, K, D, D, torch.float32)
    lens = torch.tensor([[0, 3, 0, 8, 1], [0, 0, 0, 0, 0]])
    out = ops.scaled_dot_product_attention(*args, valid_lens=lens)
    empty = (lens == 0)[:, None, :].expand(B, H, Q)
    assert (out[empty] == 0).all() and (out[~empty] != 0).any()
    gq, gk, gv = torch.autograd.grad(out.sum(), args)
    assert torch.isfinite(gq).all() and (gq[empty] == 0).all()
    assert (gk[1] == 0).all() and (gv[1] == 0).all()  # batch 1 attends to nothing
    mask = torch.zeros(B, 1, 1, K, dtype=torch.bool)
    out = ops.scaled_dot_product_attention(*args, attn_mask=mask)
    assert (out == 0).all()


def test_sdpa_dropout_matches_reference_mask_and_preserves_the_mean():
    B, H, Q, K, D = 2, 2, 40, 50, 8
    args = sdpa_args(B, H, Q, K, D, D, torch.float64)
    lens = torch.tensor([50, 17])
    kw = {"valid_lens": lens, "dropout_p": 0.3, "seed": 1234}
    ours = ops.scaled_dot_product_attention(*args, **kw)
    ref = reference.scaled_dot_product_attention(*args, **kw)
    assert_match([ours], [ref], torch.float64, "dropout output")
    assert_match(grads_of([ours], args), grads_of([ref], args), torch.float64, "dropout gradients")
    # the hash drops about p of the weights, and different seeds drop different ones
    keep = reference.sdpa_dropout_keep(1234, (B, H, Q, K), 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert (keep != reference.sdpa_dropout_keep(1235, (B, H, Q, K), 0.3)).any()
    # statistically unbiased: averaged over seeds, the output approaches the no-dropout one
    q, k, v = (a.detach() for a in args)
    v = torch.ones_like(v)  # then every output equals the sum of its row's kept weights
    mean = torch.stack([ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3, seed=s)
                        for s in range(200)]).mean(0)
    assert abs(mean.mean().item() - 1.0) < 0.01
    plain = ops.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(plain, torch.ones_like(plain))


def test_sdpa_gradcheck_float64():
    args = sdpa_args(2, 2, 4, 6, 3, 5, torch.float64)
    cases = [{"valid_lens": torch.tensor([[6, 1, 0, 3], [2, 6, 6, 4]])},
             {"attn_mask": torch.rand(2, 1, 4, 6) > 0.3, "is_causal": True},
             {"attn_mask": torch.randn(4, 6, dtype=torch.float64), "dropout_p": 0.25, "seed": 3}]
    for kw in cases:
        assert torch.autograd.gradcheck(lambda *a: ops.scaled_dot_product_attention(*a, **kw),
                                        tuple(args))


def test_sdpa_opcheck():
    args = sdpa_args(2, 2, 5, 7, 4, 3, torch.float32)
    raw = torch.ops.seqfuse.scaled_dot_product_attention.default
    for mask, lens, causal, scale, p in ((None, None, False, None, 0.0),
                                         (torch.rand(2, 1, 5, 7) > 0.5, torch.tensor([7, 3]), True, 0.5, 0.1),
                                         (torch.randn(5, 7), None, False, None, 0.0)):
        torch.library.opcheck(raw, (*args, mask, lens, causal, scale, p, 7))
    plain = [a.detach() for a in args]
    out, lse = raw(*plain, None, torch.tensor([7, 0]), False, None, 0.0, 0)
    torch.library.opcheck(torch.ops.seqfuse.scaled_dot_product_attention_backward.default,
                          (torch.randn_like(out), *plain, None, torch.tensor([7, 0]), out, lse,
                           False, None, 0.0, 0))


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v, valid_lens):
        return ops.scaled_dot_product_attention(q, k, v, valid_lens=valid_lens)


def test_sdpa_torch_export_dynamic_shapes():
    m = _Sdpa()
    Bd, Qd, Kd = (torch.export.Dim(n, min=1, max=512) for n in ("B", "Q", "K"))
    ex = (torch.randn(3, 2, 4, 8), torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8), torch.tensor([6, 1, 3]))
    ep = torch.export.export(m, ex, dynamic_shapes=({0: Bd, 2: Qd}, {0: Bd, 2: Kd}, {0: Bd, 2: Kd}, {0: Bd}))
    assert any("seqfuse.scaled_dot_product_attention" in str(n.target) for n in ep.graph.nodes)
    new = (torch.randn(2, 2, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), torch.tensor([9, 4]))
    torch.testing.assert_close(ep.module()(*new), m(*new))


def test_sdpa_torch_compile_fullgraph_forward_backward():
    args = sdpa_args(2, 2, 5, 7, 4, 3, torch.float32)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    fn = torch.compile(lambda *a: ops.scaled_dot_product_attention(*a, attn_mask=mask).sum(),
                       fullgraph=True, backend="aot_eager")
    g_c = torch.autograd.grad(fn(*args), args)
    g_e = torch.autograd.grad(reference.scaled_dot_product_attention(*args, attn_mask=mask).sum(), args)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


SDPA_BAD = [
    ({"query": torch.randn(2, 5, 4)}, "query must be 4-D"),
    ({"key": torch.randn(2, 2, 7, 5)}, "key must be"),
    ({"value": torch.randn(2, 2, 6, 3)}, "value must be"),
    ({"value": torch.randn(2, 2, 7, 3, dtype=torch.float64)}, "value must have the query's dtype"),
    ({"attn_mask": torch.ones(2, 2, 5, 6, dtype=torch.bool)}, "attn_mask must be broadcastable"),
    ({"attn_mask": torch.ones(5, 7, dtype=torch.int32)}, "attn_mask must be bool"),
    ({"valid_lens": torch.tensor([8, 1])}, r"valid_lens must be in \[0, K=7\]"),
    ({"valid_lens": torch.ones(2, 4, dtype=torch.long)}, "valid_lens must be"),
    ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ({"scale": float("nan")}, "scale must be finite"),
]


@pytest.mark.parametrize("change,message", SDPA_BAD, ids=[m for _, m in SDPA_BAD])
def test_sdpa_bad_arguments(change, message):
    q, k, v = sdpa_args(2, 2, 5, 7, 4, 3, torch.float32, requires_grad=False)
    kw = {"query": q, "key": k, "value": v, **change}
    with pytest.raises(RuntimeError, match=message):
        ops.scaled_dot_product_attention(**kw)


# ---------------------------------------------------------------------------------------
# bfloat16: error against a float32 reference within 2x of eager bfloat16's own error
# ---------------------------------------------------------------------------------------

def _bf16_errors(op, ref, args32, kw):
    def cast(dtype):
        return [a.detach().to(dtype).requires_grad_() for a in args32]
    results = []
    for fn, dtype in ((ref, torch.float32), (op, torch.bfloat16), (ref, torch.bfloat16)):
        args = cast(dtype)
        out = fn(*args, **kw)
        out = list(out) if isinstance(out, tuple) else [out]
        results.append((out, list(grads_of([o.float() for o in out], args))))
    return results


@pytest.mark.parametrize("which", ["additive", "sdpa"])
def test_bfloat16_error_within_twice_eager_bfloat16(which):
    if which == "additive":
        args32 = add_args(3, 5, 37, 24, 9, torch.float32)
        op, ref, kw = ops.additive_attention, reference.additive_attention, {"valid_lens": torch.tensor([37, 5, 1])}
    else:
        args32 = sdpa_args(2, 3, 17, 45, 16, 8, torch.float32)
        op, ref, kw = (ops.scaled_dot_product_attention, reference.scaled_dot_product_attention,
                       {"attn_mask": torch.rand(2, 1, 17, 45) > 0.3})
    (r_out, r_g), (o_out, o_g), (e_out, e_g) = _bf16_errors(op, ref, args32, kw)
    for o in o_out:
        assert o.dtype == torch.bfloat16
    for name, ours, eager, truth in (("outputs", o_out, e_out, r_out), ("gradients", o_g, e_g, r_g)):
        for i, (a, e, r) in enumerate(zip(ours, eager, truth, strict=True)):
            err = (a.float() - r.float()).abs().max().item()
            eager_err = (e.float() - r.float()).abs().max().item()
            floor = r.abs().max().item() * 2 ** -9
            assert err <= 2 * max(eager_err, floor), f"{name}[{i}]: {err:.2e} vs eager {eager_err:.2e}"


def test_autocast_bfloat16_runs_the_ops_in_bfloat16():
    q, k, v = sdpa_args(2, 2, 5, 7, 4, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(5, 7))
        ctx, w = ops.additive_attention(q[:, 0], k[:, 0], torch.randn(4), v[:, 0])
    assert out.dtype == ctx.dtype == w.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
