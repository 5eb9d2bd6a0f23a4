// Fused LSTM layer on CPU (float32, float64).
//
// Forward. Each step of each direction is one register-tiled product (tile_gemm.h):
// for 6 rows and one vector of hidden units, the four gates' pre-activations sit in 24
// vector registers, and the epilogue turns them into gates, cell and hidden state
// before anything goes back to memory. The recurrent weights are packed once per call
// into panels [unit block][k][gate][unit] that the tile reads with unit stride.
// The input projection comes one of two ways:
//  * training (keep_activations): one GEMM for all steps and both directions into
//    `gates`, which the epilogue then overwrites with the activated gates the backward
//    needs;
//  * inference: stacked into the same panels ([x_t, h_{t-1}] times [W_ih; W_hh]), so no
//    [T, B, 4H] pre-activation tensor is written and read back.
//
// Backward. Per step, dh_{t-1} = dgates_t W_hh is tiled the same way, four vectors of
// hidden units at a time, and the epilogue runs the cell's backward for those units, so
// the next step's dgates come out of registers too. W_hh [4H, H] is already the K x N
// panel this needs. The weight and input gradients are then three large GEMMs.
//
// Lengths: batch rows run in order of decreasing length (SeqOrder), so at step s the
// active rows are a prefix of the state buffers, and the reverse direction starts at each
// row's own last valid step. Threads: recurrence.h (one direction per thread, or rows
// split, or units split with a spin barrier per step).
#include "../lstm.h"
#include "fast_math.h"
#include "recurrence.h"
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

namespace seqfuse {
namespace {

// Rows a thread should get before splitting rows beats splitting units.
constexpr int64_t kMinRowsPerPart = 2 * kTileRows;

template <typename scalar_t>
struct LstmForward {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t V = Vec::size();

  const SeqOrder& order;
  int64_t T, B, I, H, D, G;
  int64_t n_units;  // unit blocks of V units
  int64_t Hp;       // H rounded up to whole unit blocks (state row stride)
  bool fused;       // input projection inside the step tiles (else read from `gates`)
  const scalar_t* x;
  const scalar_t* w_ih;
  const scalar_t* w_hh;
  const scalar_t* bias;  // [D, 4H] or null
  scalar_t* gates;       // [T, B, D, 4H]: pre-activations (unfused), then activated gates (keep)
  bool keep;             // write gates and cells for the backward
  scalar_t* cells;       // [T, B, D, H]
  scalar_t* out;         // [T, B, D*H]
  scalar_t* h_n;         // [D, B, H]
  scalar_t* c_n;
  scalar_t* panels_ih;  // [D, n_units, I, 4V]
  scalar_t* panels_hh;  // [D, n_units, H, 4V]
  scalar_t* h_state;    // [D, 2, B, Hp]: double-buffered, as unit-split threads read step s while writing s+1
  scalar_t* c_state;    // [D, B, Hp]

  scalar_t* panel_ih(int64_t d, int64_t ub) const { return panels_ih + (d * n_units + ub) * I * 4 * V; }
  scalar_t* panel_hh(int64_t d, int64_t ub) const { return panels_hh + (d * n_units + ub) * H * 4 * V; }

  // panel[k][q*V + u] = W[q*H + ub*V + u][k], zero for units past H: the transpose of 4
  // blocks of V weight rows.
  void pack_panel(const scalar_t* w, int64_t K, int64_t d, int64_t ub, scalar_t* panel) const {
    const int64_t j0 = ub * V, m = std::min(V, H - j0);
    if (m < V) std::fill_n(panel, K * 4 * V, scalar_t(0));
    for (int64_t q = 0; q < 4; ++q)
      at::vec::transpose_mxn<scalar_t>(w + (d * G + q * H + j0) * K, K, panel + q * V, 4 * V,
                                       static_cast<int>(m), static_cast<int>(K));
  }

  void pack(int64_t d, int64_t u0, int64_t u1) const {
    for (int64_t ub = u0; ub < u1; ++ub) {
      pack_panel(w_ih, I, d, ub, panel_ih(d, ub));
      pack_panel(w_hh, H, d, ub, panel_hh(d, ub));
    }
  }

  // gates[row, d, unit block ub] = x[row] W_ih^T + bias for the given (t * B + b) rows.
  void project(int64_t d, const std::vector<int64_t>& rows, int64_t u0, int64_t u1) const {
    const int64_t n = static_cast<int64_t>(rows.size());
    for (int64_t ub = u0; ub < u1; ++ub)
      for (int64_t r = 0; r < n; r += kTileRows)
        with_tile_rows(std::min<int64_t>(kTileRows, n - r), [&](auto mr) {
          constexpr int MR = decltype(mr)::value;
          const scalar_t* a[MR];
          for (int i = 0; i < MR; ++i) a[i] = x + rows[r + i] * I;
          TileAcc<scalar_t, MR> acc;
          acc.zero();
          tile_fma<scalar_t, MR, true>(acc, a, 0, panel_ih(d, ub), 4 * V, I, 4 * V);
          const int64_t j0 = ub * V, m = std::min(V, H - j0);
          for (int i = 0; i < MR; ++i) {
            scalar_t* g = gates + (rows[r + i] * D + d) * G + j0;
            for (int q = 0; q < 4; ++q) {
              const Vec b = bias ? Vec::loadu(bias + d * G + q * H + j0, m) : Vec(scalar_t(0));
              (acc.v[i][q] + b).store(g + q * H, m);
            }
          }
        });
  }

  // Step s of direction d for slots [r0, r1) and unit blocks [u0, u1).
  void step(int64_t d, int64_t s, int64_t r0, int64_t r1, int64_t u0, int64_t u1) const {
    r1 = std::min(r1, order.active_at(s));
    const scalar_t* h_cur = h_state + (d * 2 + s % 2) * B * Hp;
    scalar_t* h_next = h_state + (d * 2 + (s + 1) % 2) * B * Hp;
    for (int64_t ub = u0; ub < u1; ++ub)
      for (int64_t r = r0; r < r1; r += kTileRows)
        with_tile_rows(std::min<int64_t>(kTileRows, r1 - r), [&](auto mr) {
          tile<decltype(mr)::value>(d, s, r, ub, h_cur, h_next);
        });
  }

  template <int MR>
  void tile(int64_t d, int64_t s, int64_t r, int64_t ub, const scalar_t* h_cur,
            scalar_t* h_next) const {
    const scalar_t* a_x[MR];
    const scalar_t* a_h[MR];
    int64_t row[MR];  // (t * B + b): this slot's position in the [T, B] grid
    for (int i = 0; i < MR; ++i) {
      const int64_t slot = r + i, b = order.slot_batch[slot];
      row[i] = SeqOrder::time_of(d, s, order.slot_len[slot]) * B + b;
      a_x[i] = x + row[i] * I;
      a_h[i] = h_cur + slot * Hp;
    }
    TileAcc<scalar_t, MR> acc;
    acc.zero();
    if (fused) tile_fma<scalar_t, MR, true>(acc, a_x, 0, panel_ih(d, ub), 4 * V, I, 4 * V);
    tile_fma<scalar_t, MR, true>(acc, a_h, 0, panel_hh(d, ub), 4 * V, H, 4 * V);

    const int64_t j0 = ub * V, m = std::min(V, H - j0);
    for (int i = 0; i < MR; ++i) {
      const int64_t slot = r + i;
      scalar_t* g_row = gates ? gates + (row[i] * D + d) * G + j0 : nullptr;
      Vec pre[4];
      for (int q = 0; q < 4; ++q) {
        if (!fused)
          pre[q] = acc.v[i][q] + Vec::loadu(g_row + q * H, m);
        else if (bias)
          pre[q] = acc.v[i][q] + Vec::loadu(bias + d * G + q * H + j0, m);
        else
          pre[q] = acc.v[i][q];
      }
      const Vec gi = vsigmoid(pre[0]), gf = vsigmoid(pre[1]);
      const Vec gg = vtanh(pre[2]), go = vsigmoid(pre[3]);
      scalar_t* c = c_state + (d * B + slot) * Hp + j0;
      const Vec cn = at::vec::fmadd(gf, Vec::loadu(c), gi * gg);
      const Vec hn = go * vtanh(cn);
      cn.store(c);
      hn.store(h_next + slot * Hp + j0);
      hn.store(out + row[i] * D * H + d * H + j0, m);
      if (keep) {
        gi.store(g_row, m);
        gf.store(g_row + H, m);
        gg.store(g_row + 2 * H, m);
        go.store(g_row + 3 * H, m);
        cn.store(cells + (row[i] * D + d) * H + j0, m);
      }
      if (s == order.slot_len[slot] - 1) {  // this row's last step: final state
        const int64_t b = order.slot_batch[slot];
        hn.store(h_n + (d * B + b) * H + j0, m);
        cn.store(c_n + (d * B + b) * H + j0, m);
      }
    }
  }
};

// Forward of one layer. `gates` is [T, B, D, 4H] when the input projection runs first
// (training, or too few rows to fill a tile), and empty when it is fused into the steps.
template <typename scalar_t>
void lstm_forward(const at::Tensor& input, const at::Tensor& weight_ih,
                  const at::Tensor& weight_hh, const at::Tensor& bias, const at::Tensor& hx,
                  const at::Tensor& cx, const SeqOrder& order, at::Tensor& gates, bool keep,
                  at::Tensor& output, at::Tensor& cells, at::Tensor& h_n, at::Tensor& c_n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2), G = 4 * H;
  const int64_t n_units = (H + V - 1) / V, Hp = n_units * V;
  const bool fused = gates.numel() == 0;

  // One workspace: packed panels, then the state buffers. At batch 1 a call is ~100 us,
  // and every ATen call here would cost one or two of them.
  const int64_t n_ih = D * n_units * I * 4 * V, n_hh = D * n_units * H * 4 * V;
  const int64_t n_h = D * 2 * B * Hp, n_c = D * B * Hp;
  at::Tensor workspace = at::empty({n_ih + n_hh + n_h + n_c}, input.options());
  scalar_t* panels_ih = workspace.data_ptr<scalar_t>();
  scalar_t* panels_hh = panels_ih + n_ih;
  scalar_t* h_state = panels_hh + n_hh;
  scalar_t* c_state = h_state + n_h;
  // Initial state, in slot order; the padding past H stays zero.
  std::fill_n(h_state, n_h + n_c, scalar_t(0));
  const scalar_t* hx_p = hx.data_ptr<scalar_t>();
  const scalar_t* cx_p = cx.data_ptr<scalar_t>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t slot = 0; slot < B; ++slot) {
      const int64_t b = order.slot_batch[slot];
      std::copy_n(hx_p + (d * B + b) * H, H, h_state + (d * 2 * B + slot) * Hp);
      std::copy_n(cx_p + (d * B + b) * H, H, c_state + (d * B + slot) * Hp);
    }

  const LstmForward<scalar_t> k{
      order, T, B, I, H, D, G, n_units, Hp, fused,
      input.data_ptr<scalar_t>(), weight_ih.data_ptr<scalar_t>(), weight_hh.data_ptr<scalar_t>(),
      bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
      fused ? nullptr : gates.data_ptr<scalar_t>(), keep,
      keep ? cells.data_ptr<scalar_t>() : nullptr, output.data_ptr<scalar_t>(),
      h_n.data_ptr<scalar_t>(), c_n.data_ptr<scalar_t>(), panels_ih, panels_hh, h_state, c_state};

  const TeamPlan plan(D, B, n_units, D * B * G * (I + H), order, kMinRowsPerPart);
  PartBarrier packed(plan.size());
  std::vector<std::unique_ptr<PartBarrier>> step_done;
  for (int64_t d = 0; d < D; ++d) step_done.push_back(std::make_unique<PartBarrier>(plan.parts_per_dir));

  run_team(plan, [&](int64_t p0, int64_t p1) {
    // Each part packs a share of its directions' panels: its own unit blocks, or an even
    // slice of them when the direction's threads split rows (and all read every panel).
    for (int64_t p = p0; p < p1; ++p) {
      const TeamPart& part = plan.parts[p];
      int64_t u0 = part.u0, u1 = part.u1;
      if (!plan.split_units && plan.parts_per_dir > 1) {
        const int64_t j = p % plan.parts_per_dir;
        u0 = j * n_units / plan.parts_per_dir;
        u1 = (j + 1) * n_units / plan.parts_per_dir;
      }
      for (int64_t d = part.d0; d < part.d1; ++d) k.pack(d, u0, u1);
    }
    packed.arrive(p1 - p0);
    packed.wait_for_round(1);
    // Unfused: each part projects exactly the (rows, units) its steps will read, so no
    // barrier is needed between the projection and the recurrence.
    if (!fused)
      for (int64_t p = p0; p < p1; ++p) {
        const TeamPart& part = plan.parts[p];
        std::vector<int64_t> rows;
        for (int64_t slot = part.r0; slot < part.r1; ++slot)
          for (int64_t t = 0; t < order.slot_len[slot]; ++t) rows.push_back(t * B + order.slot_batch[slot]);
        for (int64_t d = part.d0; d < part.d1; ++d) k.project(d, rows, part.u0, part.u1);
      }
    for (int64_t s = 0; s < order.max_len; ++s)
      for (int64_t p = p0; p < p1; ++p) {
        const TeamPart& part = plan.parts[p];
        for (int64_t d = part.d0; d < part.d1; ++d) {
          if (plan.split_units) step_done[d]->wait_for_round(s);
          k.step(d, s, part.r0, part.r1, part.u0, part.u1);
          if (plan.split_units) step_done[d]->arrive(1);
        }
      }
  });
}

template <typename scalar_t>
struct LstmBackward {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t V = Vec::size();
  static constexpr int64_t kTileUnits = 4 * V;

  const SeqOrder& order;
  int64_t T, B, H, D, G;
  int64_t Hc;  // H rounded up to whole tiles (dc_state row stride)
  const scalar_t* w_hh;
  const scalar_t* gy;    // grad_output [T, B, D*H]
  const scalar_t* g_hn;  // [D, B, H]
  const scalar_t* g_cn;
  const scalar_t* hx;
  const scalar_t* cx;
  const scalar_t* out;
  const scalar_t* gates;
  const scalar_t* cells;
  scalar_t* dgates;  // [T, B, D, 4H]
  scalar_t* h_prev;  // [T, B, D, H]: the h each step read, for grad_weight_hh
  scalar_t* grad_hx;
  scalar_t* grad_cx;
  scalar_t* dc_state;  // [D, B, Hc]

  const scalar_t* dgates_at(int64_t d, int64_t s, int64_t slot) const {
    const int64_t t = SeqOrder::time_of(d, s, order.slot_len[slot]);
    return dgates + ((t * B + order.slot_batch[slot]) * D + d) * G;
  }

  // Backward of step s, direction d, slots [r0, r1), unit tiles [n0, n1). Rows still
  // running at step s+1 get their dh from dgates_{s+1} W_hh; rows whose last step is s
  // start from grad_h_n, grad_c_n.
  void step(int64_t d, int64_t s, int64_t r0, int64_t r1, int64_t n0, int64_t n1) const {
    r1 = std::min(r1, order.active_at(s));
    const int64_t split = std::clamp(order.active_at(s + 1), r0, std::max(r0, r1));
    for (int64_t nt = n0; nt < n1; ++nt) {
      for (int64_t r = r0; r < split; r += kTileRows)
        with_tile_rows(std::min<int64_t>(kTileRows, split - r),
                       [&](auto mr) { tile<decltype(mr)::value>(d, s, r, nt, true); });
      for (int64_t r = split; r < r1; r += kTileRows)
        with_tile_rows(std::min<int64_t>(kTileRows, r1 - r),
                       [&](auto mr) { tile<decltype(mr)::value>(d, s, r, nt, false); });
    }
  }

  // acc = dgates_{s+1} rows [r, r+MR) times W_hh[d][:, tile nt].
  template <int MR>
  void recurrent_product(TileAcc<scalar_t, MR>& acc, int64_t d, int64_t s_next, int64_t r,
                         int64_t nt) const {
    const scalar_t* a[MR];
    for (int i = 0; i < MR; ++i) a[i] = dgates_at(d, s_next, r + i);
    const scalar_t* w = w_hh + d * G * H + nt * kTileUnits;
    const int64_t cols = H - nt * kTileUnits;
    if (cols >= kTileUnits)
      tile_fma<scalar_t, MR, true>(acc, a, 0, w, H, G, cols);
    else
      tile_fma<scalar_t, MR, false>(acc, a, 0, w, H, G, cols);
  }

  template <int MR>
  void tile(int64_t d, int64_t s, int64_t r, int64_t nt, bool recurrent) const {
    TileAcc<scalar_t, MR> acc;
    acc.zero();
    if (recurrent) recurrent_product(acc, d, s + 1, r, nt);
    const Vec one(scalar_t(1));
    for (int i = 0; i < MR; ++i) {
      const int64_t slot = r + i, b = order.slot_batch[slot], len = order.slot_len[slot];
      const int64_t t = SeqOrder::time_of(d, s, len);
      const int64_t tp = d == 0 ? t - 1 : t + 1;  // the step processed before t
      const int64_t row = (t * B + b) * D + d;
      const bool first = s == 0, last = s == len - 1;
      for (int q = 0; q < 4; ++q) {
        const int64_t j = nt * kTileUnits + q * V;
        const int64_t m = std::min(V, H - j);
        if (m <= 0) break;
        Vec dh = acc.v[i][q] + Vec::loadu(gy + (t * B + b) * D * H + d * H + j, m);
        if (last) dh = dh + Vec::loadu(g_hn + (d * B + b) * H + j, m);
        const scalar_t* g = gates + row * G + j;
        const Vec gi = Vec::loadu(g, m), gf = Vec::loadu(g + H, m);
        const Vec gg = Vec::loadu(g + 2 * H, m), go = Vec::loadu(g + 3 * H, m);
        const Vec tc = vtanh(Vec::loadu(cells + row * H + j, m));
        scalar_t* dc = dc_state + (d * B + slot) * Hc + j;
        const Vec dc_in = last ? Vec::loadu(g_cn + (d * B + b) * H + j, m) : Vec::loadu(dc);
        const Vec dc_t = dc_in + dh * go * (one - tc * tc);
        const Vec c_prev = first ? Vec::loadu(cx + (d * B + b) * H + j, m)
                                 : Vec::loadu(cells + ((tp * B + b) * D + d) * H + j, m);
        scalar_t* dg = dgates + row * G + j;
        (dc_t * gg * gi * (one - gi)).store(dg, m);
        (dc_t * c_prev * gf * (one - gf)).store(dg + H, m);
        (dc_t * gi * (one - gg * gg)).store(dg + 2 * H, m);
        (dh * tc * go * (one - go)).store(dg + 3 * H, m);
        (dc_t * gf).store(dc);
        const scalar_t* h_before = first ? hx + (d * B + b) * H + j
                                         : out + (tp * B + b) * D * H + d * H + j;
        std::copy_n(h_before, m, h_prev + row * H + j);
      }
    }
  }

  // grad_hx = dgates_0 W_hh and grad_cx = dc after the last (earliest) step.
  void initial_state_grads(int64_t d, int64_t r0, int64_t r1, int64_t n0, int64_t n1) const {
    for (int64_t nt = n0; nt < n1; ++nt)
      for (int64_t r = r0; r < r1; r += kTileRows)
        with_tile_rows(std::min<int64_t>(kTileRows, r1 - r), [&](auto mr) {
          constexpr int MR = decltype(mr)::value;
          TileAcc<scalar_t, MR> acc;
          acc.zero();
          recurrent_product(acc, d, 0, r, nt);
          for (int i = 0; i < MR; ++i) {
            const int64_t slot = r + i, b = order.slot_batch[slot];
            for (int q = 0; q < 4; ++q) {
              const int64_t j = nt * kTileUnits + q * V, m = std::min(V, H - j);
              if (m <= 0) break;
              acc.v[i][q].store(grad_hx + (d * B + b) * H + j, m);
              std::copy_n(dc_state + (d * B + slot) * Hc + j, m, grad_cx + (d * B + b) * H + j);
            }
          }
        });
  }
};

template <typename scalar_t>
void lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                   const at::Tensor& grad_c_n, const at::Tensor& weight_hh, const at::Tensor& hx,
                   const at::Tensor& cx, const at::Tensor& output, const at::Tensor& gates,
                   const at::Tensor& cells, const SeqOrder& order, at::Tensor& dgates,
                   at::Tensor& h_prev, at::Tensor& grad_hx, at::Tensor& grad_cx) {
  using K = LstmBackward<scalar_t>;
  const int64_t T = gates.size(0), B = hx.size(1);
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2), G = 4 * H;
  const int64_t n_tiles = (H + K::kTileUnits - 1) / K::kTileUnits, Hc = n_tiles * K::kTileUnits;
  at::Tensor dc_state = at::zeros({D, B, Hc}, hx.options());
  const K k{order, T, B, H, D, G, Hc, weight_hh.data_ptr<scalar_t>(),
            grad_output.data_ptr<scalar_t>(), grad_h_n.data_ptr<scalar_t>(),
            grad_c_n.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(), cx.data_ptr<scalar_t>(),
            output.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
            dgates.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(),
            grad_hx.data_ptr<scalar_t>(), grad_cx.data_ptr<scalar_t>(),
            dc_state.data_ptr<scalar_t>()};

  const TeamPlan plan(D, B, n_tiles, D * B * G * H, order, kMinRowsPerPart);
  std::vector<std::unique_ptr<PartBarrier>> step_done;
  for (int64_t d = 0; d < D; ++d) step_done.push_back(std::make_unique<PartBarrier>(plan.parts_per_dir));

  run_team(plan, [&](int64_t p0, int64_t p1) {
    for (int64_t n = 0; n <= order.max_len; ++n)  // n: steps already done
      for (int64_t p = p0; p < p1; ++p) {
        const TeamPart& part = plan.parts[p];
        for (int64_t d = part.d0; d < part.d1; ++d) {
          if (plan.split_units) step_done[d]->wait_for_round(n);
          if (n < order.max_len)
            k.step(d, order.max_len - 1 - n, part.r0, part.r1, part.u0, part.u1);
          else
            k.initial_state_grads(d, part.r0, part.r1, part.u0, part.u1);
          if (plan.split_units) step_done[d]->arrive(1);
        }
      }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths, bool keep_activations) {
  check_lstm_layer_args(input, weight_ih, weight_hh, bias, hx, cx, lengths);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2), G = 4 * H;
  const at::Tensor x = input.contiguous();
  const at::Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const SeqOrder order(lengths, T, B);

  // The input projection runs first, into `gates`, when training (the backward needs
  // the gates there anyway) or when a step has too few rows to fill a register tile
  // (then the step is bound by streaming weights, and streaming W_ih too would double
  // that). Otherwise it is fused into the step tiles and no [T, B, D, 4H] tensor exists.
  const bool project_first = keep_activations || B < kTileRows;

  // Padded positions are never written: zero them so outputs match packed semantics and
  // every output is deterministic.
  const bool padded = order.max_len < T || (B > 0 && order.slot_len[B - 1] < T);
  auto alloc = [&](at::IntArrayRef shape) {
    return padded ? at::zeros(shape, input.options()) : at::empty(shape, input.options());
  };
  at::Tensor gates = project_first ? alloc({T, B, D, G}) : at::empty({0}, input.options());
  at::Tensor output = alloc({T, B, D * H});
  at::Tensor cells = keep_activations ? alloc({T, B, D, H}) : at::empty({0}, input.options());
  at::Tensor h_n = at::empty({D, B, H}, input.options());
  at::Tensor c_n = at::empty({D, B, H}, input.options());
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_cpu", [&] {
      lstm_forward<scalar_t>(x, w_ih, w_hh, b, hx.contiguous(), cx.contiguous(), order, gates,
                             keep_activations, output, cells, h_n, c_n);
    });
  }
  if (!keep_activations) gates = at::empty({0}, input.options());
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
              "lstm_layer_backward: gates/cells must come from lstm_layer on the same input with "
              "keep_activations=True; got gates ", gates.sizes(), " and cells ", cells.sizes());
  const SeqOrder order(lengths, T, B);

  // Rows the recurrence skips (padding) keep zero gradients, which the GEMMs below rely on.
  at::Tensor dgates = at::zeros({T, B, D, G}, input.options());
  at::Tensor h_prev = at::zeros({T, B, D, H}, input.options());
  at::Tensor grad_hx = at::empty({D, B, H}, input.options());
  at::Tensor grad_cx = at::empty({D, B, H}, input.options());
  const at::Tensor w_hh = weight_hh.contiguous();
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
      lstm_backward<scalar_t>(grad_output.contiguous(), grad_h_n.contiguous(),
                              grad_c_n.contiguous(), w_hh, hx.contiguous(), cx.contiguous(),
                              output.contiguous(), gates.contiguous(), cells.contiguous(), order,
                              dgates, h_prev, grad_hx, grad_cx);
    });
  }

  const at::Tensor dg_2d = dgates.view({T * B, D * G});
  const at::Tensor x_2d = input.reshape({T * B, I});
  const at::Tensor grad_input = at::mm(dg_2d, weight_ih.reshape({D * G, I})).view({T, B, I});
  const at::Tensor grad_weight_ih = at::mm(dg_2d.t(), x_2d).view({D, G, I});
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
