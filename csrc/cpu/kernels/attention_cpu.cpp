// CPU kernels of the fused attention ops (see attention.h for shapes and masks).
//
// Additive attention: one score is w_v . tanh(q + k) over A features. The classic module
// forms all B*Q*K*A features in memory (1 GiB at B=32, Q=K=256, A=128) and reads them
// back twice; here each (query row, key row) pair is reduced in registers as soon as its
// tanh is evaluated, and the backward evaluates tanh again rather than storing it.
//
// Scaled dot-product attention: flash-style. A chunk of query rows walks over blocks of
// keys; the scores of one tile of rows against one block live in a small buffer, the
// softmax is online (running max and sum, the partial output rescaled when the max
// grows), and the backward, which holds whole rows of scores, recomputes the weights
// from each row's maximum and sum (the saved log-sum-exp only marks rows with no key:
// one float cannot keep log(sum) next to a huge maximum, see sdpa_backward). Rows stop
// at their last allowed key (valid_lens, causal, or the last true column of a boolean
// mask), so padded keys cost nothing: key blocks past every row's end are skipped.
//
// float64 runs the same code (gradcheck); bfloat16 is computed in float32 and rounded at
// the end, like the rest of seqfuse.
#include "../../attention.h"
#include "fast_math.h"
#include "../fork_safety.h"
#include "../kernels.h"
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace seqfuse {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability

namespace {

using at::vec::Vectorized;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// max(a, b) that keeps a NaN from either side (std::max drops b when b is NaN): a NaN
// score must make its row NaN, as it does in eager PyTorch's softmax.
template <typename T>
C10_ALWAYS_INLINE T nan_max(T a, T b) {
  return (b > a || std::isnan(b)) ? b : a;
}

at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? at::kFloat : t.scalar_type();
}

// Per-row allowed key range from valid_lens ([B] or [B, Q]).
struct ValidLens {
  std::vector<int64_t> lens;  // empty: none
  int64_t per_b = 0;          // 1 for [B], Q for [B, Q]
  ValidLens(const std::optional<at::Tensor>& t, int64_t Q) {
    if (!t.has_value()) return;
    auto c = t->to(at::kLong).contiguous();
    lens.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
    per_b = t->dim() == 1 ? 1 : Q;
  }
  int64_t end(int64_t b, int64_t q, int64_t K) const {
    if (lens.empty()) return K;
    return lens[b * per_b + (per_b == 1 ? 0 : q)];
  }
};

// A mask broadcast to [B, (H,) Q, K] through strides (0 on broadcast axes); floating masks
// are converted to the compute dtype once.
template <typename T>
struct MaskView {
  at::Tensor holder;
  const bool* bools = nullptr;
  const T* adds = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  MaskView(const std::optional<at::Tensor>& m, at::IntArrayRef target) {
    if (!m.has_value()) return;
    holder = m->scalar_type() == at::kBool ? *m : m->to(c10::CppTypeToScalarType<T>::value);
    auto e = holder.expand(target);
    const auto st = e.strides();
    const size_t n = target.size();
    sb = st[0];
    sh = n == 4 ? st[1] : 0;
    sq = st[n - 2];
    sk = st[n - 1];
    if (holder.scalar_type() == at::kBool)
      bools = holder.const_data_ptr<bool>();
    else
      adds = holder.const_data_ptr<T>();
  }
  bool present() const { return bools || adds; }
  int64_t offset(int64_t b, int64_t h, int64_t q) const { return b * sb + h * sh + q * sq; }
  // Whether key k of the row at `off` may be attended. An additive entry of -inf or NaN
  // is not allowed (the reference's `mask > -inf`, and the Triton kernels').
  bool allowed(int64_t off, int64_t k) const {
    if (bools) return bools[off + k * sk];
    if (adds) return adds[off + k * sk] > kNegInf<T>;
    return true;
  }
};

// The row's end: one past its last allowed key (0 when it has none), and whether every key
// before the end is allowed (then the mask needs no per-key look within the row).
template <typename T>
std::pair<int64_t, bool> row_extent(const MaskView<T>& mask, int64_t off, int64_t end) {
  if (!mask.present()) return {end, true};
  while (end > 0 && !mask.allowed(off, end - 1)) --end;
  bool dense = mask.adds == nullptr;  // an additive mask always has to be added
  for (int64_t k = 0; dense && k < end; ++k) dense = mask.allowed(off, k);
  return {end, dense};
}

// s[0, n) = scale * s, then the mask's verdict: -inf where not allowed, + the additive
// mask. Returns the maximum.
template <typename T>
T scale_mask_max(T* s, int64_t n, T scale, const MaskView<T>& mask, int64_t off, bool dense) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  if (!dense) {
    for (int64_t k = 0; k < n; ++k) {
      if (mask.bools) {
        s[k] = mask.bools[off + k * mask.sk] ? s[k] * scale : kNegInf<T>;
      } else {
        const T add = mask.adds[off + k * mask.sk];
        s[k] = add > kNegInf<T> ? s[k] * scale + add : kNegInf<T>;  // a NaN score stays out
      }
    }
  }
  Vec vmax(kNegInf<T>);
  const Vec vs(dense ? scale : T(1));
  int64_t k = 0;
  for (; k + V <= n; k += V) {
    Vec x = Vec::loadu(s + k) * vs;
    x.store(s + k);
    vmax = at::vec::maximum(vmax, x);
  }
  T mx = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; k < n; ++k) {
    s[k] *= dense ? scale : T(1);
    mx = nan_max(mx, s[k]);
  }
  return mx;  // NaN when a score of the row is (at::vec::maximum propagates it too)
}

// s[0, n) = exp(s - shift) (0 for -inf, NaN for NaN); returns the sum.
template <typename T>
T exp_shift_sum(T* s, int64_t n, T shift) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec vshift(shift);
  Vec vsum(T(0));
  int64_t k = 0;
  for (; k + V <= n; k += V) {
    const Vec e = vexp_nonpos(Vec::loadu(s + k) - vshift);
    e.store(s + k);
    vsum = vsum + e;
  }
  if (k < n) {
    const Vec e = vexp_nonpos(Vec::loadu(s + k, n - k) - vshift);
    e.store(s + k, n - k);
    // lanes past n were loaded as 0 - shift and must not count
    const Vec tail = Vec::set(Vec(T(0)), e, n - k);
    vsum = vsum + tail;
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

template <typename T>
void scale_row(T* x, int64_t n, T f) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  int64_t k = 0;
  for (; k + V <= n; k += V) (Vec::loadu(x + k) * Vec(f)).store(x + k);
  for (; k < n; ++k) x[k] *= f;
}

template <typename T>
T dot_row(const T* x, const T* y, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc(T(0));
  int64_t k = 0;
  for (; k + V <= n; k += V) acc = at::vec::fmadd(Vec::loadu(x + k), Vec::loadu(y + k), acc);
  if (k < n) acc = at::vec::fmadd(Vec::loadu(x + k, n - k), Vec::loadu(y + k, n - k), acc);
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.
template <typename T>
void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB)
      for (int64_t r = r0; r < std::min(rows, r0 + kB); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kB); ++c) dst[c * ldd + r] = src[r * lds + c];
}

// ---------------------------------------------------------------------------------------
// Additive attention
// ---------------------------------------------------------------------------------------

// w_v . tanh(q + k) over A features; lanes past A load as zero and add tanh(0) * 0.
template <typename T>
C10_ALWAYS_INLINE T additive_score(const T* q, const T* k, const T* w, int64_t A) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc0(T(0)), acc1(T(0));
  int64_t a = 0;
  for (; a + 2 * V <= A; a += 2 * V) {
    acc0 = at::vec::fmadd(Vec::loadu(w + a), vtanh(Vec::loadu(q + a) + Vec::loadu(k + a)), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(w + a + V),
                          vtanh(Vec::loadu(q + a + V) + Vec::loadu(k + a + V)), acc1);
  }
  for (; a < A; a += V) {
    const int64_t n = std::min(V, A - a);
    acc0 = at::vec::fmadd(Vec::loadu(w + a, n), vtanh(Vec::loadu(q + a, n) + Vec::loadu(k + a, n)),
                          acc0);
  }
  return at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
}

// Writes the masked softmax weights [B, Q, K]; the caller multiplies them with value.
template <typename T>
void additive_weights(const T* query, const T* key, const T* w_v, T* weights, int64_t B,
                      int64_t Q, int64_t K, int64_t A, const ValidLens& lens,
                      const MaskView<T>& mask) {
  // Keys in blocks that stay in L1 while every query row of the task passes over them.
  constexpr int64_t kKeyBlock = 32;
  at::parallel_for(0, B * Q, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> row_end(end - begin);
    std::vector<char> row_dense(end - begin);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Q, q = i % Q;
      auto [e, dense] = row_extent(mask, mask.offset(b, 0, q), lens.end(b, q, K));
      row_end[i - begin] = e;
      row_dense[i - begin] = dense;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kKeyBlock) {
      const int64_t k1 = std::min(K, k0 + kKeyBlock);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / Q, q = i % Q;
        const T* qrow = query + i * A;
        const T* kb = key + b * K * A;
        T* srow = weights + i * K;
        const int64_t ke = std::min(k1, row_end[i - begin]);
        const int64_t off = mask.offset(b, 0, q);
        for (int64_t k = k0; k < ke; ++k)
          srow[k] = (row_dense[i - begin] || mask.allowed(off, k))
                        ? additive_score(qrow, kb + k * A, w_v, A)
                        : kNegInf<T>;
      }
    }
    for (int64_t i = begin; i < end; ++i) {
      T* srow = weights + i * K;
      const int64_t e = row_end[i - begin];
      std::fill(srow + e, srow + K, T(0));
      T mx = kNegInf<T>;
      for (int64_t k = 0; k < e; ++k) mx = nan_max(mx, srow[k]);
      if (mx == kNegInf<T>) {  // no key: zeros, never NaN
        std::fill(srow, srow + e, T(0));
        continue;
      }
      if (std::isnan(mx)) {  // a NaN score: the whole row is NaN, as eager's softmax gives
        std::fill(srow, srow + K, std::numeric_limits<T>::quiet_NaN());
        continue;
      }
      scale_row(srow, e, T(1) / exp_shift_sum(srow, e, mx));
    }
  });
}

// Gradients of the fused scoring, given dS = dL/dscore [B, Q, K] (0 where masked):
// t = tanh(q + k); g = dS * w_v * (1 - t^2); dq += g; dk += g; dw_v += dS * t.
// Parallel over the batch: each b owns its dk rows; dw_v is summed per b, then reduced.
template <typename T>
void additive_scoring_backward(const T* query, const T* key, const T* w_v, const T* dscore,
                               T* dquery, T* dkey, T* dw_rows, int64_t B, int64_t Q, int64_t K,
                               int64_t A) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* dw = dw_rows + b * A;
      for (int64_t q = 0; q < Q; ++q) {
        const T* qrow = query + (b * Q + q) * A;
        T* dq = dquery + (b * Q + q) * A;
        const T* ds_row = dscore + (b * Q + q) * K;
        for (int64_t k = 0; k < K; ++k) {
          const T ds = ds_row[k];
          if (ds == T(0)) continue;  // masked keys (weight 0) send nothing back
          const T* krow = key + (b * K + k) * A;
          T* dk = dkey + (b * K + k) * A;
          const Vec vds(ds);
          for (int64_t a = 0; a < A; a += V) {
            const int64_t n = std::min(V, A - a);
            const Vec t = vtanh(Vec::loadu(qrow + a, n) + Vec::loadu(krow + a, n));
            const Vec g = vds * Vec::loadu(w_v + a, n) * (Vec(T(1)) - t * t);
            (Vec::loadu(dq + a, n) + g).store(dq + a, n);
            (Vec::loadu(dk + a, n) + g).store(dk + a, n);
            at::vec::fmadd(vds, t, Vec::loadu(dw + a, n)).store(dw + a, n);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> additive_attention_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& w_v, const at::Tensor& value,
    const std::optional<at::Tensor>& valid_lens_arg, const std::optional<at::Tensor>& mask) {
  before_cpu_op();
  const std::optional<at::Tensor> valid_lens = private_copy(valid_lens_arg);
  check_additive_attention_args(query, key, w_v, value, valid_lens, mask);
  const auto ct = compute_dtype(query);
  const auto q = query.to(ct).contiguous(), k = key.to(ct).contiguous(),
             w = w_v.to(ct).contiguous(), v = value.to(ct);
  const int64_t B = q.size(0), Q = q.size(1), A = q.size(2), K = k.size(1);
  auto weights = at::empty({B, Q, K}, q.options());
  const ValidLens lens(valid_lens, Q);
  AT_DISPATCH_FLOATING_TYPES(ct, "additive_attention_cpu", [&] {
    const MaskView<scalar_t> mv(mask, {B, Q, K});
    additive_weights<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                               w.const_data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), B, Q,
                               K, A, lens, mv);
  });
  auto context = at::bmm(weights, v);
  return {context.to(query.scalar_type()), weights.to(query.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward_cpu(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& w_v, const at::Tensor& value,
    const at::Tensor& weights) {
  before_cpu_op();
  check_additive_attention_backward_args(grad_context, grad_weights, query, key, w_v, value,
                                         weights);
  const auto ct = compute_dtype(query);
  const int64_t B = query.size(0), Q = query.size(1), A = query.size(2), K = key.size(1);
  const auto q = query.to(ct).contiguous(), k = key.to(ct).contiguous(), w = w_v.to(ct).contiguous();
  const auto v = value.to(ct), p = weights.to(ct), gc = grad_context.to(ct);
  auto grad_value = at::bmm(p.transpose(1, 2), gc);
  // dS = P * (dP - sum_k P dP), dP = dcontext value^T + dweights
  auto dp = at::baddbmm(grad_weights.to(ct), gc, v.transpose(1, 2));
  auto dscore = (p * (dp - (p * dp).sum(-1, /*keepdim=*/true))).contiguous();
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dw_rows = at::zeros({B, A}, q.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "additive_attention_backward_cpu", [&] {
    additive_scoring_backward<scalar_t>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        dscore.const_data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
        dw_rows.data_ptr<scalar_t>(), B, Q, K, A);
  });
  const auto dt = query.scalar_type();
  return {dq.to(dt), dk.to(dt), dw_rows.sum(0).to(dt), grad_value.to(dt)};
}

// ---------------------------------------------------------------------------------------
// Scaled dot-product attention
// ---------------------------------------------------------------------------------------

namespace {

constexpr int64_t kQueryChunk = 48;  // query rows per forward task (8 tiles of 6)
constexpr int64_t kKeyBlock = 256;   // keys per online-softmax block

// Query rows per backward block. The backward holds whole rows: four [rows, K] scratch
// panels per thread (P, dS and their transposes). The block is as tall as the forward's
// chunk, but never taller than Q (a decoder step has Q = 1) nor than fits a
// kBackwardScratchBytes budget (K = 2^22 keys: 48 rows would be 3 GiB per thread, against
// the reference's [Q, K] weights), in whole register tiles while there is room for one.
constexpr int64_t kBackwardScratchBytes = int64_t(64) << 20;
template <typename T>
int64_t backward_query_block(int64_t Q, int64_t K) {
  const int64_t fit = kBackwardScratchBytes / (4 * std::max<int64_t>(K, 1) * int64_t(sizeof(T)));
  int64_t rows = std::clamp<int64_t>(fit, 1, kQueryChunk);
  if (rows >= kTileRows) rows -= rows % kTileRows;
  return std::min(rows, std::max<int64_t>(Q, 1));
}

// One (b, h) slice of the problem and its masks; rows' extents computed on demand.
template <typename T>
struct SdpaProblem {
  int64_t B, H, Q, K, D, Dv;
  T scale;
  bool causal;
  const ValidLens& lens;
  const MaskView<T>& mask;
  uint32_t drop_threshold;  // 0: no dropout
  T keep_scale;             // 1 / (1 - p)
  int64_t seed;

  // End (exclusive) of row q's keys and whether all keys before it are allowed. `memo`
  // holds the last row scanned: rows of a broadcast mask ([B, 1, 1, K] key padding) share
  // one mask row, which is then scanned once per chunk instead of once per query row.
  struct Memo {
    int64_t off = -1, end = -1;
    std::pair<int64_t, bool> result;
  };
  std::pair<int64_t, bool> extent(int64_t b, int64_t h, int64_t q, Memo& memo) const {
    int64_t e = lens.end(b, q, K);
    if (causal) e = std::min(e, q + 1);
    const int64_t off = mask.offset(b, h, q);
    if (off != memo.off || e != memo.end) memo = {off, e, row_extent(mask, off, e)};
    return memo.result;
  }

  // Extents of rows q0 .. q0 + n: ends and dense flags into the arrays; returns the
  // largest end (the keys the block of rows needs).
  int64_t extents(int64_t b, int64_t h, int64_t q0, int64_t n, int64_t* row_end,
                  char* dense) const {
    Memo memo;
    int64_t block_end = 0;
    for (int64_t r = 0; r < n; ++r) {
      std::tie(row_end[r], dense[r]) = extent(b, h, q0 + r, memo);
      block_end = std::max(block_end, row_end[r]);
    }
    return block_end;
  }

  // p[0, n) *= keep(b, h, q, k0 + j) / (1 - p)
  void apply_dropout(T* p, int64_t n, int64_t b, int64_t h, int64_t q, int64_t k0) const {
    const uint64_t base = static_cast<uint64_t>(((b * H + h) * Q + q) * K + k0);
    for (int64_t j = 0; j < n; ++j)
      p[j] = sdpa_dropout_keep(sdpa_dropout_hash(seed, base + j), drop_threshold)
                 ? p[j] * keep_scale
                 : T(0);
  }
};

// key_t: the keys transposed, [B, H, D, K], so that a block of keys is a panel of the
// score product (transposed once by ATen rather than once per query chunk here).
// stats: [B, H, Q, 2], each row's (max score m, log of its sum of exp(s - m)).
template <typename T>
void sdpa_forward(const SdpaProblem<T>& P, const T* query, const T* key_t, const T* value, T* out,
                  T* stats) {
  const int64_t Q = P.Q, K = P.K, D = P.D, Dv = P.Dv;
  const int64_t chunks = (Q + kQueryChunk - 1) / kQueryChunk;
  at::parallel_for(0, P.B * P.H * chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t KB = std::min(K, kKeyBlock);
    std::vector<T> s(kTileRows * KB), acc(kQueryChunk * Dv);
    std::vector<T> m(kQueryChunk), l(kQueryChunk);
    std::vector<int64_t> row_end(kQueryChunk);
    std::vector<char> dense(kQueryChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, q0 = (task % chunks) * kQueryChunk;
      const int64_t b = bh / P.H, h = bh % P.H, nq = std::min(kQueryChunk, Q - q0);
      const T* qb = query + (bh * Q + q0) * D;
      const T* ktbase = key_t + bh * D * K;
      const T* vbase = value + bh * K * Dv;
      const int64_t chunk_end = P.extents(b, h, q0, nq, row_end.data(), dense.data());
      std::fill(m.begin(), m.end(), kNegInf<T>);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.begin() + nq * Dv, T(0));
      for (int64_t k0 = 0; k0 < chunk_end; k0 += KB) {
        const int64_t kn = std::min(KB, chunk_end - k0);
        for (int64_t r0 = 0; r0 < nq; r0 += kTileRows) {
          const int64_t mr = std::min<int64_t>(kTileRows, nq - r0);
          int64_t tile_end = 0;
          for (int64_t r = r0; r < r0 + mr; ++r) tile_end = std::max(tile_end, row_end[r]);
          const int64_t n = std::min(kn, tile_end - k0);
          if (n <= 0) continue;
          small_gemm<T>(mr, n, D, qb + r0 * D, D, ktbase + k0, K, s.data(), KB, false);
          for (int64_t r = r0; r < r0 + mr; ++r) {
            T* srow = s.data() + (r - r0) * KB;
            const int64_t rn = std::clamp<int64_t>(row_end[r] - k0, 0, n);
            std::fill(srow + rn, srow + n, T(0));  // past the row's end: no weight
            if (rn == 0) continue;
            const T bm = scale_mask_max(srow, rn, P.scale, P.mask, P.mask.offset(b, h, q0 + r) + k0 * P.mask.sk, dense[r]);
            const T m_new = nan_max(m[r], bm);  // NaN from here on makes the row NaN
            if (m_new == kNegInf<T>) {  // nothing allowed yet
              std::fill(srow, srow + rn, T(0));
              continue;
            }
            const T alpha = m[r] == kNegInf<T> ? T(0) : std::exp(m[r] - m_new);
            l[r] = l[r] * alpha + exp_shift_sum(srow, rn, m_new);
            if (alpha != T(1)) scale_row(acc.data() + r * Dv, Dv, alpha);
            m[r] = m_new;
            if (P.drop_threshold) P.apply_dropout(srow, rn, b, h, q0 + r, k0);
          }
          small_gemm<T>(mr, Dv, n, s.data(), KB, vbase + k0 * Dv, Dv, acc.data() + r0 * Dv, Dv,
                        true);
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        T* o = out + (bh * Q + q0 + r) * Dv;
        T* row_stats = stats + 2 * (bh * Q + q0 + r);
        if (l[r] == T(0)) {  // no key: zeros, and m = +inf so the backward's weights are 0
          std::fill(o, o + Dv, T(0));
          row_stats[0] = std::numeric_limits<T>::infinity();
          row_stats[1] = T(0);
          continue;
        }
        const T inv = T(1) / l[r];
        for (int64_t j = 0; j < Dv; ++j) o[j] = acc[r * Dv + j] * inv;
        // (m, log l) apart, not their sum: m + log(l) rounds to m when |m| is huge (a
        // finfo.min mask on every key), which would lose l for any backward that used it.
        row_stats[0] = m[r];
        row_stats[1] = std::log(l[r]);
      }
    }
  });
}

// Flash backward, one (b, h) slice per task (it owns that slice of dK and dV).
// delta_q = dO_q . O_q;  P = softmax of the row (x keep / (1 - p) under dropout);
// dS = P_undropped * (dP_dropped - delta);  dQ = scale dS K;  dK = scale dS^T Q;  dV = P^T dO.
// key_t [B, H, D, K] and value_t [B, H, Dv, K]: transposed as in sdpa_forward.
template <typename T>
void sdpa_backward(const SdpaProblem<T>& P, const T* grad_out, const T* query, const T* key,
                   const T* key_t, const T* value_t, const T* out, const T* stats, T* dquery,
                   T* dkey, T* dvalue) {
  const int64_t Q = P.Q, K = P.K, D = P.D, Dv = P.Dv;
  const int64_t QB = backward_query_block<T>(Q, K);
  at::parallel_for(0, P.B * P.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pb(QB * K), dsb(QB * K), pt(K * QB), dst(K * QB);
    std::vector<T> delta(QB);
    std::vector<int64_t> row_end(QB);
    std::vector<char> dense(QB);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / P.H, h = bh % P.H;
      const T* kbase = key + bh * K * D;
      const T* kt = key_t + bh * D * K;
      const T* vt = value_t + bh * Dv * K;
      T* dk = dkey + bh * K * D;
      T* dv = dvalue + bh * K * Dv;
      for (int64_t q0 = 0; q0 < Q; q0 += QB) {
        const int64_t nq = std::min(QB, Q - q0);
        const T* qb = query + (bh * Q + q0) * D;
        const T* dob = grad_out + (bh * Q + q0) * Dv;
        const int64_t block_end = P.extents(b, h, q0, nq, row_end.data(), dense.data());
        for (int64_t r = 0; r < nq; ++r)
          delta[r] = dot_row(dob + r * Dv, out + (bh * Q + q0 + r) * Dv, Dv);
        for (int64_t r0 = 0; r0 < nq; r0 += kTileRows) {
          const int64_t mr = std::min<int64_t>(kTileRows, nq - r0);
          int64_t tile_end = 0;
          for (int64_t r = r0; r < r0 + mr; ++r) tile_end = std::max(tile_end, row_end[r]);
          T* dq_tile = dquery + (bh * Q + q0 + r0) * D;
          if (tile_end == 0) {
            for (int64_t r = r0; r < r0 + mr; ++r) {
              std::fill(pb.data() + r * K, pb.data() + r * K + block_end, T(0));
              std::fill(dsb.data() + r * K, dsb.data() + r * K + block_end, T(0));
            }
            std::fill(dq_tile, dq_tile + mr * D, T(0));
            continue;
          }
          T* s = pb.data() + r0 * K;
          T* dp = dsb.data() + r0 * K;
          small_gemm<T>(mr, tile_end, D, qb + r0 * D, D, kt, K, s, K, false);
          small_gemm<T>(mr, tile_end, Dv, dob + r0 * Dv, Dv, vt, K, dp, K, false);
          for (int64_t r = r0; r < r0 + mr; ++r) {
            T* srow = pb.data() + r * K;
            T* dprow = dsb.data() + r * K;
            const T row_max = stats[2 * (bh * Q + q0 + r)];  // +inf: the row has no key
            const int64_t rn = row_end[r];
            if (row_max == std::numeric_limits<T>::infinity() || rn == 0) {
              std::fill(srow, srow + block_end, T(0));
              std::fill(dprow, dprow + block_end, T(0));
              continue;
            }
            // srow = P (undropped), recomputed from the row's own maximum and sum: the row
            // is whole here, so this costs one scaling pass, and needs no saved statistic
            // beyond the no-key marker.
            const T mx = scale_mask_max(srow, rn, P.scale, P.mask, P.mask.offset(b, h, q0 + r), dense[r]);
            scale_row(srow, rn, T(1) / exp_shift_sum(srow, rn, mx));
            if (P.drop_threshold) {
              P.apply_dropout(dprow, rn, b, h, q0 + r, 0);  // dP of the dropped weights
              for (int64_t k = 0; k < rn; ++k) dprow[k] = P.scale * srow[k] * (dprow[k] - delta[r]);
              P.apply_dropout(srow, rn, b, h, q0 + r, 0);   // srow = dropped P, for dV
            } else {
              for (int64_t k = 0; k < rn; ++k) dprow[k] = P.scale * srow[k] * (dprow[k] - delta[r]);
            }
            std::fill(srow + rn, srow + block_end, T(0));
            std::fill(dprow + rn, dprow + block_end, T(0));
          }
          // dQ rows = (scale dS) K over the tile's keys
          small_gemm<T>(mr, D, tile_end, dp, K, kbase, D, dq_tile, D, false);
        }
        if (block_end == 0) continue;
        transpose(pb.data(), K, nq, block_end, pt.data(), QB);
        transpose(dsb.data(), K, nq, block_end, dst.data(), QB);
        small_gemm<T>(block_end, Dv, nq, pt.data(), QB, dob, Dv, dv, Dv, true);
        small_gemm<T>(block_end, D, nq, dst.data(), QB, qb, D, dk, D, true);
      }
    }
  });
}

template <typename T>
SdpaProblem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const ValidLens& lens, const MaskView<T>& mask, bool is_causal,
                            std::optional<double> scale, double dropout_p, int64_t seed) {
  const int64_t D = q.size(3);
  SdpaProblem<T> P{q.size(0), q.size(1), q.size(2), k.size(2), D, v.size(3),
                   static_cast<T>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(D))),
                   is_causal, lens, mask, 0, T(1), seed};
  if (dropout_p > 0) {
    P.drop_threshold = sdpa_dropout_threshold(dropout_p);
    P.keep_scale = static_cast<T>(1.0 / (1.0 - dropout_p));
  }
  return P;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scaled_dot_product_attention_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& valid_lens_arg,
    bool is_causal, std::optional<double> scale, double dropout_p, int64_t seed) {
  before_cpu_op();
  const std::optional<at::Tensor> valid_lens = private_copy(valid_lens_arg);
  check_sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p);
  const auto ct = compute_dtype(query);
  const auto q = query.to(ct).contiguous(), k = key.to(ct).contiguous(), v = value.to(ct).contiguous();
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), K = k.size(2);
  auto out = at::empty({B, H, Q, v.size(3)}, q.options());
  auto stats = at::empty({B, H, Q, 2}, q.options());
  const ValidLens lens(valid_lens, Q);
  AT_DISPATCH_FLOATING_TYPES(ct, "scaled_dot_product_attention_cpu", [&] {
    const MaskView<scalar_t> mv(attn_mask, {B, H, Q, K});
    const auto P = make_problem<scalar_t>(q, k, v, lens, mv, is_causal, scale, dropout_p, seed);
    const auto kt = k.transpose(2, 3).contiguous();
    sdpa_forward<scalar_t>(P, q.const_data_ptr<scalar_t>(), kt.const_data_ptr<scalar_t>(),
                           v.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                           stats.data_ptr<scalar_t>());
  });
  return {out.to(query.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_dot_product_attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& valid_lens_arg, const at::Tensor& output,
    const at::Tensor& softmax_stats, bool is_causal, std::optional<double> scale,
    double dropout_p, int64_t seed) {
  before_cpu_op();
  const std::optional<at::Tensor> valid_lens = private_copy(valid_lens_arg);
  check_sdpa_backward_args(grad_output, query, key, value, attn_mask, valid_lens, output,
                           softmax_stats, scale, dropout_p);
  const auto ct = compute_dtype(query);
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2), K = key.size(2);
  const auto q = query.to(ct).contiguous(), k = key.to(ct).contiguous(), v = value.to(ct).contiguous();
  const auto go = grad_output.to(ct).contiguous(), o = output.to(ct).contiguous();
  const auto l = softmax_stats.to(ct).contiguous();
  auto dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const ValidLens lens(valid_lens, Q);
  AT_DISPATCH_FLOATING_TYPES(ct, "scaled_dot_product_attention_backward_cpu", [&] {
    const MaskView<scalar_t> mv(attn_mask, {B, H, Q, K});
    const auto P = make_problem<scalar_t>(q, k, v, lens, mv, is_causal, scale, dropout_p, seed);
    const auto kt = k.transpose(2, 3).contiguous(), vt = v.transpose(2, 3).contiguous();
    sdpa_backward<scalar_t>(P, go.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                            k.const_data_ptr<scalar_t>(), kt.const_data_ptr<scalar_t>(),
                            vt.const_data_ptr<scalar_t>(),
                            o.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
                            dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                            dv.data_ptr<scalar_t>());
  });
  const auto dt = query.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}


}  // namespace CPU_CAPABILITY
}  // namespace seqfuse
