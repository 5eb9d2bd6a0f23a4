"""Triton kernels for seqfuse's attention ops: masked additive (Bahdanau) attention and
masked scaled dot-product attention (shapes and mask conventions in csrc/attention.h;
semantics are those of seqfuse.ops / seqfuse.reference, dropout hash included).

Each op is a `torch.library.triton_op` (`seqfuse::<op>_triton`, with a `_backward_triton`
op that its autograd formula calls) whose kernels launch through `wrap_triton`, so that
torch.compile can trace into them on a GPU. Kernel, launcher, op and autograd are kept
together per op below.

Everything accumulates in float32: inputs are float32, float16 or bfloat16; float32
products are IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 is set, as for
torch.matmul.

Under TRITON_INTERPRET=1 (no GPU) the same kernels run on CPU tensors (triton/common.py
says what changes there). Argument checks: seqfuse.ops.checks, the same as every backend's;
autograd: seqfuse.ops.attention's formulas, registered on these ops too.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops import checks
from ..ops.attention import (register_additive_autograd, register_sdpa_autograd, run_additive,
                             run_sdpa)
from .common import INTERPRETED as _INTERPRETED
from .common import TRITON_DTYPES, can_launch, check_device, keep_opaque_when_interpreted

# The kernels' softmaxes run in base 2: exp(x) = exp2(x * log2(e)).
# SDPA scales by log2(e) only after subtracting the row maximum, (s - m) * log2(e): a
# score carrying an HF-style finfo.min mask would overflow to -inf if scaled first.
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------

def _lens_arg(valid_lens: Tensor | None, query: Tensor) -> tuple[Tensor, int]:
    """(int64 lengths on the query's device, LENS_KIND: 0 none, 1 [B], 2 [B, Q]); without
    lengths the query stands in as an unread pointer."""
    if valid_lens is None:
        return query, 0
    lens = valid_lens.to(device=query.device, dtype=torch.int64).contiguous()
    return lens, lens.dim()


def _next_pow2(n: int, cap: int | None = None) -> int:
    """The power of two >= n, at least 16 (tl.dot's smallest tile side, also in the
    interpreter), at most cap. A loop of comparisons rather than bit tricks: under
    torch.compile with dynamic shapes n is a SymInt, and this guards on a few buckets."""
    p = 16
    while p < n and (cap is None or p < cap):
        p *= 2
    return p


@triton.jit
def _row_ends(Lens, b, offs_m, M, N, LENS_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """One past the last key each query row offs_m [BLOCK_M] may see, from valid_lens and
    causality (0 for rows past M). Clamped to N so that a bad length cannot read past the
    keys (the launchers reject one before it gets here)."""
    ends = tl.zeros([BLOCK_M], tl.int32) + N
    if LENS_KIND == 1:
        ends = tl.minimum(ends, tl.load(Lens + b).to(tl.int32))
    elif LENS_KIND == 2:
        ends = tl.minimum(ends, tl.load(Lens + b.to(tl.int64) * M + offs_m, mask=offs_m < M,
                                        other=0).to(tl.int32))
    if IS_CAUSAL:
        ends = tl.minimum(ends, offs_m + 1)  # top-left aligned, as torch
    return tl.where(offs_m < M, ends, 0)


@triton.jit
def _split_pid(L, BLOCK: tl.constexpr):
    """Axis 0 of a grid of cdiv(L, BLOCK) * B (or B*H) programs -> (block along L, b).
    Batches share axis 0 because the grid's second and third axes stop at 65535."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(L, BLOCK)
    return pid % blocks, pid // blocks


# ---------------------------------------------------------------------------------------
# Scaled dot-product attention
#
# Flash-style. Forward: one program per (block of BLOCK_M query rows, b*h) walks the key
# blocks up to the last key any of its rows may see (valid_lens, causal), with an online
# softmax in the exp2 domain; it writes the output and the row's logsumexp (+inf for a row
# with no key). Masks are read as tiles of an expanded view (stride 0 on broadcast axes),
# so a [B, 1, 1, K] padding mask is never materialised to [B, H, Q, K].
# Backward: delta = rowsum(dO * O) first; then one program per key block accumulates dK
# and dV over the query blocks that can see it, and one per query block accumulates dQ
# over its key blocks. Both recompute P from the logsumexp; no atomics, so the gradients
# are deterministic. Dropout recomputes its keep mask from the hash of (seed, index).
# ---------------------------------------------------------------------------------------

@triton.jit
def _fmix32(x):
    # murmur3's 32-bit finaliser on uint32 (logical shifts, products wrap mod 2^32).
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _dropout_row(base):
    """int64 flat index of a row's key 0 -> its low and high 32-bit halves (uint32)."""
    return base.to(tl.uint32), (base >> 32).to(tl.uint32)


@triton.jit
def _dropout_keep(row_lo, row_hi, n, seed, threshold):
    """Keep decision of the elements at flat index row + n, where row = (b*H + h)*Q + q)*K
    is given as its uint32 halves (row_lo, row_hi, see _dropout_row) and n is the key:
    csrc/attention.h's sdpa_dropout_hash of the seed's low 32 bits. All arithmetic is
    32-bit (an int64 index per element would cost a tile of register pairs): the low half
    wraps, and its carry picks the high half's inner hash, computed per row for both."""
    s = _fmix32(seed.to(tl.uint32) ^ 0x9E3779B9)
    inner = _fmix32(row_hi ^ s)
    inner_carry = _fmix32((row_hi + 1) ^ s)
    lo = row_lo + n.to(tl.uint32)
    h = _fmix32(lo ^ tl.where(lo < row_lo, inner_carry, inner))
    return (h >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32. UPCAST (interpreter and bfloat16 only): the
    interpreter multiplies bfloat16 tiles as their raw uint16 bits, so they are widened
    first; bfloat16 x bfloat16 products are exact in float32, so this is what the tensor
    cores compute, up to the order of the sums."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _sdpa_logits(s, mq, nk, end, Mask, mask_off, smm, smn, M, N, sm_scale,
                 MASK_KIND: tl.constexpr):
    """Scores s = q.k of a tile -> s * scale + mask, as eager computes them (a huge mask
    absorbs the product there too), -inf where not allowed. The tile's
    orientation is given by the broadcastable index tensors: mq (query rows), nk (keys)
    and end (each query row's end, shaped like mq). MASK_KIND: 0 none, 1 bool (stored as
    uint8), 2 additive (-inf, or NaN as in the reference, = not allowed).
    No separate "allowed" tile is kept (registers are what limit the tiles): -inf logits
    give exp2(...) = 0 in both passes, since the row maximum is never -inf there."""
    qk = s * sm_scale
    if MASK_KIND != 0:
        mv = tl.load(Mask + mask_off + mq * smm + nk * smn, mask=(mq < M) & (nk < N), other=0)
        if MASK_KIND == 1:
            qk = tl.where(mv != 0, qk, -float("inf"))
        else:
            mv = mv.to(tl.float32)
            qk = tl.where(mv > -float("inf"), qk + mv, -float("inf"))
    return tl.where(nk < end, qk, -float("inf"))


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _sdpa_fwd_kernel(
        Q, K, V, Mask, Lens, Out, Stats,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
        H, M, N, D, DV, sm_scale, keep_scale, seed, drop_threshold,
        MASK_KIND: tl.constexpr, LENS_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """Q [B, H, M, D], K [B, H, N, D], V [B, H, N, DV] (any strides); Mask: a view
    expanded to [B, H, M, N] (strides smb..smn); Lens [B] or [B, M] int64; Out
    [B, H, M, DV] and Stats [B, H, M, 2] float32 (_sdpa_op's softmax_stats), contiguous. Grid (cdiv(M, BLOCK_M) * B*H,),
    query blocks fastest: the blocks of one head run together and share its K, V in L2."""
    pid_m, bh = _split_pid(M, BLOCK_M)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    mask_off = b64 * smb + h64 * smh
    ends = _row_ends(Lens, b, offs_m, M, N, LENS_KIND, IS_CAUSAL, BLOCK_M)
    # Rows stop at their last allowed key: key blocks past every row's end are never read.
    block_end = tl.max(ends, axis=0)
    drop_lo, drop_hi = _dropout_row((bh.to(tl.int64) * M + offs_m) * N)

    m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, block_end, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = tl.load(k_base + offs_d[:, None] * skd + offs_n[None, :] * skn,
                     mask=(offs_d[:, None] < D) & (offs_n[None, :] < N), other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST)
        qk = _sdpa_logits(s, offs_m[:, None], offs_n[None, :], ends[:, None], Mask, mask_off,
                          smm, smn, M, N, sm_scale, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # A row with nothing allowed yet keeps m = -inf; shifting it by 0 instead keeps
        # exp2 away from (-inf) - (-inf) = NaN.
        m_safe = tl.where(m_new > -float("inf"), m_new, 0.0)
        p = tl.exp2((qk - m_safe[:, None]) * _LOG2E)
        alpha = tl.exp2((m_i - m_safe) * _LOG2E)
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the normaliser counts the undropped weights
        if DROPOUT:
            keep = _dropout_keep(drop_lo[:, None], drop_hi[:, None], offs_n[None, :], seed,
                                 drop_threshold)
            p = tl.where(keep, p * keep_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # acc is 0 on rows without a key
    row = bh.to(tl.int64) * M + offs_m
    tl.store(Out + row[:, None] * DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV))
    # (m, log l), not their sum: m + log(l) rounds to m when |m| is huge (every key under
    # a finfo.min mask), and the backward's weights would then be l times too large.
    tl.store(Stats + row * 2, tl.where(has_key, m_i, float("inf")), mask=offs_m < M)
    tl.store(Stats + row * 2 + 1, tl.where(has_key, tl.log(tl.where(has_key, l_i, 1.0)), 0.0),
             mask=offs_m < M)


@triton.jit
def _sdpa_row_stats(Stats, row, valid):
    """(row max, log of the row's sum) of rows `row` from the forward's Stats; rows past
    the end read as having no key (max +inf: every weight exp2(-inf) = 0). The weights are
    exp((s - max) - log_sum), the difference taken first so that neither is absorbed."""
    return (tl.load(Stats + row * 2, mask=valid, other=float("inf")),
            tl.load(Stats + row * 2 + 1, mask=valid, other=0.0))


@triton.jit
def _sdpa_bwd_delta_kernel(O, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, M, DV,
                           BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Delta [B*H*M] float32 = rowsum(dO * O): O, dO [B, H, M, DV] (any strides).
    Grid (cdiv(M, BLOCK_M) * B*H,)."""
    pid_m, bh = _split_pid(M, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    io = (offs_m[:, None] < M) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                mask=io, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=io, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * M + offs_m, tl.sum(o * do, axis=1), mask=offs_m < M)


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _sdpa_bwd_dkdv_kernel(
        Q, K, V, DO, Mask, Lens, Stats, Delta, DK, DVal,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
        smb, smh, smm, smn,
        H, M, N, D, DV, sm_scale, keep_scale, seed, drop_threshold,
        MASK_KIND: tl.constexpr, LENS_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """dK [B, H, N, D] and dV [B, H, N, DV] (contiguous) of one key block, accumulated over
    the query blocks that can see it: dV = P_dropped^T dO, dK = scale dS^T Q with
    dS = P (dP_dropped - delta). Tiles are kept transposed ([keys, queries]) so that no
    product needs a transposed P. Grid (cdiv(N, BLOCK_N) * B*H,)."""
    pid_n, bh = _split_pid(N, BLOCK_N)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b64 * skb + h64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * svb + h64 * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdb + h64 * sdh
    mask_off = b64 * smb + h64 * smh
    row0 = bh.to(tl.int64) * M

    # Query blocks that can see this key block: under causality, none before it; with
    # per-batch lengths, none at all when the block is padding (its gradients are zero).
    lo = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    hi = M
    if LENS_KIND == 1:
        hi = tl.where(start_n < tl.load(Lens + b).to(tl.int32), M, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        qt = tl.load(q_base + offs_d[:, None] * sqd + offs_m[None, :] * sqm,
                     mask=(offs_d[:, None] < D) & (offs_m[None, :] < M), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                     mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
        row_max, log_sum = _sdpa_row_stats(Stats, row0 + offs_m, offs_m < M)
        delta = tl.load(Delta + row0 + offs_m, mask=offs_m < M, other=0.0)
        ends = _row_ends(Lens, b, offs_m, M, N, LENS_KIND, IS_CAUSAL, BLOCK_M)
        st = _dot(k, qt, PRECISION, UPCAST)  # [BLOCK_N, BLOCK_M]
        qkt = _sdpa_logits(st, offs_m[None, :], offs_n[:, None], ends[None, :], Mask, mask_off,
                           smm, smn, M, N, sm_scale, MASK_KIND)
        pt = tl.exp2((qkt - row_max[None, :] - log_sum[None, :]) * _LOG2E)  # 0 where masked
        dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)
        if DROPOUT:
            drop_lo, drop_hi = _dropout_row((row0 + offs_m) * N)
            keep = _dropout_keep(drop_lo[None, :], drop_hi[None, :], offs_n[:, None], seed,
                                 drop_threshold)
            pdt = tl.where(keep, pt * keep_scale, 0.0)
            dpt = tl.where(keep, dpt * keep_scale, 0.0)
        else:
            pdt = pt
        dv += _dot(pdt.to(do.dtype), do, PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)

    out_row = bh.to(tl.int64) * N + offs_n
    tl.store(DK + out_row[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_d[None, :] < D))
    tl.store(DVal + out_row[:, None] * DV + offs_dv[None, :], dv.to(DVal.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV))


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _sdpa_bwd_dq_kernel(
        Q, K, V, DO, Mask, Lens, Stats, Delta, DQ,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
        smb, smh, smm, smn,
        H, M, N, D, DV, sm_scale, keep_scale, seed, drop_threshold,
        MASK_KIND: tl.constexpr, LENS_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """dQ [B, H, M, D] (contiguous) of one query block: scale * sum over its key blocks of
    dS K. Rows with no key get dS = 0, hence zeros. Grid (cdiv(M, BLOCK_M) * B*H,)."""
    pid_m, bh = _split_pid(M, BLOCK_M)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
    row = bh.to(tl.int64) * M + offs_m
    row_max, log_sum = _sdpa_row_stats(Stats, row, offs_m < M)
    delta = tl.load(Delta + row, mask=offs_m < M, other=0.0)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    mask_off = b64 * smb + h64 * smh
    ends = _row_ends(Lens, b, offs_m, M, N, LENS_KIND, IS_CAUSAL, BLOCK_M)
    block_end = tl.max(ends, axis=0)
    drop_lo, drop_hi = _dropout_row(row * N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, block_end, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = tl.load(k_base + offs_d[:, None] * skd + offs_n[None, :] * skn,
                     mask=(offs_d[:, None] < D) & (offs_n[None, :] < N), other=0.0)
        vt = tl.load(v_base + offs_dv[:, None] * svd + offs_n[None, :] * svn,
                     mask=(offs_dv[:, None] < DV) & (offs_n[None, :] < N), other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST)
        qk = _sdpa_logits(s, offs_m[:, None], offs_n[None, :], ends[:, None], Mask, mask_off,
                          smm, smn, M, N, sm_scale, MASK_KIND)
        p = tl.exp2((qk - row_max[:, None] - log_sum[:, None]) * _LOG2E)  # 0 where masked
        dp = _dot(do, vt, PRECISION, UPCAST)
        if DROPOUT:
            keep = _dropout_keep(drop_lo[:, None], drop_hi[:, None], offs_n[None, :], seed,
                                 drop_threshold)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)

    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_d[None, :] < D))


def _sdpa_config(dtype: torch.dtype, D: int, DV: int, M: int, bool_mask_aligned: bool) -> dict:
    """Tiles and launch options of the three SDPA kernels, each (BLOCK_M, BLOCK_N,
    num_warps, num_stages) in its own terms: fwd and q (dQ) take BLOCK_M query rows per
    program and step over BLOCK_N keys; kv (dK, dV) takes BLOCK_N keys per program and
    steps over BLOCK_M query rows.

    GPU values are the largest tiles that ptxas (sm_90, Triton 3.9) fits without register
    spills with every mask, causal and dropout switched on, for D = 64, 128 and 256 (16-bit)
    and 64, 128 (float32, whose IEEE products run on FMAs with both operands in registers);
    they have not been timed on a GPU. A bool mask whose rows are not 16-byte aligned
    (odd K) cannot be copied asynchronously and is prefetched into registers instead,
    hence the smaller forward tiles then. The interpreter takes the smallest tiles tl.dot
    allows, which keeps numpy's temporaries small and lets small test shapes span several
    blocks."""
    BD, BDV = _next_pow2(D), _next_pow2(DV)
    if _INTERPRETED:
        return dict(BLOCK_D=BD, BLOCK_DV=BDV, fwd=(16, 16, 1, 1), kv=(16, 16, 1, 1),
                    q=(16, 16, 1, 1))
    d = max(BD, BDV)
    if dtype == torch.float32:
        fwd, kv, q = ((32, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)) if d <= 64 else \
                     ((16, 32, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2))
    elif d <= 64:
        fwd = (128, 64, 8, 3) if bool_mask_aligned else (128, 32, 8, 3)
        kv, q = (32, 64, 4, 3), (64, 64, 8, 3)
    elif d <= 128:
        fwd = (128, 32, 8, 3) if bool_mask_aligned else (64, 32, 8, 3)
        kv, q = (32, 64, 8, 3), (64, 64, 8, 3)
    else:
        fwd, kv, q = (32, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)
    # Few query rows (a decoder step): smaller query tiles waste less of each product.
    rows = _next_pow2(M, cap=128)
    fwd, kv, q = ((min(c[0], rows),) + c[1:] for c in (fwd, kv, q))
    return dict(BLOCK_D=BD, BLOCK_DV=BDV, fwd=fwd, kv=kv, q=q)


def _sdpa_launch_args(query, key, value, attn_mask, valid_lens, is_causal, scale, dropout_p,
                      seed):
    """What the forward and backward launches share: the mask view and its strides, the
    lengths, the scalars, the compile-time switches and the tiles."""
    B, H, M, D = query.shape
    N = key.shape[2]
    if attn_mask is None:
        mask, mask_kind, mstrides = query, 0, (0, 0, 0, 0)
    else:
        mask = attn_mask.expand(B, H, M, N)  # a view: broadcast axes get stride 0
        if mask.dtype == torch.bool:
            mask, mask_kind = mask.view(torch.uint8), 1
        else:
            mask_kind = 2
        mstrides = tuple(mask.stride())
    # What Triton's specialisation sees: strides that are multiples of 16 (0 included).
    bool_mask_aligned = mask_kind != 1 or all(st % 16 == 0 for st in mstrides[:3])
    lens, lens_kind = _lens_arg(valid_lens, query)
    sm_scale = D ** -0.5 if scale is None else float(scale)
    dropout = dropout_p > 0.0
    scalars = dict(
        keep_scale=1.0 / (1.0 - dropout_p) if dropout else 1.0,
        seed=seed,  # hashed in the kernels: under torch.compile it may be a SymInt
        drop_threshold=int(dropout_p * 16777216.0 + 0.5))
    # float32 products are IEEE unless torch.backends.cuda.matmul.allow_tf32 is set, the
    # switch that governs torch.matmul (and seqfuse's Triton recurrent layers).
    tf32 = query.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    flags = dict(MASK_KIND=mask_kind, LENS_KIND=lens_kind, IS_CAUSAL=bool(is_causal),
                 DROPOUT=dropout, PRECISION="tf32" if tf32 else "ieee",
                 UPCAST=_INTERPRETED and query.dtype == torch.bfloat16)
    cfg = _sdpa_config(query.dtype, D, value.shape[3], M, bool_mask_aligned)
    return mask, mstrides, lens, sm_scale, scalars, flags, cfg


@triton_op("seqfuse::scaled_dot_product_attention_triton", mutates_args=())
def _sdpa_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
             valid_lens: Tensor | None = None, is_causal: bool = False,
             scale: float | None = None, dropout_p: float = 0.0,
             seed: int = 0) -> tuple[Tensor, Tensor]:
    """query [B, H, Q, D], key [B, H, K, D], value [B, H, K, Dv]; attn_mask bool or
    floating, broadcastable to [B, H, Q, K]; valid_lens [B] or [B, Q] integer. Returns
    output [B, H, Q, Dv] (query's dtype) and softmax_stats [B, H, Q, 2] float32: each
    row's maximum score m (+inf on rows with no key) and log of its sum of exp(s - m) (0
    there). Their sum is the logsumexp, but one float cannot hold it when |m| is huge
    (every key under a finfo.min mask): log(l) rounds away, so the backward takes both."""
    checks.sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p, TRITON_DTYPES)
    check_device("scaled_dot_product_attention", query)
    B, H, M, D = query.shape
    N, DV = key.shape[2], value.shape[3]
    out = query.new_empty(B, H, M, DV)
    stats = query.new_empty(B, H, M, 2, dtype=torch.float32)
    if not can_launch(out):
        return out, stats
    mask, ms, lens, sm_scale, scalars, flags, cfg = _sdpa_launch_args(
        query, key, value, attn_mask, valid_lens, is_causal, scale, dropout_p, seed)
    BLOCK_M, BLOCK_N, warps, stages = cfg["fwd"]
    wrap_triton(_sdpa_fwd_kernel)[(triton.cdiv(M, BLOCK_M) * B * H,)](
        query, key, value, mask, lens, out, stats,
        *query.stride(), *key.stride(), *value.stride(), *ms,
        H, M, N, D, DV, sm_scale, scalars["keep_scale"], scalars["seed"],
        scalars["drop_threshold"], **flags, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=cfg["BLOCK_D"], BLOCK_DV=cfg["BLOCK_DV"], num_warps=warps, num_stages=stages)
    return out, stats


@triton_op("seqfuse::scaled_dot_product_attention_backward_triton", mutates_args=())
def _sdpa_backward_op(grad_output: Tensor, query: Tensor, key: Tensor, value: Tensor,
                      attn_mask: Tensor | None, valid_lens: Tensor | None, output: Tensor,
                      softmax_stats: Tensor, is_causal: bool, scale: float | None,
                      dropout_p: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """grad_output and output [B, H, Q, Dv]; softmax_stats [B, H, Q, 2] float32 from the forward;
    the rest as the forward's. Returns grad_query, grad_key, grad_value shaped like their
    inputs (contiguous). No gradient flows to a floating attn_mask."""
    op = "scaled_dot_product_attention_backward"
    checks.sdpa_backward_args(grad_output, query, key, value, attn_mask, valid_lens, output,
                              softmax_stats, scale, dropout_p, TRITON_DTYPES)
    check_device(op, query)
    B, H, M, D = query.shape
    N, DV = key.shape[2], value.shape[3]
    dq = query.new_empty(B, H, M, D)
    dk = key.new_empty(B, H, N, D)
    dv = value.new_empty(B, H, N, DV)
    if not can_launch(dq):
        return dq, dk, dv
    mask, ms, lens, sm_scale, scalars, flags, cfg = _sdpa_launch_args(
        query, key, value, attn_mask, valid_lens, is_causal, scale, dropout_p, seed)
    stats = softmax_stats.to(torch.float32).contiguous()
    delta = torch.empty(B, H, M, device=query.device, dtype=torch.float32)
    wrap_triton(_sdpa_bwd_delta_kernel)[(triton.cdiv(M, 64) * B * H,)](
        output, grad_output, delta, *output.stride(), *grad_output.stride(), H, M, DV,
        BLOCK_M=64, BLOCK_DV=cfg["BLOCK_DV"], num_warps=4)
    common = (*query.stride(), *key.stride(), *value.stride(), *grad_output.stride(), *ms,
              H, M, N, D, DV, sm_scale, scalars["keep_scale"],
              scalars["seed"], scalars["drop_threshold"])
    dims = dict(BLOCK_D=cfg["BLOCK_D"], BLOCK_DV=cfg["BLOCK_DV"])
    BLOCK_M, BLOCK_N, warps, stages = cfg["kv"]
    wrap_triton(_sdpa_bwd_dkdv_kernel)[(triton.cdiv(N, BLOCK_N) * B * H,)](
        query, key, value, grad_output, mask, lens, stats, delta, dk, dv, *common, **flags,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **dims, num_warps=warps, num_stages=stages)
    BLOCK_M, BLOCK_N, warps, stages = cfg["q"]
    wrap_triton(_sdpa_bwd_dq_kernel)[(triton.cdiv(M, BLOCK_M) * B * H,)](
        query, key, value, grad_output, mask, lens, stats, delta, dq, *common, **flags,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **dims, num_warps=warps, num_stages=stages)
    return dq, dk, dv


register_sdpa_autograd("scaled_dot_product_attention_triton",
                       "scaled_dot_product_attention_backward_triton")


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    valid_lens: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    dropout_p: float = 0.0, seed: int = 0,
) -> Tensor:
    """Masked scaled dot-product attention (flash-style) on the Triton kernels: arguments,
    shapes and results as seqfuse.ops.scaled_dot_product_attention (float32, float16 or
    bfloat16)."""
    return run_sdpa(torch.ops.seqfuse.scaled_dot_product_attention_triton.default, query, key,
                    value, attn_mask, valid_lens, is_causal, scale, dropout_p, seed)


# ---------------------------------------------------------------------------------------
# Additive (Bahdanau) attention
#
# score[b, q, k] = w_v . tanh(query[b, q] + key[b, k]) is reduced over A in chunks inside a
# [BLOCK_M, BLOCK_N, BLOCK_A] register tile, so the [B, Q, K, A] features never reach
# memory. The scores kernel runs one program per (key block, query block, b): a decoder
# step (Q = 1) still spreads over K / BLOCK_N programs. Tiles that are wholly masked skip
# the tanh work and store -inf. A softmax kernel then normalises each row in place
# (zeros on rows with no key), and context = weights @ value is a bmm.
# Backward: dS = P * (dP - rowsum(P dP)) with dP = dweights + dcontext value^T, and
# dvalue = P^T dcontext, in torch (GEMMs); then two kernels re-evaluate tanh: dq (one
# program per query block and A chunk, looping over keys; it also sums dw_v's partial
# for its rows) and dk (one per key block and A chunk, looping over queries). Tiles whose
# dS is all zero (masked pairs) skip the tanh work. dw_v's partials are summed by torch,
# in a fixed order: deterministic, no atomics.
# ---------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    # tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: nothing overflows, and
    # the absolute error stays ~1e-7 (libdevice's tanh does not run in the interpreter).
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _additive_scores_kernel(
        Q, K, W, Mask, Lens, S,
        sqb, sqm, sqa, skb, skn, ska, sw, smb, smm, smn,
        M, N, A,
        HAS_MASK: tl.constexpr, LENS_KIND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr):
    """S [B, M, N] float32 (contiguous) = w_v . tanh(q + k), -inf where not allowed.
    Q [B, M, A], K [B, N, A], W [A] (any strides); Mask: bool as uint8, a view expanded
    to [B, M, N]; Lens [B] or [B, M] int64. Grid (cdiv(N, BLOCK_N) * B, cdiv(M, BLOCK_M))."""
    pid_n, b = _split_pid(N, BLOCK_N)
    pid_m = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_a0 = tl.arange(0, BLOCK_A)
    ends = _row_ends(Lens, b, offs_m, M, N, LENS_KIND, False, BLOCK_M)
    allowed = offs_n[None, :] < ends[:, None]
    if HAS_MASK:
        mv = tl.load(Mask + b64 * smb + offs_m[:, None] * smm + offs_n[None, :] * smn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0)
        allowed = allowed & (mv != 0)

    scores = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if tl.max(allowed.to(tl.int32)) > 0:  # padding tiles cost no tanh
        q_base = Q + b64 * sqb
        k_base = K + b64 * skb
        for a0 in range(0, A, BLOCK_A):
            offs_a = a0 + offs_a0
            in_a = offs_a < A
            # Lanes past A load zeros and add w=0 * tanh(0) = 0.
            q = tl.load(q_base + offs_m[:, None] * sqm + offs_a[None, :] * sqa,
                        mask=(offs_m[:, None] < M) & in_a[None, :], other=0.0).to(tl.float32)
            k = tl.load(k_base + offs_n[:, None] * skn + offs_a[None, :] * ska,
                        mask=(offs_n[:, None] < N) & in_a[None, :], other=0.0).to(tl.float32)
            w = tl.load(W + offs_a * sw, mask=in_a, other=0.0).to(tl.float32)
            t = _tanh(q[:, None, :] + k[None, :, :])  # [BLOCK_M, BLOCK_N, BLOCK_A]
            scores += tl.sum(t * w[None, None, :], axis=2)
    scores = tl.where(allowed, scores, -float("inf"))
    tl.store(S + (b64 * M + offs_m[:, None]) * N + offs_n[None, :], scores,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _masked_softmax_kernel(S, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """In place on S [R, N] float32 (contiguous), -inf = masked: softmax over each row,
    zeros on a row with nothing allowed. Two passes over the row (online max and sum, then
    normalise), so any N fits. Grid (cdiv(R, BLOCK_R),)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n0 = tl.arange(0, BLOCK_N)
    rows = S + offs_r.to(tl.int64)[:, None] * N
    m_i = tl.zeros([BLOCK_R], tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        s = tl.load(rows + offs_n[None, :], mask=(offs_r[:, None] < R) & (offs_n[None, :] < N),
                    other=-float("inf")) * _LOG2E
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new > -float("inf"), m_new, 0.0)  # no (-inf) - (-inf)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    m_safe = tl.where(m_i > -float("inf"), m_i, 0.0)
    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        io = (offs_r[:, None] < R) & (offs_n[None, :] < N)
        s = tl.load(rows + offs_n[None, :], mask=io, other=-float("inf")) * _LOG2E
        tl.store(rows + offs_n[None, :], tl.exp2(s - m_safe[:, None]) * inv[:, None], mask=io)


@triton.jit
def _additive_dq_kernel(
        Q, K, W, DS, DQ, DWP,
        sqb, sqm, sqa, skb, skn, ska, sw,
        M, N, A,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr):
    """With t = tanh(q + k): dq[b, m] = w_v * sum_n dS[b, m, n] (1 - t^2) -> DQ [B, M, A]
    (contiguous), and this program's share of dw_v = sum dS t -> DWP[b, pid_m] of
    [B, cdiv(M, BLOCK_M), A] float32. DS [B, M, N] float32 contiguous.
    Grid (cdiv(M, BLOCK_M) * B, cdiv(A, BLOCK_A))."""
    pid_m, b = _split_pid(M, BLOCK_M)
    pid_a = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = offs_a < A
    q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqm + offs_a[None, :] * sqa,
                mask=(offs_m[:, None] < M) & in_a[None, :], other=0.0).to(tl.float32)
    w = tl.load(W + offs_a * sw, mask=in_a, other=0.0).to(tl.float32)
    k_base = K + b64 * skb
    ds_rows = DS + (b64 * M + offs_m[:, None]) * N
    dq = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
    dw = tl.zeros([BLOCK_A], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        ds = tl.load(ds_rows + offs_n[None, :], mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
                     other=0.0)
        if tl.max(tl.abs(ds)) > 0.0:  # masked pairs have dS = 0: skip their tanh
            k = tl.load(k_base + offs_n[:, None] * skn + offs_a[None, :] * ska,
                        mask=(offs_n[:, None] < N) & in_a[None, :], other=0.0).to(tl.float32)
            t = _tanh(q[:, None, :] + k[None, :, :])  # [BLOCK_M, BLOCK_N, BLOCK_A]
            g = ds[:, :, None]
            dq += tl.sum(g * (1.0 - t * t), axis=1)
            dw += tl.sum(tl.sum(g * t, axis=1), axis=0)
    tl.store(DQ + (b64 * M + offs_m[:, None]) * A + offs_a[None, :],
             (dq * w[None, :]).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < M) & in_a[None, :])
    tl.store(DWP + (b64 * tl.cdiv(M, BLOCK_M) + pid_m) * A + offs_a, dw, mask=in_a)


@triton.jit
def _additive_dk_kernel(
        Q, K, W, DS, DK,
        sqb, sqm, sqa, skb, skn, ska, sw,
        M, N, A,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr):
    """dk[b, n] = w_v * sum_m dS[b, m, n] (1 - tanh(q + k)^2) -> DK [B, N, A] (contiguous).
    Grid (cdiv(N, BLOCK_N) * B, cdiv(A, BLOCK_A))."""
    pid_n, b = _split_pid(N, BLOCK_N)
    pid_a = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = offs_a < A
    k = tl.load(K + b64 * skb + offs_n[:, None] * skn + offs_a[None, :] * ska,
                mask=(offs_n[:, None] < N) & in_a[None, :], other=0.0).to(tl.float32)
    w = tl.load(W + offs_a * sw, mask=in_a, other=0.0).to(tl.float32)
    q_base = Q + b64 * sqb
    dk = tl.zeros([BLOCK_N, BLOCK_A], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + offs_m0
        ds = tl.load(DS + (b64 * M + offs_m[:, None]) * N + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        if tl.max(tl.abs(ds)) > 0.0:
            q = tl.load(q_base + offs_m[:, None] * sqm + offs_a[None, :] * sqa,
                        mask=(offs_m[:, None] < M) & in_a[None, :], other=0.0).to(tl.float32)
            t = _tanh(q[:, None, :] + k[None, :, :])  # [BLOCK_M, BLOCK_N, BLOCK_A]
            dk += tl.sum(ds[:, :, None] * (1.0 - t * t), axis=0)
    tl.store(DK + (b64 * N + offs_n[:, None]) * A + offs_a[None, :],
             (dk * w[None, :]).to(DK.dtype.element_ty), mask=(offs_n[:, None] < N) & in_a[None, :])


def _additive_config() -> dict:
    """3-D tiles [BLOCK_M, BLOCK_N, BLOCK_A] of 8K elements: 64 float32 registers a thread
    at 4 warps, with the tanh of each element feeding one FMA. The interpreter takes the
    same shapes, which keep its numpy temporaries small."""
    if _INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_A=16, BLOCK_R=16, BLOCK_SN=64, num_warps=1)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_A=16, BLOCK_R=4, BLOCK_SN=512, num_warps=4)


@triton_op("seqfuse::additive_attention_triton", mutates_args=())
def _additive_op(query: Tensor, key: Tensor, w_v: Tensor, value: Tensor,
                 valid_lens: Tensor | None = None,
                 mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """query [B, Q, A], key [B, K, A], w_v [A], value [B, K, Dv]; valid_lens [B] or [B, Q]
    integer; mask bool broadcastable to [B, Q, K]. Returns context [B, Q, Dv] and weights
    [B, Q, K], in the query's dtype."""
    checks.additive_args(query, key, w_v, value, valid_lens, mask, TRITON_DTYPES)
    check_device("additive_attention", query)
    B, M, A = query.shape
    N = key.shape[1]
    weights = torch.empty(B, M, N, device=query.device, dtype=torch.float32)
    if can_launch(weights):
        cfg = _additive_config()
        lens, lens_kind = _lens_arg(valid_lens, query)
        if mask is None:
            mview, ms = query, (0, 0, 0)
        else:
            mview = mask.expand(B, M, N).view(torch.uint8)  # a view: broadcast axes stride 0
            ms = tuple(mview.stride())
        grid = (triton.cdiv(N, cfg["BLOCK_N"]) * B, triton.cdiv(M, cfg["BLOCK_M"]))
        wrap_triton(_additive_scores_kernel)[grid](
            query, key, w_v, mview, lens, weights, *query.stride(), *key.stride(),
            w_v.stride(0), *ms, M, N, A, HAS_MASK=mask is not None, LENS_KIND=lens_kind,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_A=cfg["BLOCK_A"],
            num_warps=cfg["num_warps"])
        BLOCK_SN = _next_pow2(N, cap=cfg["BLOCK_SN"])
        wrap_triton(_masked_softmax_kernel)[(triton.cdiv(B * M, cfg["BLOCK_R"]),)](
            weights, B * M, N, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=BLOCK_SN,
            num_warps=cfg["num_warps"])
    weights = weights.to(query.dtype)
    # float32 weights x float32 values, or 16-bit x 16-bit with float32 accumulation.
    return torch.bmm(weights, value), weights


@triton_op("seqfuse::additive_attention_backward_triton", mutates_args=())
def _additive_backward_op(grad_context: Tensor, grad_weights: Tensor, query: Tensor,
                          key: Tensor, w_v: Tensor, value: Tensor,
                          weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_context [B, Q, Dv]; grad_weights [B, Q, K] (zeros when the weights were not
    used); weights [B, Q, K] from the forward (zero where masked); the rest as the
    forward's. Returns grad_query [B, Q, A], grad_key [B, K, A], grad_w_v [A],
    grad_value [B, K, Dv]."""
    op = "additive_attention_backward"
    checks.additive_backward_args(grad_context, grad_weights, query, key, w_v, value, weights,
                                  TRITON_DTYPES)
    check_device(op, query)
    B, M, A = query.shape
    N, DV = key.shape[1], value.shape[2]
    # The GEMMs in float32, on the library's kernels.
    p = weights.float()
    gc = grad_context.float()
    grad_value = torch.bmm(p.transpose(1, 2), gc).to(value.dtype)
    dp = torch.baddbmm(grad_weights.float(), gc, value.float().transpose(1, 2))
    dscore = (p * (dp - (p * dp).sum(-1, keepdim=True))).contiguous()  # 0 where masked
    dq = query.new_empty(B, M, A)
    dk = key.new_empty(B, N, A)
    cfg = _additive_config()
    blocks_m = triton.cdiv(M, cfg["BLOCK_M"])
    dw_parts = torch.zeros(B, blocks_m, A, device=query.device, dtype=torch.float32)
    if can_launch(dq):
        strides = (*query.stride(), *key.stride(), w_v.stride(0))
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_A=cfg["BLOCK_A"],
                     num_warps=cfg["num_warps"])
        wrap_triton(_additive_dq_kernel)[(blocks_m * B, triton.cdiv(A, cfg["BLOCK_A"]))](
            query, key, w_v, dscore, dq, dw_parts, *strides, M, N, A, **tiles)
        wrap_triton(_additive_dk_kernel)[(triton.cdiv(N, cfg["BLOCK_N"]) * B,
                                          triton.cdiv(A, cfg["BLOCK_A"]))](
            query, key, w_v, dscore, dk, *strides, M, N, A, **tiles)
    grad_w_v = dw_parts.sum(dim=(0, 1)).to(w_v.dtype)
    return dq, dk, grad_w_v, grad_value


register_additive_autograd("additive_attention_triton", "additive_attention_backward_triton")


def additive_attention(
    query: Tensor, key: Tensor, w_v: Tensor, value: Tensor, valid_lens: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked additive (Bahdanau) attention on the Triton kernels: arguments, shapes and
    results as seqfuse.ops.additive_attention (float32, float16 or bfloat16)."""
    return run_additive(torch.ops.seqfuse.additive_attention_triton.default, query, key, w_v,
                        value, valid_lens, mask)


keep_opaque_when_interpreted(_sdpa_op, _sdpa_backward_op, _additive_op, _additive_backward_op)
