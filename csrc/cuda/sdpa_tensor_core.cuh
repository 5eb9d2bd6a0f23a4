// Tensor-core kernels of scaled dot-product attention for float16/bfloat16 (sm_80+):
// flash-attention-2 style, mma.sync.m16n8k16 with float32 accumulators, operands moved
// from shared memory by ldmatrix and from global memory by cp.async (16-byte pieces,
// double-buffered: the next tile loads while this one is computed).
//
// Fragment layouts (PTX ISA, mma.m16n8k16; g = lane / 4, t = lane % 4):
//   A 16x16 (4 regs of 2): a0 (row g, cols 2t..2t+1), a1 (row g+8, same cols),
//                          a2 (row g, cols 2t+8..2t+9), a3 (row g+8, cols 2t+8..2t+9)
//   B 16x8  (2 regs of 2): b0 (rows 2t..2t+1, col g), b1 (rows 2t+8..2t+9, col g)
//   C 16x8  (4 floats):    c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, same cols)
// So an accumulator tile of 16 rows x 16 columns (two C tiles) is, packed to 16 bits,
// exactly an A operand: P = softmax(S) feeds P V without leaving registers, and a row's
// values sit in the 4 lanes of a quad (reductions: two xor-shuffles).
//
// Every tile in shared memory is [rows][kD + 8] 16-bit elements: the 16-byte pad makes
// the 8 row addresses of each ldmatrix fall in 8 different bank groups.
//
// Warps own 16 rows: the forward and dQ kernels own query rows (S = Q K^T), the dK/dV
// kernel owns key rows and computes the transposed products (S^T = K Q^T), so that dV +=
// P^T dO and dK += dS^T Q also take their A operand from registers.
#pragma once

#include "attention_common.cuh"
#include "tensor_core_ptx.cuh"

namespace seqfuse {
namespace cuda {
namespace attn {
namespace tc {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // rows owned by a block (16 per warp)
constexpr float kLog2e = 1.4426950408889634f;

// ---- fragments from shared memory (tiles [rows][kLd]) ------------------------------------
// A operand: rows m0..m0+15, columns c0..c0+15 of a row-major tile.
template <int kLd>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* tile, int m0, int c0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (m0 + (lane & 15)) * kLd + c0 + (lane >> 4) * 8);
}

// B operands of two n-tiles (n0..n0+7 -> b[0], b[1]; n0+8..n0+15 -> b[2], b[3]) over the
// reduction columns c0..c0+15, for B[c][n] = tile[n][c] (keys stored by row: S = Q K^T).
template <int kLd>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const uint16_t* tile, int n0,
                                            int c0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * kLd + c0 + ((lane >> 3) & 1) * 8);
}

// B operands of two n-tiles for B[c][n] = tile[c][n] (the reduction runs down the rows:
// P V, dS K), reduction rows c0..c0+15, columns n0..n0+15.
template <int kLd>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const uint16_t* tile, int c0,
                                            int n0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b,
                    tile + (c0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + n0 + (lane >> 4) * 8);
}

// The A operand of columns 16 kk..16 kk+15 of a 16-row accumulator held as C tiles.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[N][4], int kk) {
  a[0] = Mma<T>::pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = Mma<T>::pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = Mma<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = Mma<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc[16 rows][kN] += A-tile (rows m0.., kK columns of `a_tile`) x B, B given by rows
// (load_b_rows) of `b_tile`: the S = Q K^T shaped products.
template <typename T, int kLd, int kK, int kN>
__device__ __forceinline__ void mma_rows(float (&acc)[kN / 8][4], const uint16_t* a_tile, int m0,
                                         const uint16_t* b_tile) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    load_a<kLd>(a, a_tile, m0, kk * 16);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t b[4];
      load_b_rows<kLd>(b, b_tile, nn * 16, kk * 16);
      Mma<T>::mma(acc[2 * nn], a, b[0], b[1]);
      Mma<T>::mma(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 rows][kN] += P (registers, 16 rows x kK) x B, B[c][n] = b_tile[c][n]: the
// P V shaped products.
template <typename T, int kLd, int kK, int kN>
__device__ __forceinline__ void mma_regs(float (&acc)[kN / 8][4], const float (&p)[kK / 8][4],
                                         const uint16_t* b_tile) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, p, kk);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t b[4];
      load_b_cols<kLd>(b, b_tile, kk * 16, nn * 16);
      Mma<T>::mma(acc[2 * nn], a, b[0], b[1]);
      Mma<T>::mma(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// ---- tiles between global and shared memory ---------------------------------------------

// tile[r][c] = src[r * ld + c] for r < rows, c < cols; zero elsewhere in [kR][kC] (zeros,
// not garbage: a padded row or column must contribute exactly 0 to every product).
template <int kR, int kC, int kLd>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* src, int rows, int cols,
                                          int64_t ld, bool vec) {
  if (vec) {
    constexpr int kChunks = kC / 8;
    for (int idx = threadIdx.x; idx < kR * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      uint16_t* d = tile + r * kLd + c;
      if (r < rows && c < cols)
        cp_async_16(d, src + r * ld + c);
      else
        *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < kR * kC; idx += kThreads) {
      const int r = idx / kC, c = idx % kC;
      tile[r * kLd + c] = r < rows && c < cols ? src[r * ld + c] : uint16_t(0);
    }
  }
}

// dst[r * ld + c] = tile[r][c] for r < rows, c < cols.
template <int kR, int kC, int kLd>
__device__ __forceinline__ void store_tile(uint16_t* dst, const uint16_t* tile, int rows, int cols,
                                           int64_t ld, bool vec) {
  if (vec) {
    constexpr int kChunks = kC / 8;
    for (int idx = threadIdx.x; idx < kR * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      if (r < rows && c < cols)
        *reinterpret_cast<uint4*>(dst + r * ld + c) =
            *reinterpret_cast<const uint4*>(tile + r * kLd + c);
    }
  } else {
    for (int idx = threadIdx.x; idx < kR * kC; idx += kThreads) {
      const int r = idx / kC, c = idx % kC;
      if (r < rows && c < cols) dst[r * ld + c] = tile[r * kLd + c];
    }
  }
}

// A warp's accumulator rows (16 x kN, C tiles) into tile rows m0..m0+15 as 16-bit values.
template <typename T, int kLd, int kN>
__device__ __forceinline__ void acc_to_tile(uint16_t* tile, int m0, const float (&c)[kN / 8][4],
                                            float scale) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
    *reinterpret_cast<uint32_t*>(tile + (m0 + g) * kLd + n * 8 + 2 * t) =
        Mma<T>::pack(c[n][0] * scale, c[n][1] * scale);
    *reinterpret_cast<uint32_t*>(tile + (m0 + g + 8) * kLd + n * 8 + 2 * t) =
        Mma<T>::pack(c[n][2] * scale, c[n][3] * scale);
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

extern __shared__ __align__(16) unsigned char tc_smem[];

// Keys per tile: 64, or 32 for the large head dims (registers: the output rows of a warp
// already take kD / 2 floats a thread).
template <int kD>
__host__ __device__ constexpr int keys_per_tile() {
  return kD >= 128 ? 32 : 64;
}

// ---- forward ------------------------------------------------------------------------------

template <int kD>
constexpr size_t fwd_smem_bytes() {
  return size_t(kRows + 4 * keys_per_tile<kD>()) * (kD + 8) * sizeof(uint16_t);  // Q, 2 x (K, V)
}

// One block per (64-query tile, b * h); writes out and lse (+inf for rows with no key).
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) sdpa_fwd_kernel(const SdpaArgs<T> p) {
  constexpr int kBc = keys_per_tile<kD>(), kLd = kD + 8;
  const auto m = p.mask.resolved();
  uint16_t* sQ = reinterpret_cast<uint16_t*>(tc_smem);
  auto sK = [&](int stage) { return sQ + (kRows + stage * kBc) * kLd; };
  auto sV = [&](int stage) { return sQ + (kRows + (2 + stage) * kBc) * kLd; };
  const auto* q = reinterpret_cast<const uint16_t*>(p.q);
  const auto* k = reinterpret_cast<const uint16_t*>(p.k);
  const auto* v = reinterpret_cast<const uint16_t*>(p.v);
  const int64_t Q = p.Q, K = p.K, D = p.D, Dv = p.Dv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t q_tiles = div_up(Q, kRows);
  const int64_t qt = q_tiles - 1 - blockIdx.x % q_tiles;  // causal: the longest rows first
  const int64_t bh = blockIdx.x / q_tiles, b = bh / p.H, h = bh % p.H, q0 = qt * kRows;
  const int q_rows = static_cast<int>(Q - q0 < kRows ? Q - q0 : kRows);

  // This thread's two rows (g and g + 8 of its warp's 16): ends, mask rows.
  int64_t row[2];
  int end[2];
  int64_t mrow[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row[i] = q0 + warp * 16 + g + 8 * i;
    end[i] = row[i] < Q ? m.row_end(b, h, row[i]) : 0;
    mrow[i] = m.mask_row(b, h, row[i]);
  }
  __shared__ int block_end;  // the keys any row of the block sees: [0, block_end)
  if (tid == 0) block_end = 0;
  __syncthreads();
  atomicMax(&block_end, end[0] > end[1] ? end[0] : end[1]);
  __syncthreads();
  const int kv_tiles = static_cast<int>(div_up(block_end, kBc));

  load_tile<kRows, kD, kLd>(sQ, q + (bh * Q + q0) * D, q_rows, D, D, p.vec_q);
  auto load_kv = [&](int tile, int stage) {
    const int64_t kv0 = int64_t(tile) * kBc;
    const int rows = static_cast<int>(K - kv0 < kBc ? K - kv0 : kBc);
    load_tile<kBc, kD, kLd>(sK(stage), k + (bh * K + kv0) * D, rows, D, D, p.vec_k);
    load_tile<kBc, kD, kLd>(sV(stage), v + (bh * K + kv0) * Dv, rows, Dv, Dv, p.vec_v);
  };
  if (kv_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  float o[kD / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  for (int j = 0; j < kv_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < kv_tiles) load_kv(j + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile j (and Q) landed; tile j + 1 may still be in flight
    __syncthreads();

    float s[kBc / 8][4] = {};
    mma_rows<T, kLd, kD, kBc>(s, sQ, warp * 16, sK(stage));

    // Online softmax of the thread's two rows; a row's 4 lanes share max and sum.
    const int kv0 = j * kBc;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kBc / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[n][2 * i + e];
          x = m.score(x, mrow[i], kv0 + n * 8 + 2 * t + e, end[i]);
          mx = fmaxf(mx, x);
        }
      const float m_new = fmaxf(row_max[i], quad_max(mx));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no key yet: all p are 0
      const float alpha = exp2f((row_max[i] - m_use) * kLog2e);
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kBc / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[n][2 * i + e];
          x = exp2f((x - m_use) * kLog2e);
          sum += x;
        }
      row_sum[i] = row_sum[i] * alpha + sum;  // this lane's share; the quad sums at the end
      row_max[i] = m_new;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        o[n][2 * i] *= alpha;
        o[n][2 * i + 1] *= alpha;
      }
      if (m.dropout()) {  // the sum above is of the undropped weights, as on the CPU
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[n][2 * i + e];
            if (x != 0.f) x = m.keep(bh, row[i], kv0 + n * 8 + 2 * t + e) ? x * m.keep_scale : 0.f;
          }
      }
    }
    mma_regs<T, kLd, kBc, kD>(o, s, sV(stage));
    __syncthreads();  // every warp is done with this stage before it is reloaded
  }
  cp_async_wait<0>();
  __syncthreads();

  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(row_sum[i]);
    inv[i] = l > 0.f ? 1.f / l : 0.f;  // a row with no key: zeros
    if (t == 0 && row[i] < Q) attn::store_row_stats(p.stats, bh * Q + row[i], row_max[i], l);
  }
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
    o[n][0] *= inv[0];
    o[n][1] *= inv[0];
    o[n][2] *= inv[1];
    o[n][3] *= inv[1];
  }
  acc_to_tile<T, kLd, kD>(sQ, warp * 16, o, 1.f);  // through shared memory: coalesced stores
  __syncthreads();
  auto* out = reinterpret_cast<uint16_t*>(p.out) + (bh * Q + q0) * Dv;
  store_tile<kRows, kD, kLd>(out, sQ, q_rows, Dv, Dv, p.vec_out);
}

// ---- backward -----------------------------------------------------------------------------
// Both kernels recompute P = exp(scale * q.k + mask - lse) from the forward's log-sum-exp
// and dP = dO V^T, then dS = P * (dP' - delta) with dP' = dP * keep / (1 - p) under
// dropout (delta = rowsum(dO * O)). No atomics: the dK/dV kernel owns a key tile and
// loops over the query tiles, the dQ kernel owns a query tile and loops over the keys.

// Query rows per tile of the dK/dV kernel (registers: S^T and dP^T take kBr / 2 floats a
// thread beside dK and dV's kD).
template <int kD>
__host__ __device__ constexpr int dkdv_queries_per_tile() {
  return kD >= 128 ? 32 : 64;
}

template <int kD>
constexpr size_t dkdv_smem_bytes() {
  constexpr int kBr = dkdv_queries_per_tile<kD>();
  // K, V; 2 x (Q, dO); 2 x (lse, delta, end)
  return size_t(2 * kRows + 4 * kBr) * (kD + 8) * sizeof(uint16_t) +
         2 * kBr * (2 * sizeof(float) + sizeof(int));
}

// One block per (64-key tile, b * h): dK and dV of those keys, over the query tiles that
// see any of them (tiles no row of which reaches the keys are skipped: causal, lengths).
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) sdpa_bwd_dkdv_kernel(const SdpaArgs<T> p) {
  constexpr int kBc = kRows, kBr = dkdv_queries_per_tile<kD>(), kLd = kD + 8;
  const auto m = p.mask.resolved();
  uint16_t* sK = reinterpret_cast<uint16_t*>(tc_smem);
  uint16_t* sV = sK + kBc * kLd;
  auto sQ = [&](int stage) { return sK + (2 * kBc + stage * kBr) * kLd; };
  auto sdO = [&](int stage) { return sK + (2 * kBc + (2 + stage) * kBr) * kLd; };
  float* sLse = reinterpret_cast<float*>(sK + (2 * kBc + 4 * kBr) * kLd);  // [2][kBr]
  float* sDelta = sLse + 2 * kBr;                                         // [2][kBr]
  int* sEnd = reinterpret_cast<int*>(sDelta + 2 * kBr);                   // [2][kBr]
  const auto* q = reinterpret_cast<const uint16_t*>(p.q);
  const auto* k = reinterpret_cast<const uint16_t*>(p.k);
  const auto* v = reinterpret_cast<const uint16_t*>(p.v);
  const auto* dout = reinterpret_cast<const uint16_t*>(p.dout);
  const int64_t Q = p.Q, K = p.K, D = p.D, Dv = p.Dv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t k_tiles = div_up(K, kBc);
  const int64_t bh = blockIdx.x / k_tiles, b = bh / p.H, h = bh % p.H;
  const int k0 = static_cast<int>((blockIdx.x % k_tiles) * kBc);
  const int k_rows = static_cast<int>(K - k0 < kBc ? K - k0 : kBc);
  const int64_t q_tiles = div_up(Q, kBr);

  load_tile<kBc, kD, kLd>(sK, k + (bh * K + k0) * D, k_rows, D, D, p.vec_k);
  load_tile<kBc, kD, kLd>(sV, v + (bh * K + k0) * Dv, k_rows, Dv, Dv, p.vec_v);

  // The first query tile at or after `qt` with a row that reaches key k0 (block-uniform).
  auto next_live = [&](int64_t qt) {
    for (; qt < q_tiles; ++qt) {
      const int64_t r = qt * kBr + tid;
      if (__syncthreads_or(tid < kBr && r < Q && m.row_end(b, h, r) > k0)) break;
    }
    return qt;
  };
  auto load_q = [&](int64_t qt, int stage) {
    const int64_t i0 = qt * kBr;
    const int rows = static_cast<int>(Q - i0 < kBr ? Q - i0 : kBr);
    load_tile<kBr, kD, kLd>(sQ(stage), q + (bh * Q + i0) * D, rows, D, D, p.vec_q);
    load_tile<kBr, kD, kLd>(sdO(stage), dout + (bh * Q + i0) * Dv, rows, Dv, Dv, p.vec_dout);
    if (tid < kBr) {
      const int64_t r = i0 + tid;
      sLse[stage * kBr + tid] = r < Q ? attn::row_lse(p.stats_in, bh * Q + r) : INFINITY;
      sDelta[stage * kBr + tid] = r < Q ? p.delta[bh * Q + r] : 0.f;
      sEnd[stage * kBr + tid] = r < Q ? m.row_end(b, h, r) : 0;
    }
  };

  float dk[kD / 8][4] = {}, dv[kD / 8][4] = {};
  int64_t qt = next_live(0);
  int stage = 0;
  if (qt < q_tiles) load_q(qt, 0);
  cp_async_commit();
  while (qt < q_tiles) {
    const int64_t next = next_live(qt + 1);
    if (next < q_tiles) load_q(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint16_t* q_s = sQ(stage);
    const uint16_t* do_s = sdO(stage);
    const float* lse_s = sLse + stage * kBr;
    const float* delta_s = sDelta + stage * kBr;
    const int* end_s = sEnd + stage * kBr;
    const int64_t i0 = qt * kBr;
    float s[kBr / 8][4] = {}, dp[kBr / 8][4] = {};
    mma_rows<T, kLd, kD, kBr>(s, sK, warp * 16, q_s);    // S^T = K Q^T
    mma_rows<T, kLd, kD, kBr>(dp, sV, warp * 16, do_s);  // dP^T = V dO^T
#pragma unroll
    for (int n = 0; n < kBr / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + warp * 16 + g + 8 * (e >> 1);
        const int ql = n * 8 + 2 * t + (e & 1);
        const int64_t qr = i0 + ql;
        const float x = m.score(s[n][e], m.mask_row(b, h, qr), key, end_s[ql]);
        const float pr = exp2f((x - lse_s[ql]) * kLog2e);  // lse = +inf (no key): 0
        float pd = pr, dpv = dp[n][e];
        if (m.dropout() && pr != 0.f) {
          const bool keep = m.keep(bh, qr, key);
          pd = keep ? pr * m.keep_scale : 0.f;
          dpv = keep ? dpv * m.keep_scale : 0.f;
        }
        s[n][e] = pd;                           // P^T (dropped) for dV
        dp[n][e] = pr * (dpv - delta_s[ql]);    // dS^T for dK
      }
    mma_regs<T, kLd, kBr, kD>(dv, s, do_s);  // dV += P^T dO
    mma_regs<T, kLd, kBr, kD>(dk, dp, q_s);  // dK += dS^T Q
    __syncthreads();
    qt = next;
    stage ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();
  acc_to_tile<T, kLd, kD>(sK, warp * 16, dk, static_cast<float>(m.scale));
  acc_to_tile<T, kLd, kD>(sV, warp * 16, dv, 1.f);
  __syncthreads();
  store_tile<kBc, kD, kLd>(reinterpret_cast<uint16_t*>(p.dk) + (bh * K + k0) * D, sK, k_rows, D, D,
                           p.vec_dk);
  store_tile<kBc, kD, kLd>(reinterpret_cast<uint16_t*>(p.dv) + (bh * K + k0) * Dv, sV, k_rows, Dv,
                           Dv, p.vec_dv);
}

template <int kD>
constexpr size_t dq_smem_bytes() {
  // Q, dO, 2 x (K, V)
  return size_t(2 * kRows + 4 * keys_per_tile<kD>()) * (kD + 8) * sizeof(uint16_t);
}

// One block per (64-query tile, b * h): dQ of those rows, over the keys they see.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) sdpa_bwd_dq_kernel(const SdpaArgs<T> p) {
  constexpr int kBc = keys_per_tile<kD>(), kLd = kD + 8;
  const auto m = p.mask.resolved();
  uint16_t* sQ = reinterpret_cast<uint16_t*>(tc_smem);
  uint16_t* sdO = sQ + kRows * kLd;
  auto sK = [&](int stage) { return sQ + (2 * kRows + stage * kBc) * kLd; };
  auto sV = [&](int stage) { return sQ + (2 * kRows + (2 + stage) * kBc) * kLd; };
  const auto* q = reinterpret_cast<const uint16_t*>(p.q);
  const auto* k = reinterpret_cast<const uint16_t*>(p.k);
  const auto* v = reinterpret_cast<const uint16_t*>(p.v);
  const auto* dout = reinterpret_cast<const uint16_t*>(p.dout);
  const int64_t Q = p.Q, K = p.K, D = p.D, Dv = p.Dv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t q_tiles = div_up(Q, kRows);
  const int64_t qt = q_tiles - 1 - blockIdx.x % q_tiles;
  const int64_t bh = blockIdx.x / q_tiles, b = bh / p.H, h = bh % p.H, q0 = qt * kRows;
  const int q_rows = static_cast<int>(Q - q0 < kRows ? Q - q0 : kRows);

  int64_t row[2];
  int end[2];
  int64_t mrow[2];
  float lse[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row[i] = q0 + warp * 16 + g + 8 * i;
    const bool in = row[i] < Q;
    end[i] = in ? m.row_end(b, h, row[i]) : 0;
    mrow[i] = m.mask_row(b, h, row[i]);
    lse[i] = in ? attn::row_lse(p.stats_in, bh * Q + row[i]) : INFINITY;
    delta[i] = in ? p.delta[bh * Q + row[i]] : 0.f;
  }
  __shared__ int block_end;
  if (tid == 0) block_end = 0;
  __syncthreads();
  atomicMax(&block_end, end[0] > end[1] ? end[0] : end[1]);
  __syncthreads();
  const int kv_tiles = static_cast<int>(div_up(block_end, kBc));

  load_tile<kRows, kD, kLd>(sQ, q + (bh * Q + q0) * D, q_rows, D, D, p.vec_q);
  load_tile<kRows, kD, kLd>(sdO, dout + (bh * Q + q0) * Dv, q_rows, Dv, Dv, p.vec_dout);
  auto load_kv = [&](int tile, int stage) {
    const int64_t kv0 = int64_t(tile) * kBc;
    const int rows = static_cast<int>(K - kv0 < kBc ? K - kv0 : kBc);
    load_tile<kBc, kD, kLd>(sK(stage), k + (bh * K + kv0) * D, rows, D, D, p.vec_k);
    load_tile<kBc, kD, kLd>(sV(stage), v + (bh * K + kv0) * Dv, rows, Dv, Dv, p.vec_v);
  };
  if (kv_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  float dq[kD / 8][4] = {};
  for (int j = 0; j < kv_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < kv_tiles) load_kv(j + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float s[kBc / 8][4] = {}, dp[kBc / 8][4] = {};
    mma_rows<T, kLd, kD, kBc>(s, sQ, warp * 16, sK(stage));    // S = Q K^T
    mma_rows<T, kLd, kD, kBc>(dp, sdO, warp * 16, sV(stage));  // dP = dO V^T
    const int kv0 = j * kBc;
#pragma unroll
    for (int n = 0; n < kBc / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, key = kv0 + n * 8 + 2 * t + (e & 1);
        const float x = m.score(s[n][e], mrow[i], key, end[i]);
        const float pr = exp2f((x - lse[i]) * kLog2e);
        float dpv = dp[n][e];
        if (m.dropout() && pr != 0.f) dpv = m.keep(bh, row[i], key) ? dpv * m.keep_scale : 0.f;
        s[n][e] = pr * (dpv - delta[i]);  // dS
      }
    mma_regs<T, kLd, kBc, kD>(dq, s, sK(stage));  // dQ += dS K
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  acc_to_tile<T, kLd, kD>(sQ, warp * 16, dq, static_cast<float>(m.scale));
  __syncthreads();
  auto* dq_out = reinterpret_cast<uint16_t*>(p.dq) + (bh * Q + q0) * D;
  store_tile<kRows, kD, kLd>(dq_out, sQ, q_rows, D, D, p.vec_dq);
}

}  // namespace tc
}  // namespace attn
}  // namespace cuda
}  // namespace seqfuse
