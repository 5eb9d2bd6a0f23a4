// Fused LSTM layer on CPU (float32, float64).
//
// Forward: the input projection of every step and both directions is one GEMM into
// `gates`; the recurrence then runs step by step, each step being the recurrent
// product plus one vectorised pass that turns pre-activations into gates, cell and
// hidden state. Per-sequence lengths are handled in the loop: batch rows are visited in
// order of decreasing length, so at step s the active rows are a prefix of the state
// buffers (what packing buys, without the copies), and the reverse direction starts at
// each row's own last valid step.
//
// Two recurrence schedules:
//  * small batch (B <= kGemvMaxBatch): a hand-written GEMV over rows of weight_hh. With
//    one direction, both threads split the hidden units and meet at a spin barrier each
//    step; with two directions each thread runs one direction.
//  * larger batch: one batched GEMM per step on the active rows of both directions
//    (MKL threads it), then the cell pass split across threads.
#include "../lstm.h"
#include "fast_math.h"
#include "spin_barrier.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

namespace seqfuse {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGemvMaxBatch = 4;
// Below this many multiply-adds per step a second thread costs more than it saves.
constexpr int64_t kMinParallelStepWork = 16 * 1024;
constexpr int64_t kMinUnitsPerSlice = 16;

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  Vec acc0(scalar_t(0)), acc1(scalar_t(0));
  int64_t k = 0;
  for (; k + 2 * V <= n; k += 2 * V) {
    acc0 = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + k + V), Vec::loadu(b + k + V), acc1);
  }
  for (; k < n; k += V) {
    const int64_t m = std::min(V, n - k);
    acc0 = at::vec::fmadd(Vec::loadu(a + k, m), Vec::loadu(b + k, m), acc0);
  }
  return at::vec::vec_reduce_all<scalar_t>(
      [](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
}

// Which batch row runs where: rows sorted by decreasing length (stable), so the rows
// still running at step s are slots [0, active[s]).
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
    active.assign(max_len, 0);
    for (int64_t s = 0; s < max_len; ++s) {
      int64_t n = 0;
      while (n < B && slot_len[n] > s) ++n;
      active[s] = n;
    }
  }

  // The time index that direction d processes at step s for a row of length len.
  static int64_t time_of(int64_t d, int64_t s, int64_t len) { return d == 0 ? s : len - 1 - s; }
};

// One step of the cell for units [j0, j0 + n) of one batch row.
//   gx:   [4H] this row's pre-activation input projection (+ bias); overwritten with the
//         activated gates, which the backward reuses
//   rec:  recurrent product for the same units, gate q at rec + q * rec_stride
//   c:    [n] cell state, updated in place; h_out, cell_out, y_out: [n]
template <typename scalar_t>
inline void lstm_cell_forward(scalar_t* gx, const scalar_t* rec, int64_t rec_stride, int64_t H,
                              int64_t j0, int64_t n, scalar_t* c, scalar_t* h_out,
                              scalar_t* cell_out, scalar_t* y_out) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  scalar_t* gi_p = gx + j0;
  scalar_t* gf_p = gx + H + j0;
  scalar_t* gg_p = gx + 2 * H + j0;
  scalar_t* go_p = gx + 3 * H + j0;
  for (int64_t k = 0; k < n; k += V) {
    const int64_t m = std::min(V, n - k);
    const Vec gi = vsigmoid(Vec::loadu(gi_p + k, m) + Vec::loadu(rec + k, m));
    const Vec gf = vsigmoid(Vec::loadu(gf_p + k, m) + Vec::loadu(rec + rec_stride + k, m));
    const Vec gg = vtanh(Vec::loadu(gg_p + k, m) + Vec::loadu(rec + 2 * rec_stride + k, m));
    const Vec go = vsigmoid(Vec::loadu(go_p + k, m) + Vec::loadu(rec + 3 * rec_stride + k, m));
    const Vec cn = at::vec::fmadd(gf, Vec::loadu(c + k, m), gi * gg);
    const Vec hn = go * vtanh(cn);
    gi.store(gi_p + k, m);
    gf.store(gf_p + k, m);
    gg.store(gg_p + k, m);
    go.store(go_p + k, m);
    cn.store(c + k, m);
    cn.store(cell_out + k, m);
    hn.store(h_out + k, m);
    hn.store(y_out + k, m);
  }
}

// Backward of one cell step for one batch row, all H units.
//   g: [4H] activated gates; c_t, c_prev, gy: [H]
//   dh: [H] gradient w.r.t. this step's h (from the step after); read only
//   dc: [H] in: gradient w.r.t. c_t from the step after; out: w.r.t. c_prev
//   dg: [4H] out: gradient w.r.t. the pre-activations
template <typename scalar_t>
inline void lstm_cell_backward(const scalar_t* g, const scalar_t* c_t, const scalar_t* c_prev,
                               const scalar_t* gy, const scalar_t* dh, scalar_t* dc, scalar_t* dg,
                               int64_t H) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  const Vec one(scalar_t(1));
  for (int64_t k = 0; k < H; k += V) {
    const int64_t m = std::min(V, H - k);
    const Vec gi = Vec::loadu(g + k, m), gf = Vec::loadu(g + H + k, m);
    const Vec gg = Vec::loadu(g + 2 * H + k, m), go = Vec::loadu(g + 3 * H + k, m);
    const Vec tc = vtanh(Vec::loadu(c_t + k, m));
    const Vec dh_t = Vec::loadu(dh + k, m) + Vec::loadu(gy + k, m);
    const Vec dc_t = Vec::loadu(dc + k, m) + dh_t * go * (one - tc * tc);
    (dc_t * gg * gi * (one - gi)).store(dg + k, m);
    (dc_t * Vec::loadu(c_prev + k, m) * gf * (one - gf)).store(dg + H + k, m);
    (dc_t * gi * (one - gg * gg)).store(dg + 2 * H + k, m);
    (dh_t * tc * go * (one - go)).store(dg + 3 * H + k, m);
    (dc_t * gf).store(dc + k, m);
  }
}

template <typename scalar_t>
void lstm_forward_recurrence(const at::Tensor& weight_hh, const at::Tensor& hx,
                             const at::Tensor& cx, const SeqOrder& order, at::Tensor& gates,
                             at::Tensor& output, at::Tensor& cells, at::Tensor& h_n,
                             at::Tensor& c_n) {
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2), B = hx.size(1);
  const int64_t G = 4 * H;
  const int64_t T = output.size(0);
  (void)T;
  // State in slot order: h double-buffered (threads splitting one direction read step
  // s's h while writing step s+1's), c owned unit-wise so single-buffered.
  at::Tensor h_state = at::empty({D, 2, B, H}, hx.options());
  at::Tensor c_state = at::empty({D, B, H}, cx.options());
  scalar_t* hs = h_state.data_ptr<scalar_t>();
  scalar_t* cs = c_state.data_ptr<scalar_t>();
  const scalar_t* hx_p = hx.data_ptr<scalar_t>();
  const scalar_t* cx_p = cx.data_ptr<scalar_t>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t b = order.slot_batch[i];
      std::copy_n(hx_p + (d * B + b) * H, H, hs + ((d * 2) * B + i) * H);
      std::copy_n(cx_p + (d * B + b) * H, H, cs + (d * B + i) * H);
    }

  scalar_t* gates_p = gates.data_ptr<scalar_t>();
  scalar_t* out_p = output.data_ptr<scalar_t>();
  scalar_t* cells_p = cells.data_ptr<scalar_t>();
  const scalar_t* whh = weight_hh.data_ptr<scalar_t>();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  int64_t final_buf = 0;  // which h buffer holds the final state

  if (B <= kGemvMaxBatch) {
    int64_t S = 1;  // slices of hidden units per direction
    if (D < threads && G * H * B >= kMinParallelStepWork)
      S = std::max<int64_t>(1, std::min(threads / D, H / kMinUnitsPerSlice));
    const int64_t parts = D * S;
    std::vector<std::unique_ptr<PartBarrier>> barriers;
    for (int64_t d = 0; d < D; ++d) barriers.push_back(std::make_unique<PartBarrier>(S));
    final_buf = order.max_len % 2;

    auto run_parts = [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> rec(4 * ((H + S - 1) / S));
      for (int64_t s = 0; s < order.max_len; ++s) {
        const int64_t n_act = order.active[s];
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t d = p / S, sl = p % S;
          const int64_t j0 = sl * H / S, n = (sl + 1) * H / S - j0;
          if (S > 1) barriers[d]->wait_for_round(s);
          const scalar_t* h_cur = hs + ((d * 2 + s % 2) * B) * H;
          scalar_t* h_next = hs + ((d * 2 + (s + 1) % 2) * B) * H;
          scalar_t* c_d = cs + d * B * H;
          const scalar_t* w_d = whh + d * G * H;
          for (int64_t i = 0; i < n_act; ++i) {
            const int64_t b = order.slot_batch[i];
            const int64_t t = SeqOrder::time_of(d, s, order.slot_len[i]);
            const scalar_t* h_i = h_cur + i * H;
            for (int64_t q = 0; q < 4; ++q)
              for (int64_t j = 0; j < n; ++j)
                rec[q * n + j] = dot(w_d + (q * H + j0 + j) * H, h_i, H);
            lstm_cell_forward(gates_p + ((t * B + b) * D + d) * G, rec.data(), n, H, j0, n,
                              c_d + i * H + j0, h_next + i * H + j0,
                              cells_p + ((t * B + b) * D + d) * H + j0,
                              out_p + (t * B + b) * D * H + d * H + j0);
          }
          for (int64_t i = n_act; i < B; ++i)  // finished rows carry their state
            std::copy_n(h_cur + i * H + j0, n, h_next + i * H + j0);
          if (S > 1) barriers[d]->arrive(1);
        }
      }
    };
    if (parts > 1 && threads > 1)
      at::parallel_for(0, parts, 1, run_parts);
    else
      run_parts(0, parts);
  } else {
    // One batched GEMM per step covers both directions (the active rows are the same
    // prefix in each), so MKL threads it at top level; then the cell pass is split over
    // (direction, row) pairs.
    const at::Tensor h = h_state.select(1, 0);        // [D, B, H]
    const at::Tensor w_t = weight_hh.transpose(1, 2);  // [D, H, 4H]
    at::Tensor rec_flat = at::empty({D * B * G}, hx.options());
    scalar_t* h_p = h.data_ptr<scalar_t>();
    const scalar_t* rec_p = rec_flat.data_ptr<scalar_t>();
    const int64_t h_dir_stride = h.stride(0);
    for (int64_t s = 0; s < order.max_len; ++s) {
      const int64_t n_act = order.active[s];
      at::Tensor rec = rec_flat.narrow(0, 0, D * n_act * G).view({D, n_act, G});
      at::bmm_out(rec, h.narrow(1, 0, n_act), w_t);
      auto cells_for = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t d = r / n_act, i = r % n_act;
          const int64_t b = order.slot_batch[i];
          const int64_t t = SeqOrder::time_of(d, s, order.slot_len[i]);
          lstm_cell_forward(gates_p + ((t * B + b) * D + d) * G, rec_p + r * G, H, H, 0, H,
                            cs + (d * B + i) * H, h_p + d * h_dir_stride + i * H,
                            cells_p + ((t * B + b) * D + d) * H,
                            out_p + (t * B + b) * D * H + d * H);
        }
      };
      cells_for(0, D * n_act);
    }
  }

  scalar_t* hn_p = h_n.data_ptr<scalar_t>();
  scalar_t* cn_p = c_n.data_ptr<scalar_t>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t b = order.slot_batch[i];
      std::copy_n(hs + ((d * 2 + final_buf) * B + i) * H, H, hn_p + (d * B + b) * H);
      std::copy_n(cs + (d * B + i) * H, H, cn_p + (d * B + b) * H);
    }
}

template <typename scalar_t>
void lstm_backward_recurrence(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                              const at::Tensor& grad_c_n, const at::Tensor& weight_hh,
                              const at::Tensor& hx, const at::Tensor& cx,
                              const at::Tensor& output, const at::Tensor& gates,
                              const at::Tensor& cells, const SeqOrder& order,
                              at::Tensor& dgates, at::Tensor& h_prev, at::Tensor& grad_hx,
                              at::Tensor& grad_cx) {
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2), B = hx.size(1);
  const int64_t G = 4 * H;
  const scalar_t* gy_p = grad_output.data_ptr<scalar_t>();
  const scalar_t* ghn_p = grad_h_n.data_ptr<scalar_t>();
  const scalar_t* gcn_p = grad_c_n.data_ptr<scalar_t>();
  const scalar_t* hx_p = hx.data_ptr<scalar_t>();
  const scalar_t* cx_p = cx.data_ptr<scalar_t>();
  const scalar_t* out_p = output.data_ptr<scalar_t>();
  const scalar_t* gates_p = gates.data_ptr<scalar_t>();
  const scalar_t* cells_p = cells.data_ptr<scalar_t>();
  const scalar_t* whh = weight_hh.data_ptr<scalar_t>();
  scalar_t* dgates_p = dgates.data_ptr<scalar_t>();
  scalar_t* hprev_p = h_prev.data_ptr<scalar_t>();
  scalar_t* ghx_p = grad_hx.data_ptr<scalar_t>();
  scalar_t* gcx_p = grad_cx.data_ptr<scalar_t>();
  using Vec = Vectorized<scalar_t>;

  // dh, dc in slot order: [D, B, H]; dg holds one step's pre-activation gradients for
  // the active rows of every direction, packed [D, n_act, 4H].
  at::Tensor dh = at::empty({D, B, H}, hx.options());
  at::Tensor dc = at::empty({D, B, H}, hx.options());
  at::Tensor dg_flat = at::empty({D * B * G}, hx.options());
  at::Tensor dh_new_flat = at::empty({D * B * H}, hx.options());
  scalar_t* dh_p = dh.data_ptr<scalar_t>();
  scalar_t* dc_p = dc.data_ptr<scalar_t>();
  scalar_t* dg_p = dg_flat.data_ptr<scalar_t>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t b = order.slot_batch[i];
      std::copy_n(ghn_p + (d * B + b) * H, H, dh_p + (d * B + i) * H);
      std::copy_n(gcn_p + (d * B + b) * H, H, dc_p + (d * B + i) * H);
    }
  const at::Tensor w = weight_hh;  // [D, 4H, H]

  for (int64_t s = order.max_len - 1; s >= 0; --s) {
    const int64_t n_act = order.active[s];
    auto cells_for = [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t d = r / n_act, i = r % n_act;
        const int64_t b = order.slot_batch[i];
        const int64_t t = SeqOrder::time_of(d, s, order.slot_len[i]);
        const int64_t tp = d == 0 ? t - 1 : t + 1;  // the step processed before t
        const int64_t row = (t * B + b) * D + d;
        const scalar_t* c_prev = s > 0 ? cells_p + ((tp * B + b) * D + d) * H : cx_p + (d * B + b) * H;
        const scalar_t* h_before = s > 0 ? out_p + (tp * B + b) * D * H + d * H : hx_p + (d * B + b) * H;
        lstm_cell_backward(gates_p + row * G, cells_p + row * H, c_prev,
                           gy_p + (t * B + b) * D * H + d * H, dh_p + (d * B + i) * H,
                           dc_p + (d * B + i) * H, dg_p + r * G, H);
        std::copy_n(dg_p + r * G, G, dgates_p + row * G);
        std::copy_n(h_before, H, hprev_p + row * H);
      }
    };
    cells_for(0, D * n_act);

    // dh for the previous step: dg @ weight_hh, [n, 4H] x [4H, H] per direction.
    if (B <= kGemvMaxBatch) {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t i = 0; i < n_act; ++i) {
          scalar_t* dh_i = dh_p + (d * B + i) * H;
          const scalar_t* dg_i = dg_p + (d * n_act + i) * G;
          const scalar_t* w_d = whh + d * G * H;
          std::fill_n(dh_i, H, scalar_t(0));
          for (int64_t r = 0; r < G; ++r) {
            const Vec a(dg_i[r]);
            const scalar_t* w_r = w_d + r * H;
            for (int64_t k = 0; k < H; k += Vec::size()) {
              const int64_t m = std::min<int64_t>(Vec::size(), H - k);
              at::vec::fmadd(a, Vec::loadu(w_r + k, m), Vec::loadu(dh_i + k, m)).store(dh_i + k, m);
            }
          }
        }
    } else {
      at::Tensor dh_new = dh_new_flat.narrow(0, 0, D * n_act * H).view({D, n_act, H});
      at::bmm_out(dh_new, dg_flat.narrow(0, 0, D * n_act * G).view({D, n_act, G}), w);
      dh.narrow(1, 0, n_act).copy_(dh_new);
    }
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t b = order.slot_batch[i];
      std::copy_n(dh_p + (d * B + i) * H, H, ghx_p + (d * B + b) * H);
      std::copy_n(dc_p + (d * B + i) * H, H, gcx_p + (d * B + b) * H);
    }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths) {
  check_lstm_layer_args(input, weight_ih, weight_hh, bias, hx, cx, lengths);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2), G = 4 * H;
  const at::Tensor w_hh = weight_hh.contiguous();
  const at::Tensor h0 = hx.contiguous(), c0 = cx.contiguous();
  const SeqOrder order(lengths, T, B);

  // Input projection of all steps and directions: [T*B, I] x [I, D*4H] (+ bias).
  at::Tensor gates = at::empty({T, B, D, G}, input.options());
  at::Tensor gates_2d = gates.view({T * B, D * G});
  const at::Tensor x_2d = input.reshape({T * B, I});
  const at::Tensor w_ih_t = weight_ih.reshape({D * G, I}).t();
  if (bias.has_value())
    at::addmm_out(gates_2d, bias->reshape({D * G}), x_2d, w_ih_t);
  else
    at::mm_out(gates_2d, x_2d, w_ih_t);

  // Padded positions are never written by the recurrence: zero them so outputs match
  // packed semantics and every output is deterministic.
  const bool padded = order.max_len < T || (B > 0 && order.slot_len[B - 1] < T);
  at::Tensor output = padded ? at::zeros({T, B, D * H}, input.options())
                             : at::empty({T, B, D * H}, input.options());
  at::Tensor cells = padded ? at::zeros({T, B, D, H}, input.options())
                            : at::empty({T, B, D, H}, input.options());
  at::Tensor h_n = at::empty({D, B, H}, input.options());
  at::Tensor c_n = at::empty({D, B, H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_cpu", [&] {
    lstm_forward_recurrence<scalar_t>(w_hh, h0, c0, order, gates, output, cells, h_n, c_n);
  });
  return {output, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& lengths,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells) {
  check_lstm_layer_args(input, weight_ih, weight_hh, std::nullopt, hx, cx, lengths);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2), G = 4 * H;
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "lstm_layer_backward: grad_output must have shape ",
              output.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_h_n.sizes() == hx.sizes() && grad_c_n.sizes() == cx.sizes(),
              "lstm_layer_backward: grad_h_n and grad_c_n must have shape ", hx.sizes(), ", got ",
              grad_h_n.sizes(), " and ", grad_c_n.sizes());
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({T, B, D, G}) &&
                  cells.sizes() == at::IntArrayRef({T, B, D, H}),
              "lstm_layer_backward: gates/cells must come from lstm_layer on the same input");
  const SeqOrder order(lengths, T, B);

  // Rows the recurrence skips (padding) keep zero gradients, which the GEMMs below rely on.
  at::Tensor dgates = at::zeros({T, B, D, G}, input.options());
  at::Tensor h_prev = at::zeros({T, B, D, H}, input.options());
  at::Tensor grad_hx = at::empty({D, B, H}, input.options());
  at::Tensor grad_cx = at::empty({D, B, H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    lstm_backward_recurrence<scalar_t>(
        grad_output.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(),
        weight_hh.contiguous(), hx.contiguous(), cx.contiguous(), output.contiguous(),
        gates.contiguous(), cells.contiguous(), order, dgates, h_prev, grad_hx, grad_cx);
  });

  const at::Tensor dg_2d = dgates.view({T * B, D * G});
  const at::Tensor grad_input = at::mm(dg_2d, weight_ih.reshape({D * G, I})).view({T, B, I});
  const at::Tensor grad_weight_ih = at::mm(dg_2d.t(), input.reshape({T * B, I})).view({D, G, I});
  at::Tensor grad_weight_hh = at::empty({D, G, H}, input.options());
  for (int64_t d = 0; d < D; ++d) {
    at::Tensor out_d = grad_weight_hh.select(0, d);
    at::mm_out(out_d, dgates.select(2, d).reshape({T * B, G}).t(),
               h_prev.select(2, d).reshape({T * B, H}));
  }
  const at::Tensor grad_bias = dg_2d.sum(0).view({D, G});
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_hx, grad_cx};
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace seqfuse
