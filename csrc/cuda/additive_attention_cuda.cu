// CUDA kernels of masked additive (Bahdanau) attention (shapes and masks in attention.h).
//
// score[b, q, k] = w_v . tanh(query[b, q] + key[b, k]) costs B*Q*K*A tanh, and tanh
// throughput (the SFU, 16 a clock per SM) is the bound, not memory: the kernels stage
// query and key rows in shared memory and keep a tile of (query, key) pairs per thread
// with the reduction over A in registers, so the [B, Q, K, A] features never exist.
//
// Forward:  scores kernel (tile of 16*R queries x 64 keys per block, masked pairs -inf)
//           -> masked softmax, one warp per row -> context = weights @ value (at::bmm).
//           The scores go to a float scratch for the half types and straight into the
//           weights for float/double (softmaxed in place).
// Backward: dW = grad_weights + grad_context @ value^T (at::bmm); dS = W * (dW - rowsum(
//           dW * W)) (row kernel); grad_value = W^T @ grad_context (at::bmm); then two
//           kernels evaluate tanh again per pair: dquery (each block loops over the keys,
//           and also sums dw_v per block: deterministic partials, reduced by at::sum) and
//           dkey (loops over the queries). With t = tanh(q + k):
//             dq[a] = w_v[a] sum_k dS (1 - t^2);  dk[a] = w_v[a] sum_q dS (1 - t^2);
//             dw_v[a] = sum_{q,k} dS t.
//           Keys (queries) whose dS is zero for the whole tile (masked) are skipped.
#include "attention_common.cuh"

#include <torch/library.h>

#include <tuple>

namespace seqfuse {
namespace cuda {
namespace {

using attn::LensRef;
using attn::ScoreTanh;
using attn::neg_inf;

// Every kernel here is a 16 x 16 grid of threads; thread (tx, ty) owns the rows ty + 16 i
// (i < R) of one side and the columns tx + 16 j (j < kCols) of the other. Strided, not
// contiguous, ownership keeps every shared-memory read conflict-free or a broadcast.
constexpr int kSide = 16;
constexpr int kThreads = kSide * kSide;
constexpr int kCols = 4;
constexpr int kStageA = 32;     // features per shared-memory stage of the scores kernel
constexpr int kStageRows = 32;  // keys (queries) per stage of the dquery (dkey) kernel

// valid_lens and the bool mask, broadcast to [B, Q, K] through strides.
struct AdditiveMask {
  LensRef lens;
  const bool* mask = nullptr;
  int64_t mb = 0, mq = 0, mk = 0;
  __device__ __forceinline__ bool allowed(int64_t b, int64_t q, int64_t k, int64_t K) const {
    return k < lens.end(b, q, K) && (mask == nullptr || mask[b * mb + q * mq + k * mk]);
  }
};

// Raw scores of a tile of kSide*kRows queries x kSide*kCols keys, -inf where masked.
// scores: [B, Q, K] in the compute type.
template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads)
    additive_scores_kernel(const T* __restrict__ query, const T* __restrict__ key,
                           const T* __restrict__ w_v, acc_t<T>* __restrict__ scores,
                           AdditiveMask mask, int64_t Q, int64_t K, int64_t A, int64_t q_tiles,
                           int64_t k_tiles) {
  using Acc = acc_t<T>;
  constexpr int kTQ = kSide * kRows, kTK = kSide * kCols;
  __shared__ Acc sq[kStageA][kTQ + 1];  // [feature][query]: a query's features down a column
  __shared__ Acc sk[kStageA][kTK + 1];
  __shared__ Acc sw[kStageA];
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  int64_t blk = blockIdx.x;
  const int64_t k0 = (blk % k_tiles) * kTK;
  blk /= k_tiles;
  const int64_t q0 = (blk % q_tiles) * kTQ, b = blk / q_tiles;

  bool ok[kRows][kCols];
  bool any = false;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t q = q0 + ty + kSide * i, k = k0 + tx + kSide * j;
      ok[i][j] = q < Q && k < K && mask.allowed(b, q, k, K);
      any |= ok[i][j];
    }
  Acc acc[kRows][kCols] = {};
  if (__syncthreads_or(any)) {  // a fully masked tile (padding) costs no tanh
    for (int64_t a0 = 0; a0 < A; a0 += kStageA) {
      // Zero-padded features add w 0 * tanh(0 + 0) = 0.
      for (int idx = tid; idx < kTQ * kStageA; idx += kThreads) {
        const int r = idx / kStageA, a = idx % kStageA;
        const int64_t q = q0 + r;
        sq[a][r] = q < Q && a0 + a < A ? load_acc(query + (b * Q + q) * A + a0 + a) : Acc(0);
      }
      for (int idx = tid; idx < kTK * kStageA; idx += kThreads) {
        const int r = idx / kStageA, a = idx % kStageA;
        const int64_t k = k0 + r;
        sk[a][r] = k < K && a0 + a < A ? load_acc(key + (b * K + k) * A + a0 + a) : Acc(0);
      }
      if (tid < kStageA) sw[tid] = a0 + tid < A ? load_acc(w_v + a0 + tid) : Acc(0);
      __syncthreads();
#pragma unroll 8
      for (int a = 0; a < kStageA; ++a) {
        const Acc w = sw[a];
        Acc qv[kRows], kv[kCols];
#pragma unroll
        for (int i = 0; i < kRows; ++i) qv[i] = sq[a][ty + kSide * i];
#pragma unroll
        for (int j = 0; j < kCols; ++j) kv[j] = sk[a][tx + kSide * j];
#pragma unroll
        for (int i = 0; i < kRows; ++i)
#pragma unroll
          for (int j = 0; j < kCols; ++j) acc[i][j] += w * ScoreTanh<T>::apply(qv[i] + kv[j]);
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t q = q0 + ty + kSide * i, k = k0 + tx + kSide * j;
      if (q < Q && k < K) scores[(b * Q + q) * K + k] = ok[i][j] ? acc[i][j] : neg_inf<Acc>();
    }
}

constexpr int kRowWarps = 8;  // rows per block of the row kernels (one warp each)

// weights = softmax of each row of scores ([rows, K], -inf = masked); zeros for a row with
// no allowed key. scores may alias weights (float/double: softmax in place; each element
// is read and then written by the same lane).
template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps)
    masked_softmax_rows_kernel(const acc_t<T>* scores, T* weights, int64_t rows, int64_t K) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const Acc* s = scores + row * K;
  T* w = weights + row * K;
  Acc mx = neg_inf<Acc>();
  for (int64_t k = lane; k < K; k += 32) mx = fmax(mx, s[k]);
  mx = attn::warp_max(mx);
  if (mx == neg_inf<Acc>()) {
    for (int64_t k = lane; k < K; k += 32) store_acc(w + k, Acc(0));
    return;
  }
  Acc sum = 0;
  for (int64_t k = lane; k < K; k += 32) sum += attn::exp_acc(s[k] - mx);
  const Acc inv = Acc(1) / attn::warp_sum(sum);
  for (int64_t k = lane; k < K; k += 32) store_acc(w + k, attn::exp_acc(s[k] - mx) * inv);
}

// dS = W * (dW - sum_k W dW) with dW = grad_weights + grad_context @ value^T, per row.
// All [rows, K]; dscore in the compute type. Masked entries (W = 0) get exactly 0.
template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps)
    additive_dscore_kernel(const T* __restrict__ weights, const T* __restrict__ grad_weights,
                           const T* __restrict__ grad_context_value, acc_t<T>* __restrict__ dscore,
                           int64_t rows, int64_t K) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t off = row * K;
  Acc dot = 0;
  for (int64_t k = lane; k < K; k += 32)
    dot += load_acc(weights + off + k) *
           (load_acc(grad_weights + off + k) + load_acc(grad_context_value + off + k));
  dot = attn::warp_sum(dot);
  for (int64_t k = lane; k < K; k += 32) {
    const Acc dw = load_acc(grad_weights + off + k) + load_acc(grad_context_value + off + k);
    dscore[off + k] = load_acc(weights + off + k) * (dw - dot);
  }
}

// grad_query rows q0 + ty + 16 i, features a0 + tx + 16 j of one batch entry, looping over
// the keys; also the block's share of grad_w_v: dw_part [B * q_tiles, A].
template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads)
    additive_dquery_kernel(const T* __restrict__ query, const T* __restrict__ key,
                           const T* __restrict__ w_v, const acc_t<T>* __restrict__ dscore,
                           T* __restrict__ dquery, acc_t<T>* __restrict__ dw_part, int64_t Q,
                           int64_t K, int64_t A, int64_t q_tiles, int64_t a_tiles) {
  using Acc = acc_t<T>;
  using Tanh = ScoreTanh<T>;
  constexpr int kTQ = kSide * kRows, kTA = kSide * kCols, kTK = kStageRows;
  __shared__ Acc sk[kTK][kTA + 1];   // key rows of the stage
  __shared__ Acc sds[kTK][kTQ + 1];  // dS of the stage, transposed: [key][query]
  __shared__ int live[kTK];          // whether a key has a non-zero dS in this tile
  __shared__ Acc sred[kSide][kTA];
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  int64_t blk = blockIdx.x;
  const int64_t a0 = (blk % a_tiles) * kTA;
  blk /= a_tiles;
  const int64_t qt = blk % q_tiles, b = blk / q_tiles, q0 = qt * kTQ;

  Acc qv[kRows][kCols], dq[kRows][kCols] = {}, dw[kCols] = {};
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t q = q0 + ty + kSide * i, a = a0 + tx + kSide * j;
      qv[i][j] = q < Q && a < A ? load_acc(query + (b * Q + q) * A + a) : Acc(0);
    }
  for (int64_t k0 = 0; k0 < K; k0 += kTK) {
    __syncthreads();  // the previous stage's readers are done
    for (int idx = tid; idx < kTK * kTA; idx += kThreads) {
      const int r = idx / kTA, a = idx % kTA;
      const int64_t k = k0 + r;
      sk[r][a] = k < K && a0 + a < A ? load_acc(key + (b * K + k) * A + a0 + a) : Acc(0);
    }
    for (int idx = tid; idx < kTQ * kTK; idx += kThreads) {
      const int r = idx / kTK, c = idx % kTK;
      const int64_t q = q0 + r, k = k0 + c;
      sds[c][r] = q < Q && k < K ? dscore[(b * Q + q) * K + k] : Acc(0);
    }
    __syncthreads();
    bool nonzero = false;
    if (tid < kTK) {
      for (int r = 0; r < kTQ; ++r) nonzero |= sds[tid][r] != Acc(0);
      live[tid] = nonzero;
    }
    if (!__syncthreads_or(nonzero)) continue;
    for (int c = 0; c < kTK; ++c) {
      if (!live[c]) continue;  // uniform across the block
      Acc kv[kCols], ds[kRows];
#pragma unroll
      for (int j = 0; j < kCols; ++j) kv[j] = sk[c][tx + kSide * j];
#pragma unroll
      for (int i = 0; i < kRows; ++i) ds[i] = sds[c][ty + kSide * i];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const Acc t = Tanh::apply(qv[i][j] + kv[j]);
          dq[i][j] += ds[i] * (Acc(1) - t * t);
          dw[j] += ds[i] * t;
        }
    }
  }
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t a = a0 + tx + kSide * j;
    if (a >= A) continue;
    const Acc w = load_acc(w_v + a);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t q = q0 + ty + kSide * i;
      if (q < Q) store_acc(dquery + (b * Q + q) * A + a, w * dq[i][j]);
    }
  }
  // grad_w_v: this block's rows summed in a fixed order (deterministic).
#pragma unroll
  for (int j = 0; j < kCols; ++j) sred[ty][tx + kSide * j] = dw[j];
  __syncthreads();
  if (tid < kTA && a0 + tid < A) {
    Acc s = 0;
    for (int r = 0; r < kSide; ++r) s += sred[r][tid];
    dw_part[(b * q_tiles + qt) * A + a0 + tid] = s;
  }
}

// grad_key rows k0 + ty + 16 i, features a0 + tx + 16 j of one batch entry, looping over
// the queries.
template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads)
    additive_dkey_kernel(const T* __restrict__ query, const T* __restrict__ key,
                         const T* __restrict__ w_v, const acc_t<T>* __restrict__ dscore,
                         T* __restrict__ dkey, int64_t Q, int64_t K, int64_t A, int64_t k_tiles,
                         int64_t a_tiles) {
  using Acc = acc_t<T>;
  using Tanh = ScoreTanh<T>;
  constexpr int kTK = kSide * kRows, kTA = kSide * kCols, kTQ = kStageRows;
  __shared__ Acc sq[kTQ][kTA + 1];   // query rows of the stage
  __shared__ Acc sds[kTQ][kTK + 1];  // dS of the stage: [query][key]
  __shared__ int live[kTQ];          // whether a query has a non-zero dS in this tile
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  int64_t blk = blockIdx.x;
  const int64_t a0 = (blk % a_tiles) * kTA;
  blk /= a_tiles;
  const int64_t k0 = (blk % k_tiles) * kTK, b = blk / k_tiles;

  Acc kv[kRows][kCols], dk[kRows][kCols] = {};
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t k = k0 + ty + kSide * i, a = a0 + tx + kSide * j;
      kv[i][j] = k < K && a < A ? load_acc(key + (b * K + k) * A + a) : Acc(0);
    }
  for (int64_t q0 = 0; q0 < Q; q0 += kTQ) {
    __syncthreads();
    for (int idx = tid; idx < kTQ * kTA; idx += kThreads) {
      const int r = idx / kTA, a = idx % kTA;
      const int64_t q = q0 + r;
      sq[r][a] = q < Q && a0 + a < A ? load_acc(query + (b * Q + q) * A + a0 + a) : Acc(0);
    }
    for (int idx = tid; idx < kTQ * kTK; idx += kThreads) {
      const int r = idx / kTK, c = idx % kTK;
      const int64_t q = q0 + r, k = k0 + c;
      sds[r][c] = q < Q && k < K ? dscore[(b * Q + q) * K + k] : Acc(0);
    }
    __syncthreads();
    bool nonzero = false;
    if (tid < kTQ) {
      for (int c = 0; c < kTK; ++c) nonzero |= sds[tid][c] != Acc(0);
      live[tid] = nonzero;
    }
    if (!__syncthreads_or(nonzero)) continue;
    for (int r = 0; r < kTQ; ++r) {
      if (!live[r]) continue;  // uniform across the block
      Acc qv[kCols], ds[kRows];
#pragma unroll
      for (int j = 0; j < kCols; ++j) qv[j] = sq[r][tx + kSide * j];
#pragma unroll
      for (int i = 0; i < kRows; ++i) ds[i] = sds[r][ty + kSide * i];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const Acc t = Tanh::apply(qv[j] + kv[i][j]);
          dk[i][j] += ds[i] * (Acc(1) - t * t);
        }
    }
  }
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t a = a0 + tx + kSide * j;
    if (a >= A) continue;
    const Acc w = load_acc(w_v + a);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t k = k0 + ty + kSide * i;
      if (k < K) store_acc(dkey + (b * K + k) * A + a, w * dk[i][j]);
    }
  }
}

// Rows per thread along the side that has Q (or K) entries: 4 (64-row tiles), or 1 for
// a handful of rows (a decoder step, Q = 1), where 64-row tiles would be mostly idle.
template <typename F>
void with_rows_per_thread(int64_t n, F&& f) {
  if (n <= kSide)
    f(std::integral_constant<int, 1>{});
  else
    f(std::integral_constant<int, 4>{});
}

AdditiveMask make_additive_mask(const std::optional<at::Tensor>& valid_lens,
                                const std::optional<at::Tensor>& mask, int64_t B, int64_t Q,
                                int64_t K, at::Tensor& lens_hold, at::Tensor& mask_hold) {
  AdditiveMask m;
  if (valid_lens.has_value()) {
    lens_hold = valid_lens->to(at::kLong).contiguous();
    m.lens.lens = lens_hold.const_data_ptr<int64_t>();
    m.lens.per_b = valid_lens->dim() == 1 ? 1 : Q;
  }
  if (mask.has_value()) {
    mask_hold = mask->expand({B, Q, K});
    m.mask = mask_hold.const_data_ptr<bool>();
    m.mb = mask_hold.stride(0);
    m.mq = mask_hold.stride(1);
    m.mk = mask_hold.stride(2);
  }
  return m;
}

int64_t row_blocks(int64_t rows) { return ceil_div(rows, kRowWarps); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> additive_attention_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& w_v, const at::Tensor& value,
    const std::optional<at::Tensor>& valid_lens_arg, const std::optional<at::Tensor>& mask) {
  const std::optional<at::Tensor> valid_lens = private_copy(valid_lens_arg);  // check_format.h
  check_additive_attention_args(query, key, w_v, value, valid_lens, mask);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto q = query.contiguous(), k = key.contiguous(), w = w_v.contiguous();
  const int64_t B = q.size(0), Q = q.size(1), A = q.size(2), K = k.size(1);
  auto weights = at::empty({B, Q, K}, q.options());
  at::Tensor lens_hold, mask_hold;
  const AdditiveMask am = make_additive_mask(valid_lens, mask, B, Q, K, lens_hold, mask_hold);
  const auto stream = current_stream();
  SEQFUSE_DISPATCH_CUDA_TYPES(q.scalar_type(), "additive_attention_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    constexpr bool kInPlace = std::is_same_v<Acc, scalar_t>;
    const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<Acc>::value);
    const auto scores = kInPlace ? weights : at::empty({B, Q, K}, acc_opts);
    with_rows_per_thread(Q, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      const int64_t q_tiles = ceil_div(Q, kSide * R), k_tiles = ceil_div(K, kSide * kCols);
      const dim3 grid = attn::grid_1d(B * q_tiles * k_tiles, "additive_attention");
      additive_scores_kernel<scalar_t, R><<<grid, kThreads, 0, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          reinterpret_cast<Acc*>(scores.data_ptr()), am, Q, K, A, q_tiles, k_tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const dim3 rows_grid = attn::grid_1d(row_blocks(B * Q), "additive_attention");
    masked_softmax_rows_kernel<scalar_t><<<rows_grid, 32 * kRowWarps, 0, stream>>>(
        reinterpret_cast<const Acc*>(scores.const_data_ptr()), weights.data_ptr<scalar_t>(), B * Q,
        K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto context = at::bmm(weights, value);
  return {context, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward_cuda(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& w_v, const at::Tensor& value,
    const at::Tensor& weights) {
  check_additive_attention_backward_args(grad_context, grad_weights, query, key, w_v, value,
                                         weights);
  const int64_t B = query.size(0), Q = query.size(1), A = query.size(2), K = key.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto dt = query.scalar_type();
  const auto q = query.contiguous(), k = key.contiguous(), w = w_v.contiguous();
  const auto p = weights.to(dt).contiguous(), gw = grad_weights.to(dt).contiguous();
  const auto gc = grad_context.to(dt), v = value;
  auto grad_value = at::bmm(p.transpose(1, 2), gc);
  const auto gcv = at::bmm(gc, v.transpose(1, 2)).contiguous();  // [B, Q, K]
  auto dq = at::empty_like(q), dk = at::empty_like(k);
  at::Tensor dw;
  const auto stream = current_stream();
  SEQFUSE_DISPATCH_CUDA_TYPES(dt, "additive_attention_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<Acc>::value);
    auto dscore = at::empty({B, Q, K}, acc_opts);
    const dim3 rows_grid = attn::grid_1d(row_blocks(B * Q), "additive_attention_backward");
    additive_dscore_kernel<scalar_t><<<rows_grid, 32 * kRowWarps, 0, stream>>>(
        p.const_data_ptr<scalar_t>(), gw.const_data_ptr<scalar_t>(), gcv.const_data_ptr<scalar_t>(),
        dscore.data_ptr<Acc>(), B * Q, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t a_tiles = ceil_div(A, kSide * kCols);
    with_rows_per_thread(Q, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      const int64_t q_tiles = ceil_div(Q, kSide * R);
      auto dw_part = at::empty({B * q_tiles, A}, acc_opts);
      const dim3 grid = attn::grid_1d(B * q_tiles * a_tiles, "additive_attention_backward");
      additive_dquery_kernel<scalar_t, R><<<grid, kThreads, 0, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          dscore.const_data_ptr<Acc>(), dq.data_ptr<scalar_t>(), dw_part.data_ptr<Acc>(), Q, K, A,
          q_tiles, a_tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dw = dw_part.sum(0).to(dt);
    });
    with_rows_per_thread(K, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      const int64_t k_tiles = ceil_div(K, kSide * R);
      const dim3 grid = attn::grid_1d(B * k_tiles * a_tiles, "additive_attention_backward");
      additive_dkey_kernel<scalar_t, R><<<grid, kThreads, 0, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          dscore.const_data_ptr<Acc>(), dk.data_ptr<scalar_t>(), Q, K, A, k_tiles, a_tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq, dk, dw, grad_value};
}

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("additive_attention", &additive_attention_cuda);
  m.impl("additive_attention_backward", &additive_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace seqfuse
