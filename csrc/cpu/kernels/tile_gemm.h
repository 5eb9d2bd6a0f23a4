// Register-blocked tile products for the fused recurrences.
//
// A recurrent step is a small GEMM (active rows x K times K x gate columns) followed by
// pointwise cell math. Calling a BLAS per step pays a call, a thread fork and a trip of
// the result through memory for every step; here the product for MR rows and four
// vectors of columns accumulates in MR*4 vector registers, and the caller's epilogue
// turns those registers straight into gates, cell and hidden state. Four vectors are
// one vector of units for each of the four LSTM gates (or one block of 4 vectors of
// units in the backward), so the epilogue has every gate of a unit at hand.
//
// Each A row has its own pointer: at a given step the active rows of a batch sit at
// different time positions (reverse direction, per-row lengths), and gathering them
// into a contiguous block would cost a copy per step.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(SEQFUSE_AVX512_BF16)
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#endif

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/kernels/ is compiled once per capability, with CPU_CAPABILITY set (kernels.h)"
#endif

namespace seqfuse {
inline namespace CPU_CAPABILITY {  // one copy per capability (kernels.h)

using at::vec::Vectorized;

// Rows per register tile: MR * 4 accumulators + 4 weight vectors must fit the vector
// registers: 6 rows (24 + 4 + 1 of 32) on AVX-512; 3 on AVX2 and DEFAULT, whose 16
// registers 6 rows overflowed (24 accumulators: the tiles spilled every k, and AVX2 ran
// at 2.7x AVX-512's time, where its half-width vectors alone explain 2x at most).
constexpr int kTileRows = Vectorized<float>::size() == 16 ? 6 : 3;

// NQ vectors per row: 4 for the LSTM's gates, 3 for the GRU's, 4 blocks of units in
// the backward.
template <typename scalar_t, int MR, int NQ = 4>
struct TileAcc {
  Vectorized<scalar_t> v[MR][NQ];
  C10_ALWAYS_INLINE void zero() {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q) v[r][q] = Vectorized<scalar_t>(scalar_t(0));
  }
};

// Accumulator of panel column block q: q itself, or, with kLastToEnd, the last block goes
// to the tile's last accumulator. The fused GRU keeps 4 accumulators per row (r, z, x_n,
// h_n) for 3-block panels: the input product fills r, z, x_n and the recurrent one r, z,
// h_n, since n = tanh(x_n + r * h_n) needs the two apart.
template <int NQ, int NA, bool kLastToEnd>
constexpr int acc_slot(int q) { return kLastToEnd && q == NQ - 1 ? NA - 1 : q; }

// acc[r][slot(q)] += sum_k a[r][a_off + k] * b[k * ldb + q * V + (0..V)]  for k in [0, K).
// kFull: all NQ*V columns are valid; otherwise only the first `cols` are loaded (the
// rest read as zero), for panels at the ragged end of a weight matrix.
template <typename scalar_t, int MR, bool kFull, int NQ, int NA = NQ, bool kLastToEnd = false>
C10_ALWAYS_INLINE void tile_fma(TileAcc<scalar_t, MR, NA>& acc, const scalar_t* const* a,
                                int64_t a_off, const scalar_t* b, int64_t ldb, int64_t K,
                                int64_t cols) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  const scalar_t* ar[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ar[r] = a[r] + a_off;
  int64_t cnt[NQ];
#pragma GCC unroll 4
  for (int q = 0; q < NQ; ++q) cnt[q] = std::clamp<int64_t>(cols - q * V, 0, V);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* bk = b + k * ldb;
    Vec w[NQ];
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q)
      w[q] = kFull ? Vec::loadu(bk + q * V) : Vec::loadu(bk + q * V, cnt[q]);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec x(ar[r][k]);
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q) {
        auto& c = acc.v[r][acc_slot<NQ, NA, kLastToEnd>(q)];
        c = at::vec::fmadd(x, w[q], c);
      }
    }
  }
}

#if defined(SEQFUSE_AVX512_BF16)
// bfloat16 operands, float32 accumulators (AVX512-BF16): vdpbf16ps adds the products of
// two consecutive k to each float lane, so one instruction does the work of two FMAs and
// the weights take half the bytes. Panel layout [ceil(K/2)][NQ * 16 units][2]: one
// 512-bit load is 16 units x a pair of k. A rows are bfloat16; a pair of k is broadcast
// as one 32-bit lane. An odd K ends with a half pair (the panel's pad is zero).
constexpr bool kHaveBf16Dot = true;

template <int MR, int NQ, int NA = NQ, bool kLastToEnd = false>
C10_ALWAYS_INLINE void tile_dot_bf16(TileAcc<float, MR, NA>& acc, const c10::BFloat16* const* a,
                                     const c10::BFloat16* b, int64_t K) {
  const int64_t K2 = K / 2;
  __m512 c[MR][NQ];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) c[r][q] = acc.v[r][acc_slot<NQ, NA, kLastToEnd>(q)];
  auto step = [&](int64_t k2, const uint32_t* pair) C10_ALWAYS_INLINE_ATTRIBUTE {
    __m512bh w[NQ];
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) w[q] = (__m512bh)_mm512_loadu_si512(b + (k2 * NQ + q) * 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair[r]));
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q) c[r][q] = _mm512_dpbf16_ps(c[r][q], x, w[q]);
    }
  };
  uint32_t pair[MR];
  for (int64_t k2 = 0; k2 < K2; ++k2) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) std::memcpy(&pair[r], a[r] + 2 * k2, 4);
    step(k2, pair);
  }
  if (K & 1) {
    for (int r = 0; r < MR; ++r) {
      uint16_t lo;
      std::memcpy(&lo, a[r] + K - 1, 2);
      pair[r] = lo;  // upper half zero: the missing k contributes nothing
    }
    step(K2, pair);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) acc.v[r][acc_slot<NQ, NA, kLastToEnd>(q)] = c[r][q];
}

// 16 floats -> 16 bfloat16 (round to nearest even).
C10_ALWAYS_INLINE void store_bf16(c10::BFloat16* dst, const Vectorized<float>& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}
#else
constexpr bool kHaveBf16Dot = false;
#endif

// Calls f(std::integral_constant<int, MR>) for the row counts 1..kTileRows, so a tile
// loop can hand its ragged last block to a kernel instantiated for exactly that many rows.
template <typename F>
C10_ALWAYS_INLINE void with_tile_rows(int64_t rows, F&& f) {
  if constexpr (kTileRows == 3) {
    switch (rows) {
      case 1: f(std::integral_constant<int, 1>{}); break;
      case 2: f(std::integral_constant<int, 2>{}); break;
      default: f(std::integral_constant<int, 3>{}); break;
    }
  } else {
    switch (rows) {
      case 1: f(std::integral_constant<int, 1>{}); break;
      case 2: f(std::integral_constant<int, 2>{}); break;
      case 3: f(std::integral_constant<int, 3>{}); break;
      case 4: f(std::integral_constant<int, 4>{}); break;
      case 5: f(std::integral_constant<int, 5>{}); break;
      default: f(std::integral_constant<int, 6>{}); break;
    }
  }
}
static_assert(kTileRows == 6 || kTileRows == 3, "with_tile_rows covers 1..kTileRows rows");

// C[M x N] = (or +=, with accumulate) A[M x Kd] * B[Kd x N], all row-major with leading
// dimensions lda, ldb, ldc: the attention kernels' block products (scores of a block of
// query rows against a packed block of keys, weights times values, and the backward's
// products), small enough to stay in cache, so a BLAS call would cost more than it saves.
// Tiles of kTileRows x 4 vectors; a ragged right edge uses masked loads and stores.
template <typename scalar_t>
void small_gemm(int64_t M, int64_t N, int64_t Kd, const scalar_t* A, int64_t lda,
                const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc, bool accumulate) {
  using Vec = Vectorized<scalar_t>;
  constexpr int NQ = 4;
  constexpr int64_t V = Vec::size(), NB = NQ * V;
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
    with_tile_rows(std::min<int64_t>(kTileRows, M - m0), [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      const scalar_t* a[MR];
      scalar_t* c[MR];
      for (int r = 0; r < MR; ++r) {
        a[r] = A + (m0 + r) * lda;
        c[r] = C + (m0 + r) * ldc;
      }
      for (int64_t n0 = 0; n0 < N; n0 += NB) {
        const int64_t cols = std::min(NB, N - n0);
        int64_t cnt[NQ];
        for (int q = 0; q < NQ; ++q) cnt[q] = std::clamp<int64_t>(cols - q * V, 0, V);
        TileAcc<scalar_t, MR, NQ> acc;
        if (accumulate) {
          for (int r = 0; r < MR; ++r)
            for (int q = 0; q < NQ; ++q) acc.v[r][q] = Vec::loadu(c[r] + n0 + q * V, cnt[q]);
        } else {
          acc.zero();
        }
        if (cols == NB)
          tile_fma<scalar_t, MR, true, NQ>(acc, a, 0, B + n0, ldb, Kd, cols);
        else
          tile_fma<scalar_t, MR, false, NQ>(acc, a, 0, B + n0, ldb, Kd, cols);
        for (int r = 0; r < MR; ++r)
          for (int q = 0; q < NQ; ++q) {
            if (cnt[q] == V)
              acc.v[r][q].store(c[r] + n0 + q * V);
            else if (cnt[q] > 0)
              acc.v[r][q].store(c[r] + n0 + q * V, cnt[q]);
          }
      }
    });
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace seqfuse
