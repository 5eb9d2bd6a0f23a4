// CUDA kernels of masked scaled dot-product attention (shapes and masks in attention.h),
// forward and backward, flash-style: no [Q, K] matrix in memory, an online softmax over
// key tiles, float32 (float64) accumulation, and the backward recomputing the weights
// from the saved log-sum-exp.
//
// Two implementations of the same arithmetic:
//   - tensor cores (sdpa_tensor_core.cuh): float16/bfloat16 on sm_80+, head dims up to 256
//     forward and 128 backward (padded to 32/64/128/256);
//   - CUDA cores (here): a warp per row, the other side's rows staged in shared memory a
//     tile at a time and one lane per staged row. float32, float64, and the half types
//     where the tensor-core kernels do not apply. Simple rather than fast.
// Both stop a row block at its last allowed key (valid_lens, causal, and the last allowed
// key of each mask row, found once per call), so key padding costs no work.
#include "attention_common.cuh"
#include "sdpa_tensor_core.cuh"

#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace seqfuse {
namespace cuda {
namespace {

using attn::SdpaArgs;
using attn::exp_acc;
using attn::neg_inf;
using attn::warp_max;
using attn::warp_sum;

constexpr int kMaxHeadDim = 256;  // D, Dv: 8 values a lane in the CUDA-core kernels
constexpr int kLaneDims = kMaxHeadDim / 32;
constexpr int kRowWarps = 8;  // rows (warps) per block of the CUDA-core kernels
constexpr int kRowThreads = 32 * kRowWarps;

// Staged rows per tile of the CUDA-core kernels (one per lane): 16 for double, whose
// tiles would otherwise take too much shared memory at large head dims.
template <typename Acc>
__host__ __device__ constexpr int lane_rows() {
  return sizeof(Acc) == 8 ? 16 : 32;
}

// Shared-memory row stride: odd, so that lanes reading a column of staged rows hit
// distinct banks.
__host__ __device__ inline int64_t odd_stride(int64_t n) { return n | 1; }

extern __shared__ __align__(16) unsigned char rows_smem[];

// The largest row end of the block's rows (one per warp): the block's keys are [0, end).
__device__ __forceinline__ int block_max(int v) {
  __shared__ int s;
  if (threadIdx.x == 0) s = 0;
  __syncthreads();
  if (threadIdx.x % 32 == 0) atomicMax(&s, v);
  __syncthreads();
  return s;
}

// rows [r0, r0 + n) of src ([*, cols] contiguous) into tile[n][ld] in the compute type;
// zeros past `valid` rows.
template <typename T, typename Acc>
__device__ __forceinline__ void stage_rows(Acc* tile, int64_t ld, const T* src, int64_t r0, int n,
                                           int64_t valid, int64_t cols) {
  for (int64_t idx = threadIdx.x; idx < n * cols; idx += blockDim.x) {
    const int64_t r = idx / cols, c = idx % cols;
    tile[r * ld + c] = r0 + r < valid ? load_acc(src + (r0 + r) * cols + c) : Acc(0);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc dot(const Acc* x, const Acc* y, int64_t n) {
  Acc s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// ---- CUDA-core forward: a warp per query row ----------------------------------------------

template <typename Acc>
size_t fwd_rows_smem(int64_t D, int64_t Dv) {
  constexpr int kBc = lane_rows<Acc>();
  return (kRowWarps * D + kBc * odd_stride(D) + kBc * Dv) * sizeof(Acc);  // Q rows, K, V tiles
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) sdpa_fwd_rows_kernel(const SdpaArgs<T> p) {
  using Acc = acc_t<T>;
  constexpr int kBc = lane_rows<Acc>();
  const auto m = p.mask.resolved();
  const int64_t Q = p.Q, K = p.K, D = p.D, Dv = p.Dv, ldk = odd_stride(D);
  Acc* sQ = reinterpret_cast<Acc*>(rows_smem);  // [kRowWarps][D]
  Acc* sK = sQ + kRowWarps * D;                 // [kBc][ldk]
  Acc* sV = sK + kBc * ldk;                     // [kBc][Dv]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q_tiles = attn::div_up(Q, kRowWarps);
  const int64_t qt = q_tiles - 1 - blockIdx.x % q_tiles;
  const int64_t bh = blockIdx.x / q_tiles, b = bh / p.H, h = bh % p.H, q0 = qt * kRowWarps;
  const int64_t r = q0 + warp;
  const int end = r < Q ? m.row_end(b, h, r) : 0;
  const int64_t mrow = m.mask_row(b, h, r);
  const int kv_end = block_max(end);
  stage_rows(sQ, D, p.q + bh * Q * D, q0, kRowWarps, Q, D);

  Acc o[kLaneDims] = {};
  Acc row_max = neg_inf<Acc>(), row_sum = 0;
  for (int kv0 = 0; kv0 < kv_end; kv0 += kBc) {
    __syncthreads();  // the previous tile's readers are done (and sQ is staged)
    stage_rows(sK, ldk, p.k + bh * K * D, kv0, kBc, K, D);
    stage_rows(sV, Dv, p.v + bh * K * Dv, kv0, kBc, K, Dv);
    __syncthreads();
    Acc x = neg_inf<Acc>();
    if (lane < kBc) x = m.score(dot(sQ + warp * D, sK + lane * ldk, D), mrow, kv0 + lane, end);
    const Acc m_new = fmax(row_max, warp_max(x));
    const Acc m_use = m_new == neg_inf<Acc>() ? Acc(0) : m_new;
    const Acc alpha = exp_acc(row_max - m_use);
    Acc pr = exp_acc(x - m_use);
    row_sum = row_sum * alpha + warp_sum(pr);  // of the undropped weights, as on the CPU
    row_max = m_new;
    if (m.dropout() && pr != Acc(0)) pr = m.keep(bh, r, kv0 + lane) ? pr * m.keep_scale : Acc(0);
#pragma unroll
    for (int i = 0; i < kLaneDims; ++i) o[i] *= alpha;
    const int n = static_cast<int>(K - kv0 < kBc ? K - kv0 : kBc);
    for (int j = 0; j < n; ++j) {
      const Acc pj = __shfl_sync(0xffffffffu, pr, j);
      if (pj == Acc(0)) continue;  // warp-uniform
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < Dv) o[i] += pj * sV[j * Dv + d];
      }
    }
  }
  if (r >= Q) return;
  const Acc inv = row_sum > Acc(0) ? Acc(1) / row_sum : Acc(0);  // no key: zeros
#pragma unroll
  for (int i = 0; i < kLaneDims; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < Dv) store_acc(p.out + (bh * Q + r) * Dv + d, o[i] * inv);
  }
  if (lane == 0)
    attn::store_row_stats(p.stats, bh * Q + r, row_max, row_sum);
}

// ---- backward pieces ------------------------------------------------------------------------

// delta = rowsum(dout * out) [B * H * Q], a warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    sdpa_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                      acc_t<T>* __restrict__ delta, int64_t rows, int64_t Dv) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  Acc s = 0;
  for (int64_t d = lane; d < Dv; d += 32)
    s += load_acc(dout + row * Dv + d) * load_acc(out + row * Dv + d);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// The gradient terms of one (query, key) element from its raw products s = q.k and
// dp = dO.v: pd (the dropped weight, for dV) and ds (for dQ and dK; without the scale).
template <typename Acc>
__device__ __forceinline__ void element_grads(const attn::SdpaMasking<Acc>& m, Acc s, Acc dp,
                                              int64_t mrow, int key, int end, Acc lse, Acc delta,
                                              int64_t bh, int64_t q, Acc& pd, Acc& ds) {
  const Acc pr = exp_acc(m.score(s, mrow, key, end) - lse);  // lse = +inf (no key): 0
  pd = pr;
  if (m.dropout() && pr != Acc(0)) {
    const bool keep = m.keep(bh, q, key);
    pd = keep ? pr * m.keep_scale : Acc(0);
    dp = keep ? dp * m.keep_scale : Acc(0);
  }
  ds = pr * (dp - delta);
}

// ---- CUDA-core dQ: a warp per query row ------------------------------------------------------

template <typename Acc>
size_t dq_rows_smem(int64_t D, int64_t Dv) {
  constexpr int kBc = lane_rows<Acc>();
  return (kRowWarps * (D + Dv) + kBc * (odd_stride(D) + odd_stride(Dv))) * sizeof(Acc);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) sdpa_bwd_dq_rows_kernel(const SdpaArgs<T> p) {
  using Acc = acc_t<T>;
  constexpr int kBc = lane_rows<Acc>();
  const auto m = p.mask.resolved();
  const int64_t Q = p.Q, K = p.K, D = p.D, Dv = p.Dv, ldk = odd_stride(D), ldv = odd_stride(Dv);
  Acc* sQ = reinterpret_cast<Acc*>(rows_smem);  // [kRowWarps][D]
  Acc* sdO = sQ + kRowWarps * D;                // [kRowWarps][Dv]
  Acc* sK = sdO + kRowWarps * Dv;               // [kBc][ldk]
  Acc* sV = sK + kBc * ldk;                     // [kBc][ldv]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q_tiles = attn::div_up(Q, kRowWarps);
  const int64_t qt = q_tiles - 1 - blockIdx.x % q_tiles;
  const int64_t bh = blockIdx.x / q_tiles, b = bh / p.H, h = bh % p.H, q0 = qt * kRowWarps;
  const int64_t r = q0 + warp;
  const bool in = r < Q;
  const int end = in ? m.row_end(b, h, r) : 0;
  const int64_t mrow = m.mask_row(b, h, r);
  const Acc lse = in ? attn::row_lse(p.stats_in, bh * Q + r) : attn::pos_inf<Acc>();
  const Acc delta = in ? p.delta[bh * Q + r] : Acc(0);
  const int kv_end = block_max(end);
  stage_rows(sQ, D, p.q + bh * Q * D, q0, kRowWarps, Q, D);
  stage_rows(sdO, Dv, p.dout + bh * Q * Dv, q0, kRowWarps, Q, Dv);

  Acc dq[kLaneDims] = {};
  for (int kv0 = 0; kv0 < kv_end; kv0 += kBc) {
    __syncthreads();
    stage_rows(sK, ldk, p.k + bh * K * D, kv0, kBc, K, D);
    stage_rows(sV, ldv, p.v + bh * K * Dv, kv0, kBc, K, Dv);
    __syncthreads();
    Acc pd = 0, ds = 0;
    if (lane < kBc)
      element_grads(m, dot(sQ + warp * D, sK + lane * ldk, D),
                    dot(sdO + warp * Dv, sV + lane * ldv, Dv), mrow, kv0 + lane, end, lse, delta,
                    bh, r, pd, ds);
    const int n = static_cast<int>(K - kv0 < kBc ? K - kv0 : kBc);
    for (int j = 0; j < n; ++j) {
      const Acc dsj = __shfl_sync(0xffffffffu, ds, j);
      if (dsj == Acc(0)) continue;
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) dq[i] += dsj * sK[j * ldk + d];
      }
    }
  }
  if (!in) return;
#pragma unroll
  for (int i = 0; i < kLaneDims; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < D) store_acc(p.dq + (bh * Q + r) * D + d, dq[i] * m.scale);
  }
}

// ---- CUDA-core dK, dV: a warp per key row ------------------------------------------------------

template <typename Acc>
size_t dkdv_rows_smem(int64_t D, int64_t Dv) {
  constexpr int kBr = lane_rows<Acc>();
  return (kRowWarps * (D + Dv) + kBr * (odd_stride(D) + odd_stride(Dv)) + 2 * kBr) * sizeof(Acc) +
         kBr * sizeof(int);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) sdpa_bwd_dkdv_rows_kernel(const SdpaArgs<T> p) {
  using Acc = acc_t<T>;
  constexpr int kBr = lane_rows<Acc>();
  const auto m = p.mask.resolved();
  const int64_t Q = p.Q, K = p.K, D = p.D, Dv = p.Dv, ldq = odd_stride(D), ldo = odd_stride(Dv);
  Acc* sK = reinterpret_cast<Acc*>(rows_smem);  // [kRowWarps][D]: the block's key rows
  Acc* sV = sK + kRowWarps * D;                 // [kRowWarps][Dv]
  Acc* sQ = sV + kRowWarps * Dv;                // [kBr][ldq]
  Acc* sdO = sQ + kBr * ldq;                    // [kBr][ldo]
  Acc* sLse = sdO + kBr * ldo;                  // [kBr]
  Acc* sDelta = sLse + kBr;                     // [kBr]
  int* sEnd = reinterpret_cast<int*>(sDelta + kBr);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t k_tiles = attn::div_up(K, kRowWarps);
  const int64_t bh = blockIdx.x / k_tiles, b = bh / p.H, h = bh % p.H;
  const int k0 = static_cast<int>((blockIdx.x % k_tiles) * kRowWarps);
  const int key = k0 + warp;
  stage_rows(sK, D, p.k + bh * K * D, k0, kRowWarps, K, D);
  stage_rows(sV, Dv, p.v + bh * K * Dv, k0, kRowWarps, K, Dv);

  Acc dk[kLaneDims] = {}, dv[kLaneDims] = {};
  for (int64_t i0 = 0; i0 < Q; i0 += kBr) {
    // Skip query tiles no row of which reaches the block's keys (also the barrier that
    // ends the previous tile's reads).
    if (!__syncthreads_or(tid < kBr && i0 + tid < Q && m.row_end(b, h, i0 + tid) > k0)) continue;
    stage_rows(sQ, ldq, p.q + bh * Q * D, i0, kBr, Q, D);
    stage_rows(sdO, ldo, p.dout + bh * Q * Dv, i0, kBr, Q, Dv);
    if (tid < kBr) {
      const int64_t r = i0 + tid;
      sLse[tid] = r < Q ? attn::row_lse(p.stats_in, bh * Q + r) : attn::pos_inf<Acc>();
      sDelta[tid] = r < Q ? p.delta[bh * Q + r] : Acc(0);
      sEnd[tid] = r < Q ? m.row_end(b, h, r) : 0;
    }
    __syncthreads();
    Acc pd = 0, ds = 0;
    if (lane < kBr) {
      const int64_t r = i0 + lane;
      element_grads(m, dot(sQ + lane * ldq, sK + warp * D, D),
                    dot(sdO + lane * ldo, sV + warp * Dv, Dv), m.mask_row(b, h, r), key,
                    sEnd[lane], sLse[lane], sDelta[lane], bh, r, pd, ds);
    }
    const int n = static_cast<int>(Q - i0 < kBr ? Q - i0 : kBr);
    for (int j = 0; j < n; ++j) {
      const Acc pdj = __shfl_sync(0xffffffffu, pd, j), dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) {
        const int64_t d = lane + 32 * i;
        if (pdj != Acc(0) && d < Dv) dv[i] += pdj * sdO[j * ldo + d];
        if (dsj != Acc(0) && d < D) dk[i] += dsj * sQ[j * ldq + d];
      }
    }
  }
  if (key >= K) return;
#pragma unroll
  for (int i = 0; i < kLaneDims; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < D) store_acc(p.dk + (bh * K + key) * D + d, dk[i] * m.scale);
    if (d < Dv) store_acc(p.dv + (bh * K + key) * Dv + d, dv[i]);
  }
}

// ---- host ---------------------------------------------------------------------------------

template <typename T>
constexpr bool kHalfType = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// The tensor-core kernels: half types on sm_80+, head dims up to `limit`.
bool use_tensor_cores(bool half_type, int64_t D, int64_t Dv, int64_t limit) {
  if (!half_type || D > limit || Dv > limit) return false;
  return attn::device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8;
}

// Calls f with the head-dim bucket (32, 64, 128 or 256) that holds max(D, Dv).
template <typename F>
void with_head_dim_bucket(int64_t D, int64_t Dv, F&& f) {
  const int64_t d = D > Dv ? D : Dv;
  if (d <= 32)
    f(std::integral_constant<int, 32>{});
  else if (d <= 64)
    f(std::integral_constant<int, 64>{});
  else if (d <= 128)
    f(std::integral_constant<int, 128>{});
  else
    f(std::integral_constant<int, 256>{});
}

template <typename Kernel, typename T>
void launch(Kernel* kernel, int64_t blocks, int threads, size_t smem, const SdpaArgs<T>& args,
            const char* op) {
  attn::allow_shared_memory(kernel, smem, op);
  kernel<<<attn::grid_1d(blocks, op), threads, smem, current_stream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_head_dims(const char* op, int64_t D, int64_t Dv) {
  TORCH_CHECK(D <= kMaxHeadDim && Dv <= kMaxHeadDim, op,
              ": the CUDA kernels take head dims up to ", kMaxHeadDim, ", got D=", D, ", Dv=", Dv);
}

template <typename T>
bool vec16(const T* ptr, int64_t row) {
  return row % 8 == 0 && attn::is_aligned16(ptr);
}

template <typename T>
SdpaArgs<T> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const attn::SdpaMasking<acc_t<T>>& mask) {
  SdpaArgs<T> a;
  a.q = q.const_data_ptr<T>();
  a.k = k.const_data_ptr<T>();
  a.v = v.const_data_ptr<T>();
  a.B = q.size(0);
  a.H = q.size(1);
  a.Q = q.size(2);
  a.D = q.size(3);
  a.K = k.size(2);
  a.Dv = v.size(3);
  a.mask = mask;
  a.vec_q = vec16(a.q, a.D);
  a.vec_k = vec16(a.k, a.D);
  a.vec_v = vec16(a.v, a.Dv);
  return a;
}

template <typename T>
void sdpa_forward(const SdpaArgs<T>& a) {
  constexpr const char* op = "scaled_dot_product_attention";
  using Acc = acc_t<T>;
  if constexpr (kHalfType<T>) {
    if (use_tensor_cores(true, a.D, a.Dv, kMaxHeadDim)) {
      with_head_dim_bucket(a.D, a.Dv, [&](auto bucket) {
        constexpr int kD = decltype(bucket)::value;
        launch(attn::tc::sdpa_fwd_kernel<T, kD>, ceil_div(a.Q, attn::tc::kRows) * a.B * a.H,
               attn::tc::kThreads, attn::tc::fwd_smem_bytes<kD>(), a, op);
      });
      return;
    }
  }
  launch(sdpa_fwd_rows_kernel<T>, ceil_div(a.Q, kRowWarps) * a.B * a.H, kRowThreads,
         fwd_rows_smem<Acc>(a.D, a.Dv), a, op);
}

template <typename T>
void sdpa_backward(const SdpaArgs<T>& a) {
  constexpr const char* op = "scaled_dot_product_attention_backward";
  using Acc = acc_t<T>;
  if constexpr (kHalfType<T>) {
    if (use_tensor_cores(true, a.D, a.Dv, 128)) {
      with_head_dim_bucket(a.D, a.Dv, [&](auto bucket) {
        constexpr int kD = decltype(bucket)::value;
        if constexpr (kD <= 128) {
          launch(attn::tc::sdpa_bwd_dkdv_kernel<T, kD>, ceil_div(a.K, attn::tc::kRows) * a.B * a.H,
                 attn::tc::kThreads, attn::tc::dkdv_smem_bytes<kD>(), a, op);
          launch(attn::tc::sdpa_bwd_dq_kernel<T, kD>, ceil_div(a.Q, attn::tc::kRows) * a.B * a.H,
                 attn::tc::kThreads, attn::tc::dq_smem_bytes<kD>(), a, op);
        }
      });
      return;
    }
  }
  launch(sdpa_bwd_dkdv_rows_kernel<T>, ceil_div(a.K, kRowWarps) * a.B * a.H, kRowThreads,
         dkdv_rows_smem<Acc>(a.D, a.Dv), a, op);
  launch(sdpa_bwd_dq_rows_kernel<T>, ceil_div(a.Q, kRowWarps) * a.B * a.H, kRowThreads,
         dq_rows_smem<Acc>(a.D, a.Dv), a, op);
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> scaled_dot_product_attention_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& valid_lens_arg,
    bool is_causal, std::optional<double> scale, double dropout_p, int64_t seed) {
  const std::optional<at::Tensor> valid_lens = private_copy(valid_lens_arg);  // check_format.h
  check_sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p);
  const char* op = "scaled_dot_product_attention";
  check_head_dims(op, query.size(3), value.size(3));
  const c10::cuda::CUDAGuard guard(query.device());
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2);
  auto out = at::empty({B, H, Q, v.size(3)}, q.options());
  auto stats = at::empty({B, H, Q, 2}, q.options().dtype(acc_dtype(q.scalar_type())));
  SEQFUSE_DISPATCH_CUDA_TYPES(q.scalar_type(), "scaled_dot_product_attention_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    attn::SdpaMaskingHolder hold;
    const auto mask = attn::make_sdpa_masking<Acc>(q, k, attn_mask, valid_lens, is_causal, scale,
                                                   dropout_p, seed, hold);
    auto a = make_args<scalar_t>(q, k, v, mask);
    a.out = out.data_ptr<scalar_t>();
    a.stats = stats.data_ptr<Acc>();
    a.vec_out = vec16(a.out, a.Dv);
    sdpa_forward(a);
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_dot_product_attention_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& valid_lens_arg, const at::Tensor& output,
    const at::Tensor& softmax_stats, bool is_causal, std::optional<double> scale,
    double dropout_p, int64_t seed) {
  const std::optional<at::Tensor> valid_lens = private_copy(valid_lens_arg);  // check_format.h
  check_sdpa_backward_args(grad_output, query, key, value, attn_mask, valid_lens, output,
                           softmax_stats, scale, dropout_p);
  const char* op = "scaled_dot_product_attention_backward";
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2);
  check_head_dims(op, query.size(3), value.size(3));
  const c10::cuda::CUDAGuard guard(query.device());
  const auto dt = query.scalar_type();
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const auto go = grad_output.to(dt).contiguous(), o = output.to(dt).contiguous();
  const auto l = softmax_stats.to(acc_dtype(dt)).contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  SEQFUSE_DISPATCH_CUDA_TYPES(dt, "scaled_dot_product_attention_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    attn::SdpaMaskingHolder hold;
    const auto mask = attn::make_sdpa_masking<Acc>(q, k, attn_mask, valid_lens, is_causal, scale,
                                                   dropout_p, seed, hold);
    auto a = make_args<scalar_t>(q, k, v, mask);
    auto delta = at::empty({B, H, Q}, l.options());
    const int64_t rows = B * H * Q;
    const dim3 grid = attn::grid_1d(ceil_div(rows, kRowWarps), op);
    sdpa_delta_kernel<scalar_t><<<grid, kRowThreads, 0, current_stream()>>>(
        go.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), delta.data_ptr<Acc>(), rows,
        a.Dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.dout = go.const_data_ptr<scalar_t>();
    a.stats_in = l.const_data_ptr<Acc>();
    a.delta = delta.const_data_ptr<Acc>();
    a.dq = dq.data_ptr<scalar_t>();
    a.dk = dk.data_ptr<scalar_t>();
    a.dv = dv.data_ptr<scalar_t>();
    a.vec_dout = vec16(a.dout, a.Dv);
    a.vec_dq = vec16(a.dq, a.D);
    a.vec_dk = vec16(a.dk, a.D);
    a.vec_dv = vec16(a.dv, a.Dv);
    sdpa_backward(a);
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("scaled_dot_product_attention", &scaled_dot_product_attention_cuda);
  m.impl("scaled_dot_product_attention_backward", &scaled_dot_product_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace seqfuse
