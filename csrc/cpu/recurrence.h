// Scheduling shared by the fused recurrent layers on CPU: which batch row runs where
// (SeqOrder) and how one layer's recurrence is spread over threads (TeamPlan; the threads
// run it with run_team_tasks, team_tasks.h).
#pragma once

#include "gemm.h"
#include "team_tasks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace seqfuse {

// Batch rows sorted by decreasing length (stable), so the rows still running at step s
// are the slots [0, active[s]) (what packing buys, without the copies).
struct SeqOrder {
  std::vector<int64_t> slot_batch;  // slot -> batch row
  std::vector<int64_t> slot_len;    // slot -> length
  std::vector<int64_t> active;      // step -> number of running slots
  int64_t max_len = 0;

  SeqOrder(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B)
      : slot_batch(B), slot_len(B) {
    std::iota(slot_batch.begin(), slot_batch.end(), 0);
    if (lengths.has_value()) {
      const at::Tensor len = lengths->contiguous();
      const int64_t* lp = len.data_ptr<int64_t>();
      std::stable_sort(slot_batch.begin(), slot_batch.end(),
                       [lp](int64_t a, int64_t b) { return lp[a] > lp[b]; });
      for (int64_t i = 0; i < B; ++i) slot_len[i] = lp[slot_batch[i]];
    } else {
      std::fill(slot_len.begin(), slot_len.end(), T);
    }
    max_len = B > 0 ? slot_len[0] : 0;
    // Lengths decrease along the slots, so the running count only falls: O(T + B), not
    // O(T * B) (which hung before the output's allocation could refuse a huge T * B).
    active.assign(max_len, 0);
    int64_t n = B;
    for (int64_t s = 0; s < max_len; ++s) {
      while (n > 0 && slot_len[n - 1] <= s) --n;
      active[s] = n;
    }
  }

  // Slots running at step s (0 past the longest sequence).
  int64_t active_at(int64_t s) const { return s >= 0 && s < max_len ? active[s] : 0; }

  // The time index that direction d processes at step s for a row of length len: the
  // reverse direction starts at each row's own last valid step.
  static int64_t time_of(int64_t d, int64_t s, int64_t len) { return d == 0 ? s : len - 1 - s; }
};

// One thread's share of a recurrence: directions [d0, d1), slots [r0, r1), unit groups
// [u0, u1) (a unit group is whatever column block the kernel tiles by).
struct TeamPart {
  int64_t d0, d1, r0, r1, u0, u1;
};

// How one layer's recurrence is spread over the threads, chosen once per call.
//  * One direction per thread when there are as many threads as directions: the two
//    directions of a bidirectional layer never wait for each other.
//  * Threads sharing a direction split its batch rows when there are enough of them:
//    rows are independent, so again nobody waits.
//  * Otherwise (small batch) they split the hidden units and meet every
//    step (team_tasks.h), because every unit's next step reads the whole hidden state.
// The recurrent weights each thread touches stay in its own core's L2 across steps.
struct TeamPlan {
  std::vector<TeamPart> parts;
  int64_t parts_per_dir = 1;  // parts that share one direction
  bool split_units = false;   // those parts meet at a barrier every step

  // Below this many multiply-adds per step a second thread costs more than it saves.
  static constexpr int64_t kMinParallelStepWork = 16 * 1024;

  TeamPlan(int64_t D, int64_t B, int64_t unit_groups, int64_t step_macs, const SeqOrder& order,
           int64_t min_rows_per_part) {
    // One thread inside another parallel region, and while the machine is busy (team_tasks.h).
    const int64_t threads = at::in_parallel_region() || team_solo() ? 1 : at::get_num_threads();
    if (threads < 2 || step_macs < kMinParallelStepWork || (threads < D)) {
      parts.push_back({0, D, 0, B, 0, unit_groups});
      return;
    }
    int64_t per_dir = threads / D;
    if (B >= per_dir * min_rows_per_part) {
      // Contiguous slot ranges with about equal total length (rows are length-sorted).
      std::vector<int64_t> cuts{0};
      const int64_t total = std::accumulate(order.slot_len.begin(), order.slot_len.end(), int64_t(0));
      int64_t acc = 0, next = 1;
      for (int64_t i = 0; i < B && next < per_dir; ++i) {
        acc += order.slot_len[i];
        if (acc * per_dir >= total * next) {
          cuts.push_back(i + 1);
          ++next;
        }
      }
      while (static_cast<int64_t>(cuts.size()) <= per_dir) cuts.push_back(B);
      for (int64_t d = 0; d < D; ++d)
        for (int64_t k = 0; k < per_dir; ++k) parts.push_back({d, d + 1, cuts[k], cuts[k + 1], 0, unit_groups});
    } else {
      per_dir = std::min(per_dir, unit_groups);
      split_units = per_dir > 1;
      for (int64_t d = 0; d < D; ++d)
        for (int64_t k = 0; k < per_dir; ++k)
          parts.push_back({d, d + 1, 0, B, k * unit_groups / per_dir, (k + 1) * unit_groups / per_dir});
    }
    parts_per_dir = per_dir;
  }

  int64_t size() const { return static_cast<int64_t>(parts.size()); }
};

// grad_weight_hh[d] = dgates[:, :, d, :G]^T h_prev[:, :, d]: one GEMM per direction over
// all steps (padding rows are zero in both). dgates: [T, B, D, >=G]; h_prev: [T, B, D, H].
inline at::Tensor recurrent_weight_grad(const at::Tensor& dgates, const at::Tensor& h_prev, int64_t G) {
  const int64_t T = h_prev.size(0), B = h_prev.size(1), D = h_prev.size(2), H = h_prev.size(3);
  at::Tensor grad = at::empty({D, G, H}, h_prev.options());
  for (int64_t d = 0; d < D; ++d) {
    at::Tensor out_d = grad.select(0, d);
    large_mm_out(out_d, dgates.select(2, d).narrow(2, 0, G).reshape({T * B, G}).t(),
                 h_prev.select(2, d).reshape({T * B, H}));
  }
  return grad;
}

// bfloat16 layers that run on the float32 kernels: widened once per call, rounded back.
inline bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }
inline at::Tensor f32(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
inline std::optional<at::Tensor> f32(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(f32(*t)) : std::nullopt;
}
// Rounds the first N results of a kernel back to bfloat16 (the rest are saved activations).
template <size_t N, typename Tuple>
inline Tuple round_bf16(Tuple r) {
  size_t i = 0;
  std::apply([&](auto&... t) { ((i++ < N ? (void)(t = t.to(at::kBFloat16)) : (void)0), ...); }, r);
  return r;
}

}  // namespace seqfuse
