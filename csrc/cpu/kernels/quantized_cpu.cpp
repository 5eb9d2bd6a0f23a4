// int8 dynamically quantised LSTM and GRU layers for inference (seqfuse.quantize_dynamic).
//
// Weights: int8, one symmetric scale per output row (gate unit), quantised once in Python.
// Activations: quantised here, per row and per step, symmetrically to int8 (scale =
// max|row| / 127), then offset by 128 to uint8, because the int8 dot product instructions
// multiply an unsigned by a signed byte; sum_k (q + 128) w = sum_k q w + 128 sum_k w, so
// each unit's 128 * sum_k w is subtracted again. int32 sums are exact; they become float32
// as sum * row scale * unit scale.
//
// Layout: the weights are repacked per call into panels [unit block][k/4][gate][16 units]
// [4 k] (kUnits = 16 units per block, k padded to a multiple of 4 with zero weights), so
// that for one unit block a step's product yields every gate of its 16 units, and the
// cell's epilogue runs on them directly, as the float32 engine's panels do. AVX512-VNNI
// (the AVX512_BF16 capability: every CPU with AVX512-BF16 has it) multiplies 64 bytes of
// weights by a broadcast 4-byte group of a row per vpdpbusd; other capabilities sum in
// int32 with plain loops (correct everywhere, fast only with VNNI).
//
// Order of work per call: the input side of every step first (one product over all T * B
// rows, into float32 pre-activations with b_ih, or the LSTM's b_ih + b_hh), then the steps.
// Threads split each direction's unit blocks and meet once a step, inside one parallel
// region (run_team_tasks, team_tasks.h: a late thread's part is taken over).
#include "../../quantized.h"
#include "../kernels.h"
#include "../fork_safety.h"
#include "../recurrence.h"
#include "fast_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

namespace seqfuse {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability
namespace {

constexpr int64_t kUnits = 16;  // units per panel block (one 512-bit vector of int32 sums)
constexpr int kRows = 4;        // rows per register tile: 4 rows x 4 gates of 32 registers

int64_t round4(int64_t k) { return (k + 3) / 4 * 4; }

// Packed int8 weights of one direction and their per-unit constants.
struct Panels {
  int64_t K = 0, Kp = 0, NG = 0, H = 0, n_ub = 0;
  std::vector<int8_t> w;        // [n_ub][Kp/4][NG][kUnits][4]
  std::vector<int32_t> colsum;  // [n_ub][NG][kUnits]: 128 * sum_k w
  std::vector<float> scale;     // [n_ub][NG][kUnits]: the unit's weight scale (0 past H)

  Panels(const int8_t* wsrc, const float* ssrc, int64_t NG_, int64_t H_, int64_t K_)
      : K(K_), Kp(round4(K_)), NG(NG_), H(H_), n_ub((H_ + kUnits - 1) / kUnits) {
    w.assign(n_ub * Kp * NG * kUnits, 0);
    colsum.assign(n_ub * NG * kUnits, 0);
    scale.assign(n_ub * NG * kUnits, 0.0f);
    for (int64_t ub = 0; ub < n_ub; ++ub)
      for (int64_t q = 0; q < NG; ++q)
        for (int64_t u = 0; u < kUnits; ++u) {
          const int64_t j = ub * kUnits + u;
          if (j >= H) continue;
          const int8_t* row = wsrc + (q * H + j) * K;
          int32_t sum = 0;
          for (int64_t k = 0; k < K; ++k) {
            w[(((ub * (Kp / 4) + k / 4) * NG + q) * kUnits + u) * 4 + k % 4] = row[k];
            sum += row[k];
          }
          colsum[(ub * NG + q) * kUnits + u] = 128 * sum;
          scale[(ub * NG + q) * kUnits + u] = ssrc[q * H + j];
        }
  }
  const int8_t* block(int64_t ub) const { return w.data() + ub * (Kp / 4) * NG * kUnits * 4; }
};

// Rows of float32 activations to uint8 (q + 128, q = round-half-even(x * (1 / s)) clamped
// to [-127, 127], s = max|x| / 127, 1 for an all-zero row), K padded to Kp with 128 (q = 0;
// the padded weights are zero anyway). Vectorised: a step quantises B x H values, and a
// scalar nearbyint per value cost more than the step's products.
void quantize_row(const float* x, int64_t K, int64_t Kp, uint8_t* q, float* s) {
  using Vec = Vectorized<float>;
  constexpr int64_t V = Vec::size();
  Vec vmax(0.0f);
  for (int64_t k = 0; k < K; k += V) vmax = at::vec::maximum(vmax, Vec::loadu(x + k, std::min(V, K - k)).abs());
  float lanes[V];
  vmax.store(lanes);
  const float amax = *std::max_element(lanes, lanes + V);
  const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  const Vec inv(1.0f / scale), lo(-127.0f), hi(127.0f);
  for (int64_t k = 0; k < K; k += V) {
    const int64_t cnt = std::min(V, K - k);
    at::vec::clamp(Vec::loadu(x + k, cnt) * inv, lo, hi).round().store(lanes, cnt);
    for (int64_t j = 0; j < cnt; ++j) q[k + j] = static_cast<uint8_t>(static_cast<int>(lanes[j]) + 128);
  }
  std::fill(q + K, q + Kp, uint8_t(128));
  *s = scale;
}

// acc[r][q][u] = sum_k a[r][k] * w[k][q][u] (int32) for MR rows of a (row pointers) and one
// unit block's panel of NG gates. Both are template parameters: with a run-time gate count
// the loops stayed rolled and the 16 accumulators lived on the stack (a load and a store
// around every vpdpbusd: 36% of a layer's samples in this function).
template <int MR, int NG>
C10_ALWAYS_INLINE void block_product(const uint8_t* const* a, const int8_t* panel, int64_t Kp, int32_t* acc) {
#if defined(__AVX512VNNI__)
  __m512i c[MR][NG];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NG; ++q) c[r][q] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < Kp / 4; ++k4) {
    const int8_t* p = panel + k4 * NG * kUnits * 4;
    __m512i w[NG];
#pragma GCC unroll 4
    for (int q = 0; q < NG; ++q) w[q] = _mm512_loadu_si512(p + q * kUnits * 4);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t group;
      std::memcpy(&group, a[r] + 4 * k4, 4);
      const __m512i x = _mm512_set1_epi32(group);
#pragma GCC unroll 4
      for (int q = 0; q < NG; ++q) c[r][q] = _mm512_dpbusd_epi32(c[r][q], x, w[q]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NG; ++q) _mm512_storeu_si512(acc + (r * NG + q) * kUnits, c[r][q]);
#else
  std::fill(acc, acc + MR * NG * kUnits, 0);
  for (int64_t k4 = 0; k4 < Kp / 4; ++k4) {
    const int8_t* p = panel + k4 * NG * kUnits * 4;
    for (int r = 0; r < MR; ++r) {
      const uint8_t* x = a[r] + 4 * k4;
      for (int q = 0; q < NG; ++q)
        for (int64_t u = 0; u < kUnits; ++u) {
          const int8_t* wq = p + (q * kUnits + u) * 4;
          acc[(r * NG + q) * kUnits + u] += x[0] * wq[0] + x[1] * wq[1] + x[2] * wq[2] + x[3] * wq[3];
        }
    }
  }
#endif
}

// block_product for the layer's gate count (4 LSTM, 3 GRU).
template <int MR>
void block_product(const uint8_t* const* a, const int8_t* panel, int64_t Kp, int NG, int32_t* acc) {
  if (NG == 4) block_product<MR, 4>(a, panel, Kp, acc);
  else block_product<MR, 3>(a, panel, Kp, acc);
}

// Calls f(MR) for a block of `rows` <= kRows rows.
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// pre[r][q * H + j] = (acc - colsum) * row scale * unit scale (+ bias) for the block's units.
void dequantize(const int32_t* acc, const Panels& P, int64_t ub, const float* row_scale, int MR,
                const float* bias, float* const* pre) {
  const int64_t j0 = ub * kUnits, m = std::min(kUnits, P.H - j0);
  for (int r = 0; r < MR; ++r)
    for (int64_t q = 0; q < P.NG; ++q) {
      const int32_t* a = acc + (r * P.NG + q) * kUnits;
      const int32_t* cs = P.colsum.data() + (ub * P.NG + q) * kUnits;
      const float* sc = P.scale.data() + (ub * P.NG + q) * kUnits;
      float* out = pre[r] + q * P.H + j0;
      for (int64_t u = 0; u < m; ++u)
        out[u] = static_cast<float>(a[u] - cs[u]) * row_scale[r] * sc[u] +
                 (bias ? bias[q * P.H + j0 + u] : 0.0f);
    }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantized_rnn_layer_cpu(
    c10::string_view mode, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& scale_ih, const at::Tensor& weight_hh, const at::Tensor& scale_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    const std::optional<at::Tensor>& lengths_arg) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_quantized_rnn_layer_args(mode, input, weight_ih, scale_ih, weight_hh, scale_hh, bias_ih,
                                 bias_hh, hx, cx, lengths);
  const bool lstm = mode == "lstm";
  const int64_t NG = lstm ? 4 : 3;
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2), G = NG * H;
  const at::TensorOptions opts = input.options();
  const SeqOrder order(lengths, T, B);
  const bool padded = order.max_len < T || (B > 0 && order.slot_len[B - 1] < T);
  at::Tensor output = padded ? at::zeros({T, B, D * H}, opts) : at::empty({T, B, D * H}, opts);
  at::Tensor h_n = at::empty({D, B, H}, opts);
  at::Tensor c_n = lstm ? at::empty({D, B, H}, opts) : at::empty({0}, opts);
  if (T == 0 || B == 0) {
    h_n.copy_(hx);
    if (lstm) c_n.copy_(*cx);
    return {output, h_n, c_n};
  }
  const at::Tensor x = input.contiguous(), wi = weight_ih.contiguous(), wh = weight_hh.contiguous();
  const at::Tensor si = scale_ih.contiguous(), sh = scale_hh.contiguous();
  const at::Tensor bi = bias_ih.has_value() ? bias_ih->contiguous() : at::Tensor();
  const at::Tensor bh = bias_hh.has_value() ? bias_hh->contiguous() : at::Tensor();
  const at::Tensor h0 = hx.contiguous(), c0 = lstm ? cx->contiguous() : at::Tensor();

  std::vector<Panels> pi, ph;
  for (int64_t d = 0; d < D; ++d) {
    pi.emplace_back(wi.data_ptr<int8_t>() + d * G * I, si.data_ptr<float>() + d * G, NG, H, I);
    ph.emplace_back(wh.data_ptr<int8_t>() + d * G * H, sh.data_ptr<float>() + d * G, NG, H, H);
  }

  // The input rows, quantised once (every part reads all of them).
  const int64_t Ip = round4(I), Hp = round4(H), rows = T * B;
  std::vector<uint8_t> xq(rows * Ip);
  std::vector<float> xs(rows);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * I, I, Ip, xq.data() + r * Ip, &xs[r]);
  });

  // State per direction, in slot order: h double-buffered (a step reads s's h while its
  // partners write s + 1's), c in place (each unit is one part's).
  std::vector<float> h(D * 2 * B * H), c(lstm ? D * B * H : 0);
  const float* h0p = h0.data_ptr<float>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t slot = 0; slot < B; ++slot) {
      const int64_t b = order.slot_batch[slot];
      std::copy_n(h0p + (d * B + b) * H, H, h.data() + (d * 2 * B + slot) * H);
      if (lstm) std::copy_n(c0.data_ptr<float>() + (d * B + b) * H, H, c.data() + (d * B + slot) * H);
    }

  // Parts: each direction's unit blocks split among the threads (one thread on a busy
  // machine, team_tasks.h). Task 0 of a part is the input side of its units for every
  // step, pre_x[t * B + b][d][G]; task 1 + s is step s, after every part of its direction
  // has done step s - 1. Each part quantises the running rows' h itself (B x H values,
  // less than its share of the products), so a step needs no second meeting.
  const int64_t n_ub = pi[0].n_ub;
  const int64_t threads = team_solo() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_dir = std::clamp<int64_t>(threads / D, 1, n_ub), n_parts = D * per_dir;
  // Written before read: no zero-fill (pre_x alone is 8 MB at B32 T64 H256).
  const at::Tensor pre_x_buf = at::empty({rows * D * G}, opts);
  float* pre_x = pre_x_buf.data_ptr<float>();
  std::vector<float> pre_h(n_parts * B * G);
  std::vector<uint8_t> hq(n_parts * B * Hp);
  std::vector<float> hs(n_parts * B);
  float* out = output.data_ptr<float>();
  const float* bhp = bh.defined() ? bh.data_ptr<float>() : nullptr;  // GRU only: inside r * (.)
  using Vec = Vectorized<float>;
  constexpr int64_t V = Vec::size();
  const auto sync = [](int64_t t) { return t == 0 ? Sync::kOwn : Sync::kDirection; };
  run_team_tasks(n_parts, per_dir, 1 + order.max_len, sync, [&](int64_t p, int64_t t) {
    const int64_t d = p / per_dir, k = p % per_dir;
    const int64_t ub0 = k * n_ub / per_dir, ub1 = (k + 1) * n_ub / per_dir;
    std::vector<int32_t> acc(kRows * NG * kUnits);
    if (t == 0) {
      for (int64_t ub = ub0; ub < ub1; ++ub)
        for (int64_t r0 = 0; r0 < rows; r0 += kRows)
          with_rows(std::min<int64_t>(kRows, rows - r0), [&](auto cst) {
            constexpr int MR = decltype(cst)::value;
            const uint8_t* a[MR];
            float* pre[MR];
            for (int r = 0; r < MR; ++r)
              a[r] = xq.data() + (r0 + r) * Ip, pre[r] = pre_x + ((r0 + r) * D + d) * G;
            block_product<MR>(a, pi[d].block(ub), Ip, static_cast<int>(NG), acc.data());
            dequantize(acc.data(), pi[d], ub, xs.data() + r0, MR,
                       bi.defined() ? bi.data_ptr<float>() + d * G : nullptr, pre);
          });
      return;
    }
    const int64_t s = t - 1, n = order.active_at(s);
    uint8_t* hqp = hq.data() + p * B * Hp;
    float* hsp = hs.data() + p * B;
    float* prep = pre_h.data() + p * B * G;
    for (int64_t slot = 0; slot < n; ++slot)
      quantize_row(h.data() + ((d * 2 + s % 2) * B + slot) * H, H, Hp, hqp + slot * Hp, hsp + slot);
    for (int64_t ub = ub0; ub < ub1; ++ub) {
      const int64_t j0 = ub * kUnits, m = std::min(kUnits, H - j0);
      for (int64_t r0 = 0; r0 < n; r0 += kRows) {
        const int64_t mr = std::min<int64_t>(kRows, n - r0);
        with_rows(mr, [&](auto cst) {
          constexpr int MR = decltype(cst)::value;
          const uint8_t* a[MR];
          float* pre[MR];
          for (int r = 0; r < MR; ++r) a[r] = hqp + (r0 + r) * Hp, pre[r] = prep + (r0 + r) * G;
          block_product<MR>(a, ph[d].block(ub), Hp, static_cast<int>(NG), acc.data());
          dequantize(acc.data(), ph[d], ub, hsp + r0, MR, lstm || !bhp ? nullptr : bhp + d * G, pre);
        });
        // The cell on the block's units, for each of the tile's rows.
        for (int64_t slot = r0; slot < r0 + mr; ++slot) {
          const int64_t b = order.slot_batch[slot], tt = SeqOrder::time_of(d, s, order.slot_len[slot]);
          const float* px = pre_x + ((tt * B + b) * D + d) * G;
          const float* phh = prep + slot * G;
          const float* hc = h.data() + ((d * 2 + s % 2) * B + slot) * H;
          float* hn = h.data() + ((d * 2 + (s + 1) % 2) * B + slot) * H;
          float* o = out + (tt * B + b) * D * H + d * H;
          for (int64_t u = 0; u < m; u += V) {
            const int64_t j = j0 + u, cnt = std::min(V, m - u);
            auto ld = [&](const float* q) { return Vec::loadu(q + j, cnt); };
            Vec hnew;
            if (lstm) {
              float* cc = c.data() + (d * B + slot) * H;
              const Vec i = vsigmoid(ld(px) + ld(phh)), f = vsigmoid(ld(px + H) + ld(phh + H));
              const Vec g = vtanh(ld(px + 2 * H) + ld(phh + 2 * H));
              const Vec og = vsigmoid(ld(px + 3 * H) + ld(phh + 3 * H));
              const Vec cn = f * ld(cc) + i * g;
              cn.store(cc + j, cnt);
              hnew = og * vtanh(cn);
            } else {
              const Vec r = vsigmoid(ld(px) + ld(phh)), z = vsigmoid(ld(px + H) + ld(phh + H));
              const Vec nn = vtanh(ld(px + 2 * H) + r * ld(phh + 2 * H));
              hnew = (Vec(1.0f) - z) * nn + z * ld(hc);
            }
            hnew.store(hn + j, cnt);
            hnew.store(o + j, cnt);
          }
        }
      }
    }
  });
  float* hnp = h_n.data_ptr<float>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t slot = 0; slot < B; ++slot) {
      const int64_t b = order.slot_batch[slot];
      // A row's final h is in the buffer its last step wrote: (len % 2), kept in both after.
      const float* src = h.data() + ((d * 2 + order.slot_len[slot] % 2) * B + slot) * H;
      std::copy_n(src, H, hnp + (d * B + b) * H);
      if (lstm) std::copy_n(c.data() + (d * B + slot) * H, H, c_n.data_ptr<float>() + (d * B + b) * H);
    }
  return {output, h_n, c_n};
}

}  // namespace CPU_CAPABILITY
}  // namespace seqfuse
