"""Triton LSTM, GRU and Elman RNN layers (backend="triton"): kernels, launchers, the
`seqfuse::*_triton` ops and their autograd, together.

Design (haste-style, both directions in every launch):
  forward   one GEMM in torch for the input projection of every step and direction,
            xproj = x W_ih^T + b: [T*B, I] x [I, D*G] -> [T, B, D, G] (float32); then per
            time step ONE fused kernel: grid (row blocks, unit blocks, direction). A program
            owns BLOCK_B rows and BLOCK_H hidden units of one direction and computes the
            recurrent product h_{s-1} W_hh^T for ALL gates of its units (tl.dot over
            K-chunks of H, one accumulator per gate), so the cell math runs on registers and
            writes h, c, the output row and (training only) the saved activations.
  backward  per step, in reverse, ONE fused kernel: dh = grad_output + dgates_{s+1} W_hh
            (tl.dot over K-chunks of G, see _dgates_times_w) + the cell's pointwise
            backward, writing dgates_s and the h each step read; then the weight, bias and
            input gradients are big GEMMs over all steps in torch. The recurrent product
            is in the kernel rather than a torch matmul per step because a step is
            latency-bound (one launch instead of two, no dh round trip through memory) and
            each row reads its dgates at its own time, which with ragged lengths in the
            reverse direction a matmul could only get through a gather.
Lengths: each row's time index at step s is s (forward) or len-1-s (reverse), so the
reverse direction starts at the row's own last valid step; rows past their length keep
their state and write zeros (output, saved activations, dgates) at time s, so every
[T, B] position is written exactly once per direction and no buffer needs zero-filling.
h_n / c_n are written at each row's last valid step (s == len-1).

Precision: float32, float16 and bfloat16. States, cell math and saved activations are
float32; float16/bfloat16 products multiply in the input dtype with float32 accumulation;
float32 products are IEEE unless torch.backends.cuda.matmul.allow_tf32 is set (the same
switch that governs torch.mm).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1): tl.dot there
needs blocks >= 16 (masks pad them) and cannot multiply bfloat16, so bfloat16 needs CUDA.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops import checks
from ..ops.recurrent import (register_gru_autograd, register_lstm_autograd,
                             register_rnn_autograd, run_gru, run_lstm, run_rnn)
from .common import TRITON_DTYPES, can_launch, check_device, keep_opaque_when_interpreted


# ---------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tl has no tanh that also runs in the interpreter; this form saturates cleanly to +-1
    # (exp overflow gives 1 / inf = 0), with ~1e-7 absolute error.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _dot(a, w, acc, ALLOW_TF32: tl.constexpr):
    # input_precision only matters for float32 operands: IEEE unless torch allows TF32, so
    # the recurrent product is as exact as the torch.mm that computes the projection.
    if ALLOW_TF32:
        acc = tl.dot(a, w, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    return acc


@triton.jit
def _row_lengths(len_ptr, rows, row_ok, T, HAS_LENGTHS: tl.constexpr):
    """lengths[rows] (0 for rows past B), all T when there are no lengths."""
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
    else:
        lens = tl.where(row_ok, T, 0)
    return lens


@triton.jit
def _time_of(s, lens, d):
    """The time index of step s: s forward, len-1-s reverse (negative past the length)."""
    return tl.where(d == 0, s, lens - 1 - s)


@triton.jit
def _program_rows(len_ptr, s, T, B, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """This program's direction d, rows [BLOCK_B], units j [BLOCK_H], their lengths, which
    rows run at step s, and the time each row writes at: its own for running rows, s for
    the others (the padding they zero)."""
    d = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < B
    lens = _row_lengths(len_ptr, rows, row_ok, T, HAS_LENGTHS)
    active = row_ok & (s < lens)
    t = tl.where(active, _time_of(s, lens, d), s).to(tl.int64)
    return d, rows, j, row_ok, lens, active, t


@triton.jit
def _h_chunk(h_ptr, rows, row_ok, d, k, k_ok, B, H, w_dtype: tl.constexpr):
    """h[d, rows, k] as the product's left operand [BLOCK_B, BLOCK_K]: the float32 state
    rounded to the weights' dtype (float16/bfloat16 run on the tensor cores).
    h_ptr: [D, B, H] float32."""
    a = tl.load(h_ptr + (d * B + rows)[:, None] * H + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    return a.to(w_dtype)


@triton.jit
def _w_chunk(w_ptr, d, G, H, GATE: tl.constexpr, j, j_ok, k, k_ok):
    """W_hh[d, GATE*H + j, k]^T: [BLOCK_K, BLOCK_H]. w_ptr: [D, G, H]."""
    return tl.load(w_ptr + d * G * H + (GATE * H + j)[None, :] * H + k[:, None],
                   mask=k_ok[:, None] & j_ok[None, :], other=0.0)


@triton.jit
def _dgates_times_w(dg_ptr, row_off, row_ok, w_ptr, d, j, j_ok, H, KG,
                    ALLOW_TF32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """dgates[row_off + k] W_hh[d, k, j] summed over k < KG: [BLOCK_B, BLOCK_H] float32.
    row_off: [BLOCK_B] int64 offsets of each row's dgates (each row at its own time);
    w_ptr: [D, KG, H]."""
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    w_base = w_ptr + d * KG * H
    for k0 in range(0, KG, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < KG
        a = tl.load(dg_ptr + row_off[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_base + k[:, None] * H + j[None, :], mask=k_ok[:, None] & j_ok[None, :],
                    other=0.0)
        acc = _dot(a.to(w.dtype), w, acc, ALLOW_TF32)
    return acc


# ---------------------------------------------------------------------------------
# Forward step kernels. Shapes: xg [T, B, D, G] float32 (projection in; LSTM training:
# activated gates out, in place), w_hh [D, G, H], h_in/h_out [D, B, H] float32 (double
# buffer: other programs of the launch still read h_in), c [D, B, H] float32 (each program
# owns its units: in place), len [B] int32, out [T, B, D*H], h_n/c_n [D, B, H].
# ---------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["s"])
def _lstm_forward_step(
    xg_ptr, w_hh_ptr, h_in_ptr, h_out_ptr, c_ptr, len_ptr, out_ptr, hn_ptr, cn_ptr, cells_ptr,
    s, T, B, H, D,
    HAS_LENGTHS: tl.constexpr, KEEP: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d, rows, j, row_ok, lens, active, t = _program_rows(
        len_ptr, s, T, B, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    j_ok = j < H
    G = 4 * H

    # h_{s-1} W_hh^T for the four gates of these units: each K-chunk of h is loaded once
    # and feeds all four accumulators.
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        a = _h_chunk(h_in_ptr, rows, row_ok, d, k, k_ok, B, H, w_hh_ptr.dtype.element_ty)
        acc_i = _dot(a, _w_chunk(w_hh_ptr, d, G, H, 0, j, j_ok, k, k_ok), acc_i, ALLOW_TF32)
        acc_f = _dot(a, _w_chunk(w_hh_ptr, d, G, H, 1, j, j_ok, k, k_ok), acc_f, ALLOW_TF32)
        acc_g = _dot(a, _w_chunk(w_hh_ptr, d, G, H, 2, j, j_ok, k, k_ok), acc_g, ALLOW_TF32)
        acc_o = _dot(a, _w_chunk(w_hh_ptr, d, G, H, 3, j, j_ok, k, k_ok), acc_o, ALLOW_TF32)

    m = active[:, None] & j_ok[None, :]
    m_any = row_ok[:, None] & j_ok[None, :]
    x_ptrs = xg_ptr + ((t * B + rows) * D + d)[:, None] * G + j[None, :]
    gi = _sigmoid(acc_i + tl.load(x_ptrs, mask=m, other=0.0))
    gf = _sigmoid(acc_f + tl.load(x_ptrs + H, mask=m, other=0.0))
    gg = _tanh(acc_g + tl.load(x_ptrs + 2 * H, mask=m, other=0.0))
    go = _sigmoid(acc_o + tl.load(x_ptrs + 3 * H, mask=m, other=0.0))
    state = (d * B + rows)[:, None] * H + j[None, :]
    c = gf * tl.load(c_ptr + state, mask=m, other=0.0) + gi * gg
    h = go * _tanh(c)
    tl.store(c_ptr + state, c, mask=m)
    tl.store(h_out_ptr + state, h, mask=m)
    out_ptrs = out_ptr + ((t * B + rows) * D + d)[:, None] * H + j[None, :]
    tl.store(out_ptrs, tl.where(m, h, 0.0).to(out_ptr.dtype.element_ty), mask=m_any)
    last = m & (s == lens - 1)[:, None]
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=last)
    tl.store(cn_ptr + state, c.to(cn_ptr.dtype.element_ty), mask=last)
    if KEEP:
        # Activated gates over the projection just read (same program, same addresses).
        tl.store(x_ptrs, tl.where(m, gi, 0.0), mask=m_any)
        tl.store(x_ptrs + H, tl.where(m, gf, 0.0), mask=m_any)
        tl.store(x_ptrs + 2 * H, tl.where(m, gg, 0.0), mask=m_any)
        tl.store(x_ptrs + 3 * H, tl.where(m, go, 0.0), mask=m_any)
        cell_ptrs = cells_ptr + ((t * B + rows) * D + d)[:, None] * H + j[None, :]
        tl.store(cell_ptrs, tl.where(m, c, 0.0), mask=m_any)


@triton.jit(do_not_specialize=["s"])
def _gru_forward_step(
    xg_ptr, w_hh_ptr, b_hh_ptr, h_in_ptr, h_out_ptr, len_ptr, out_ptr, hn_ptr, gates_ptr,
    s, T, B, H, D,
    HAS_LENGTHS: tl.constexpr, HAS_BIAS_HH: tl.constexpr, KEEP: tl.constexpr,
    ALLOW_TF32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # xg: [T, B, D, 3H] (x W_ih^T + b_ih); b_hh: [D, 3H]; gates: [T, B, D, 4H] float32,
    # the saved r, z, n and W_hn h + b_hn (b_hn sits inside r * (...), so it stays apart).
    d, rows, j, row_ok, lens, active, t = _program_rows(
        len_ptr, s, T, B, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    j_ok = j < H
    G = 3 * H

    acc_r = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        a = _h_chunk(h_in_ptr, rows, row_ok, d, k, k_ok, B, H, w_hh_ptr.dtype.element_ty)
        acc_r = _dot(a, _w_chunk(w_hh_ptr, d, G, H, 0, j, j_ok, k, k_ok), acc_r, ALLOW_TF32)
        acc_z = _dot(a, _w_chunk(w_hh_ptr, d, G, H, 1, j, j_ok, k, k_ok), acc_z, ALLOW_TF32)
        acc_n = _dot(a, _w_chunk(w_hh_ptr, d, G, H, 2, j, j_ok, k, k_ok), acc_n, ALLOW_TF32)
    if HAS_BIAS_HH:
        b = b_hh_ptr + d * G + j
        acc_r += tl.load(b, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        acc_z += tl.load(b + H, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        acc_n += tl.load(b + 2 * H, mask=j_ok, other=0.0).to(tl.float32)[None, :]

    m = active[:, None] & j_ok[None, :]
    m_any = row_ok[:, None] & j_ok[None, :]
    x_ptrs = xg_ptr + ((t * B + rows) * D + d)[:, None] * G + j[None, :]
    r = _sigmoid(acc_r + tl.load(x_ptrs, mask=m, other=0.0))
    z = _sigmoid(acc_z + tl.load(x_ptrs + H, mask=m, other=0.0))
    n = _tanh(tl.load(x_ptrs + 2 * H, mask=m, other=0.0) + r * acc_n)
    state = (d * B + rows)[:, None] * H + j[None, :]
    h_prev = tl.load(h_in_ptr + state, mask=m, other=0.0)
    h = n + z * (h_prev - n)
    tl.store(h_out_ptr + state, h, mask=m)
    out_ptrs = out_ptr + ((t * B + rows) * D + d)[:, None] * H + j[None, :]
    tl.store(out_ptrs, tl.where(m, h, 0.0).to(out_ptr.dtype.element_ty), mask=m_any)
    last = m & (s == lens - 1)[:, None]
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=last)
    if KEEP:
        g_ptrs = gates_ptr + ((t * B + rows) * D + d)[:, None] * (4 * H) + j[None, :]
        tl.store(g_ptrs, tl.where(m, r, 0.0), mask=m_any)
        tl.store(g_ptrs + H, tl.where(m, z, 0.0), mask=m_any)
        tl.store(g_ptrs + 2 * H, tl.where(m, n, 0.0), mask=m_any)
        tl.store(g_ptrs + 3 * H, tl.where(m, acc_n, 0.0), mask=m_any)


@triton.jit(do_not_specialize=["s"])
def _rnn_forward_step(
    xg_ptr, w_hh_ptr, h_in_ptr, h_out_ptr, len_ptr, out_ptr, hn_ptr,
    s, T, B, H, D,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # xg: [T, B, D, H] (x W_ih^T + b). Nothing is saved: act' is a function of the output.
    d, rows, j, row_ok, lens, active, t = _program_rows(
        len_ptr, s, T, B, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    j_ok = j < H
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        a = _h_chunk(h_in_ptr, rows, row_ok, d, k, k_ok, B, H, w_hh_ptr.dtype.element_ty)
        acc = _dot(a, _w_chunk(w_hh_ptr, d, H, H, 0, j, j_ok, k, k_ok), acc, ALLOW_TF32)
    m = active[:, None] & j_ok[None, :]
    m_any = row_ok[:, None] & j_ok[None, :]
    x_ptrs = xg_ptr + ((t * B + rows) * D + d)[:, None] * H + j[None, :]
    pre = acc + tl.load(x_ptrs, mask=m, other=0.0)
    if RELU:
        h = tl.maximum(pre, 0.0)
    else:
        h = _tanh(pre)
    state = (d * B + rows)[:, None] * H + j[None, :]
    tl.store(h_out_ptr + state, h, mask=m)
    out_ptrs = out_ptr + ((t * B + rows) * D + d)[:, None] * H + j[None, :]
    tl.store(out_ptrs, tl.where(m, h, 0.0).to(out_ptr.dtype.element_ty), mask=m_any)
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=m & (s == lens - 1)[:, None])


# ---------------------------------------------------------------------------------
# Backward step kernels, run for s = T-1 .. 0. A row's dh at step s is grad_output at its
# time plus, if it ran at s+1, dgates_{s+1} W_hh read at its own time of step s+1 (written
# by the previous launch), or grad_h_n if s is its last step. Shapes: gy [T, B, D*H],
# g_hn/g_cn/hx/cx [D, B, H], out [T, B, D*H], dg [T, B, D, GS] float32, h_prev
# [T, B, D, H] (the h each step read, for grad_weight_hh), carry [D, B, H] float32 (the
# gradient passed to the step before other than through W_hh: the LSTM's dc, the GRU's
# dh * z; each program owns its units, so it is updated in place).
# ---------------------------------------------------------------------------------

@triton.jit
def _h_before(out_ptr, hx_ptr, s, lens, d, rows, j, m, B, H, D):
    """The h step s read: hx at s == 0, else the output at the time of step s-1."""
    first = ((lens * 0 + s) == 0)[:, None]  # a block, as masks must be
    tp = tl.maximum(_time_of(s - 1, lens, d), 0).to(tl.int64)
    from_out = tl.load(out_ptr + ((tp * B + rows) * D + d)[:, None] * H + j[None, :],
                       mask=m & ~first, other=0.0).to(tl.float32)
    from_hx = tl.load(hx_ptr + (d * B + rows)[:, None] * H + j[None, :],
                      mask=m & first, other=0.0).to(tl.float32)
    return tl.where(first, from_hx, from_out)


@triton.jit
def _recurrent_dh(dg_ptr, w_hh_ptr, s, lens, d, rows, row_ok, j, j_ok, B, H, D, GS, KG,
                  ALLOW_TF32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """dgates_{s+1} W_hh for the rows that ran at step s+1 (zero for the others), each row's
    dgates read at its own time of step s+1."""
    ran_next = row_ok & (s + 1 < lens)
    tn = tl.maximum(_time_of(s + 1, lens, d), 0).to(tl.int64)
    return _dgates_times_w(dg_ptr, ((tn * B + rows) * D + d) * GS, ran_next, w_hh_ptr, d, j, j_ok,
                           H, KG, ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)


@triton.jit(do_not_specialize=["s"])
def _lstm_backward_step(
    gy_ptr, ghn_ptr, gcn_ptr, w_hh_ptr, hx_ptr, cx_ptr, out_ptr, gates_ptr, cells_ptr, len_ptr,
    dg_ptr, hprev_ptr, dc_ptr,
    s, T, B, H, D,
    HAS_LENGTHS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # gates: [T, B, D, 4H] activated i, f, g, o; cells: [T, B, D, H]; dg: [T, B, D, 4H].
    d, rows, j, row_ok, lens, active, t = _program_rows(
        len_ptr, s, T, B, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    j_ok = j < H
    G = 4 * H
    acc = _recurrent_dh(dg_ptr, w_hh_ptr, s, lens, d, rows, row_ok, j, j_ok, B, H, D, G, G,
                        ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    m = active[:, None] & j_ok[None, :]
    m_any = row_ok[:, None] & j_ok[None, :]
    last = (s == lens - 1)[:, None]
    state = (d * B + rows)[:, None] * H + j[None, :]
    unit = ((t * B + rows) * D + d)[:, None] * H + j[None, :]
    dh = tl.load(gy_ptr + unit, mask=m, other=0.0).to(tl.float32)
    dh += tl.where(last, tl.load(ghn_ptr + state, mask=m, other=0.0).to(tl.float32), acc)
    dc = tl.where(last, tl.load(gcn_ptr + state, mask=m, other=0.0).to(tl.float32),
                  tl.load(dc_ptr + state, mask=m, other=0.0))

    g_ptrs = gates_ptr + ((t * B + rows) * D + d)[:, None] * G + j[None, :]
    gi = tl.load(g_ptrs, mask=m, other=0.0)
    gf = tl.load(g_ptrs + H, mask=m, other=0.0)
    gg = tl.load(g_ptrs + 2 * H, mask=m, other=0.0)
    go = tl.load(g_ptrs + 3 * H, mask=m, other=0.0)
    tc = _tanh(tl.load(cells_ptr + unit, mask=m, other=0.0))
    first = ((lens * 0 + s) == 0)[:, None]
    tp = tl.maximum(_time_of(s - 1, lens, d), 0).to(tl.int64)
    c_prev = tl.where(
        first,
        tl.load(cx_ptr + state, mask=m & first, other=0.0).to(tl.float32),
        tl.load(cells_ptr + ((tp * B + rows) * D + d)[:, None] * H + j[None, :],
                mask=m & ~first, other=0.0))
    dc = dc + dh * go * (1.0 - tc * tc)
    dg_ptrs = dg_ptr + ((t * B + rows) * D + d)[:, None] * G + j[None, :]
    tl.store(dg_ptrs, tl.where(m, dc * gg * gi * (1.0 - gi), 0.0), mask=m_any)
    tl.store(dg_ptrs + H, tl.where(m, dc * c_prev * gf * (1.0 - gf), 0.0), mask=m_any)
    tl.store(dg_ptrs + 2 * H, tl.where(m, dc * gi * (1.0 - gg * gg), 0.0), mask=m_any)
    tl.store(dg_ptrs + 3 * H, tl.where(m, dh * tc * go * (1.0 - go), 0.0), mask=m_any)
    tl.store(dc_ptr + state, dc * gf, mask=m)
    h_before = _h_before(out_ptr, hx_ptr, s, lens, d, rows, j, m, B, H, D)
    tl.store(hprev_ptr + unit, tl.where(m, h_before, 0.0).to(hprev_ptr.dtype.element_ty),
             mask=m_any)


@triton.jit(do_not_specialize=["s"])
def _gru_backward_step(
    gy_ptr, ghn_ptr, w_hh_ptr, hx_ptr, out_ptr, gates_ptr, len_ptr,
    dgh_ptr, dgi_ptr, hprev_ptr, carry_ptr,
    s, T, B, H, D,
    HAS_LENGTHS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # gates: [T, B, D, 4H] r, z, n, W_hn h + b_hn. Pre-activation gradients go to two
    # buffers so that neither needs a gather later: dgh [T, B, D, 3H] = [dr, dz, dn * r]
    # multiplies W_hh, dgi [T, B, D, 3H] = [dr, dz, dn] multiplies W_ih.
    d, rows, j, row_ok, lens, active, t = _program_rows(
        len_ptr, s, T, B, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    j_ok = j < H
    G = 3 * H
    acc = _recurrent_dh(dgh_ptr, w_hh_ptr, s, lens, d, rows, row_ok, j, j_ok, B, H, D, G, G,
                        ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    m = active[:, None] & j_ok[None, :]
    m_any = row_ok[:, None] & j_ok[None, :]
    last = (s == lens - 1)[:, None]
    state = (d * B + rows)[:, None] * H + j[None, :]
    unit = ((t * B + rows) * D + d)[:, None] * H + j[None, :]
    dh = tl.load(gy_ptr + unit, mask=m, other=0.0).to(tl.float32)
    dh += tl.where(last, tl.load(ghn_ptr + state, mask=m, other=0.0).to(tl.float32),
                   acc + tl.load(carry_ptr + state, mask=m, other=0.0))

    g_ptrs = gates_ptr + ((t * B + rows) * D + d)[:, None] * (4 * H) + j[None, :]
    r = tl.load(g_ptrs, mask=m, other=0.0)
    z = tl.load(g_ptrs + H, mask=m, other=0.0)
    n = tl.load(g_ptrs + 2 * H, mask=m, other=0.0)
    hn = tl.load(g_ptrs + 3 * H, mask=m, other=0.0)
    h_before = _h_before(out_ptr, hx_ptr, s, lens, d, rows, j, m, B, H, D)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h_before - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    off = ((t * B + rows) * D + d)[:, None] * G + j[None, :]
    tl.store(dgh_ptr + off, tl.where(m, dr, 0.0), mask=m_any)
    tl.store(dgh_ptr + off + H, tl.where(m, dz, 0.0), mask=m_any)
    tl.store(dgh_ptr + off + 2 * H, tl.where(m, dn * r, 0.0), mask=m_any)
    tl.store(dgi_ptr + off, tl.where(m, dr, 0.0), mask=m_any)
    tl.store(dgi_ptr + off + H, tl.where(m, dz, 0.0), mask=m_any)
    tl.store(dgi_ptr + off + 2 * H, tl.where(m, dn, 0.0), mask=m_any)
    tl.store(carry_ptr + state, dh * z, mask=m)
    tl.store(hprev_ptr + unit, tl.where(m, h_before, 0.0).to(hprev_ptr.dtype.element_ty),
             mask=m_any)


@triton.jit(do_not_specialize=["s"])
def _rnn_backward_step(
    gy_ptr, ghn_ptr, w_hh_ptr, hx_ptr, out_ptr, len_ptr, dg_ptr, hprev_ptr,
    s, T, B, H, D,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dg: [T, B, D, H] = dh * act'(pre), act' from the output: 1 - y^2, or y > 0.
    d, rows, j, row_ok, lens, active, t = _program_rows(
        len_ptr, s, T, B, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    j_ok = j < H
    acc = _recurrent_dh(dg_ptr, w_hh_ptr, s, lens, d, rows, row_ok, j, j_ok, B, H, D, H, H,
                        ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    m = active[:, None] & j_ok[None, :]
    m_any = row_ok[:, None] & j_ok[None, :]
    last = (s == lens - 1)[:, None]
    state = (d * B + rows)[:, None] * H + j[None, :]
    unit = ((t * B + rows) * D + d)[:, None] * H + j[None, :]
    dh = tl.load(gy_ptr + unit, mask=m, other=0.0).to(tl.float32)
    dh += tl.where(last, tl.load(ghn_ptr + state, mask=m, other=0.0).to(tl.float32), acc)
    y = tl.load(out_ptr + unit, mask=m, other=0.0).to(tl.float32)
    if RELU:
        dpre = tl.where(y > 0.0, dh, 0.0)
    else:
        dpre = dh * (1.0 - y * y)
    tl.store(dg_ptr + unit, tl.where(m, dpre, 0.0), mask=m_any)
    h_before = _h_before(out_ptr, hx_ptr, s, lens, d, rows, j, m, B, H, D)
    tl.store(hprev_ptr + unit, tl.where(m, h_before, 0.0).to(hprev_ptr.dtype.element_ty),
             mask=m_any)


@triton.jit
def _initial_state_grad(
    dg_ptr, w_hh_ptr, carry_ptr, len_ptr, ghx_ptr,
    T, B, H, D, GS, KG,
    HAS_LENGTHS: tl.constexpr, ADD_CARRY: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_hx = dgates of step 0 (at each row's own time) times W_hh, plus the carry for
    # the GRU. dg: [T, B, D, GS] (first KG columns multiply W_hh [D, KG, H]); ghx [D, B, H].
    d = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, j_ok = rows < B, j < H
    lens = _row_lengths(len_ptr, rows, row_ok, T, HAS_LENGTHS)
    t0 = tl.maximum(_time_of(0, lens, d), 0).to(tl.int64)
    acc = _dgates_times_w(dg_ptr, ((t0 * B + rows) * D + d) * GS, row_ok, w_hh_ptr, d, j, j_ok,
                          H, KG, ALLOW_TF32, BLOCK_B, BLOCK_H, BLOCK_K)
    m = row_ok[:, None] & j_ok[None, :]
    state = (d * B + rows)[:, None] * H + j[None, :]
    if ADD_CARRY:
        acc += tl.load(carry_ptr + state, mask=m, other=0.0)
    tl.store(ghx_ptr + state, acc.to(ghx_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_config(device: torch.device, dtype: torch.dtype, B: int, H: int, D: int) -> dict:
    """Block sizes and warps for the step kernels of a [B, H] state, D directions."""
    if device.type != "cuda":
        # Interpreter: tl.dot's minimum 16 everywhere, so that small test sizes still span
        # several unit blocks and K-chunks.
        return dict(BLOCK_B=16, BLOCK_H=16, BLOCK_K=16, num_warps=4)
    # A step is latency-bound: every SM should pull a slice of W_hh from L2. Rows per
    # program as few as tl.dot allows (16) for small batches, more for large ones (W_hh
    # is re-read once per row block); then narrow the unit block until the grid covers
    # the SMs. Upper limits from sm_90 cubins (ptxas resource usage): BLOCK_H=64 or a
    # K-chunk of 64 spill the LSTM's four accumulators and weight tiles to local memory.
    block_b = 16 if B <= 16 else 32 if B <= 32 else 64
    block_h = 32
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if triton.cdiv(B, block_b) * triton.cdiv(H, block_h) * D < sms:
        block_h = 16
    block_k = 16 if dtype == torch.float32 else 32
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
                num_warps=4 if block_b == 16 else 8)


def _grid(cfg: dict, B: int, H: int, D: int) -> tuple[int, int, int]:
    return (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(H, cfg["BLOCK_H"]), D)


def _allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def _device_lengths(lengths: Tensor | None, input: Tensor) -> tuple[Tensor, bool]:
    """lengths as int32 on the input's device (one copy per call), and whether there are
    any; without lengths a placeholder the kernels never read."""
    if lengths is None:
        return input.new_empty(1, dtype=torch.int32), False
    return lengths.to(device=input.device, dtype=torch.int32), True


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with a float32 result. float16/bfloat16 operands multiply on the tensor cores
    (mm.dtype is a CUDA kernel); elsewhere they are widened first."""
    if a.dtype == torch.float32:
        return a @ b
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _projection(input: Tensor, weight_ih: Tensor, bias: Tensor | None) -> Tensor:
    """x W_ih^T + bias for every step and direction in one GEMM: [T, B, D, G] float32.
    input: [T, B, I]; weight_ih: [D, G, I]; bias: [D, G] or None."""
    T, B, I = input.shape
    D, G, _ = weight_ih.shape
    xg = _mm_f32(input.reshape(T * B, I), weight_ih.reshape(D * G, I).t())
    if bias is not None:
        xg += bias.reshape(D * G).to(torch.float32)
    return xg.view(T, B, D, G)


def _state_buffers(hx: Tensor) -> tuple[Tensor, Tensor]:
    """Two float32 copies of hx [D, B, H]: step s reads one and writes the other, as other
    programs of the launch still read h_{s-1}. Separate tensors rather than views of one, so
    that functionalization (torch.compile) sees plain mutated arguments."""
    h = hx.to(torch.float32, copy=True).contiguous()
    return h, h.clone()


def _steps(input: Tensor, T: int, reverse: bool = False) -> range:
    """The time steps to launch: 0..T-1 (or T-1..0), none when can_launch says no."""
    if not can_launch(input):
        return range(0)
    return range(T - 1, -1, -1) if reverse else range(T)


# ---------------------------------------------------------------------------------
# Weight, bias and input gradients: big GEMMs over all steps (padding rows of dgates are
# zero, so they contribute nothing)
# ---------------------------------------------------------------------------------

def _input_side_grads(dg: Tensor, input: Tensor,
                      weight_ih: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dg: [T, B, D, G] float32 pre-activation gradients of x W_ih^T + b_ih; input [T, B, I];
    weight_ih [D, G, I]. Returns grad_input [T, B, I], grad_weight_ih [D, G, I], grad_bias
    [D, G], in the input's dtype (float16/bfloat16 GEMMs accumulate in float32)."""
    T, B, I = input.shape
    D, G, _ = weight_ih.shape
    dg2 = dg.reshape(T * B, D * G)
    dg2_op = dg2.to(input.dtype)
    grad_input = (dg2_op @ weight_ih.reshape(D * G, I)).view(T, B, I)
    grad_weight_ih = (dg2_op.t() @ input.reshape(T * B, I)).view(D, G, I)
    return grad_input, grad_weight_ih, dg2.sum(0).view(D, G).to(input.dtype)


def _recurrent_weight_grad(dg: Tensor, h_prev: Tensor, dtype: torch.dtype) -> Tensor:
    """sum over steps of dgates^T h_prev per direction: dg [T, B, D, G] float32, h_prev
    [T, B, D, H]. Returns [D, G, H]."""
    T, B, D, G = dg.shape
    H = h_prev.shape[3]
    a = dg.reshape(T * B, D, G).to(dtype).permute(1, 2, 0)   # [D, G, T*B]
    b = h_prev.reshape(T * B, D, H).transpose(0, 1)            # [D, T*B, H]
    return torch.bmm(a, b)


# ---------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------

@triton_op("seqfuse::lstm_layer_triton", mutates_args=())
def _lstm_layer_op(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    cx: Tensor, lengths: Tensor | None, keep_activations: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """input [T, B, I]; weight_ih [D, 4H, I]; weight_hh [D, 4H, H]; bias [D, 4H] or None;
    hx, cx [D, B, H]; lengths [B] int64 on CPU or None. Returns output [T, B, D*H], h_n,
    c_n [D, B, H], and (keep_activations, else empty) gates [T, B, D, 4H] and cells
    [T, B, D, H] float32 for the backward."""
    checks.layer_args("lstm_layer", 4, input, weight_ih, weight_hh, {"bias": bias}, hx, cx,
                      lengths, TRITON_DTYPES)
    check_device("lstm_layer", input)
    T, B, _ = input.shape
    D, H = weight_hh.shape[0], weight_hh.shape[2]
    xg = _projection(input, weight_ih, bias)
    w_hh = weight_hh.contiguous()
    h_state = _state_buffers(hx)
    c_state = cx.to(torch.float32, copy=True).contiguous()
    lens, has_lengths = _device_lengths(lengths, input)
    output = input.new_empty(T, B, D * H)
    h_n, c_n = torch.empty_like(hx), torch.empty_like(cx)
    cells = input.new_empty((T, B, D, H) if keep_activations else (0,), dtype=torch.float32)
    cfg = _launch_config(input.device, input.dtype, B, H, D)
    grid = _grid(cfg, B, H, D)
    for s in _steps(input, T):
        wrap_triton(_lstm_forward_step)[grid](
            xg, w_hh, h_state[s % 2], h_state[1 - s % 2], c_state, lens, output, h_n, c_n, cells,
            s, T, B, H, D, HAS_LENGTHS=has_lengths, KEEP=keep_activations,
            ALLOW_TF32=_allow_tf32(input.dtype), **cfg)
    gates = xg if keep_activations else input.new_empty(0, dtype=torch.float32)
    return output, h_n, c_n, gates, cells


@triton_op("seqfuse::lstm_layer_backward_triton", mutates_args=())
def _lstm_layer_backward_op(
    grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, input: Tensor, weight_ih: Tensor,
    weight_hh: Tensor, hx: Tensor, cx: Tensor, lengths: Tensor | None, output: Tensor,
    gates: Tensor, cells: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of lstm_layer_triton. grad_output [T, B, D*H]; grad_h_n, grad_c_n [D, B, H];
    the rest are its inputs and outputs (gates [T, B, D, 4H], cells [T, B, D, H]). Returns
    grad_input, grad_weight_ih, grad_weight_hh, grad_bias [D, 4H], grad_hx, grad_cx."""
    op = "lstm_layer_backward"
    checks.layer_args("lstm_layer", 4, input, weight_ih, weight_hh, {}, hx, cx, lengths,
                      TRITON_DTYPES)
    checks.layer_backward_args(op, "lstm_layer", input, weight_ih, weight_hh, grad_output, output,
                               grad_h_n, hx, grad_c_n=grad_c_n, gates=gates, cells=cells)
    checks.lstm_activations(op, input, weight_ih, weight_hh, grad_c_n, cx, gates, cells)
    check_device(op, input)
    T, B, _ = input.shape
    D, H = weight_hh.shape[0], weight_hh.shape[2]
    lens, has_lengths = _device_lengths(lengths, input)
    w_hh = weight_hh.contiguous()
    dgates = input.new_empty(T, B, D, 4 * H, dtype=torch.float32)
    h_prev = input.new_empty(T, B, D, H)
    dc = input.new_zeros(D, B, H, dtype=torch.float32)
    cfg = _launch_config(input.device, input.dtype, B, H, D)
    grid = _grid(cfg, B, H, D)
    tf32 = _allow_tf32(input.dtype)
    gy, ghn, gcn = grad_output.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous()
    hx_c, cx_c, out_c = hx.contiguous(), cx.contiguous(), output.contiguous()
    gates_c, cells_c = gates.contiguous(), cells.contiguous()
    for s in _steps(input, T, reverse=True):
        wrap_triton(_lstm_backward_step)[grid](
            gy, ghn, gcn, w_hh, hx_c, cx_c, out_c, gates_c, cells_c, lens, dgates, h_prev, dc,
            s, T, B, H, D, HAS_LENGTHS=has_lengths, ALLOW_TF32=tf32, **cfg)
    grad_hx = torch.empty_like(hx)
    if can_launch(input):
        wrap_triton(_initial_state_grad)[grid](
            dgates, w_hh, dc, lens, grad_hx, T, B, H, D, 4 * H, 4 * H,
            HAS_LENGTHS=has_lengths, ADD_CARRY=False, ALLOW_TF32=tf32, **cfg)
    grad_input, grad_weight_ih, grad_bias = _input_side_grads(dgates, input, weight_ih)
    grad_weight_hh = _recurrent_weight_grad(dgates, h_prev, input.dtype)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_hx, dc.to(cx.dtype)


register_lstm_autograd("lstm_layer_triton", "lstm_layer_backward_triton")


def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer on the Triton kernels: arguments, shapes and results as
    seqfuse.ops.lstm_layer."""
    return run_lstm(torch.ops.seqfuse.lstm_layer_triton.default, input, weight_ih, weight_hh,
                    bias, hx, cx, lengths)


# ---------------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------------

@triton_op("seqfuse::gru_layer_triton", mutates_args=())
def _gru_layer_op(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None,
    keep_activations: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """input [T, B, I]; weight_ih [D, 3H, I]; weight_hh [D, 3H, H]; bias_ih, bias_hh [D, 3H]
    or None; hx [D, B, H]; lengths [B] int64 on CPU or None. Returns output [T, B, D*H],
    h_n [D, B, H] and (keep_activations, else empty) gates [T, B, D, 4H] float32."""
    checks.layer_args("gru_layer", 3, input, weight_ih, weight_hh,
                      {"bias_ih": bias_ih, "bias_hh": bias_hh}, hx, None, lengths, TRITON_DTYPES)
    check_device("gru_layer", input)
    T, B, _ = input.shape
    D, H = weight_hh.shape[0], weight_hh.shape[2]
    xg = _projection(input, weight_ih, bias_ih)
    w_hh = weight_hh.contiguous()
    b_hh = bias_hh.contiguous() if bias_hh is not None else w_hh  # placeholder, never read
    h_state = _state_buffers(hx)
    lens, has_lengths = _device_lengths(lengths, input)
    output = input.new_empty(T, B, D * H)
    h_n = torch.empty_like(hx)
    gates = input.new_empty((T, B, D, 4 * H) if keep_activations else (0,), dtype=torch.float32)
    cfg = _launch_config(input.device, input.dtype, B, H, D)
    grid = _grid(cfg, B, H, D)
    for s in _steps(input, T):
        wrap_triton(_gru_forward_step)[grid](
            xg, w_hh, b_hh, h_state[s % 2], h_state[1 - s % 2], lens, output, h_n, gates,
            s, T, B, H, D, HAS_LENGTHS=has_lengths, HAS_BIAS_HH=bias_hh is not None,
            KEEP=keep_activations, ALLOW_TF32=_allow_tf32(input.dtype), **cfg)
    return output, h_n, gates


@triton_op("seqfuse::gru_layer_backward_triton", mutates_args=())
def _gru_layer_backward_op(
    grad_output: Tensor, grad_h_n: Tensor, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    hx: Tensor, lengths: Tensor | None, output: Tensor, gates: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of gru_layer_triton. grad_output [T, B, D*H]; grad_h_n [D, B, H]; gates
    [T, B, D, 4H]. Returns grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih [D, 3H],
    grad_bias_hh [D, 3H], grad_hx."""
    op = "gru_layer_backward"
    checks.layer_args("gru_layer", 3, input, weight_ih, weight_hh, {}, hx, None, lengths,
                      TRITON_DTYPES)
    checks.layer_backward_args(op, "gru_layer", input, weight_ih, weight_hh, grad_output, output,
                               grad_h_n, hx, gates=gates)
    checks.gru_activations(op, input, weight_ih, weight_hh, gates)
    check_device(op, input)
    T, B, _ = input.shape
    D, H = weight_hh.shape[0], weight_hh.shape[2]
    lens, has_lengths = _device_lengths(lengths, input)
    w_hh = weight_hh.contiguous()
    dgh = input.new_empty(T, B, D, 3 * H, dtype=torch.float32)
    dgi = torch.empty_like(dgh)
    h_prev = input.new_empty(T, B, D, H)
    carry = input.new_zeros(D, B, H, dtype=torch.float32)
    cfg = _launch_config(input.device, input.dtype, B, H, D)
    grid = _grid(cfg, B, H, D)
    tf32 = _allow_tf32(input.dtype)
    gy, ghn = grad_output.contiguous(), grad_h_n.contiguous()
    hx_c, out_c, gates_c = hx.contiguous(), output.contiguous(), gates.contiguous()
    for s in _steps(input, T, reverse=True):
        wrap_triton(_gru_backward_step)[grid](
            gy, ghn, w_hh, hx_c, out_c, gates_c, lens, dgh, dgi, h_prev, carry,
            s, T, B, H, D, HAS_LENGTHS=has_lengths, ALLOW_TF32=tf32, **cfg)
    grad_hx = torch.empty_like(hx)
    if can_launch(input):
        wrap_triton(_initial_state_grad)[grid](
            dgh, w_hh, carry, lens, grad_hx, T, B, H, D, 3 * H, 3 * H,
            HAS_LENGTHS=has_lengths, ADD_CARRY=True, ALLOW_TF32=tf32, **cfg)
    grad_input, grad_weight_ih, grad_bias_ih = _input_side_grads(dgi, input, weight_ih)
    grad_weight_hh = _recurrent_weight_grad(dgh, h_prev, input.dtype)
    grad_bias_hh = dgh.sum((0, 1)).to(input.dtype)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_hx


register_gru_autograd("gru_layer_triton", "gru_layer_backward_triton")


def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer on the Triton kernels: arguments, shapes and results as
    seqfuse.ops.gru_layer."""
    return run_gru(torch.ops.seqfuse.gru_layer_triton.default, input, weight_ih, weight_hh,
                   bias_ih, bias_hh, hx, lengths)


# ---------------------------------------------------------------------------------
# Elman RNN
# ---------------------------------------------------------------------------------

@triton_op("seqfuse::rnn_layer_triton", mutates_args=())
def _rnn_layer_op(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None, nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """input [T, B, I]; weight_ih [D, H, I]; weight_hh [D, H, H]; bias [D, H] or None;
    hx [D, B, H]; lengths [B] int64 on CPU or None; nonlinearity "tanh" or "relu".
    Returns output [T, B, D*H] and h_n [D, B, H]."""
    checks.nonlinearity("rnn_layer", nonlinearity)
    checks.layer_args("rnn_layer", 1, input, weight_ih, weight_hh, {"bias": bias}, hx, None,
                      lengths, TRITON_DTYPES)
    check_device("rnn_layer", input)
    T, B, _ = input.shape
    D, H = weight_hh.shape[0], weight_hh.shape[2]
    xg = _projection(input, weight_ih, bias)
    w_hh = weight_hh.contiguous()
    h_state = _state_buffers(hx)
    lens, has_lengths = _device_lengths(lengths, input)
    output = input.new_empty(T, B, D * H)
    h_n = torch.empty_like(hx)
    cfg = _launch_config(input.device, input.dtype, B, H, D)
    grid = _grid(cfg, B, H, D)
    for s in _steps(input, T):
        wrap_triton(_rnn_forward_step)[grid](
            xg, w_hh, h_state[s % 2], h_state[1 - s % 2], lens, output, h_n,
            s, T, B, H, D, HAS_LENGTHS=has_lengths, RELU=nonlinearity == "relu",
            ALLOW_TF32=_allow_tf32(input.dtype), **cfg)
    return output, h_n


@triton_op("seqfuse::rnn_layer_backward_triton", mutates_args=())
def _rnn_layer_backward_op(
    grad_output: Tensor, grad_h_n: Tensor, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    hx: Tensor, lengths: Tensor | None, output: Tensor, nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of rnn_layer_triton. grad_output [T, B, D*H]; grad_h_n [D, B, H]. Returns
    grad_input, grad_weight_ih, grad_weight_hh, grad_bias [D, H], grad_hx."""
    op = "rnn_layer_backward"
    checks.nonlinearity("rnn_layer", nonlinearity)
    checks.layer_args("rnn_layer", 1, input, weight_ih, weight_hh, {}, hx, None, lengths,
                      TRITON_DTYPES)
    checks.layer_backward_args(op, "rnn_layer", input, weight_ih, weight_hh, grad_output, output,
                               grad_h_n, hx)
    check_device(op, input)
    T, B, _ = input.shape
    D, H = weight_hh.shape[0], weight_hh.shape[2]
    lens, has_lengths = _device_lengths(lengths, input)
    w_hh = weight_hh.contiguous()
    dgates = input.new_empty(T, B, D, H, dtype=torch.float32)
    h_prev = input.new_empty(T, B, D, H)
    cfg = _launch_config(input.device, input.dtype, B, H, D)
    grid = _grid(cfg, B, H, D)
    tf32 = _allow_tf32(input.dtype)
    gy, ghn = grad_output.contiguous(), grad_h_n.contiguous()
    hx_c, out_c = hx.contiguous(), output.contiguous()
    for s in _steps(input, T, reverse=True):
        wrap_triton(_rnn_backward_step)[grid](
            gy, ghn, w_hh, hx_c, out_c, lens, dgates, h_prev,
            s, T, B, H, D, HAS_LENGTHS=has_lengths, RELU=nonlinearity == "relu",
            ALLOW_TF32=tf32, **cfg)
    grad_hx = torch.empty_like(hx)
    if can_launch(input):
        wrap_triton(_initial_state_grad)[grid](
            dgates, w_hh, dgates, lens, grad_hx, T, B, H, D, H, H,
            HAS_LENGTHS=has_lengths, ADD_CARRY=False, ALLOW_TF32=tf32, **cfg)
    grad_input, grad_weight_ih, grad_bias = _input_side_grads(dgates, input, weight_ih)
    grad_weight_hh = _recurrent_weight_grad(dgates, h_prev, input.dtype)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_hx


register_rnn_autograd("rnn_layer_triton", "rnn_layer_backward_triton")


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer on the Triton kernels: arguments, shapes and results as
    seqfuse.ops.rnn_layer."""
    return run_rnn(torch.ops.seqfuse.rnn_layer_triton.default, input, weight_ih, weight_hh, bias,
                   hx, lengths, nonlinearity)


keep_opaque_when_interpreted(_lstm_layer_op, _lstm_layer_backward_op, _gru_layer_op,
                             _gru_layer_backward_op, _rnn_layer_op, _rnn_layer_backward_op)
