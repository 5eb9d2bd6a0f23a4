// Fused recurrent layers on CPU (float32, float64, bfloat16): LSTM, GRU and Elman RNN, one
// or both directions, per-sequence lengths. One engine (RecurrentForward /
// RecurrentBackward) drives all three; a cell type (LstmCell, GruCell, RnnCell) supplies
// only the pointwise math of a step's epilogue and of its backward.
//
// Forward. Each step of each direction is one register-tiled product (tile_gemm.h): for
// 6 rows and one vector of hidden units, the pre-activations of every gate (4 for the
// LSTM, 3 for the GRU, whose n gate keeps its input and recurrent parts in two
// accumulators, 1 for the RNN) sit in vector registers, and the cell's epilogue turns them
// into the new state before anything goes back to memory. The weights are packed once
// per call into panels [unit block][k][gate][unit] that the tile reads with unit stride.
// The input projection comes one of two ways:
//  * first, for all steps, inside the same thread team, into `gates`: in training (the
//    backward needs the saved activations there anyway), and when a step has too few
//    rows to fill a tile (then a step streams weights, and streaming W_ih too would
//    double that);
//  * otherwise folded into the step tiles ([x_t, h_{t-1}] times [W_ih; W_hh]), so no
//    [T, B, D, G] tensor is written and read back.
// bfloat16 inference (and the RNN, which saves nothing) multiplies bfloat16 operands with
// float32 accumulation (tile_dot_bf16, AVX512-BF16); states and cell math stay float32.
//
// Backward. Per step, dh_{t-1} = dgates_t W_hh is tiled the same way, four vectors of
// hidden units at a time (W_hh [G, H] is already the K x N panel this needs), and the
// cell's backward runs in the epilogue, so the next step's dgates come out of registers.
// The weight and input gradients are then large GEMMs.
//
// Lengths: batch rows run in order of decreasing length (SeqOrder), so at step s the
// active rows are a prefix of the state buffers, and the reverse direction starts at each
// row's own last valid step. Threads: recurrence.h (one direction per thread, or rows
// split, or units split and meeting every step; team_tasks.h: a late thread's part is
// taken over).
#include "../../cell_math.h"
#include "../../gru.h"
#include "../../lstm.h"
#include "../../rnn.h"
#include "../amx.h"
#include "../kernels.h"
#include "fast_math.h"
#include "../fork_safety.h"
#include "../recurrence.h"
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <memory>
#include <vector>

namespace seqfuse {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability
namespace {

// Rows a thread should get before splitting rows beats splitting units.
constexpr int64_t kMinRowsPerPart = 2 * kTileRows;

// op_t: the type of the products' operands (input, weights, and a copy of the hidden
// state): scalar_t, or bfloat16 with scalar_t = float (tile_dot_bf16). Everything else,
// the cell math, states, outputs and saved activations, is scalar_t.
template <typename scalar_t, typename Cell, typename op_t = scalar_t>
struct RecurrentForward {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t V = Vec::size();
  static constexpr int NG = Cell::kGates;
  static constexpr bool kBf16 = !std::is_same_v<op_t, scalar_t>;
  // Panel rows per k: bfloat16 panels hold pairs of k, so K rounds up to even.
  static constexpr int64_t panel_rows(int64_t K) { return kBf16 ? (K + 1) / 2 * 2 : K; }

  const SeqOrder& order;
  int64_t T, B, I, H, D;
  int64_t GS;       // row stride of `gates`: Cell::kSaved * H
  int64_t n_units;  // unit blocks of V units
  int64_t Hp;       // H rounded up to whole unit blocks (state row stride)
  bool fused;       // input projection inside the step tiles (else read from `gates`)
  const op_t* x;
  const op_t* w_ih;         // [D, NG*H, I]
  const op_t* w_hh;         // [D, NG*H, H]
  const scalar_t* bias_ih;  // [D, NG*H] or null (the LSTM's b_ih + b_hh)
  const scalar_t* bias_hh;  // [D, NG*H] or null (GRU only)
  scalar_t* gates;          // [T, B, D, GS]: input projection in, saved activations out (keep)
  bool keep;                // save activations for the backward
  scalar_t* cells;          // LSTM: [T, B, D, H]
  scalar_t* out;            // [T, B, D*H]
  scalar_t* h_n;            // [D, B, H]
  scalar_t* c_n;            // LSTM: [D, B, H]
  op_t* panels_ih;          // [D, n_units, I, NG*V] (bfloat16: [.., I/2, NG*V, 2])
  op_t* panels_hh;          // [D, n_units, H, NG*V]
  scalar_t* h_state;        // [D, 2, B, Hp]: double-buffered, as unit-split threads read step s while writing s+1
  scalar_t* c_state;        // LSTM: [D, B, Hp]
  op_t* h_op;               // bfloat16 only: [D, 2, B, Hp], h_state rounded for the products
  bool amx = false;         // bfloat16 recurrent products of 16-row blocks on AMX tiles (amx.h)

  op_t* panel_ih(int64_t d, int64_t ub) const { return panels_ih + (d * n_units + ub) * panel_rows(I) * NG * V; }
  op_t* panel_hh(int64_t d, int64_t ub) const { return panels_hh + (d * n_units + ub) * panel_rows(H) * NG * V; }
  const op_t* h_operand(int64_t d, int64_t s) const {
    if constexpr (kBf16) return h_op + (d * 2 + s % 2) * B * Hp;
    else return h_state + (d * 2 + s % 2) * B * Hp;
  }

  // Accumulators per row: NG, or Cell::kAcc (the GRU's 4: r, z, x_n, h_n).
  static constexpr int NA = Cell::kAcc;

  // acc += a rows times a packed panel of K rows. kRecurrent: the W_hh panel, whose last
  // gate block goes to the last accumulator when the cell keeps it apart (NA > NG).
  template <int MR, bool kRecurrent>
  C10_ALWAYS_INLINE void product(TileAcc<scalar_t, MR, NA>& acc, const op_t* const* a,
                                 const op_t* panel, int64_t K) const {
    constexpr bool kLastToEnd = kRecurrent && NA > NG;
#if defined(SEQFUSE_AVX512_BF16)
    if constexpr (kBf16) {
      tile_dot_bf16<MR, NG, NA, kLastToEnd>(acc, a, panel, K);
      return;
    }
#endif
    if constexpr (!kBf16)
      tile_fma<scalar_t, MR, true, NG, NA, kLastToEnd>(acc, a, 0, panel, NG * V, K, NG * V);
  }

  // panel[k][q*V + u] = W[q*H + ub*V + u][k], zero for units past H: the transpose of NG
  // blocks of V weight rows.
  // Static: pack_recurrent_weights_cpu packs without a forward.
  static void pack_panel(const op_t* w, int64_t K, int64_t H, int64_t d, int64_t ub, op_t* panel) {
    const int64_t j0 = ub * V, m = std::min(V, H - j0);
    if constexpr (kBf16) {
      // panel[k/2][q*V + u][k%2] = W[q*H + j0 + u][k], zero past H and past K.
      const int64_t K2 = panel_rows(K) / 2;
      for (int64_t k2 = 0; k2 < K2; ++k2)
        for (int64_t q = 0; q < NG; ++q) {
          op_t* dst = panel + (k2 * NG + q) * V * 2;
          for (int64_t u = 0; u < V; ++u)
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t k = 2 * k2 + e;
              dst[u * 2 + e] = (u < m && k < K) ? w[(d * NG * H + q * H + j0 + u) * K + k] : op_t(0);
            }
        }
    } else {
      if (m < V) std::fill_n(panel, K * NG * V, scalar_t(0));
      for (int64_t q = 0; q < NG; ++q)
        at::vec::transpose_mxn<scalar_t>(w + (d * NG * H + q * H + j0) * K, K, panel + q * V,
                                         NG * V, static_cast<int>(m), static_cast<int>(K));
    }
  }

  void pack(int64_t d, int64_t u0, int64_t u1) const {
    for (int64_t ub = u0; ub < u1; ++ub) {
      if (I > 0) pack_panel(w_ih, I, H, d, ub, panel_ih(d, ub));  // I = 0: input projected by the caller
      pack_panel(w_hh, H, H, d, ub, panel_hh(d, ub));
    }
  }

  // gates[row, d, gate q, unit block ub] = x[row] W_ih^T + bias_ih for the given
  // (t * B + b) rows.
  void project(int64_t d, const std::vector<int64_t>& rows, int64_t u0, int64_t u1) const {
    const int64_t n = static_cast<int64_t>(rows.size());
    for (int64_t ub = u0; ub < u1; ++ub)
      for (int64_t r = 0; r < n; r += kTileRows)
        with_tile_rows(std::min<int64_t>(kTileRows, n - r), [&](auto mr) {
          constexpr int MR = decltype(mr)::value;
          const op_t* a[MR];
          for (int i = 0; i < MR; ++i) a[i] = x + rows[r + i] * I;
          TileAcc<scalar_t, MR, NA> acc;
          acc.zero();
          product<MR, false>(acc, a, panel_ih(d, ub), I);
          const int64_t j0 = ub * V, m = std::min(V, H - j0);
          for (int i = 0; i < MR; ++i) {
            scalar_t* g = gates + (rows[r + i] * D + d) * GS + j0;
            for (int q = 0; q < NG; ++q) {
              const Vec b = bias_ih ? Vec::loadu(bias_ih + d * NG * H + q * H + j0, m) : Vec(scalar_t(0));
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
    int64_t r_tiles = r0;  // rows from here on run on the register tiles
    if constexpr (kBf16)
      if (amx) r_tiles = amx_step(d, s, r0, r1, u0, u1, h_cur, h_next);
    for (int64_t ub = u0; ub < u1; ++ub)
      for (int64_t r = r_tiles; r < r1; r += kTileRows)
        with_tile_rows(std::min<int64_t>(kTileRows, r1 - r), [&](auto mr) {
          tile<decltype(mr)::value>(d, s, r, ub, h_cur, h_next, h_operand(d, s));
        });
  }

  // step() on AMX tiles, in blocks of 16 rows (the last one shorter): each block's input rows are
  // gathered into one operand (a tile reads rows at one stride, and a step's rows lie at
  // scattered (t, b)), then per unit block [x_t, h] times [W_ih; W_hh] into tile sums,
  // and the cell's epilogue per row. Returns the first row left to the register tiles.
  int64_t amx_step(int64_t d, int64_t s, int64_t r0, int64_t r1, int64_t u0, int64_t u1,
                   const scalar_t* h_cur, scalar_t* h_next) const {
    static_assert(!kBf16 || V == 16, "an AMX float32 sum tile row is one 16-lane vector");
    using BF = c10::BFloat16;
    const int64_t Ip = panel_rows(I);  // the operand's columns past I read as zero
    thread_local std::vector<op_t> xs;
    if (fused) xs.assign(kAmxRows * Ip, op_t(0));
    // The GRU's n gate keeps its input and recurrent sums apart (NA > NG): two sum buffers.
    alignas(64) float sums_x[NG * kAmxRows * 16];
    alignas(64) float sums_h[NG * kAmxRows * 16];
    float* h_into = NA > NG && fused ? sums_h : sums_x;
    int64_t r = r0;
    for (; r < r1; r += kAmxRows) {
      const int64_t rows = std::min(kAmxRows, r1 - r);
      if (fused)
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t slot = r + i;
          const int64_t row = SeqOrder::time_of(d, s, order.slot_len[slot]) * B + order.slot_batch[slot];
          std::copy_n(x + row * I, I, xs.data() + i * Ip);
        }
      for (int64_t ub = u0; ub < u1; ++ub) {
        if (fused)
          amx_panel_product(reinterpret_cast<const BF*>(xs.data()), Ip,
                            reinterpret_cast<const BF*>(panel_ih(d, ub)), I, NG, sums_x, false, rows);
        amx_panel_product(reinterpret_cast<const BF*>(h_operand(d, s) + r * Hp), Hp,
                          reinterpret_cast<const BF*>(panel_hh(d, ub)), H, NG, h_into,
                          /*accumulate=*/fused && h_into == sums_x, rows);
        const int64_t j0 = ub * V, m = std::min(V, H - j0);
        for (int64_t i = 0; i < rows; ++i) {
          Vec acc[NA];
          for (int q = 0; q < NA; ++q) acc[q] = Vec(scalar_t(0));
          for (int q = 0; q < NG; ++q) acc[q] = Vec::loadu(sums_x + (q * kAmxRows + i) * 16);
          if (h_into == sums_h) {  // GRU: r and z add up, n's recurrent sum goes last
            for (int q = 0; q < NG - 1; ++q) acc[q] = acc[q] + Vec::loadu(sums_h + (q * kAmxRows + i) * 16);
            acc[NA - 1] = Vec::loadu(sums_h + ((NG - 1) * kAmxRows + i) * 16);
          } else if (!fused && NA > NG) {  // the recurrent sums alone: n's goes last
            acc[NA - 1] = acc[NG - 1];
            acc[NG - 1] = Vec(scalar_t(0));
          }
          epilogue(acc, d, s, r + i, j0, m, h_cur, h_next);
        }
      }
    }
    return r;
  }

  template <int MR>
  void tile(int64_t d, int64_t s, int64_t r, int64_t ub, const scalar_t* h_cur,
            scalar_t* h_next, const op_t* h_op_cur) const {
    const op_t* a_x[MR];
    const op_t* a_h[MR];
    int64_t row[MR];  // (t * B + b): this slot's position in the [T, B] grid
    for (int i = 0; i < MR; ++i) {
      const int64_t slot = r + i, b = order.slot_batch[slot];
      row[i] = SeqOrder::time_of(d, s, order.slot_len[slot]) * B + b;
      a_x[i] = x + row[i] * I;
      a_h[i] = h_op_cur + slot * Hp;
    }
    TileAcc<scalar_t, MR, NA> acc;
    acc.zero();
    if (fused) product<MR, false>(acc, a_x, panel_ih(d, ub), I);
    product<MR, true>(acc, a_h, panel_hh(d, ub), H);

    const int64_t j0 = ub * V, m = std::min(V, H - j0);
    for (int i = 0; i < MR; ++i) epilogue(acc.v[i], d, s, r + i, j0, m, h_cur, h_next);
  }

  // The cell's math for one row (slot) and vector of units from its gate sums acc.
  C10_ALWAYS_INLINE void epilogue(const Vec* acc, int64_t d, int64_t s, int64_t slot, int64_t j0,
                                  int64_t m, const scalar_t* h_cur, scalar_t* h_next) const {
    const int64_t b = order.slot_batch[slot];
    const int64_t row = SeqOrder::time_of(d, s, order.slot_len[slot]) * B + b;
    const bool last = s == order.slot_len[slot] - 1;
    Cell::forward(*this, acc, d, slot, b, row, j0, m, last, h_cur + slot * Hp + j0,
                  h_next + slot * Hp + j0);
#if defined(SEQFUSE_AVX512_BF16)
    if constexpr (kBf16)  // the next step's operand: the new h, rounded once
      store_bf16(h_op + (d * 2 + (s + 1) % 2) * B * Hp + slot * Hp + j0,
                 Vec::loadu(h_next + slot * Hp + j0));
#endif
  }
};

// Forward of one layer. `gates` is [T, B, D, GS] when the input projection runs first,
// and empty when it is fused into the steps. projected: the caller has already filled
// `gates` with the input projection (bias included), [T, B, D, NG*H]; then input and
// weight_ih are [T, B, 0] and [D, G, 0], nothing is packed or projected for them, and
// (keep is false) the kernel only reads `gates`.
template <typename scalar_t, typename Cell, typename op_t = scalar_t>
void recurrent_forward(const at::Tensor& input, const at::Tensor& weight_ih,
                       const at::Tensor& weight_hh, const at::Tensor& bias_ih,
                       const at::Tensor& bias_hh, const at::Tensor& hx, const at::Tensor& cx,
                       const SeqOrder& order, at::Tensor& gates, bool keep, at::Tensor& output,
                       at::Tensor& cells, at::Tensor& h_n, at::Tensor& c_n,
                       bool projected = false, const at::Tensor& prepacked = at::Tensor()) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  constexpr int NG = Cell::kGates;
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2);
  const int64_t n_units = (H + V - 1) / V, Hp = n_units * V;
  using K = RecurrentForward<scalar_t, Cell, op_t>;
  const bool fused = gates.numel() == 0;

  // One workspace: packed panels, then the state buffers (and, for bfloat16, one for the
  // panels and the rounded state). At batch 1 a call is ~100 us, and every ATen call here
  // would cost one or two of them.
  const int64_t n_ih = D * n_units * K::panel_rows(I) * NG * V;
  const int64_t n_hh = D * n_units * K::panel_rows(H) * NG * V;
  const int64_t n_h = D * 2 * B * Hp, n_c = Cell::kCellState ? D * B * Hp : 0;
  // prepacked (pack_recurrent_weights, checked by the op): the panels, not repacked here.
  const bool have_panels = prepacked.defined();
  TORCH_CHECK(!(have_panels && K::kBf16), "seqfuse: packed_weights serve float32/float64 layers only");
  const int64_t n_op = K::kBf16 ? n_ih + n_hh + n_h : 0;
  const int64_t n_own = K::kBf16 || have_panels ? 0 : n_ih + n_hh;
  at::Tensor workspace = at::empty({n_own + n_h + n_c}, output.options());
  at::Tensor op_workspace = K::kBf16 ? at::empty({n_op}, input.options()) : at::Tensor();
  op_t* panels_ih = have_panels ? static_cast<op_t*>(prepacked.data_ptr())  // only read
                    : K::kBf16  ? reinterpret_cast<op_t*>(op_workspace.data_ptr())
                                : reinterpret_cast<op_t*>(workspace.data_ptr<scalar_t>());
  op_t* panels_hh = panels_ih + n_ih;
  scalar_t* h_state = workspace.data_ptr<scalar_t>() + n_own;
  scalar_t* c_state = h_state + n_h;
  op_t* h_op = K::kBf16 ? panels_hh + n_hh : nullptr;
  // Initial state, in slot order; the padding past H stays zero.
  std::fill_n(h_state, n_h + n_c, scalar_t(0));
  const scalar_t* hx_p = hx.data_ptr<scalar_t>();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t slot = 0; slot < B; ++slot) {
      const int64_t b = order.slot_batch[slot];
      std::copy_n(hx_p + (d * B + b) * H, H, h_state + (d * 2 * B + slot) * Hp);
      if (Cell::kCellState)
        std::copy_n(cx.data_ptr<scalar_t>() + (d * B + b) * H, H, c_state + (d * B + slot) * Hp);
    }
  if (h_op)
    for (int64_t i = 0; i < n_h; ++i) h_op[i] = op_t(h_state[i]);

  auto ptr = [](const at::Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr; };
  K k{
      order, T, B, I, H, D, (projected ? NG : Cell::kSaved) * H, n_units, Hp, fused,
      input.data_ptr<op_t>(), weight_ih.data_ptr<op_t>(), weight_hh.data_ptr<op_t>(),
      ptr(bias_ih), ptr(bias_hh), ptr(gates), keep, keep ? ptr(cells) : nullptr,
      output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(), ptr(c_n), panels_ih, panels_hh,
      h_state, c_state, h_op};
  k.amx = K::kBf16 && B >= kAmxMinRows && amx_bf16_usable();

  const TeamPlan plan(D, B, n_units, D * B * NG * H * (I + H), order, kMinRowsPerPart);
  // Each part's tasks: 0 packs a share of its directions' panels, 1 projects its input,
  // 2 + s is step s. Threads that split rows all read every panel, so the projection
  // waits for all the packing; unit-split threads meet every step.
  const auto sync = [&](int64_t t) {
    return t == 1 ? Sync::kAll : plan.split_units ? Sync::kDirection : Sync::kOwn;
  };
  run_team_tasks(plan.size(), plan.parts_per_dir, 2 + order.max_len, sync, [&](int64_t p, int64_t t) {
    const TeamPart& part = plan.parts[p];
    if (t == 0) {
      // Its own unit blocks, or an even slice of them when the direction's threads split
      // rows.
      int64_t u0 = part.u0, u1 = part.u1;
      if (!plan.split_units && plan.parts_per_dir > 1) {
        const int64_t j = p % plan.parts_per_dir;
        u0 = j * n_units / plan.parts_per_dir;
        u1 = (j + 1) * n_units / plan.parts_per_dir;
      }
      if (!have_panels)
        for (int64_t d = part.d0; d < part.d1; ++d) k.pack(d, u0, u1);
    } else if (t == 1) {
      // Unfused: each part projects exactly the (rows, units) its steps will read.
      if (fused || projected) return;
      std::vector<int64_t> rows;
      for (int64_t slot = part.r0; slot < part.r1; ++slot)
        for (int64_t tt = 0; tt < order.slot_len[slot]; ++tt) rows.push_back(tt * B + order.slot_batch[slot]);
      for (int64_t d = part.d0; d < part.d1; ++d) k.project(d, rows, part.u0, part.u1);
    } else {
      for (int64_t d = part.d0; d < part.d1; ++d) k.step(d, t - 2, part.r0, part.r1, part.u0, part.u1);
    }
  });
}

template <typename scalar_t, typename Cell>
struct RecurrentBackward {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t V = Vec::size();
  static constexpr int64_t kTileUnits = 4 * V;
  static constexpr int NG = Cell::kGates;

  const SeqOrder& order;
  int64_t T, B, H, D;
  int64_t GS;  // row stride of gates and dgates
  int64_t Hc;  // H rounded up to whole tiles (carry row stride)
  const scalar_t* w_hh;
  const scalar_t* gy;    // grad_output [T, B, D*H]
  const scalar_t* g_hn;  // [D, B, H]
  const scalar_t* g_cn;  // LSTM
  const scalar_t* hx;
  const scalar_t* cx;    // LSTM
  const scalar_t* out;
  const scalar_t* gates;
  const scalar_t* cells;  // LSTM
  scalar_t* dgates;       // [T, B, D, GS]; the first NG*H columns multiply W_hh
  scalar_t* h_prev;       // [T, B, D, H]: the h each step read, for grad_weight_hh
  scalar_t* grad_hx;
  scalar_t* grad_cx;      // LSTM
  scalar_t* carry;        // [D, B, Hc]: the gradient a step passes to the one before besides
                          // through W_hh (the LSTM's dc, the GRU's dh * z)

  const scalar_t* dgates_at(int64_t d, int64_t s, int64_t slot) const {
    const int64_t t = SeqOrder::time_of(d, s, order.slot_len[slot]);
    return dgates + ((t * B + order.slot_batch[slot]) * D + d) * GS;
  }

  // Backward of step s, direction d, slots [r0, r1), unit tiles [n0, n1). Rows still
  // running at step s+1 get their recurrent dh from dgates_{s+1} W_hh; rows whose last
  // step is s start from grad_h_n (and grad_c_n).
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

  // acc = dgates_{s_next} rows [r, r+MR) times W_hh[d][:, tile nt].
  template <int MR>
  void recurrent_product(TileAcc<scalar_t, MR>& acc, int64_t d, int64_t s_next, int64_t r,
                         int64_t nt) const {
    const scalar_t* a[MR];
    for (int i = 0; i < MR; ++i) a[i] = dgates_at(d, s_next, r + i);
    const scalar_t* w = w_hh + d * NG * H * H + nt * kTileUnits;
    const int64_t cols = H - nt * kTileUnits;
    if (cols >= kTileUnits)
      tile_fma<scalar_t, MR, true, 4>(acc, a, 0, w, H, NG * H, cols);
    else
      tile_fma<scalar_t, MR, false, 4>(acc, a, 0, w, H, NG * H, cols);
  }

  template <int MR>
  void tile(int64_t d, int64_t s, int64_t r, int64_t nt, bool recurrent) const {
    TileAcc<scalar_t, MR> acc;
    acc.zero();
    if (recurrent) recurrent_product(acc, d, s + 1, r, nt);
    for (int i = 0; i < MR; ++i) {
      const int64_t slot = r + i, b = order.slot_batch[slot], len = order.slot_len[slot];
      const int64_t t = SeqOrder::time_of(d, s, len);
      const int64_t tp = d == 0 ? t - 1 : t + 1;  // the step processed before t
      const bool first = s == 0, last = s == len - 1;
      for (int q = 0; q < 4; ++q) {
        const int64_t j = nt * kTileUnits + q * V;
        const int64_t m = std::min(V, H - j);
        if (m <= 0) break;
        const Vec dh_rec = acc.v[i][q] + Vec::loadu(gy + (t * B + b) * D * H + d * H + j, m);
        const scalar_t* h_before = first ? hx + (d * B + b) * H + j
                                         : out + (tp * B + b) * D * H + d * H + j;
        Cell::backward(*this, dh_rec, d, slot, b, t, tp, j, m, first, last, h_before);
        std::copy_n(h_before, m, h_prev + ((t * B + b) * D + d) * H + j);
      }
    }
  }

  // Gradients of the initial state, after the last (earliest) step.
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
              Cell::initial_state_grads(*this, acc.v[i][q], d, slot, b, j, m);
            }
          }
        });
  }
};

template <typename scalar_t, typename Cell>
void recurrent_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& weight_hh,
                        const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& output,
                        const at::Tensor& gates, const at::Tensor& cells, const SeqOrder& order,
                        at::Tensor& dgates, at::Tensor& h_prev, at::Tensor& grad_hx,
                        at::Tensor& grad_cx) {
  using K = RecurrentBackward<scalar_t, Cell>;
  const int64_t T = output.size(0), B = hx.size(1);
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2);
  const int64_t n_tiles = (H + K::kTileUnits - 1) / K::kTileUnits, Hc = n_tiles * K::kTileUnits;
  at::Tensor carry = at::zeros({D, B, Hc}, hx.options());
  auto ptr = [](const at::Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr; };
  const K k{order, T, B, H, D, Cell::kSaved * H, Hc, weight_hh.data_ptr<scalar_t>(),
            grad_output.data_ptr<scalar_t>(), grad_h_n.data_ptr<scalar_t>(), ptr(grad_c_n),
            hx.data_ptr<scalar_t>(), ptr(cx), output.data_ptr<scalar_t>(),
            ptr(gates), ptr(cells), dgates.data_ptr<scalar_t>(),
            h_prev.data_ptr<scalar_t>(), grad_hx.data_ptr<scalar_t>(), ptr(grad_cx),
            carry.data_ptr<scalar_t>()};

  const TeamPlan plan(D, B, n_tiles, D * B * Cell::kGates * H * H, order, kMinRowsPerPart);
  // Task n: the step n steps from the end, then (n = max_len) the initial state's gradients.
  const auto sync = [&](int64_t) { return plan.split_units ? Sync::kDirection : Sync::kOwn; };
  run_team_tasks(plan.size(), plan.parts_per_dir, order.max_len + 1, sync, [&](int64_t p, int64_t n) {
    const TeamPart& part = plan.parts[p];
    for (int64_t d = part.d0; d < part.d1; ++d) {
      if (n < order.max_len)
        k.step(d, order.max_len - 1 - n, part.r0, part.r1, part.u0, part.u1);
      else
        k.initial_state_grads(d, part.r0, part.r1, part.u0, part.u1);
    }
  });
}

// ---------------------------------------------------------------------------------
// Cells: the pointwise math of a step (forward epilogue) and of its backward. The
// formulas are cell_math.h's, shared with the CUDA kernels; these structs only load and
// store vectors of hidden units around them.
// ---------------------------------------------------------------------------------

// cell_math.h's activation policy for ATen vectors.
// LSTM, PyTorch's gate order i, f, g, o. Saved per step: the activated gates (4H) and the
// cell state.
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;
  static constexpr bool kCellState = true;
  static constexpr int kAcc = 4;

  template <typename F, typename Vec>
  static void forward(const F& k, const Vec* acc, int64_t d, int64_t slot, int64_t b, int64_t row,
                      int64_t j0, int64_t m, bool last, const typename F::Vec::value_type* /*h*/,
                      typename F::Vec::value_type* h_next) {
    const int64_t H = k.H, D = k.D;
    auto* g_row = k.gates ? k.gates + (row * D + d) * k.GS + j0 : nullptr;
    Vec pre[4];
    for (int q = 0; q < 4; ++q) {
      if (!k.fused)
        pre[q] = acc[q] + Vec::loadu(g_row + q * H, m);
      else if (k.bias_ih)
        pre[q] = acc[q] + Vec::loadu(k.bias_ih + d * 4 * H + q * H + j0, m);
      else
        pre[q] = acc[q];
    }
    auto* c = k.c_state + (d * k.B + slot) * k.Hp + j0;
    Vec gi, gf, gg, go, cn, hn;
    cell::lstm_forward<VecAct>(pre[0], pre[1], pre[2], pre[3], Vec::loadu(c), gi, gf, gg, go, cn, hn);
    cn.store(c);
    hn.store(h_next);
    hn.store(k.out + row * D * H + d * H + j0, m);
    if (k.keep) {
      gi.store(g_row, m);
      gf.store(g_row + H, m);
      gg.store(g_row + 2 * H, m);
      go.store(g_row + 3 * H, m);
      cn.store(k.cells + (row * D + d) * H + j0, m);
    }
    if (last) {
      hn.store(k.h_n + (d * k.B + b) * H + j0, m);
      cn.store(k.c_n + (d * k.B + b) * H + j0, m);
    }
  }

  template <typename K, typename Vec>
  static void backward(const K& k, Vec dh, int64_t d, int64_t slot, int64_t b, int64_t t,
                       int64_t tp, int64_t j, int64_t m, bool first, bool last,
                       const typename K::Vec::value_type* /*h_before*/) {
    using scalar_t = typename K::Vec::value_type;
    const int64_t H = k.H, D = k.D, B = k.B;
    const int64_t row = (t * B + b) * D + d;
    if (last) dh = dh + Vec::loadu(k.g_hn + (d * B + b) * H + j, m);
    const scalar_t* g = k.gates + row * k.GS + j;
    scalar_t* dc = k.carry + (d * B + slot) * k.Hc + j;
    const Vec dc_in = last ? Vec::loadu(k.g_cn + (d * B + b) * H + j, m) : Vec::loadu(dc);
    const Vec c_prev = first ? Vec::loadu(k.cx + (d * B + b) * H + j, m)
                             : Vec::loadu(k.cells + ((tp * B + b) * D + d) * H + j, m);
    Vec di, df, dg, d_o, dc_prev;
    cell::lstm_backward<VecAct>(dh, dc_in, Vec::loadu(g, m), Vec::loadu(g + H, m),
                                Vec::loadu(g + 2 * H, m), Vec::loadu(g + 3 * H, m),
                                Vec::loadu(k.cells + row * H + j, m), c_prev, di, df, dg, d_o,
                                dc_prev);
    scalar_t* dgates = k.dgates + row * k.GS + j;
    di.store(dgates, m);
    df.store(dgates + H, m);
    dg.store(dgates + 2 * H, m);
    d_o.store(dgates + 3 * H, m);
    dc_prev.store(dc);
  }

  template <typename K, typename Vec>
  static void initial_state_grads(const K& k, const Vec& acc, int64_t d, int64_t slot, int64_t b,
                                  int64_t j, int64_t m) {
    acc.store(k.grad_hx + (d * k.B + b) * k.H + j, m);
    Vec::loadu(k.carry + (d * k.B + slot) * k.Hc + j).store(k.grad_cx + (d * k.B + b) * k.H + j, m);
  }
};

// GRU, PyTorch's formula and gate order r, z, n:
//   r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r * h_n),
//   h' = (1 - z) * n + z * h,   with x_* = x W_i*^T + b_i*, h_* = h W_h*^T + b_h*.
// Saved per step (4H): r, z, n, h_n. dgates per step (4H): [dr, dz, dn * r, dn] (pre-
// activation gradients): the first 3H multiply W_hh, the gates r, z and the last H
// multiply W_ih.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;
  static constexpr bool kCellState = false;
  // n = tanh(x_n + r * h_n) needs x_n and h_n apart: the step tile keeps them in separate
  // accumulators, acc = [r, z, x_n, h_n] (x_n zero when the projection ran first).
  static constexpr int kAcc = 4;

  template <typename F, typename Vec>
  static void forward(const F& k, const Vec* acc, int64_t d, int64_t /*slot*/, int64_t b,
                      int64_t row, int64_t j0, int64_t m, bool last,
                      const typename F::Vec::value_type* h, typename F::Vec::value_type* h_next) {
    using scalar_t = typename F::Vec::value_type;
    const int64_t H = k.H, D = k.D;
    scalar_t* g = k.gates ? k.gates + (row * D + d) * k.GS + j0 : nullptr;
    // x-side pre-activations: projected first into `gates` (bias included), or in acc.
    Vec xs[3];
    for (int q = 0; q < 3; ++q) {
      if (!k.fused)
        xs[q] = Vec::loadu(g + q * H, m);
      else
        xs[q] = k.bias_ih ? Vec::loadu(k.bias_ih + d * 3 * H + q * H + j0, m) : Vec(scalar_t(0));
    }
    Vec bh[3];
    for (int q = 0; q < 3; ++q)
      bh[q] = k.bias_hh ? Vec::loadu(k.bias_hh + d * 3 * H + q * H + j0, m) : Vec(scalar_t(0));
    const Vec hn = acc[3] + bh[2];
    Vec r, z, n, h_new;
    cell::gru_forward<VecAct>(xs[0] + acc[0], xs[1] + acc[1], xs[2] + acc[2], bh[0], bh[1], hn,
                              Vec::loadu(h), r, z, n, h_new);
    h_new.store(h_next);
    h_new.store(k.out + row * D * H + d * H + j0, m);
    if (k.keep) {
      r.store(g, m);
      z.store(g + H, m);
      n.store(g + 2 * H, m);
      hn.store(g + 3 * H, m);
    }
    if (last) h_new.store(k.h_n + (d * k.B + b) * H + j0, m);
  }

  template <typename K, typename Vec>
  static void backward(const K& k, Vec dh, int64_t d, int64_t slot, int64_t b, int64_t t,
                       int64_t /*tp*/, int64_t j, int64_t m, bool /*first*/, bool last,
                       const typename K::Vec::value_type* h_before) {
    using scalar_t = typename K::Vec::value_type;
    const int64_t H = k.H, D = k.D, B = k.B;
    const int64_t row = (t * B + b) * D + d;
    scalar_t* carry = k.carry + (d * B + slot) * k.Hc + j;
    dh = dh + (last ? Vec::loadu(k.g_hn + (d * B + b) * H + j, m) : Vec::loadu(carry));
    const scalar_t* g = k.gates + row * k.GS + j;
    Vec dr, dz, dn, dhn, dh_direct;
    cell::gru_backward<VecAct>(dh, Vec::loadu(g, m), Vec::loadu(g + H, m), Vec::loadu(g + 2 * H, m),
                               Vec::loadu(g + 3 * H, m), Vec::loadu(h_before, m), dr, dz, dn, dhn,
                               dh_direct);
    scalar_t* dg = k.dgates + row * k.GS + j;
    dr.store(dg, m);
    dz.store(dg + H, m);
    dhn.store(dg + 2 * H, m);
    dn.store(dg + 3 * H, m);
    dh_direct.store(carry);
  }

  template <typename K, typename Vec>
  static void initial_state_grads(const K& k, const Vec& acc, int64_t d, int64_t slot, int64_t b,
                                  int64_t j, int64_t m) {
    (acc + Vec::loadu(k.carry + (d * k.B + slot) * k.Hc + j)).store(k.grad_hx + (d * k.B + b) * k.H + j, m);
  }
};

// Elman RNN: h' = act(x W_ih^T + h W_hh^T + b), act = tanh or relu. One gate block; the
// pre-activation is a plain sum of the two products, so inference and training alike
// fold the input projection into the step tiles (nothing but the output is saved: the
// derivative of either activation is a function of h'). dgates per step (H): dh * act'.
template <bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;  // `gates` rows hold the input projection when it runs first
  static constexpr bool kCellState = false;
  static constexpr int kAcc = 1;

  template <typename F, typename Vec>
  static void forward(const F& k, const Vec* acc, int64_t d, int64_t /*slot*/, int64_t b,
                      int64_t row, int64_t j0, int64_t m, bool last,
                      const typename F::Vec::value_type* /*h*/,
                      typename F::Vec::value_type* h_next) {
    using scalar_t = typename F::Vec::value_type;
    const int64_t H = k.H, D = k.D;
    Vec pre = acc[0];
    if (!k.fused)
      pre = pre + Vec::loadu(k.gates + (row * D + d) * k.GS + j0, m);
    else if (k.bias_ih)
      pre = pre + Vec::loadu(k.bias_ih + d * H + j0, m);
    const Vec h_new = cell::rnn_forward<kRelu, VecAct>(pre);
    h_new.store(h_next);
    h_new.store(k.out + row * D * H + d * H + j0, m);
    if (last) h_new.store(k.h_n + (d * k.B + b) * H + j0, m);
  }

  template <typename K, typename Vec>
  static void backward(const K& k, Vec dh, int64_t d, int64_t /*slot*/, int64_t b, int64_t t,
                       int64_t /*tp*/, int64_t j, int64_t m, bool /*first*/, bool last,
                       const typename K::Vec::value_type* /*h_before*/) {
    using scalar_t = typename K::Vec::value_type;
    const int64_t H = k.H, D = k.D, B = k.B;
    if (last) dh = dh + Vec::loadu(k.g_hn + (d * B + b) * H + j, m);
    const Vec y = Vec::loadu(k.out + (t * B + b) * D * H + d * H + j, m);
    cell::rnn_backward<kRelu, VecAct>(dh, y).store(k.dgates + ((t * B + b) * D + d) * k.GS + j, m);
  }

  template <typename K, typename Vec>
  static void initial_state_grads(const K& k, const Vec& acc, int64_t d, int64_t /*slot*/,
                                  int64_t b, int64_t j, int64_t m) {
    acc.store(k.grad_hx + (d * k.B + b) * k.H + j, m);
  }
};

}  // namespace


// ---------------------------------------------------------------------------------
// bfloat16. The ops accept bfloat16 inputs, weights and states and accumulate in float32:
// here by widening them once per call and running the float32 kernels, then rounding the
// results back. Saved activations (gates, cells) stay float32, so the backward loses
// nothing to a second rounding.
// ---------------------------------------------------------------------------------
namespace {
// Calls fn(scalar_t{}, op_t{}) for the forward kernel of a dtype: float32 and float64 as
// themselves, bfloat16 (inference, on CPUs with AVX512-BF16) as float32 with bfloat16
// operands.
template <typename Fn>
void dispatch_forward(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kDouble: fn(double{}, double{}); break;
#if defined(SEQFUSE_AVX512_BF16)
    case at::kBFloat16: fn(float{}, c10::BFloat16{}); break;
#endif
    case at::kFloat: fn(float{}, float{}); break;
    default: TORCH_CHECK(false, "seqfuse: no forward kernel for dtype ", dtype);
  }
}


// pack_recurrent_weights' result: a header of kPackHeader elements that names the layout
// (kPackMagic, V, D, NG, I, H: small integers, exact in float32), then the forward's panels
// [D, n_units, I, NG*V] and [D, n_units, H, NG*V], V the vector width of this build. The
// panels' size alone cannot tell a layout from another (for H a multiple of 8 and 16 the
// AVX2 and AVX-512 panels have the same size): panels baked into an artifact and read by
// another build's kernels would be read wrongly, so the header is checked on every call.
constexpr int64_t kPackHeader = 8;
constexpr int64_t kPackMagic = 5417;  // arbitrary: a tensor that is not a packing fails here

int64_t pack_vector_width(at::ScalarType dtype) {
  return dtype == at::kDouble ? Vectorized<double>::size() : Vectorized<float>::size();
}

int64_t packed_numel(at::ScalarType dtype, int64_t D, int64_t NG, int64_t I, int64_t H) {
  const int64_t V = pack_vector_width(dtype);
  return kPackHeader + D * ((H + V - 1) / V) * (I + H) * NG * V;
}

// A layer op's packed_weights (undefined when absent): pack_recurrent_weights of this
// layer's weights, in inference, float32/float64, as the panels without the header. The
// panels' values cannot be checked without packing again; the shape, dtype and the
// header (layout, this build's vector width, the layer's sizes) are.
at::Tensor checked_packed(const char* op, const std::optional<at::Tensor>& packed,
                          at::ScalarType dtype, int64_t D, int64_t NG, int64_t I, int64_t H,
                          bool keep) {
  if (!packed.has_value()) return at::Tensor();
  const at::Tensor& p = *packed;
  TORCH_CHECK(!keep, op, ": packed_weights serve inference; pass keep_activations=False (a "
              "backward reads weight_ih and weight_hh themselves)");
  TORCH_CHECK(p.device().is_cpu(), op, ": packed_weights must be a CPU tensor, got device ", p.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": packed_weights serve float32/float64 layers only, got input dtype ", dtype);
  TORCH_CHECK(p.scalar_type() == dtype, op, ": packed_weights dtype ", p.scalar_type(),
              " does not match the layer's ", dtype);
  const int64_t expected = packed_numel(dtype, D, NG, I, H);
  TORCH_CHECK(p.dim() == 1 && p.is_contiguous() && p.numel() == expected, op,
              ": packed_weights must be pack_recurrent_weights(weight_ih, weight_hh) of this "
              "layer, a contiguous 1-D tensor of ", expected, " elements, got shape ", p.sizes());
  // Read in place (a conversion would allocate on every call) and compared as doubles: a
  // tensor of other values (NaN included) fails the checks instead of being cast.
  double h[6];
  for (int64_t k = 0; k < 6; ++k)
    h[k] = dtype == at::kDouble ? p.data_ptr<double>()[k] : p.data_ptr<float>()[k];
  TORCH_CHECK(h[0] == kPackMagic, op, ": packed_weights is not a result of pack_recurrent_weights "
              "(its layout header is missing)");
  const int64_t V = pack_vector_width(dtype);
  TORCH_CHECK(h[1] == V, op, ": packed_weights were packed for vector width ", h[1],
              " but this build's kernels read width ", V, ": pack them again here");
  TORCH_CHECK(h[2] == D && h[3] == NG && h[4] == I && h[5] == H, op,
              ": packed_weights were packed for a layer of D=", h[2], ", gates=", h[3], ", I=", h[4],
              ", H=", h[5], ", not this one's D=", D, ", gates=", NG, ", I=", I, ", H=", H);
  return p.narrow(0, kPackHeader, expected - kPackHeader);
}
}  // namespace

namespace {
// pack_recurrent_weights' argument checks, shared by its CPU kernel and its Meta kernel
// (shapes only: what torch.export and AOTInductor trace).
void check_pack_args(const at::Tensor& weight_ih, const at::Tensor& weight_hh, bool meta) {
  const char* op = "pack_recurrent_weights";
  TORCH_CHECK(weight_hh.dim() == 3, op, ": weight_hh must be [D, G, H], got shape ", weight_hh.sizes());
  const int64_t D = weight_hh.size(0), G = weight_hh.size(1), H = weight_hh.size(2);
  TORCH_CHECK((D == 1 || D == 2) && H > 0 && (G == 4 * H || G == 3 * H || G == H), op,
              ": weight_hh must be [D, G, H] with D 1 or 2 and G = 4H (LSTM), 3H (GRU) or H "
              "(RNN), got shape ", weight_hh.sizes());
  TORCH_CHECK(weight_ih.dim() == 3 && weight_ih.size(0) == D && weight_ih.size(1) == G, op,
              ": weight_ih must be [D=", D, ", G=", G, ", I], got shape ", weight_ih.sizes());
  TORCH_CHECK(meta || (weight_ih.device().is_cpu() && weight_hh.device().is_cpu()), op,
              ": weight_ih and weight_hh must be CPU tensors, got ", weight_ih.device(), " and ",
              weight_hh.device());
  const at::ScalarType dtype = weight_hh.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": packs float32/float64 weights only, got weight_hh dtype ", dtype);
  TORCH_CHECK(weight_ih.scalar_type() == dtype, op, ": weight_ih dtype ", weight_ih.scalar_type(),
              " does not match weight_hh's ", dtype);
}

}  // namespace

// The panels' shape without packing: the capability's vector width decides their size,
// so the fake of a traced graph must come from here, not from Python.
at::Tensor pack_recurrent_weights_meta(const at::Tensor& weight_ih, const at::Tensor& weight_hh) {
  check_pack_args(weight_ih, weight_hh, /*meta=*/true);
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2);
  return at::empty({packed_numel(weight_hh.scalar_type(), D, weight_hh.size(1) / H,
                                 weight_ih.size(2), H)}, weight_hh.options());
}

at::Tensor pack_recurrent_weights_cpu(const at::Tensor& weight_ih, const at::Tensor& weight_hh) {
  before_cpu_op();
  check_pack_args(weight_ih, weight_hh, /*meta=*/false);
  const int64_t D = weight_hh.size(0), G = weight_hh.size(1), H = weight_hh.size(2);
  const at::ScalarType dtype = weight_hh.scalar_type();
  const int64_t NG = G / H, I = weight_ih.size(2);
  at::Tensor packed = at::empty({packed_numel(dtype, D, NG, I, H)}, weight_hh.options());
  const at::Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  auto pack = [&](auto cell, auto s) {
    using scalar_t = decltype(s);
    using K = RecurrentForward<scalar_t, decltype(cell)>;
    const int64_t n_units = (H + K::V - 1) / K::V;
    scalar_t* head = packed.data_ptr<scalar_t>();
    const int64_t tag[kPackHeader] = {kPackMagic, K::V, D, NG, I, H, 0, 0};
    for (int64_t k = 0; k < kPackHeader; ++k) head[k] = static_cast<scalar_t>(tag[k]);
    scalar_t* ih = head + kPackHeader;
    scalar_t* hh = ih + D * n_units * I * NG * K::V;
    const scalar_t* wi = w_ih.data_ptr<scalar_t>();
    const scalar_t* wh = w_hh.data_ptr<scalar_t>();
    at::parallel_for(0, D * n_units, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t d = j / n_units, ub = j % n_units;
        if (I > 0) K::pack_panel(wi, I, H, d, ub, ih + j * I * NG * K::V);
        K::pack_panel(wh, H, H, d, ub, hh + j * H * NG * K::V);
      }
    });
  };
  auto with_dtype = [&](auto cell) {
    if (dtype == at::kDouble) pack(cell, double{});
    else pack(cell, float{});
  };
  if (NG == 4) with_dtype(LstmCell{});
  else if (NG == 3) with_dtype(GruCell{});
  else with_dtype(RnnCell<false>{});
  return packed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths_arg, bool keep_activations,
    const std::optional<at::Tensor>& packed_weights) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_lstm_layer_args(input, weight_ih, weight_hh, bias, hx, cx, lengths);
  const at::Tensor panels = checked_packed("lstm_layer", packed_weights, input.scalar_type(), weight_ih.size(0),
                                          4, input.size(2), weight_hh.size(2), keep_activations);
  const bool bf16 = is_bf16(input);
  if (bf16 && !kHaveBf16Dot)
    return round_bf16<3>(lstm_layer_cpu(f32(input), f32(weight_ih), f32(weight_hh), f32(bias),
                                        f32(hx), f32(cx), lengths, keep_activations, std::nullopt));
  // From here: float32 or float64, or bfloat16 on bfloat16 tiles (input and weights as
  // they are; states, bias and results in float32, rounded at the end; in training the
  // saved activations stay float32, for the float32 backward).
  const int64_t T = input.size(0), B = input.size(1);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2), G = 4 * H;
  const at::TensorOptions opts = input.options().dtype(bf16 ? at::kFloat : input.scalar_type());
  const at::Tensor x = input.contiguous();
  const at::Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(opts.dtype()).contiguous() : at::Tensor();
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
    return padded ? at::zeros(shape, opts) : at::empty(shape, opts);
  };
  at::Tensor gates = project_first ? alloc({T, B, D, G}) : at::empty({0}, opts);
  at::Tensor output = alloc({T, B, D * H});
  at::Tensor cells = keep_activations ? alloc({T, B, D, H}) : at::empty({0}, opts);
  at::Tensor h_n = at::empty({D, B, H}, opts);
  at::Tensor c_n = at::empty({D, B, H}, opts);
  dispatch_forward(input.scalar_type(), [&](auto s, auto o) {
    recurrent_forward<decltype(s), LstmCell, decltype(o)>(
        x, w_ih, w_hh, b, at::Tensor(), hx.to(opts.dtype()).contiguous(),
        cx.to(opts.dtype()).contiguous(), order, gates, keep_activations, output, cells, h_n, c_n,
        /*projected=*/false, panels);
  });
  if (!keep_activations) gates = at::empty({0}, opts);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> r{output, h_n, c_n, gates, cells};
  return bf16 ? round_bf16<3>(std::move(r)) : r;
}

namespace {
// The backward's two input-side GEMMs: grad_input = dg W_ih and grad_weight_ih = dg^T x.
// dg (the pre-activation gradients) is float32; a bfloat16 layer passes its bfloat16 x
// and W_ih, and the GEMMs then run on bfloat16 operands with float32 accumulation, dg
// rounded once, as eager bfloat16 does (oneDNN's bfloat16 GEMM: 1.2 ms against 5.8 ms in
// float32 for [2048 x 1024] x [1024 x 256] on the AMD EPYC of docs/RESULTS.md, whose
// MKL takes its AVX2 path; float32 GEMMs there go to oneDNN too, gemm.h). grad_weight_hh stays float32: its h_{t-1} come from the
// float32 activations (see lstm_layer_backward_cpu).
std::pair<at::Tensor, at::Tensor> input_side_grads(const at::Tensor& dg_2d, const at::Tensor& weight_ih_2d,
                                                   const at::Tensor& x_2d) {
  const at::Tensor dg = dg_2d.scalar_type() == x_2d.scalar_type() ? dg_2d : dg_2d.to(x_2d.scalar_type());
  return {large_mm(dg, weight_ih_2d), large_mm(dg.t(), x_2d)};
}

// lstm_layer_backward_cpu after its checks: float32/float64, or the float32 recurrence of a
// bfloat16 layer with its bfloat16 input and W_ih (input_side_grads).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_impl(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& lengths,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells) {
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2), G = 4 * H;
  const SeqOrder order(lengths, T, B);

  // Rows the recurrence skips (padding) keep zero gradients, which the GEMMs below rely on.
  at::Tensor dgates = at::zeros({T, B, D, G}, grad_output.options());
  at::Tensor h_prev = at::zeros({T, B, D, H}, grad_output.options());
  at::Tensor grad_hx = at::empty({D, B, H}, grad_output.options());
  at::Tensor grad_cx = at::empty({D, B, H}, grad_output.options());
  const at::Tensor w_hh = weight_hh.contiguous();
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "lstm_layer_backward_cpu", [&] {
      recurrent_backward<scalar_t, LstmCell>(
          grad_output.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(), w_hh,
          hx.contiguous(), cx.contiguous(), output.contiguous(), gates.contiguous(),
          cells.contiguous(), order, dgates, h_prev, grad_hx, grad_cx);
    });
  }

  const at::Tensor dg_2d = dgates.view({T * B, D * G});
  const at::Tensor x_2d = input.reshape({T * B, I});
  const auto [grad_input_2d, grad_weight_ih_2d] = input_side_grads(dg_2d, weight_ih.reshape({D * G, I}), x_2d);
  const at::Tensor grad_input = grad_input_2d.view({T, B, I});
  const at::Tensor grad_weight_ih = grad_weight_ih_2d.view({D, G, I});
  const at::Tensor grad_weight_hh = recurrent_weight_grad(dgates, h_prev, G);
  const at::Tensor grad_bias = dg_2d.sum(0).view({D, G});
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_hx, grad_cx};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& lengths_arg,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_lstm_layer_backward_args(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, hx,
                                 cx, lengths, output, gates, cells);
  if (is_bf16(input)) {
    // The forward ran in float32 and rounded its output. The steps' h_{t-1} (grad_weight_hh
    // sums dgates^T h over every step) are rebuilt from the float32 activations instead,
    // h = o * tanh(c), so that the weight gradient does not pay for that rounding: found by
    // the bfloat16 property (tests/reliability), where it alone reached 2x eager's error.
    at::Tensor out = f32(output);
    const int64_t T = input.size(0), B = input.size(1), D = weight_ih.size(0), H = weight_hh.size(2);
    if (gates.sizes() == at::IntArrayRef({T, B, D, 4 * H}) &&
        cells.sizes() == at::IntArrayRef({T, B, D, H}) && out.sizes() == at::IntArrayRef({T, B, D * H})) {
      at::Tensor h = gates.narrow(3, 3 * H, H).to(at::kFloat) * cells.to(at::kFloat).tanh();
      if (lengths.has_value()) {  // padding steps hold no activations: zeros, as the output
        const auto valid = at::arange(T, lengths->options()).unsqueeze(1) < lengths->unsqueeze(0);
        h = at::where(valid.view({T, B, 1, 1}), h, at::zeros({}, h.options()));
      }
      out = h.reshape({T, B, D * H});
    }
    return round_bf16<6>(lstm_backward_impl(
        f32(grad_output), f32(grad_h_n), f32(grad_c_n), input.contiguous(), weight_ih.contiguous(),
        f32(weight_hh), f32(hx), f32(cx), lengths, out, f32(gates), f32(cells)));
  }
  return lstm_backward_impl(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, hx, cx,
                            lengths, output, gates, cells);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const at::Tensor& hx, const std::optional<at::Tensor>& lengths_arg, bool keep_activations,
    const std::optional<at::Tensor>& packed_weights) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_gru_layer_args(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths);
  const at::Tensor panels = checked_packed("gru_layer", packed_weights, input.scalar_type(), weight_ih.size(0),
                                          3, input.size(2), weight_hh.size(2), keep_activations);
  const bool bf16 = is_bf16(input);
  if (bf16 && !kHaveBf16Dot)
    return round_bf16<2>(gru_layer_cpu(f32(input), f32(weight_ih), f32(weight_hh), f32(bias_ih),
                                       f32(bias_hh), f32(hx), lengths, keep_activations, std::nullopt));
  // As lstm_layer_cpu: bfloat16 runs on bfloat16 tiles where the CPU has them.
  const int64_t T = input.size(0), B = input.size(1);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2);
  const at::TensorOptions opts = input.options().dtype(bf16 ? at::kFloat : input.scalar_type());
  const at::Tensor x = input.contiguous();
  const at::Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  const at::Tensor b_ih = bias_ih.has_value() ? bias_ih->to(opts.dtype()).contiguous() : at::Tensor();
  const at::Tensor b_hh = bias_hh.has_value() ? bias_hh->to(opts.dtype()).contiguous() : at::Tensor();
  const SeqOrder order(lengths, T, B);
  const bool padded = order.max_len < T || (B > 0 && order.slot_len[B - 1] < T);
  auto alloc = [&](at::IntArrayRef shape) {
    return padded ? at::zeros(shape, opts) : at::empty(shape, opts);
  };
  // As the LSTM: the projection runs first (into `gates`, which then holds the saved r,
  // z, n, h_n) in training and for batches under a tile; otherwise it is fused.
  const bool project_first = keep_activations || B < kTileRows;
  at::Tensor gates = project_first ? alloc({T, B, D, 4 * H}) : at::empty({0}, opts);
  at::Tensor output = alloc({T, B, D * H});
  at::Tensor h_n = at::empty({D, B, H}, opts);
  at::Tensor none;
  dispatch_forward(input.scalar_type(), [&](auto s, auto o) {
    recurrent_forward<decltype(s), GruCell, decltype(o)>(
        x, w_ih, w_hh, b_ih, b_hh, hx.to(opts.dtype()).contiguous(), none, order, gates,
        keep_activations, output, none, h_n, none, /*projected=*/false, panels);
  });
  if (!keep_activations) gates = at::empty({0}, opts);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> r{output, h_n, gates};
  return bf16 ? round_bf16<2>(std::move(r)) : r;
}

namespace {
// gru_layer_backward_cpu after its checks (as lstm_backward_impl).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_impl(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output, const at::Tensor& gates) {
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2);
  const SeqOrder order(lengths, T, B);

  // dgates rows: [dr, dz, dn * r, dn]; padding rows stay zero for the GEMMs below.
  at::Tensor dgates = at::zeros({T, B, D, 4 * H}, grad_output.options());
  at::Tensor h_prev = at::zeros({T, B, D, H}, grad_output.options());
  at::Tensor grad_hx = at::empty({D, B, H}, grad_output.options());
  at::Tensor none;
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "gru_layer_backward_cpu", [&] {
    recurrent_backward<scalar_t, GruCell>(grad_output.contiguous(), grad_h_n.contiguous(), none,
                                          weight_hh.contiguous(), hx.contiguous(), none,
                                          output.contiguous(), gates.contiguous(), none, order,
                                          dgates, h_prev, grad_hx, none);
  });

  // Pre-activation gradients of the input side [dr, dz, dn] and of the recurrent side
  // [dr, dz, dn * r].
  const at::Tensor dgi = at::cat({dgates.narrow(3, 0, 2 * H), dgates.narrow(3, 3 * H, H)}, 3);
  const at::Tensor dgh = dgates.narrow(3, 0, 3 * H);
  const at::Tensor dgi_2d = dgi.view({T * B, D * 3 * H});
  const auto [grad_input_2d, grad_weight_ih_2d] =
      input_side_grads(dgi_2d, weight_ih.reshape({D * 3 * H, I}), input.reshape({T * B, I}));
  const at::Tensor grad_input = grad_input_2d.view({T, B, I});
  const at::Tensor grad_weight_ih = grad_weight_ih_2d.view({D, 3 * H, I});
  const at::Tensor grad_weight_hh = recurrent_weight_grad(dgates, h_prev, 3 * H);
  const at::Tensor grad_bias_ih = dgi_2d.sum(0).view({D, 3 * H});
  const at::Tensor grad_bias_hh = dgh.sum({0, 1});
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_hx};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths_arg, const at::Tensor& output, const at::Tensor& gates) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_gru_layer_backward_args(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                output, gates);
  if (is_bf16(input))
    return round_bf16<6>(gru_backward_impl(f32(grad_output), f32(grad_h_n), input.contiguous(),
                                           weight_ih.contiguous(), f32(weight_hh), f32(hx), lengths,
                                           f32(output), f32(gates)));
  return gru_backward_impl(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths, output, gates);
}

namespace {
// Calls fn.template operator()<Cell>() with the RnnCell of the named activation.
template <typename Fn>
void with_rnn_cell(c10::string_view nonlinearity, Fn&& fn) {
  if (nonlinearity == "relu")
    fn(RnnCell<true>{});
  else
    fn(RnnCell<false>{});
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> rnn_layer_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths_arg, c10::string_view nonlinearity,
    const std::optional<at::Tensor>& packed_weights) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_rnn_layer_args(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity);
  // The RNN saves nothing: the wrapper refuses packed_weights when a gradient is needed.
  const at::Tensor panels = checked_packed("rnn_layer", packed_weights, input.scalar_type(), weight_ih.size(0),
                                          1, input.size(2), weight_hh.size(2), false);
  // bfloat16 runs on bfloat16 tiles where the CPU has them (the RNN saves nothing for
  // the backward, so training uses them too); see lstm_layer_cpu.
  const bool bf16 = is_bf16(input);
  if (bf16 && !kHaveBf16Dot)
    return round_bf16<2>(rnn_layer_cpu(f32(input), f32(weight_ih), f32(weight_hh), f32(bias),
                                       f32(hx), lengths, nonlinearity, std::nullopt));
  const int64_t T = input.size(0), B = input.size(1);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2);
  const at::TensorOptions opts = input.options().dtype(bf16 ? at::kFloat : input.scalar_type());
  const SeqOrder order(lengths, T, B);
  const bool padded = order.max_len < T || (B > 0 && order.slot_len[B - 1] < T);
  // The projection runs first only when a step has too few rows to fill a tile (see
  // lstm_layer_cpu); training saves nothing beyond the output either way.
  at::Tensor gates = B < kTileRows ? at::empty({T, B, D, H}, opts) : at::empty({0}, opts);
  at::Tensor output = padded ? at::zeros({T, B, D * H}, opts) : at::empty({T, B, D * H}, opts);
  at::Tensor h_n = at::empty({D, B, H}, opts);
  at::Tensor none;
  const at::Tensor b = bias.has_value() ? bias->to(opts.dtype()).contiguous() : at::Tensor();
  with_rnn_cell(nonlinearity, [&](auto cell) {
    dispatch_forward(input.scalar_type(), [&](auto s, auto o) {
      recurrent_forward<decltype(s), decltype(cell), decltype(o)>(
          input.contiguous(), weight_ih.contiguous(), weight_hh.contiguous(), b, at::Tensor(),
          hx.to(opts.dtype()).contiguous(), none, order, gates, false, output, none, h_n, none,
          /*projected=*/false, panels);
    });
  });
  std::tuple<at::Tensor, at::Tensor> r{output, h_n};
  return bf16 ? round_bf16<2>(std::move(r)) : r;
}

namespace {
// rnn_layer_backward_cpu after its checks (as lstm_backward_impl).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_impl(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output,
    c10::string_view nonlinearity) {
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), H = weight_hh.size(2);
  const SeqOrder order(lengths, T, B);
  // Pre-activation gradients; padding rows stay zero for the GEMMs below.
  at::Tensor dgates = at::zeros({T, B, D, H}, grad_output.options());
  at::Tensor h_prev = at::zeros({T, B, D, H}, grad_output.options());
  at::Tensor grad_hx = at::empty({D, B, H}, grad_output.options());
  at::Tensor none;
  with_rnn_cell(nonlinearity, [&](auto cell) {
    using Cell = decltype(cell);
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "rnn_layer_backward_cpu", [&] {
      recurrent_backward<scalar_t, Cell>(grad_output.contiguous(), grad_h_n.contiguous(), none,
                                         weight_hh.contiguous(), hx.contiguous(), none,
                                         output.contiguous(), none, none, order, dgates, h_prev,
                                         grad_hx, none);
    });
  });
  const at::Tensor dg_2d = dgates.view({T * B, D * H});
  const auto [grad_input_2d, grad_weight_ih_2d] =
      input_side_grads(dg_2d, weight_ih.reshape({D * H, I}), input.reshape({T * B, I}));
  const at::Tensor grad_input = grad_input_2d.view({T, B, I});
  const at::Tensor grad_weight_ih = grad_weight_ih_2d.view({D, H, I});
  const at::Tensor grad_weight_hh = recurrent_weight_grad(dgates, h_prev, H);
  const at::Tensor grad_bias = dg_2d.sum(0).view({D, H});
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_hx};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths_arg, const at::Tensor& output,
    c10::string_view nonlinearity) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_rnn_layer_backward_args(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                output, nonlinearity);
  if (is_bf16(input))
    return round_bf16<5>(rnn_backward_impl(f32(grad_output), f32(grad_h_n), input.contiguous(),
                                           weight_ih.contiguous(), f32(weight_hh), f32(hx), lengths,
                                           f32(output), nonlinearity));
  return rnn_backward_impl(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths, output,
                           nonlinearity);
}

// Inference from a projected input (an embedding folded through W_ih): the engine's
// project-first path with the projection given. Only `gates` is read; nothing is saved.
namespace {
template <typename Cell>
std::tuple<at::Tensor, at::Tensor, at::Tensor> projected_forward(
    const at::Tensor& projected, const at::Tensor& weight_hh, const at::Tensor& bias_hh,
    const at::Tensor& hx, const at::Tensor* cx, const std::optional<at::Tensor>& lengths,
    const char* op, const std::optional<at::Tensor>& packed_weights) {
  const int64_t T = projected.size(0), B = projected.size(1), D = projected.size(2);
  const int64_t G = projected.size(3), H = weight_hh.size(2);
  // No input here (I = 0): the panels of pack_recurrent_weights([D, G, 0], weight_hh).
  const at::Tensor panels = checked_packed(op, packed_weights, projected.scalar_type(), D,
                                          Cell::kGates, 0, H, false);
  const at::TensorOptions opts = projected.options();
  const SeqOrder order(lengths, T, B);
  const bool padded = order.max_len < T || order.slot_len[B - 1] < T;
  at::Tensor gates = projected.contiguous();  // read only: keep is false
  at::Tensor output = padded ? at::zeros({T, B, D * H}, opts) : at::empty({T, B, D * H}, opts);
  at::Tensor cells = at::empty({0}, opts);
  at::Tensor h_n = at::empty({D, B, H}, opts);
  at::Tensor c_n = cx ? at::empty({D, B, H}, opts) : at::empty({0}, opts);
  const at::Tensor no_input = at::empty({T, B, 0}, opts), no_weight = at::empty({D, G, 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "recurrent_projected", [&] {
    recurrent_forward<scalar_t, Cell>(no_input, no_weight, weight_hh.contiguous(), at::Tensor(),
                                      bias_hh.defined() ? bias_hh.contiguous() : bias_hh,
                                      hx.contiguous(), cx ? cx->contiguous() : at::Tensor(),
                                      order, gates, /*keep=*/false, output, cells, h_n, c_n,
                                      /*projected=*/true, panels);
  });
  return {output, h_n, c_n};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_projected_cpu(
    const at::Tensor& projected, const at::Tensor& weight_hh, const at::Tensor& hx,
    const at::Tensor& cx, const std::optional<at::Tensor>& lengths_arg,
    const std::optional<at::Tensor>& packed_weights) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_lstm_layer_projected_args(projected, weight_hh, hx, cx, lengths);
  return projected_forward<LstmCell>(projected, weight_hh, at::Tensor(), hx, &cx, lengths,
                                     "lstm_layer_projected", packed_weights);
}

std::tuple<at::Tensor, at::Tensor> gru_layer_projected_cpu(
    const at::Tensor& projected, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths_arg, const std::optional<at::Tensor>& packed_weights) {
  before_cpu_op();
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);
  check_gru_layer_projected_args(projected, weight_hh, bias_hh, hx, lengths);
  auto [output, h_n, c_n] = projected_forward<GruCell>(
      projected, weight_hh, bias_hh.has_value() ? *bias_hh : at::Tensor(), hx, nullptr, lengths,
      "gru_layer_projected", packed_weights);
  return {output, h_n};
}



}  // namespace CPU_CAPABILITY
}  // namespace seqfuse
