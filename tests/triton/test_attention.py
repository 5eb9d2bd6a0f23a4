"""The Triton attention ops (seqfuse.triton.attention) against the reference backend:
masked additive attention and masked scaled dot-product attention, outputs, weights,
logsumexp and every gradient, over odd sizes (several tiles, head dims that are not
powers of two), Q=1, K=1, every accepted mask form, rows with no key, dropout (the same
hash as the reference), strided inputs, float16/bfloat16 (error within 2x of eager's own),
opcheck, torch.compile, torch.export and argument checks.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1): shapes are kept small, and the interpreter's tiles are 16 wide, so
Q or K of 33-40 spans three blocks.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from seqfuse import reference  # noqa: E402
from seqfuse.triton import attention as ta  # noqa: E402
from seqfuse.triton.attention import _dropout_keep, _dropout_row  # noqa: E402

ON_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(
    not ON_CUDA and not ta._INTERPRETED,
    reason="no GPU, and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py "
           "sets it before triton is first imported)")

# float32 against the float32 reference: output absolute, gradients relative (as the
# compiled ops' tests, with 2x slack for the exp2-domain softmax).
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture
def device():
    return "cuda" if ON_CUDA else "cpu"


def grads_of(outputs, leaves, seed=1):
    """Gradients of a fixed random weighting of `outputs` with respect to `leaves`."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outputs)
    return torch.autograd.grad(loss, leaves)


def assert_match(ours, ref, what, atol=ATOL, rtol=RTOL):
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert torch.isfinite(a).all(), f"{what}[{i}] has non-finite values"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


def randn(shape, device, dtype=torch.float32, requires_grad=True):
    return torch.randn(*shape, dtype=dtype).to(device).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
# ---------------------------------------------------------------------------------------

SDPA_SHAPES = [  # B, H, Q, K, D, Dv
    (2, 2, 5, 7, 24, 20),     # head dims that are not powers of two
    (1, 2, 37, 40, 16, 8),    # three query blocks x three key blocks (online rescaling)
    (2, 1, 1, 1, 4, 4),       # one query, one key
    (2, 2, 1, 37, 20, 12),    # one decoder step over three key blocks
    (1, 1, 33, 20, 32, 32),   # more queries than keys (causal rows past K see every key)
]


def sdpa_cases(B, H, Q, K):
    """(name, kwargs) for every accepted mask form and switch; some rows have no key.
    Tensors are made on the CPU (lengths stay there: the op moves them)."""
    lens_b = torch.randint(0, K + 1, (B,))
    lens_b[-1] = 0 if B > 1 else lens_b[-1]
    lens_bq = torch.randint(0, K + 1, (B, Q))
    lens_bq[0, 0] = 0
    pad = torch.arange(K) < torch.randint(1, K + 1, (B,))[:, None]
    additive = torch.randn(1, H, Q, K)
    additive[..., 0, :] = float("-inf")  # first query row fully masked
    additive[..., -1, : K // 2] = float("-inf")
    return [
        ("none", {}),
        ("lens[B]", {"valid_lens": lens_b}),
        ("lens[B,Q]", {"valid_lens": lens_bq}),
        ("bool[B,1,1,K]", {"attn_mask": pad.view(B, 1, 1, K)}),
        ("bool[Q,K]", {"attn_mask": torch.rand(Q, K) > 0.5}),
        ("bool[B,H,Q,K]", {"attn_mask": torch.rand(B, H, Q, K) > 0.7}),
        ("float[1,H,Q,K]", {"attn_mask": additive}),
        ("float[Q,K]", {"attn_mask": torch.randn(Q, K)}),
        ("causal", {"is_causal": True}),
        ("causal+lens+scale", {"is_causal": True, "valid_lens": lens_b, "scale": 0.3}),
        ("dropout", {"dropout_p": 0.3, "seed": 1234}),
        ("dropout+bool+causal", {"dropout_p": 0.5, "seed": 7, "is_causal": True,
                                 "attn_mask": pad.view(B, 1, 1, K)}),
    ]


def to_device(kw, device):
    """Masks and lengths to the inputs' device (every backend requires valid_lens there)."""
    return {n: (v.to(device) if n in ("attn_mask", "valid_lens") else v) for n, v in kw.items()}


def sdpa_ref_lse(q, k, attn_mask=None, valid_lens=None, is_causal=False, scale=None, **_):
    """logsumexp [B, H, Q] of the masked, scaled scores; +inf on rows with no key."""
    Q, D = q.shape[-2:]
    K = k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (D ** -0.5 if scale is None else scale)
    keep = torch.ones(Q, K, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            scores = scores + attn_mask
            keep = keep & (attn_mask > float("-inf"))
    if valid_lens is not None:
        keep = keep & reference._lens_mask(valid_lens.to(q.device), Q, K).unsqueeze(1)
    if is_causal:
        keep = keep & torch.ones(Q, K, dtype=torch.bool, device=q.device).tril()
    keep = keep.expand_as(scores)
    lse = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.where(keep.any(-1), lse, torch.full_like(lse, float("inf")))


@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=str)
def test_sdpa_matches_reference(shape, device):
    B, H, Q, K, D, Dv = shape
    raw = torch.ops.seqfuse.scaled_dot_product_attention_triton.default
    for name, kw in sdpa_cases(B, H, Q, K):
        kw = to_device(kw, device)
        args = [randn(s, device) for s in ((B, H, Q, D), (B, H, K, D), (B, H, K, Dv))]
        ours = ta.scaled_dot_product_attention(*args, **kw)
        ref = reference.scaled_dot_product_attention(*args, **kw)
        assert_match([ours], [ref], f"{name} output")
        assert_match(grads_of([ours], args), grads_of([ref], args), f"{name} gradients")
        with torch.no_grad():
            _, stats = raw(*args, kw.get("attn_mask"), kw.get("valid_lens"), kw.get("is_causal", False),
                           kw.get("scale"), kw.get("dropout_p", 0.0), kw.get("seed", 0))
            ref_lse = sdpa_ref_lse(*args[:2], **kw)
        assert stats.dtype == torch.float32 and stats.shape == (B, H, Q, 2)
        lse = stats[..., 0] + stats[..., 1]  # (row max, log of the sum relative to it)
        assert (stats[..., 1][torch.isinf(ref_lse)] == 0).all()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{name}: rows without keys"
        finite = torch.isfinite(ref_lse)
        assert_match([lse[finite]], [ref_lse[finite]], f"{name} logsumexp")


def test_sdpa_rows_without_keys_are_zero_with_zero_gradients(device):
    B, H, Q, K, D = 2, 2, 5, 20, 16
    args = [randn(s, device) for s in ((B, H, Q, D), (B, H, K, D), (B, H, K, D))]
    lens = torch.tensor([[0, 3, 0, 20, 1], [0, 0, 0, 0, 0]])
    out = ta.scaled_dot_product_attention(*args, valid_lens=lens)
    empty = (lens == 0)[:, None, :].expand(B, H, Q).to(device)
    assert (out[empty] == 0).all() and (out[~empty] != 0).any()
    gq, gk, gv = torch.autograd.grad((out * torch.randn_like(out)).sum(), args)
    assert torch.isfinite(gq).all() and (gq[empty] == 0).all() and (gq[~empty] != 0).any()
    assert (gk[1] == 0).all() and (gv[1] == 0).all()  # batch 1 attends to nothing
    assert (gk[0, :, 3:] != 0).any()  # ...while batch 0's row with length 20 reaches every key
    # an all-False bool mask and an all -inf float mask: zeros, zero gradients, max = +inf
    for mask in (torch.zeros(B, 1, 1, K, dtype=torch.bool), torch.full((Q, K), float("-inf"))):
        out, stats = torch.ops.seqfuse.scaled_dot_product_attention_triton.default(
            *args, mask.to(device), None, False, None, 0.0, 0)
        row_max = stats[..., 0]
        assert (out == 0).all() and torch.isinf(row_max).all() and (row_max > 0).all()
        grads = torch.autograd.grad(out.sum(), args)
        assert all((g == 0).all() for g in grads)


def test_sdpa_dropout_uses_the_reference_hash(device):
    B, H, Q, K, D = 2, 2, 16, 40, 8
    q, k, v = (randn(s, device, requires_grad=False) for s in ((B, H, Q, D), (B, H, K, D), (B, H, K, D)))
    v = torch.ones_like(v)  # each output is then the sum of its row's kept weights / (1 - p)
    outs = {}
    for seed in (0, 1, -7, 2**40 + 5):
        ours = ta.scaled_dot_product_attention(q, k, v, dropout_p=0.25, seed=seed)
        ref = reference.scaled_dot_product_attention(q, k, v, dropout_p=0.25, seed=seed)
        assert_match([ours], [ref], f"seed {seed}")
        outs[seed] = ours
    assert not torch.equal(outs[0], outs[1])  # different seeds drop different weights
    # only the seed's low 32 bits count, as in csrc/attention.h
    assert torch.equal(outs[2**40 + 5], ta.scaled_dot_product_attention(q, k, v, dropout_p=0.25, seed=5))
    # the kept fraction is about 1 - p, so the mean output stays about 1
    assert abs(outs[0].mean().item() - 1.0) < 0.05


@triton.jit(do_not_specialize=["seed", "threshold"])
def _keep_kernel(Base, Keep, n, seed, threshold, BLOCK: tl.constexpr):
    """Keep[i, j] for flat index Base[i] + j (j < BLOCK), as the attention kernels call it."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    lo, hi = _dropout_row(tl.load(Base + rows, mask=rows < n, other=0))
    keep = _dropout_keep(lo[:, None], hi[:, None], cols[None, :], seed, threshold)
    tl.store(Keep + rows[:, None] * BLOCK + cols[None, :], keep.to(tl.int8), mask=rows[:, None] < n)


def test_dropout_hash_matches_reference_past_32_bit_indices(device):
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


def test_sdpa_strided_inputs(device):
    """Heads split from a [B, Q, H*D] projection: query/key/value are transposed views."""
    B, H, Q, K, D = 2, 3, 7, 19, 8
    proj = [randn((B, T, H * D), device) for T in (Q, K, K)]
    args = [p.view(B, -1, H, D).transpose(1, 2) for p in proj]
    assert not args[0].is_contiguous()
    kw = {"attn_mask": (torch.rand(B, 1, Q, K) > 0.3).to(device), "is_causal": True}
    ours = ta.scaled_dot_product_attention(*args, **kw)
    ref = reference.scaled_dot_product_attention(*args, **kw)
    assert_match([ours], [ref], "strided output")
    assert_match(grads_of([ours], proj), grads_of([ref], proj), "strided gradients")


def test_sdpa_opcheck(device):
    q, k, v = (randn(s, device) for s in ((2, 2, 5, 24), (2, 2, 7, 24), (2, 2, 7, 20)))
    raw = torch.ops.seqfuse.scaled_dot_product_attention_triton.default
    for mask, lens, causal, scale, p in (
            (None, None, False, None, 0.0),
            ((torch.rand(2, 1, 5, 7) > 0.5).to(device), torch.tensor([7, 3]), True, 0.5, 0.1),
            (torch.randn(5, 7, device=device), None, False, None, 0.0)):
        torch.library.opcheck(raw, (q, k, v, mask, lens, causal, scale, p, 7))
    plain = [a.detach() for a in (q, k, v)]
    lens = torch.tensor([[7, 0, 3, 1, 7], [0, 0, 0, 0, 0]])
    out, stats = raw(*plain, None, lens, False, None, 0.2, 3)
    torch.library.opcheck(torch.ops.seqfuse.scaled_dot_product_attention_backward_triton.default,
                          (torch.randn_like(out), *plain, None, lens, out, stats, False, None, 0.2, 3))


def test_sdpa_torch_compile_fullgraph_forward_backward(device):
    args = [randn(s, device) for s in ((2, 2, 5, 24), (2, 2, 7, 24), (2, 2, 7, 20))]
    mask = (torch.rand(2, 1, 5, 7) > 0.3).to(device)
    fn = torch.compile(
        lambda *a, seed: ta.scaled_dot_product_attention(*a, attn_mask=mask, dropout_p=0.2,
                                                         seed=seed).sum(),
        fullgraph=True, backend="aot_eager")
    for seed in (1, 2, 2**40):  # a new seed recompiles with the seed as a SymInt
        g_c = torch.autograd.grad(fn(*args, seed=seed), args)
        ref = reference.scaled_dot_product_attention(*args, attn_mask=mask, dropout_p=0.2, seed=seed)
        assert_match(g_c, torch.autograd.grad(ref.sum(), args), f"compiled gradients, seed {seed}")


SDPA_BAD = [
    ({"query": torch.randn(2, 5, 4)}, "query must be 4-D"),
    ({"key": torch.randn(2, 2, 7, 5)}, "key must be"),
    ({"value": torch.randn(2, 2, 6, 3)}, "value must be"),
    ({"value": torch.randn(2, 2, 7, 3, dtype=torch.float16)}, "value must have the query's dtype"),
    ({"query": torch.randn(2, 2, 5, 4, dtype=torch.float64), "key": torch.randn(2, 2, 7, 4, dtype=torch.float64),
      "value": torch.randn(2, 2, 7, 3, dtype=torch.float64)}, "query dtype must be float32, float16 or bfloat16"),
    ({"attn_mask": torch.ones(2, 2, 5, 6, dtype=torch.bool)}, "attn_mask must be broadcastable"),
    ({"attn_mask": torch.ones(5, 7, dtype=torch.int32)}, "attn_mask must be bool"),
    ({"valid_lens": torch.tensor([8, 1])}, r"valid_lens must be in \[0, K=7\]"),
    ({"valid_lens": torch.tensor([-1, 1])}, r"valid_lens must be in \[0, K=7\]"),
    ({"valid_lens": torch.ones(2, 4, dtype=torch.long)}, "valid_lens must be"),
    ({"valid_lens": torch.tensor([1.0, 2.0])}, "valid_lens must be an integer tensor"),
    ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ({"scale": float("nan")}, "scale must be finite"),
]


@pytest.mark.parametrize("change,message", SDPA_BAD, ids=[m for _, m in SDPA_BAD])
def test_sdpa_bad_arguments(change, message, device):
    q, k, v = (randn(s, device, requires_grad=False) for s in ((2, 2, 5, 4), (2, 2, 7, 4), (2, 2, 7, 3)))
    kw = {"query": q, "key": k, "value": v,
          **{n: (t.to(device) if isinstance(t, torch.Tensor) and n != "valid_lens" else t)
             for n, t in change.items()}}
    with pytest.raises(RuntimeError, match=message):
        ta.scaled_dot_product_attention(**kw)


# ---------------------------------------------------------------------------------------
# Additive attention
# ---------------------------------------------------------------------------------------

ADD_SHAPES = [  # B, Q, K, A, Dv
    (2, 5, 7, 24, 6),
    (2, 1, 37, 20, 5),     # one decoder step over three key blocks, A with a ragged chunk
    (2, 4, 1, 8, 3),       # a single key
    (1, 9, 17, 1, 1),
    (2, 18, 33, 24, 17),   # two query blocks x three key blocks x two A chunks (one ragged)
]


def add_cases(B, Q, K):
    """(name, valid_lens, mask) for every accepted form, rows with no key included."""
    lens_b = torch.randint(0, K + 1, (B,))
    lens_b[0] = 0
    lens_bq = torch.randint(0, K + 1, (B, Q))
    lens_bq[-1, 0] = 0
    return [
        ("none", None, None),
        ("lens[B]", lens_b, None),
        ("lens[B,Q]", lens_bq, None),
        ("lens full", torch.full((B,), K), None),
        ("mask[B,Q,K]", None, torch.rand(B, Q, K) > 0.4),
        ("mask[B,1,K]", None, torch.rand(B, 1, K) > 0.3),
        ("mask[Q,K]", None, torch.rand(Q, K) > 0.5),
        ("mask[K]+lens", lens_bq, torch.rand(K) > 0.2),
    ]


def add_args(B, Q, K, A, Dv, device, dtype=torch.float32, requires_grad=True):
    return [randn(s, device, dtype, requires_grad) for s in ((B, Q, A), (B, K, A), (A,), (B, K, Dv))]


@pytest.mark.parametrize("shape", ADD_SHAPES, ids=str)
def test_additive_matches_reference(shape, device):
    B, Q, K, A, Dv = shape
    for name, lens, mask in add_cases(B, Q, K):
        mask = None if mask is None else mask.to(device)
        args = add_args(B, Q, K, A, Dv, device)
        ours = ta.additive_attention(*args, lens, mask)
        ref = reference.additive_attention(*args, lens, mask)
        assert_match(ours, ref, f"{name} outputs")
        # gradients through both the context and the weights
        assert_match(grads_of(ours, args), grads_of(ref, args), f"{name} gradients")
        with torch.no_grad():
            assert_match(ta.additive_attention(*args, lens, mask), ref, f"{name} no_grad")


def test_additive_rows_without_keys_are_zero_with_zero_gradients(device):
    B, Q, K, A, Dv = 3, 4, 20, 16, 5
    args = add_args(B, Q, K, A, Dv, device)
    lens = torch.tensor([[0, 2, 0, 20], [3, 0, 1, 0], [20, 20, 20, 20]])
    ctx, w = ta.additive_attention(*args, lens)
    empty = (lens == 0).to(device)
    assert (ctx[empty] == 0).all() and (w[empty] == 0).all()
    torch.testing.assert_close(w[~empty].sum(-1), torch.ones(int((~empty).sum()), device=device))
    # masked keys get exactly zero weight
    assert (w * (torch.arange(K) >= lens[..., None]).to(device) == 0).all()
    gq = torch.autograd.grad(ctx.sum() + (w * torch.randn_like(w)).sum(), args[0])[0]
    assert torch.isfinite(gq).all() and (gq[empty] == 0).all() and (gq[~empty] != 0).any()
    # no key anywhere: everything zero, no NaN
    ctx, w = ta.additive_attention(*args, torch.zeros(B, dtype=torch.long))
    grads = torch.autograd.grad((ctx * torch.randn_like(ctx)).sum() + w.sum(), args)
    assert (ctx == 0).all() and (w == 0).all() and all((g == 0).all() for g in grads)


def test_additive_strided_inputs(device):
    B, Q, K, A, Dv = 2, 6, 19, 12, 5
    qk = randn((B, Q + K, 2 * A), device)  # query and key as slices of one buffer
    query, key = qk[:, :Q, :A], qk[:, Q:, A:]
    w_v = randn((2 * A,), device)
    value = randn((B, Dv, K), device)
    args = [query, key, w_v[::2], value.transpose(1, 2)]
    assert not any(a.is_contiguous() for a in args)
    lens = torch.tensor([19, 4])
    ours = ta.additive_attention(*args, lens)
    ref = reference.additive_attention(*args, lens)
    assert_match(ours, ref, "strided outputs")
    assert_match(grads_of(ours, [qk, w_v, value]), grads_of(ref, [qk, w_v, value]), "strided gradients")


def test_additive_opcheck(device):
    args = add_args(2, 3, 5, 7, 4, device)
    raw = torch.ops.seqfuse.additive_attention_triton.default
    for lens, mask in ((None, None), (torch.tensor([5, 0]), None),
                       (None, (torch.rand(2, 3, 5) > 0.5).to(device))):
        torch.library.opcheck(raw, (*args, lens, mask))
    ctx, w = ta.additive_attention(*args, torch.tensor([5, 2]))
    plain = [a.detach() for a in args]
    torch.library.opcheck(torch.ops.seqfuse.additive_attention_backward_triton.default,
                          (torch.randn_like(ctx), torch.randn_like(w), *plain, w.detach()))


def test_additive_torch_compile_fullgraph_forward_backward(device):
    args = add_args(2, 3, 5, 7, 4, device)
    lens = torch.tensor([5, 2])
    fn = torch.compile(lambda *a: ta.additive_attention(*a, lens)[0].sum(), fullgraph=True,
                       backend="aot_eager")
    g_c = torch.autograd.grad(fn(*args), args)
    g_e = torch.autograd.grad(reference.additive_attention(*args, lens)[0].sum(), args)
    assert_match(g_c, g_e, "compiled gradients")


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v, valid_lens):
        return ta.scaled_dot_product_attention(q, k, v, valid_lens=valid_lens, is_causal=True)


class _Additive(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.w_v = torch.nn.Parameter(torch.randn(A))

    def forward(self, query, key, value, valid_lens):
        return ta.additive_attention(query, key, self.w_v, value, valid_lens)


@pytest.mark.parametrize("which", ["sdpa", "additive"])
def test_torch_export_dynamic_shapes(which, device):
    """The exported graph keeps the op (torch.export does not decompose triton_ops) and
    runs at other batch sizes and lengths."""
    Bd, Qd, Kd = (torch.export.Dim(n, min=1, max=512) for n in ("B", "Q", "K"))
    if which == "sdpa":
        m, name = _Sdpa(), "seqfuse.scaled_dot_product_attention_triton"
        shapes = lambda B, Q, K: ((B, 2, Q, 8), (B, 2, K, 8), (B, 2, K, 8))  # noqa: E731
        dims = ({0: Bd, 2: Qd}, {0: Bd, 2: Kd}, {0: Bd, 2: Kd}, {0: Bd})
    else:
        m, name = _Additive(8).to(device), "seqfuse.additive_attention_triton"
        shapes = lambda B, Q, K: ((B, Q, 8), (B, K, 8), (B, K, 5))  # noqa: E731
        dims = ({0: Bd, 1: Qd}, {0: Bd, 1: Kd}, {0: Bd, 1: Kd}, {0: Bd})
    example = (*(randn(s, device, requires_grad=False) for s in shapes(3, 4, 6)),
               torch.tensor([6, 1, 3], device=device))
    ep = torch.export.export(m, example, dynamic_shapes=dims)
    assert any(name in str(n.target) for n in ep.graph.nodes)
    new = (*(randn(s, device, requires_grad=False) for s in shapes(2, 1, 9)),
           torch.tensor([9, 4], device=device))
    ours, ref = ep.module()(*new), m(*new)
    if which == "sdpa":
        ours, ref = [ours], [ref]
    assert len(ours) == len(ref) >= 1
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


ADD_BAD = [
    (lambda a: a.__setitem__(0, torch.randn(3, 4)), "query must be 3-D"),
    (lambda a: a.__setitem__(1, torch.randn(2, 5, 6)), "key must be"),
    (lambda a: a.__setitem__(2, torch.randn(6)), "w_v must be"),
    (lambda a: a.__setitem__(3, torch.randn(2, 4, 4)), "value must be"),
    (lambda a: a.__setitem__(1, torch.randn(2, 5, 7, dtype=torch.float16)), "key must have the query's dtype"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 3, 7))), "query dtype must be"),
    (lambda a: a.__setitem__(4, torch.tensor([6, 1])), r"valid_lens must be in \[0, K=5\]"),
    (lambda a: a.__setitem__(4, torch.tensor([-1, 1])), r"valid_lens must be in \[0, K=5\]"),
    (lambda a: a.__setitem__(4, torch.tensor([1, 2, 3])), "valid_lens must be"),
    (lambda a: a.__setitem__(4, torch.tensor([1.0, 2.0])), "valid_lens must be an integer tensor"),
    (lambda a: a.__setitem__(5, torch.ones(2, 3, 5)), "mask must be bool"),
    (lambda a: a.__setitem__(5, torch.ones(2, 4, 5, dtype=torch.bool)), "mask must be broadcastable"),
]


@pytest.mark.parametrize("mutate,message", ADD_BAD, ids=[m for _, m in ADD_BAD])
def test_additive_bad_arguments(mutate, message, device):
    args = [*add_args(2, 3, 5, 7, 4, "cpu", requires_grad=False), None, None]
    mutate(args)
    args = [a.to(device) if isinstance(a, torch.Tensor) and i != 4 else a for i, a in enumerate(args)]
    with pytest.raises(RuntimeError, match=message):
        ta.additive_attention(*args)


# ---------------------------------------------------------------------------------------
# float16 / bfloat16: error against a float32 reference within 2x of eager's own error in
# that dtype. The interpreter runs them too (it widens bfloat16 tiles before tl.dot, see
# attention._dot); on a GPU they take the tensor-core path.
# ---------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["additive", "sdpa"])
def test_low_precision_error_within_twice_eager(which, dtype, device):
    if which == "additive":
        args32 = add_args(2, 5, 37, 24, 9, device)
        op, ref, kw = ta.additive_attention, reference.additive_attention, {"valid_lens": torch.tensor([37, 5])}
    else:
        args32 = [randn(s, device) for s in ((2, 2, 17, 24), (2, 2, 45, 24), (2, 2, 45, 8))]
        op, ref, kw = (ta.scaled_dot_product_attention, reference.scaled_dot_product_attention,
                       {"attn_mask": (torch.rand(2, 1, 17, 45) > 0.3).to(device), "is_causal": True})
    (r_out, r_g), (o_out, o_g), (e_out, e_g) = _lowp_errors(op, ref, args32, kw, dtype)
    for o in o_out:
        assert o.dtype == dtype
    for name, ours, eager, truth in (("outputs", o_out, e_out, r_out), ("gradients", o_g, e_g, r_g)):
        for i, (a, e, r) in enumerate(zip(ours, eager, truth, strict=True)):
            assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}[{i}]"
            err = (a.float() - r.float()).abs().max().item()
            eager_err = (e.float() - r.float()).abs().max().item()
            floor = r.abs().max().item() * (2 ** -9 if dtype == torch.bfloat16 else 2 ** -12)
            assert err <= 2 * max(eager_err, floor), f"{name}[{i}]: {err:.2e} vs eager {eager_err:.2e}"


@pytest.mark.skipif(not ON_CUDA, reason="needs a GPU: the interpreter is deterministic by construction")
def test_gradients_are_deterministic_on_gpu(device):
    q, k, v = (randn(s, device, torch.bfloat16) for s in ((4, 8, 300, 64), (4, 8, 517, 64), (4, 8, 517, 64)))
    lens = torch.randint(1, 518, (4,))
    runs = [torch.autograd.grad(ta.scaled_dot_product_attention(q, k, v, valid_lens=lens, dropout_p=0.1,
                                                                seed=3).float().sum(), (q, k, v))
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    args = add_args(4, 64, 200, 128, 64, device, torch.bfloat16)
    runs = [torch.autograd.grad(ta.additive_attention(*args, lens.clamp(max=200))[0].float().sum(), args)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
