// The engine of the fused recurrent layers on CUDA, shared by the LSTM, the GRU and the
// Elman RNN, forward and backward: which batch row runs where (HostOrder/DeviceOrder),
// the recurrence as one persistent cooperative kernel or as a GEMM plus a pointwise
// kernel per step, and the choice between the two. recurrent_cuda.cu supplies the
// "Step" (what a step multiplies and what it does with the products); nothing here
// knows about gates.
//
// A step's recurrent product. Each step s multiplies rows A_s [rows, K] of a
// double-buffered, slot-ordered state (forward: h_{s-1}, K = H; backward: the gate
// gradients of step s+1, K = G*H) by the recurrent weights (forward W_hh^T, backward
// W_hh), and hands every (direction, slot, hidden unit j) its products to Step::epilogue,
// which runs the cell math (cell_math.h) and writes the next A rows.
//
// Persistent kernel (persistent_recurrence). One cooperative launch runs every step of
// both directions. Block (d, unit slice [j0, j0+U)) keeps the weights its units need,
// W_s[K][R] with R = the product columns of U units (forward: all G gates of the U units,
// so the cell math stays local), in shared memory for the whole call. Per step it stages
// A_s (all rows, or chunks of BS rows) from L2 into shared memory, computes its R columns
// (warps split rows x columns x K-slices; lanes run along columns, several lanes share a
// column and split K when R < 32), reduces the K-slices in the epilogue, and then every
// block meets at cooperative_groups::this_grid().sync() before the next step reads the
// rows this one wrote. Fit rule (plan_persistent): the smallest unit slice U >= 8 whose
// blocks (D * ceil(H / U)) are all co-resident (cudaOccupancyMaxActiveBlocksPerMultiprocessor
// x SM count) with its shared memory within the per-block opt-in limit.
//
// Stepwise fallback (when that does not fit, e.g. LSTM H = 1024 in float32): per step
// one at::bmm over both directions for the products, then pointwise_step applies the
// same Step::epilogue.
//
// A Step (ForwardStep, BackwardStep in recurrent_cuda.cu) provides:
//   acc_t, w_t            compute type, and the weights' type on chip (the input dtype)
//   kProdGates            products per hidden unit the epilogue reads
//   kTransposeW           the product is A W_hh^T (forward), not A W_hh (backward)
//   order, B, H, D        DeviceOrder and sizes
//   a_buf, K()            the A rows [D, 2, B, K]: step s reads buffer product_step(s) % 2
//   n_steps(), step_of(n, max_len)   how many steps, and the time step s of the n-th
//   product_step(s)       the step whose running rows have products at s (rows running at
//                         s but not at product_step(s) get zero products)
//   weight(d, j0, U, c, k)   element (k, c) of the weight slice of the block at unit j0
//   column(g, u, U)       the product column of gate g of the block's unit u
//   epilogue(d, s, slot, j, rec)   the cell for one unit; rec(g): its products
//   inactive(d, s, slot, j)        a row past its length at step s (padding)
//
// SEQFUSE_CUDA_RECURRENCE=auto|persistent|stepwise (read on every call, default auto)
// forces a path; "persistent" fails with an error when the kernel does not fit.
#pragma once

#include "cuda_common.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <vector>

namespace seqfuse {
namespace cuda {

// ---------------------------------------------------------------------------------
// Batch order. Rows sorted by decreasing length (stable), as on CPU: the rows still
// running at step s are the slots [0, active_at(s)), so a step's GEMM and staging cover a
// prefix of the slot-ordered state, and a row's state is never needed once it stops.
// ---------------------------------------------------------------------------------

// active_at(s): slots running at step s; all B for s < 0 (the backward's initial-state
// pass after step 0), none at or past the longest sequence.
struct DeviceOrder {
  const int32_t* slot_batch;  // [B] slot -> batch row
  const int32_t* slot_len;    // [B] slot -> length
  const int32_t* active;      // [max_len]
  int B, max_len;
  __device__ int batch(int slot) const { return slot_batch[slot]; }
  __device__ int len(int slot) const { return slot_len[slot]; }
  __device__ int active_at(int s) const { return s < 0 ? B : s >= max_len ? 0 : active[s]; }
};

struct HostOrder {
  std::vector<int32_t> slot_batch, slot_len, active;
  int B = 0, max_len = 0;

  // lengths: [B] int64 on CPU (already checked: 1 <= lengths[b] <= T), or absent (all T).
  HostOrder(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B_) : B(static_cast<int>(B_)) {
    slot_batch.resize(B);
    slot_len.assign(B, static_cast<int32_t>(T));
    std::iota(slot_batch.begin(), slot_batch.end(), 0);
    if (lengths.has_value()) {
      const at::Tensor len = lengths->contiguous();
      const int64_t* lp = len.data_ptr<int64_t>();
      std::stable_sort(slot_batch.begin(), slot_batch.end(),
                       [lp](int32_t a, int32_t b) { return lp[a] > lp[b]; });
      for (int i = 0; i < B; ++i) slot_len[i] = static_cast<int32_t>(lp[slot_batch[i]]);
    }
    max_len = B > 0 ? slot_len[0] : 0;
    active.assign(max_len, 0);
    for (int s = 0, n = B; s < max_len; ++s) {
      while (n > 0 && slot_len[n - 1] <= s) --n;
      active[s] = n;
    }
  }

  int active_at(int s) const { return s < 0 ? B : s >= max_len ? 0 : active[s]; }

  // One host-to-device copy per call, from pinned memory so that it does not wait for the
  // stream (the host allocator keeps the buffer until the copy is done); `storage` keeps
  // the device copy alive (the caching allocator orders its reuse after this call's
  // kernels on the stream).
  DeviceOrder upload(const at::Device& device, at::Tensor& storage) const {
    at::Tensor host = at::empty({2 * B + max_len}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    int32_t* h = host.data_ptr<int32_t>();
    std::copy(slot_batch.begin(), slot_batch.end(), h);
    std::copy(slot_len.begin(), slot_len.end(), h + B);
    std::copy(active.begin(), active.end(), h + 2 * B);
    storage = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
    const int32_t* p = storage.data_ptr<int32_t>();
    return DeviceOrder{p, p + B, p + 2 * B, B, max_len};
  }
};

// The time index that direction d processes at step s for a row of length len: the
// reverse direction starts at each row's own last valid step.
__host__ __device__ __forceinline__ int time_of(int d, int s, int len) { return d == 0 ? s : len - 1 - s; }

// ---------------------------------------------------------------------------------
// Persistent kernel
// ---------------------------------------------------------------------------------

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowTile = 4;         // A rows per thread in the product (register tile)
constexpr int kMaxStagedRows = 32;  // A rows staged in shared memory at a time
constexpr int kMinUnits = 8;        // smallest unit slice a block owns

// The block shape of one persistent launch, chosen on the host (plan_persistent).
struct PersistentShape {
  int U;               // hidden units per block
  int R;               // product columns per block (Step::kProdGates * U)
  int Rs;              // row stride of W_s: R padded so that lane groups hit distinct banks
  int K, Ks;           // reduction length, and rounded up to whole quads of 4
  int BS;              // A rows staged at a time (a multiple of kRowTile)
  int KS;              // K-slices: warps that split K, reduced in the epilogue
  int LC;              // lanes per column group (power of two, 4..32); 32 / LC lanes split K
  int blocks_per_dir;  // ceil(H / U)
  int a_offset, part_offset, smem;  // shared memory layout: W_s | A_s | partial sums
};

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 x = *reinterpret_cast<const double2*>(p), y = *reinterpret_cast<const double2*>(p + 2);
  v[0] = x.x, v[1] = x.y, v[2] = y.x, v[3] = y.y;
}

// part_s[ks][row][c] = sum over the k of slice ks of a_s[row][k] * w_s[k][c], for the nb
// staged rows and the R columns. Lanes run along columns (w_s reads are conflict-free,
// a_s reads are broadcasts); when R < 32, 32 / LC lanes share a column, take every
// (32/LC)-th quad of k and are reduced by shuffles.
template <typename w_t, typename acc_t>
__device__ __forceinline__ void block_product(const w_t* w_s, const acc_t* a_s, acc_t* part_s,
                                              const PersistentShape& sh, int nb) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int LK = 32 / sh.LC, col_lane = lane % sh.LC, kl = lane / sh.LC;
  const int n_cg = (sh.R + sh.LC - 1) / sh.LC, n_bt = (nb + kRowTile - 1) / kRowTile;
  const int NQ = sh.Ks / 4;
  const int n_tasks = n_cg * n_bt * sh.KS;
  for (int task = warp; task < n_tasks; task += kWarps) {  // warp-uniform
    const int ks = task % sh.KS, cg = (task / sh.KS) % n_cg, bt = task / (sh.KS * n_cg);
    const int c = cg * sh.LC + col_lane;
    const bool valid = c < sh.R;
    const w_t* w = w_s + (valid ? c : 0);
    const acc_t* a = a_s + bt * kRowTile * sh.Ks;  // rows past nb hold stale data: discarded
    const int q1 = (ks + 1) * NQ / sh.KS;
    acc_t acc[kRowTile];
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) acc[i] = acc_t(0);
    for (int q = ks * NQ / sh.KS + kl; q < q1; q += LK) {
      const int k = 4 * q;
      acc_t wk[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) wk[e] = static_cast<acc_t>(w[(k + e) * sh.Rs]);
#pragma unroll
      for (int i = 0; i < kRowTile; ++i) {
        acc_t ak[4];
        load4(a + i * sh.Ks + k, ak);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i] = DeviceAct::fma(wk[e], ak[e], acc[i]);
      }
    }
    for (int off = sh.LC; off < 32; off *= 2)
#pragma unroll
      for (int i = 0; i < kRowTile; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    if (kl == 0 && valid)
#pragma unroll
      for (int i = 0; i < kRowTile; ++i) {
        const int row = bt * kRowTile + i;
        if (row < nb) part_s[(ks * sh.BS + row) * sh.R + c] = acc[i];
      }
  }
}

// Every step of both directions in one cooperative launch: grid = D * blocks_per_dir
// blocks of kThreads; see the top of this file.
template <class Step>
__global__ void __launch_bounds__(kThreads) persistent_recurrence(const Step step, const PersistentShape sh) {
  using acc_t = typename Step::acc_t;
  using w_t = typename Step::w_t;
  extern __shared__ __align__(16) unsigned char smem[];
  w_t* w_s = reinterpret_cast<w_t*>(smem);
  acc_t* a_s = reinterpret_cast<acc_t*>(smem + sh.a_offset);
  acc_t* part_s = reinterpret_cast<acc_t*>(smem + sh.part_offset);
  const int d = blockIdx.x / sh.blocks_per_dir;
  const int j0 = (blockIdx.x % sh.blocks_per_dir) * sh.U;
  const int B = step.B, H = step.H, K = sh.K;

  // This block's weights, once for all steps (zero past K; the padding columns [R, Rs)
  // are never read). Read along the weights' contiguous dimension.
  for (int idx = threadIdx.x; idx < sh.Ks * sh.R; idx += kThreads) {
    int c, k;
    if constexpr (Step::kTransposeW) {
      c = idx / sh.Ks, k = idx % sh.Ks;
    } else {
      k = idx / sh.R, c = idx % sh.R;
    }
    w_s[k * sh.Rs + c] = k < K ? step.weight(d, j0, sh.U, c, k) : w_t(0);
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int n_steps = step.n_steps();
  for (int n = 0; n < n_steps; ++n) {
    const int s = Step::step_of(n, step.order.max_len);
    const int n_rows = step.order.active_at(s);
    const int n_prod = step.order.active_at(Step::product_step(s));
    const acc_t* a = step.a_buf + (static_cast<int64_t>(d) * 2 + (Step::product_step(s) & 1)) * B * K;
    for (int r0 = 0; r0 < n_rows; r0 += sh.BS) {
      const int nb = min(sh.BS, n_rows - r0);
      // Rows other blocks wrote before the grid barrier: loaded through L2 (__ldcg), never
      // from this SM's possibly stale L1. Rows without a product get zeros.
      for (int idx = threadIdx.x; idx < nb * sh.Ks; idx += kThreads) {
        const int r = idx / sh.Ks, k = idx % sh.Ks;
        a_s[idx] = (r0 + r < n_prod && k < K) ? __ldcg(a + static_cast<int64_t>(r0 + r) * K + k) : acc_t(0);
      }
      __syncthreads();
      block_product(w_s, a_s, part_s, sh, nb);
      __syncthreads();
      for (int idx = threadIdx.x; idx < nb * sh.U; idx += kThreads) {
        const int r = idx / sh.U, u = idx % sh.U;
        if (j0 + u >= H) continue;
        step.epilogue(d, s, r0 + r, j0 + u, [&](int g) -> acc_t {
          const int c = Step::column(g, u, sh.U);
          acc_t sum = part_s[r * sh.R + c];
          for (int ks = 1; ks < sh.KS; ++ks) sum += part_s[(ks * sh.BS + r) * sh.R + c];
          return sum;
        });
      }
      __syncthreads();  // a_s and part_s are rewritten by the next chunk
    }
    for (int idx = threadIdx.x; idx < (B - n_rows) * sh.U; idx += kThreads) {
      const int slot = n_rows + idx / sh.U, j = j0 + idx % sh.U;
      if (j < H) step.inactive(d, s, slot, j);
    }
    if (n + 1 < n_steps) grid.sync();  // step s's rows are complete before anyone reads them
  }
}

// ---------------------------------------------------------------------------------
// Stepwise fallback: the product of step s comes from a GEMM ([D, B, kProdGates * H],
// rows past n_prod unset) and this kernel applies the epilogue, one thread per
// (direction, slot, unit).
// ---------------------------------------------------------------------------------
template <class Step>
__global__ void __launch_bounds__(kThreads) pointwise_step(const Step step, int s,
                                                           const typename Step::acc_t* rec,
                                                           int n_rows, int n_prod) {
  using acc_t = typename Step::acc_t;
  const int B = step.B, H = step.H;
  const int64_t total = static_cast<int64_t>(step.D) * B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int j = static_cast<int>(idx % H), slot = static_cast<int>(idx / H % B);
    const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
    if (slot >= n_rows) {
      step.inactive(d, s, slot, j);
      continue;
    }
    const acc_t* row = rec + (static_cast<int64_t>(d) * B + slot) * Step::kProdGates * H + j;
    step.epilogue(d, s, slot, j, [&](int g) -> acc_t { return slot < n_prod ? row[g * H] : acc_t(0); });
  }
}

// ---------------------------------------------------------------------------------
// Host side: plan, launch, and the driver that picks the path.
// ---------------------------------------------------------------------------------

enum class RecurrenceMode { kAuto, kPersistent, kStepwise };

// SEQFUSE_CUDA_RECURRENCE, read on every call so that tests can switch paths.
inline RecurrenceMode recurrence_mode() {
  const char* v = std::getenv("SEQFUSE_CUDA_RECURRENCE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return RecurrenceMode::kAuto;
  if (std::strcmp(v, "persistent") == 0) return RecurrenceMode::kPersistent;
  if (std::strcmp(v, "stepwise") == 0) return RecurrenceMode::kStepwise;
  TORCH_CHECK(false, "SEQFUSE_CUDA_RECURRENCE must be 'auto', 'persistent' or 'stepwise', got '", v, "'");
}

constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

template <class Step>
PersistentShape persistent_shape(const Step& step, int U, int BS) {
  using acc_t = typename Step::acc_t;
  using w_t = typename Step::w_t;
  PersistentShape sh{};
  sh.U = U;
  sh.R = Step::kProdGates * U;
  sh.K = step.K();
  sh.Ks = round_up(sh.K, 4);
  sh.LC = 4;
  while (sh.LC < sh.R && sh.LC < 32) sh.LC *= 2;
  // With LC < 32 the 32 / LC lane groups read rows 4 apart: pad the row stride so that
  // they land in distinct shared memory banks (4 * Rs * sizeof(w_t) = LC * sizeof(w_t)
  // modulo the 128 bytes of a bank row).
  sh.Rs = sh.R;
  const int m = 128 / static_cast<int>(sizeof(w_t));
  if (sh.LC < 32)
    while ((4 * sh.Rs) % m != sh.LC % m) ++sh.Rs;
  sh.BS = BS;
  const int n_tasks = ((sh.R + sh.LC - 1) / sh.LC) * (BS / kRowTile);
  const int max_slices = std::max(1, sh.Ks / 4 / (2 * (32 / sh.LC)));  // >= 2 quads per lane
  sh.KS = std::clamp(kWarps / std::max(1, n_tasks), 1, max_slices);
  sh.blocks_per_dir = (step.H + U - 1) / U;
  sh.a_offset = round_up(sh.Ks * sh.Rs * static_cast<int>(sizeof(w_t)), 16);
  sh.part_offset = sh.a_offset + round_up(BS * sh.Ks * static_cast<int>(sizeof(acc_t)), 16);
  sh.smem = sh.part_offset + sh.KS * BS * sh.R * static_cast<int>(sizeof(acc_t));
  return sh;
}

// The persistent kernel's shape for this layer on the current device, or nothing when it
// does not fit: no cooperative launch, or no unit slice whose blocks are all co-resident
// within the shared memory limit.
template <class Step>
std::optional<PersistentShape> plan_persistent(const Step& step) {
  int dev = 0, coop = 0, sms = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (!coop) return std::nullopt;
  auto kernel = persistent_recurrence<Step>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  const int bs_max = std::min(round_up(step.B, kRowTile), kMaxStagedRows);
  for (int U = std::min(kMinUnits, step.H);; U = std::min(2 * U, step.H)) {
    // Fewer staged rows need less shared memory, which may let more blocks share an SM.
    for (int BS = bs_max; BS >= kRowTile; BS -= kRowTile) {
      const PersistentShape sh = persistent_shape(step, U, BS);
      if (sh.smem > smem_optin) continue;
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, sh.smem));
      if (static_cast<int64_t>(step.D) * sh.blocks_per_dir <= static_cast<int64_t>(per_sm) * sms) return sh;
    }
    // A larger slice needs more shared memory per block: stop once even the least does not fit.
    if (U == step.H || persistent_shape(step, U, kRowTile).smem > smem_optin) return std::nullopt;
  }
}

// false when the driver refuses the launch as too large (co-residency lost to something
// else on the device), so that the caller can fall back.
template <class Step>
bool launch_persistent(const Step& step, const PersistentShape& sh) {
  auto kernel = persistent_recurrence<Step>;
  void* args[] = {const_cast<Step*>(&step), const_cast<PersistentShape*>(&sh)};
  const cudaError_t err = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(kernel), dim3(step.D * sh.blocks_per_dir), dim3(kThreads), args,
      static_cast<size_t>(sh.smem), current_stream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear it: the fallback's launch checks must not see it
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Runs every step of `step`. a_buf: the Step's A rows, [D, 2, B, K] in acc_t (the tensor
// step.a_buf points into; step s reads buffer product_step(s) % 2); weight_hh: [D, G*H, H]
// in the input dtype, for the stepwise GEMMs (multiplied in acc_t: float32 for the half
// types, whose weights the persistent kernel keeps on chip as they are).
template <class Step>
void run_recurrence(const Step& step, const HostOrder& order, const at::Tensor& weight_hh,
                    const at::Tensor& a_buf) {
  const RecurrenceMode mode = recurrence_mode();
  if (mode != RecurrenceMode::kStepwise) {
    const std::optional<PersistentShape> sh = plan_persistent(step);
    TORCH_CHECK(sh.has_value() || mode == RecurrenceMode::kAuto,
                "SEQFUSE_CUDA_RECURRENCE=persistent: the persistent recurrent kernel does not fit "
                "this layer (H=", step.H, ", D=", step.D, ", B=", step.B, ") on this GPU");
    if (sh.has_value()) {
      if (launch_persistent(step, *sh)) return;
      TORCH_CHECK(mode == RecurrenceMode::kAuto,
                  "SEQFUSE_CUDA_RECURRENCE=persistent: the cooperative launch was refused as too large");
    }
  }
  using acc_t = typename Step::acc_t;
  const int B = step.B, N = Step::kProdGates * step.H;
  at::Tensor w = weight_hh.to(a_buf.scalar_type());  // [D, K, N] below
  if (Step::kTransposeW) w = w.transpose(1, 2);
  at::Tensor rec = at::empty({step.D, B, N}, a_buf.options());
  const int64_t total = static_cast<int64_t>(step.D) * B * step.H;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 1 << 20));
  for (int n = 0; n < step.n_steps(); ++n) {
    const int s = Step::step_of(n, order.max_len);
    const int n_rows = order.active_at(s), n_prod = order.active_at(Step::product_step(s));
    if (n_prod > 0) {
      at::Tensor out = rec.narrow(1, 0, n_prod);
      at::bmm_out(out, a_buf.select(1, Step::product_step(s) & 1).narrow(1, 0, n_prod), w);
    }
    pointwise_step<Step><<<blocks, kThreads, 0, current_stream()>>>(step, s, rec.data_ptr<acc_t>(),
                                                                    n_rows, n_prod);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace seqfuse
