// The LSTM layer with a projection on CPU (torch.nn.LSTM's proj_size P < H), forward and
// backward, one or both directions, per-sequence lengths; float32 and float64 (bfloat16
// through float32).
//
//   gates_t = x_t W_ih^T + b + h_{t-1} W_hh^T      W_hh [4H, P]
//   c_t = f c_{t-1} + i g,  m_t = o tanh(c_t)      [H]
//   h_t = m_t W_hr^T                               W_hr [P, H]: the output and the state
//
// The input projection of every step is one GEMM first (haste's layout). Each step is then
// two small register-tiled products over the step's active rows (small_gemm, tile_gemm.h:
// a BLAS call per step would cost more than the product at these sizes), h W_hh^T and
// m W_hr^T, with the cell's pointwise math (cell_math.h, the formulas of the fused LSTM)
// between them. Unlike the plain LSTM, the units of h_t need every unit of m_t, so a step
// cannot be tiled by units alone: one thread runs a direction, and both directions run
// side by side. Backward per step: dm = dh W_hr, the cell's backward, dh_{t-1} = dgates
// W_hh, again two small products; the weight and input gradients are large GEMMs after.
//
// Rows run in SeqOrder (recurrence.h): by decreasing length, so the active rows of a step
// are a prefix of the state buffers, and the reverse direction starts at each row's own
// last valid step.
#include "../../cell_math.h"
#include "../../lstm.h"
#include "fast_math.h"
#include "../fork_safety.h"
#include "../kernels.h"
#include "../recurrence.h"
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace seqfuse {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability
namespace {

// f(j, count) for the vectors of n units: count = V except for a partial last one.
template <typename scalar_t, typename F>
C10_ALWAYS_INLINE void for_vectors(int64_t n, F&& f) {
  constexpr int64_t V = Vectorized<scalar_t>::size();
  for (int64_t j = 0; j < n; j += V) f(j, std::min(V, n - j));
}

template <typename scalar_t>
struct ProjForward {
  using Vec = Vectorized<scalar_t>;
  const SeqOrder& order;
  int64_t B, H, P, D;
  scalar_t* gates;          // [T, B, D, 4H]: the input projection in; activated gates out (keep)
  bool keep;
  scalar_t* cells;          // [T, B, D, H] (keep)
  const scalar_t* w_hh_t;   // [D, P, 4H]: W_hh^T, the K x N operand of h W_hh^T
  const scalar_t* w_hr_t;   // [D, H, P]
  const scalar_t* hx;       // [D, B, P]
  const scalar_t* cx;       // [D, B, H]
  scalar_t* out;            // [T, B, D*P]
  scalar_t* h_n;            // [D, B, P]
  scalar_t* c_n;            // [D, B, H]
  scalar_t* work;           // per direction: h [B, P], c [B, H], pre [B, 4H], m [B, H]

  static int64_t work_per_direction(int64_t B, int64_t H, int64_t P) { return B * (P + 6 * H); }

  void run(int64_t d) const {
    const int64_t G = 4 * H;
    scalar_t* h = work + d * work_per_direction(B, H, P);
    scalar_t* c = h + B * P;
    scalar_t* pre = c + B * H;
    scalar_t* m = pre + B * G;
    for (int64_t slot = 0; slot < B; ++slot) {
      const int64_t b = order.slot_batch[slot];
      std::copy_n(hx + (d * B + b) * P, P, h + slot * P);
      std::copy_n(cx + (d * B + b) * H, H, c + slot * H);
    }
    for (int64_t s = 0; s < order.max_len; ++s) {
      const int64_t n = order.active_at(s);
      small_gemm<scalar_t>(n, G, P, h, P, w_hh_t + d * P * G, G, pre, G, /*accumulate=*/false);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = SeqOrder::time_of(d, s, order.slot_len[i]) * B + order.slot_batch[i];
        scalar_t* g = gates + (row * D + d) * G;
        const scalar_t* r = pre + i * G;
        for_vectors<scalar_t>(H, [&](int64_t j, int64_t k) {
          Vec gi, gf, gg, go, cn, mn;
          cell::lstm_forward<VecAct>(Vec::loadu(r + j, k) + Vec::loadu(g + j, k),
                                     Vec::loadu(r + H + j, k) + Vec::loadu(g + H + j, k),
                                     Vec::loadu(r + 2 * H + j, k) + Vec::loadu(g + 2 * H + j, k),
                                     Vec::loadu(r + 3 * H + j, k) + Vec::loadu(g + 3 * H + j, k),
                                     Vec::loadu(c + i * H + j, k), gi, gf, gg, go, cn, mn);
          cn.store(c + i * H + j, k);
          mn.store(m + i * H + j, k);
          if (keep) {
            gi.store(g + j, k);
            gf.store(g + H + j, k);
            gg.store(g + 2 * H + j, k);
            go.store(g + 3 * H + j, k);
            cn.store(cells + (row * D + d) * H + j, k);
          }
        });
      }
      // The new h of the active rows, in place: h W_hh^T of this step is already read.
      small_gemm<scalar_t>(n, P, H, m, H, w_hr_t + d * H * P, P, h, P, /*accumulate=*/false);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = order.slot_batch[i];
        const int64_t row = SeqOrder::time_of(d, s, order.slot_len[i]) * B + b;
        std::copy_n(h + i * P, P, out + row * D * P + d * P);
        if (s == order.slot_len[i] - 1) {
          std::copy_n(h + i * P, P, h_n + (d * B + b) * P);
          std::copy_n(c + i * H, H, c_n + (d * B + b) * H);
        }
      }
    }
  }
};

template <typename scalar_t>
struct ProjBackward {
  using Vec = Vectorized<scalar_t>;
  const SeqOrder& order;
  int64_t B, H, P, D;
  const scalar_t* gy;       // grad_output [T, B, D*P]
  const scalar_t* g_hn;     // [D, B, P]
  const scalar_t* g_cn;     // [D, B, H]
  const scalar_t* hx;       // [D, B, P]
  const scalar_t* cx;       // [D, B, H]
  const scalar_t* out;      // [T, B, D*P]
  const scalar_t* gates;    // [T, B, D, 4H] activated
  const scalar_t* cells;    // [T, B, D, H]
  const scalar_t* w_hh;     // [D, 4H, P]: the K x N operand of dgates W_hh
  const scalar_t* w_hr;     // [D, P, H]: of dh W_hr
  scalar_t* dgates;         // [T, B, D, 4H], zero at padding
  scalar_t* h_prev;         // [T, B, D, P]: each step's recurrent input, zero at padding
  scalar_t* dh_all;         // [T, B, D, P]: the gradient reaching each h_t
  scalar_t* m_all;          // [T, B, D, H]: each m_t = o tanh(c_t)
  scalar_t* grad_hx;        // [D, B, P]
  scalar_t* grad_cx;        // [D, B, H]
  scalar_t* work;           // per direction: dh [B, P], dc [B, H], dm [B, H], dg [B, 4H]

  static int64_t work_per_direction(int64_t B, int64_t H, int64_t P) { return B * (P + 6 * H); }

  void run(int64_t d) const {
    const int64_t G = 4 * H, DP = D * P;
    scalar_t* dh = work + d * work_per_direction(B, H, P);
    scalar_t* dc = dh + B * P;
    scalar_t* dm = dc + B * H;
    scalar_t* dg = dm + B * H;
    // A row's carries start as the gradients of its final states: a row joins the
    // recurrence (backwards) at its own last step, and nothing touches it before.
    for (int64_t slot = 0; slot < B; ++slot) {
      const int64_t b = order.slot_batch[slot];
      std::copy_n(g_hn + (d * B + b) * P, P, dh + slot * P);
      std::copy_n(g_cn + (d * B + b) * H, H, dc + slot * H);
    }
    for (int64_t s = order.max_len - 1; s >= 0; --s) {
      const int64_t n = order.active_at(s);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = SeqOrder::time_of(d, s, order.slot_len[i]) * B + order.slot_batch[i];
        scalar_t* dh_i = dh + i * P;
        const scalar_t* gy_i = gy + row * DP + d * P;
        for (int64_t u = 0; u < P; ++u) dh_i[u] += gy_i[u];
        std::copy_n(dh_i, P, dh_all + (row * D + d) * P);
      }
      small_gemm<scalar_t>(n, H, P, dh, P, w_hr + d * P * H, H, dm, H, /*accumulate=*/false);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = order.slot_batch[i], len = order.slot_len[i];
        const int64_t t = SeqOrder::time_of(d, s, len), row = t * B + b;
        const int64_t tp = s > 0 ? SeqOrder::time_of(d, s - 1, len) : -1;
        const scalar_t* g = gates + (row * D + d) * G;
        const scalar_t* c = cells + (row * D + d) * H;
        const scalar_t* c_prev = tp < 0 ? cx + (d * B + b) * H : cells + ((tp * B + b) * D + d) * H;
        scalar_t* dgr = dgates + (row * D + d) * G;
        scalar_t* m = m_all + (row * D + d) * H;
        for_vectors<scalar_t>(H, [&](int64_t j, int64_t k) {
          const Vec gi = Vec::loadu(g + j, k), gf = Vec::loadu(g + H + j, k),
                    gg = Vec::loadu(g + 2 * H + j, k), go = Vec::loadu(g + 3 * H + j, k);
          const Vec cc = Vec::loadu(c + j, k);
          Vec di, df, dgg, d_o, dc_prev;
          cell::lstm_backward<VecAct>(Vec::loadu(dm + i * H + j, k), Vec::loadu(dc + i * H + j, k),
                                      gi, gf, gg, go, cc, Vec::loadu(c_prev + j, k), di, df, dgg,
                                      d_o, dc_prev);
          di.store(dgr + j, k);
          df.store(dgr + H + j, k);
          dgg.store(dgr + 2 * H + j, k);
          d_o.store(dgr + 3 * H + j, k);
          dc_prev.store(dc + i * H + j, k);
          (go * VecAct::tanh(cc)).store(m + j, k);
        });
        std::copy_n(dgr, G, dg + i * G);  // contiguous rows for the product below
        const scalar_t* hp = tp < 0 ? hx + (d * B + b) * P : out + (tp * B + b) * DP + d * P;
        std::copy_n(hp, P, h_prev + (row * D + d) * P);
      }
      small_gemm<scalar_t>(n, P, G, dg, G, w_hh + d * G * P, P, dh, P, /*accumulate=*/false);
    }
    for (int64_t slot = 0; slot < B; ++slot) {
      const int64_t b = order.slot_batch[slot];
      std::copy_n(dh + slot * P, P, grad_hx + (d * B + b) * P);
      std::copy_n(dc + slot * H, H, grad_cx + (d * B + b) * H);
    }
  }
};

// Both directions side by side (one thread each when there are two).
template <typename Kernel>
void run_directions(const Kernel& k, int64_t D) {
  at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) k.run(d);
  });
}

// [T, B] true at the steps past each row's length (none without lengths).
at::Tensor padding_mask(const std::optional<at::Tensor>& lengths, int64_t T) {
  return at::arange(T, lengths->options()).unsqueeze(1) >= lengths->unsqueeze(0);
}

bool has_padding(const SeqOrder& order, int64_t T, int64_t B) {
  return order.max_len < T || order.slot_len[B - 1] < T;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& weight_hr, const at::Tensor& hx,
    const at::Tensor& cx, const std::optional<at::Tensor>& lengths_arg, bool keep_activations) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_lstm_proj_layer_args(input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths);
  if (is_bf16(input))
    return round_bf16<3>(lstm_proj_layer_cpu(f32(input), f32(weight_ih), f32(weight_hh), f32(bias),
                                             f32(weight_hr), f32(hx), f32(cx), lengths,
                                             keep_activations));
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_hr.size(0), P = weight_hr.size(1), H = weight_hr.size(2), G = 4 * H;
  const at::TensorOptions opts = input.options();
  const SeqOrder order(lengths, T, B);
  const bool padded = has_padding(order, T, B);

  // Every step's input projection, both directions, in one GEMM: [T*B, D*4H].
  const at::Tensor w_ih = weight_ih.reshape({D * G, I});
  at::Tensor gates = bias.has_value()
                         ? at::addmm(bias->reshape({D * G}), input.reshape({T * B, I}), w_ih.t())
                         : large_mm(input.reshape({T * B, I}), w_ih.t());
  gates = gates.view({T, B, D, G});
  at::Tensor output = padded ? at::zeros({T, B, D * P}, opts) : at::empty({T, B, D * P}, opts);
  at::Tensor cells = keep_activations ? at::empty({T, B, D, H}, opts) : at::empty({0}, opts);
  at::Tensor h_n = at::empty({D, B, P}, opts), c_n = at::empty({D, B, H}, opts);
  const at::Tensor w_hh_t = weight_hh.transpose(1, 2).contiguous();  // [D, P, 4H]
  const at::Tensor w_hr_t = weight_hr.transpose(1, 2).contiguous();  // [D, H, P]
  const at::Tensor hx_c = hx.contiguous(), cx_c = cx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_proj_layer_cpu", [&] {
    using K = ProjForward<scalar_t>;
    at::Tensor work = at::empty({D * K::work_per_direction(B, H, P)}, opts);
    const K k{order, B, H, P, D, gates.data_ptr<scalar_t>(), keep_activations,
              keep_activations ? cells.data_ptr<scalar_t>() : nullptr,
              w_hh_t.data_ptr<scalar_t>(), w_hr_t.data_ptr<scalar_t>(), hx_c.data_ptr<scalar_t>(),
              cx_c.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
              c_n.data_ptr<scalar_t>(), work.data_ptr<scalar_t>()};
    run_directions(k, D);
  });
  if (!keep_activations) {
    gates = at::empty({0}, opts);
  } else if (padded) {  // the steps past a length were never run: zeros, not projections
    const at::Tensor pad = padding_mask(lengths, T).view({T, B, 1, 1});
    gates.masked_fill_(pad, 0);
    cells.masked_fill_(pad, 0);
  }
  return {output, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_proj_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& weight_hr, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths_arg, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_lstm_proj_layer_backward_args(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                                      weight_hr, hx, cx, lengths, output, gates, cells);
  if (is_bf16(input))  // the saved gates and cells are float32 already
    return round_bf16<7>(lstm_proj_layer_backward_cpu(
        f32(grad_output), f32(grad_h_n), f32(grad_c_n), f32(input), f32(weight_ih),
        f32(weight_hh), f32(weight_hr), f32(hx), f32(cx), lengths, f32(output), gates, cells));
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_hr.size(0), P = weight_hr.size(1), H = weight_hr.size(2), G = 4 * H;
  const at::TensorOptions opts = input.options();
  const SeqOrder order(lengths, T, B);

  // Padding rows keep zeros in all four, which the GEMMs below rely on.
  at::Tensor dgates = at::zeros({T, B, D, G}, opts);
  at::Tensor h_prev = at::zeros({T, B, D, P}, opts);
  at::Tensor dh_all = at::zeros({T, B, D, P}, opts);
  at::Tensor m_all = at::zeros({T, B, D, H}, opts);
  at::Tensor grad_hx = at::empty({D, B, P}, opts), grad_cx = at::empty({D, B, H}, opts);
  const at::Tensor gy = grad_output.contiguous(), g_hn = grad_h_n.contiguous(),
                   g_cn = grad_c_n.contiguous(), hx_c = hx.contiguous(), cx_c = cx.contiguous(),
                   out = output.contiguous(), gates_c = gates.contiguous(),
                   cells_c = cells.contiguous(), w_hh = weight_hh.contiguous(),
                   w_hr = weight_hr.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_proj_layer_backward_cpu", [&] {
    using K = ProjBackward<scalar_t>;
    at::Tensor work = at::empty({D * K::work_per_direction(B, H, P)}, opts);
    const K k{order, B, H, P, D, gy.data_ptr<scalar_t>(), g_hn.data_ptr<scalar_t>(),
              g_cn.data_ptr<scalar_t>(), hx_c.data_ptr<scalar_t>(), cx_c.data_ptr<scalar_t>(),
              out.data_ptr<scalar_t>(), gates_c.data_ptr<scalar_t>(), cells_c.data_ptr<scalar_t>(),
              w_hh.data_ptr<scalar_t>(), w_hr.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(),
              h_prev.data_ptr<scalar_t>(), dh_all.data_ptr<scalar_t>(), m_all.data_ptr<scalar_t>(),
              grad_hx.data_ptr<scalar_t>(), grad_cx.data_ptr<scalar_t>(), work.data_ptr<scalar_t>()};
    run_directions(k, D);
  });

  // The steps past a length read no input: their rows of the input are left out of the
  // weight gradient (a NaN there would otherwise poison it through 0 * NaN).
  at::Tensor x = input;
  if (has_padding(order, T, B)) x = input.masked_fill(padding_mask(lengths, T).unsqueeze(2), 0);
  const at::Tensor dg_2d = dgates.view({T * B, D * G});
  const at::Tensor grad_input = large_mm(dg_2d, weight_ih.reshape({D * G, I})).view({T, B, I});
  const at::Tensor grad_weight_ih = large_mm(dg_2d.t(), x.reshape({T * B, I})).view({D, G, I});
  const at::Tensor grad_bias = dg_2d.sum(0).view({D, G});
  const at::Tensor grad_weight_hh = recurrent_weight_grad(dgates, h_prev, G);  // [D, 4H, P]
  const at::Tensor grad_weight_hr = recurrent_weight_grad(dh_all, m_all, P);   // [D, P, H]
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr, grad_hx, grad_cx};
}


}  // namespace CPU_CAPABILITY
}  // namespace seqfuse
