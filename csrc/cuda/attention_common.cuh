// Device pieces shared by the CUDA attention kernels (additive_attention_cuda.cu,
// sdpa_cuda.cu): the score functions' tanh/exp, warp reductions, the masks of
// attention.h read through strides, and the launch helpers for large shared memory.
#pragma once

#include "../attention.h"
#include "cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

namespace seqfuse {
namespace cuda {
namespace attn {

// ceil(a / b) on either side (cuda_common.cuh's ceil_div is host-only constexpr).
__host__ __device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (INFINITY, not std::numeric_limits: no relaxed-constexpr flag needed in device code)
template <typename A>
__device__ __forceinline__ A neg_inf() {
  return A(-INFINITY);
}
template <typename A>
__device__ __forceinline__ A pos_inf() {
  return A(INFINITY);
}

// ---- tanh ---------------------------------------------------------------------------
// The builds use --use_fast_math, under which nvcc turns tanhf into tanh.approx.f32
// (relative error up to 2^-11): too coarse for float32 (a score sums A of them), about
// the rounding of the half types themselves. So float32 uses tanh_precise (~3 ulp, one
// ex2.approx and one division), the half types the hardware instruction, float64 ::tanh.

__device__ __forceinline__ float tanh_approx(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return tanhf(x);
#endif
}

__device__ __forceinline__ float tanh_precise(float x) {
  const float ax = fabsf(x);
  if (ax >= 0.6f) {
    // 1 - 2 / (e^{2|x|} + 1): no cancellation for |x| >= 0.6; e^{2|x|} = inf gives 1.
    const float e = exp2f(ax * 2.8853900817779268f);  // 2 / ln 2
    return copysignf(1.0f - 2.0f / (e + 1.0f), x);
  }
  // x + x^3 P(x^2), a least-squares fit of the relative error on |x| < 0.6 (1.3 ulp
  // with float arithmetic, checked against numpy's tanh).
  const float s = x * x;
  float p = -0.0058831749483942986f;
  p = fmaf(p, s, 0.020785106346011162f);
  p = fmaf(p, s, -0.053780391812324524f);
  p = fmaf(p, s, 0.13331879675388336f);
  p = fmaf(p, s, -0.33333295583724976f);
  return fmaf(x * s, p, x);
}

// The tanh of the additive score for storage type T (the policy above).
template <typename T>
struct ScoreTanh {
  static __device__ __forceinline__ float apply(float x) { return tanh_approx(x); }
};
template <>
struct ScoreTanh<float> {
  static __device__ __forceinline__ float apply(float x) { return tanh_precise(x); }
};
template <>
struct ScoreTanh<double> {
  static __device__ __forceinline__ double apply(double x) { return ::tanh(x); }
};

// exp/log in the compute type (float: the ex2.approx-based intrinsics, ~2 ulp).
__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }
__device__ __forceinline__ float log_acc(float x) { return __logf(x); }
__device__ __forceinline__ double log_acc(double x) { return ::log(x); }

// ---- warp reductions (all 32 lanes take part) -----------------------------------------

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename V>
__device__ __forceinline__ V warp_max(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- masks ----------------------------------------------------------------------------

// valid_lens [B] or [B, Q] (int64): row (b, q) sees keys k < end(b, q).
struct LensRef {
  const int64_t* lens = nullptr;  // nullptr: no valid_lens
  int64_t per_b = 0;              // 1 for [B], Q for [B, Q]
  __device__ __forceinline__ int64_t end(int64_t b, int64_t q, int64_t K) const {
    if (lens == nullptr) return K;
    return lens[b * per_b + (per_b == 1 ? 0 : q)];
  }
};

// The masks of one scaled dot-product attention call, read through strides (0 on the
// broadcast axes of [B, H, Q, K]; nothing is materialised at [B, H, Q, K]).
// A: the compute type (float or double); an additive mask is converted to it once.
template <typename A>
struct SdpaMasking {
  int64_t H = 1, Q = 1;
  int K = 1;
  bool causal = false;
  A scale = A(1);
  LensRef lens;
  // One past the last key the mask allows in each row, [B, H, Q] through strides
  // (computed once on the host side, see mask_row_ends): lets a row block stop at its
  // last allowed key under a key-padding mask as it does under valid_lens.
  const int* ends = nullptr;
  int64_t eb = 0, eh = 0, eq = 0;
  const bool* bools = nullptr;  // true = attend
  // Whether every bool mask row is true up to its end and false after (key padding,
  // causal-shaped masks): the ends then say everything, and the kernels skip the per-key
  // reads (see resolved()). A flag on the device, so that no call waits for it.
  const bool* bools_are_prefixes = nullptr;
  const A* adds = nullptr;      // added to the scaled score; -inf = not allowed
  int64_t mb = 0, mh = 0, mq = 0, mk = 0;
  uint32_t drop_threshold = 0;  // 0: no dropout (as the CPU kernel, also for p < 2^-25)
  A keep_scale = A(1);          // 1 / (1 - p)
  int64_t seed = 0;

  // The masking a kernel applies: this one, without the bool mask when the row ends
  // describe it completely. Each kernel calls it once, into a local copy.
  __device__ __forceinline__ SdpaMasking resolved() const {
    SdpaMasking m = *this;
    if (bools_are_prefixes != nullptr && *bools_are_prefixes) m.bools = nullptr;
    return m;
  }
  // One past the last key row (b, h, q) may see: 0 when it sees none.
  __device__ __forceinline__ int row_end(int64_t b, int64_t h, int64_t q) const {
    int64_t e = lens.end(b, q, K);
    if (causal) e = e < q + 1 ? e : q + 1;
    if (ends != nullptr) {
      const int64_t m = ends[b * eb + h * eh + q * eq];
      e = e < m ? e : m;
    }
    return static_cast<int>(e);
  }
  __device__ __forceinline__ int64_t mask_row(int64_t b, int64_t h, int64_t q) const {
    return b * mb + h * mh + q * mq;
  }
  // Score of key k in the row at mask offset `mrow` from the raw product q.k: scaled,
  // plus the additive mask, or -inf where the key is not allowed.
  __device__ __forceinline__ A score(A s, int64_t mrow, int k, int end) const {
    if (k >= end) return neg_inf<A>();
    if (bools != nullptr) return bools[mrow + k * mk] ? s * scale : neg_inf<A>();
    if (adds != nullptr) {  // -inf or NaN: not allowed (the reference's `mask > -inf`)
      const A add = adds[mrow + k * mk];
      return add > neg_inf<A>() ? s * scale + add : neg_inf<A>();
    }
    return s * scale;
  }
  __device__ __forceinline__ bool dropout() const { return drop_threshold != 0; }
  // Whether element (bh, q, k) of the weights is kept (attention.h's hash).
  __device__ __forceinline__ bool keep(int64_t bh, int64_t q, int64_t k) const {
    const uint64_t index = static_cast<uint64_t>((bh * Q + q) * K + k);
    return sdpa_dropout_keep(sdpa_dropout_hash(seed, index), drop_threshold);
  }
};

// Tensors an SdpaMasking points into; they must outlive the kernels.
struct SdpaMaskingHolder {
  at::Tensor lens, mask, ends, prefixes;
};

// One past the last allowed key of each mask row: int32 [mask.shape[:-1]] (0 for a row
// with none). allowed: bool, true = attend.
inline at::Tensor mask_row_ends(const at::Tensor& allowed, int64_t K) {
  if (allowed.size(-1) == 1) return allowed.select(-1, 0).to(at::kInt).mul(K);
  const auto position = at::arange(1, K + 1, allowed.options().dtype(at::kInt));
  return at::where(allowed, position, 0).amax(-1).to(at::kInt);
}

template <typename A>
SdpaMasking<A> make_sdpa_masking(const at::Tensor& query, const at::Tensor& key,
                                 const std::optional<at::Tensor>& attn_mask,
                                 const std::optional<at::Tensor>& valid_lens, bool is_causal,
                                 std::optional<double> scale, double dropout_p, int64_t seed,
                                 SdpaMaskingHolder& hold) {
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2), D = query.size(3);
  const int64_t K = key.size(2);
  SdpaMasking<A> m;
  m.H = H;
  m.Q = Q;
  m.K = static_cast<int>(K);
  m.causal = is_causal;
  m.scale = static_cast<A>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  if (valid_lens.has_value()) {
    hold.lens = valid_lens->to(at::kLong).contiguous();
    m.lens.lens = hold.lens.const_data_ptr<int64_t>();
    m.lens.per_b = valid_lens->dim() == 1 ? 1 : Q;
  }
  if (attn_mask.has_value()) {
    const bool is_bool = attn_mask->scalar_type() == at::kBool;
    hold.mask = (is_bool ? *attn_mask : attn_mask->to(c10::CppTypeToScalarType<A>::value))
                    .expand({B, H, Q, K});
    const auto st = hold.mask.strides();
    m.mb = st[0];
    m.mh = st[1];
    m.mq = st[2];
    m.mk = st[3];
    if (is_bool)
      m.bools = hold.mask.const_data_ptr<bool>();
    else
      m.adds = hold.mask.const_data_ptr<A>();
    const auto allowed_any =
        is_bool ? *attn_mask : attn_mask->gt(-std::numeric_limits<double>::infinity());
    const auto allowed = allowed_any.dim() == 0 ? allowed_any.reshape({1}) : allowed_any;
    const auto ends = mask_row_ends(allowed, K);
    hold.ends = ends.expand({B, H, Q});
    const auto es = hold.ends.strides();
    m.ends = hold.ends.const_data_ptr<int>();
    m.eb = es[0];
    m.eh = es[1];
    m.eq = es[2];
    if (is_bool) {
      hold.prefixes = allowed.size(-1) == 1
                          ? at::ones({}, allowed.options())
                          : allowed.sum(-1, /*keepdim=*/false, at::kInt).eq(ends).all();
      m.bools_are_prefixes = hold.prefixes.const_data_ptr<bool>();
    }
  }
  const uint32_t threshold = dropout_p > 0 ? sdpa_dropout_threshold(dropout_p) : 0;
  if (threshold != 0) {
    m.drop_threshold = threshold;
    m.keep_scale = static_cast<A>(1.0 / (1.0 - dropout_p));
    m.seed = seed;
  }
  return m;
}

// softmax_stats, the layout every backend saves: row r's (max score, log of its sum of
// exp(s - max)) at stats[2r], stats[2r + 1]; (+inf, 0) for a row with no key.
template <typename Acc>
__device__ __forceinline__ void store_row_stats(Acc* stats, int64_t r, Acc row_max, Acc row_sum) {
  stats[2 * r] = row_sum > Acc(0) ? row_max : pos_inf<Acc>();
  stats[2 * r + 1] = row_sum > Acc(0) ? log_acc(row_sum) : Acc(0);
}

// Row r's logsumexp from its stats (+inf for a row with no key, so its weights are 0).
// The sum rounds to the max when |max| is huge (a finfo.min mask on every key): a known
// limit of the CUDA backward (RELIABILITY.md), which the CPU and Triton backwards avoid.
template <typename Acc>
__device__ __forceinline__ Acc row_lse(const Acc* stats, int64_t r) {
  return stats[2 * r] + stats[2 * r + 1];
}

// Everything a scaled dot-product attention kernel reads or writes (contiguous tensors):
//   q [B, H, Q, D], k [B, H, K, D], v [B, H, K, Dv]; out [B, H, Q, Dv], stats [B, H, Q, 2]
//   (softmax_stats: each row's max and log sum, see store_row_stats);
//   backward: out and dout [B, H, Q, Dv], stats_in, delta = rowsum(dout * out) [B, H, Q];
//   dq, dk, dv shaped as q, k, v.
// vec_*: the tensor's rows can move in 16-byte pieces (row length % 8 == 0 and a 16-byte
// aligned start), for the tensor-core kernels' cp.async loads and stores.
template <typename T>
struct SdpaArgs {
  using Acc = acc_t<T>;
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  T* out = nullptr;
  Acc* stats = nullptr;
  const T* dout = nullptr;
  const Acc* stats_in = nullptr;
  const Acc* delta = nullptr;
  T* dq = nullptr;
  T* dk = nullptr;
  T* dv = nullptr;
  int64_t B = 0, H = 0, Q = 0, K = 0, D = 0, Dv = 0;
  SdpaMasking<Acc> mask;
  bool vec_q = false, vec_k = false, vec_v = false, vec_out = false, vec_dout = false;
  bool vec_dq = false, vec_dk = false, vec_dv = false;
};

// ---- launch helpers -------------------------------------------------------------------

// A one-dimensional grid of n blocks.
inline dim3 grid_1d(int64_t n, const char* op) {
  TORCH_CHECK(n >= 1 && n <= 0x7fffffff, op, ": ", n,
              " thread blocks is more than one launch takes");
  return dim3(static_cast<unsigned>(n));
}

inline int current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

inline int device_attribute(cudaDeviceAttr attr) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, current_device()));
  return v;
}

// Lets `kernel` take `bytes` of dynamic shared memory (above 48 KiB needs an opt-in).
template <typename Kernel>
void allow_shared_memory(Kernel* kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  const int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), op, ": needs ", bytes,
              " bytes of shared memory per block for these head dims, the device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace attn
}  // namespace cuda
}  // namespace seqfuse
