// Fused recurrent layers on CUDA (float32, float64, float16, bfloat16): LSTM, GRU and
// Elman RNN, one or both directions, per-sequence lengths, forward and backward. Same
// semantics and the same saved-activation layouts as the CPU kernels
// (cpu/recurrent_cpu.cpp), so that ops.py's fakes and autograd serve both devices.
//
// Forward: the input projection of every step and both directions is one GEMM (x [T*B, I]
// times W_ih [D*G*H, I]^T, bias folded in) into [T, B, D, G*H], direction-inner like the
// saved gates; then the recurrence runs on recurrence_cuda.cuh's engine (a persistent
// kernel with W_hh on chip, or a GEMM plus a pointwise kernel per step) with a
// ForwardStep. Backward: the same engine in reverse with a BackwardStep, which writes
// every step's pre-activation gradients; the input and weight gradients are then GEMMs
// over all steps.
//
// A cell type (LstmCell, GruCell, RnnCell) supplies only the per-unit math around
// cell_math.h (the formulas the CPU kernels run too); the Steps hold the indexing common
// to the three.
//
// The half types: input, weights and results in the half type (the weights stay so on
// chip); states, accumulation, saved activations and the whole backward in float32, as
// the CPU's bfloat16.
#include "../gru.h"
#include "../lstm.h"
#include "../rnn.h"
#include "cuda_common.cuh"
#include "recurrence_cuda.cuh"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace seqfuse {
namespace cuda {
namespace {

// cell_math.h's activation policy: DeviceAct, with a float tanh that stays accurate
// under --use_fast_math (the flag setup.py builds with), where tanhf compiles to
// tanh.approx.f32 (relative error up to ~2^-11), which a float32 layer would carry from
// step to step. Here: tanh(a) = 1 - 2 / (exp(2a) + 1) through __expf, and below
// |x| = 1/16, where that form cancels, tanh's Taylor polynomial to x^7: ~1.5e-7 absolute
// and ~2e-6 relative error (float64 emulation of the float32 formula).
struct CellAct : DeviceAct {
  using DeviceAct::tanh;
  static __device__ __forceinline__ float tanh(float x) {
    const float a = fabsf(x), a2 = a * a;
    const float t = a < 0.0625f
                        ? a * (1.0f + a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f))))
                        : 1.0f - 2.0f / (__expf(2.0f * a) + 1.0f);
    return copysignf(t, x);
  }
};

// Where one (direction d, slot, hidden unit j) sits at step s.
struct Site {
  int d, s, slot, b, j;
  bool first, last;    // s is the row's first / last step
  int64_t row;         // (t * B + b) * D + d: the (t, b, d) entry of [T, B, D, ...] tensors;
                       // the output [T, B, D*H] holds this unit at row * H + j
  int64_t prev_row;    // the same for the time step processed before (when !first)
  int64_t state;       // (d * B + b) * H + j: hx, cx, h_n, c_n and their gradients
  int64_t slot_state;  // (d * B + slot) * H + j: the slot-ordered c_state and carry
};

// s = -1 (the backward's initial-state pass) gives meaningless rows: only state and
// slot_state are used there.
__device__ __forceinline__ Site make_site(const DeviceOrder& order, int B, int D, int H, int d,
                                          int s, int slot, int j) {
  Site x;
  x.d = d, x.s = s, x.slot = slot, x.b = order.batch(slot), x.j = j;
  const int len = order.len(slot), t = time_of(d, s, len), tp = d == 0 ? t - 1 : t + 1;
  x.first = s == 0;
  x.last = s == len - 1;
  x.row = (static_cast<int64_t>(t) * B + x.b) * D + d;
  x.prev_row = (static_cast<int64_t>(tp) * B + x.b) * D + d;
  x.state = (static_cast<int64_t>(d) * B + x.b) * H + j;
  x.slot_state = (static_cast<int64_t>(d) * B + slot) * H + j;
  return x;
}

// ---------------------------------------------------------------------------------
// Cells. forward(f, x, h_prev, rec) returns the new h (the Step stores it); rec(g) is
// the recurrent product of gate block g. backward(f, x, dh, h_before) gets the gradient
// reaching h_t (recurrent part + grad_output + grad_h_n at the row's last step) and the
// h the step read, and stores the pre-activation gradients with f.store_dgate.
// initial_state_grads(f, x, dh_rec) runs after step 0 with dh_rec = dgates_0 W_hh.
// ---------------------------------------------------------------------------------

// LSTM, PyTorch's gate order i, f, g, o. Saved per step: the activated gates (4H, in
// place of the pre-activations) and the cell state.
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;
  static constexpr bool kCellState = true;
  static constexpr bool kCarry = true;  // dc flows to the step before

  template <class F, class P>
  __device__ static typename F::acc_t forward(const F& f, const Site& x, typename F::acc_t /*h_prev*/, P rec) {
    using acc_t = typename F::acc_t;
    const int H = f.H;
    const acc_t* p = f.xproj + x.row * 4 * H + x.j;
    acc_t* c_state = f.c_state + x.slot_state;
    acc_t i, fg, g, o, c, h;
    cell::lstm_forward<CellAct>(p[0] + rec(0), p[H] + rec(1), p[2 * H] + rec(2), p[3 * H] + rec(3),
                                  *c_state, i, fg, g, o, c, h);
    *c_state = c;
    if (f.gates) {  // f.gates is f.xproj: the pre-activations were read above
      acc_t* q = f.gates + x.row * 4 * H + x.j;
      q[0] = i, q[H] = fg, q[2 * H] = g, q[3 * H] = o;
      f.cells[x.row * H + x.j] = c;
    }
    if (x.last) store_acc(f.c_n + x.state, c);
    return h;
  }

  template <class F>
  __device__ static void backward(const F& f, const Site& x, typename F::acc_t dh, typename F::acc_t /*h_before*/) {
    using acc_t = typename F::acc_t;
    const int H = f.H;
    acc_t* carry = f.carry + x.slot_state;
    const acc_t dc = x.last ? load_acc(f.grad_c_n + x.state) : *carry;
    const acc_t* g = f.gates + x.row * 4 * H + x.j;
    const acc_t c_prev = x.first ? load_acc(f.cx + x.state) : f.cells[x.prev_row * H + x.j];
    acc_t di, df, dg, d_o, dc_prev;
    cell::lstm_backward<CellAct>(dh, dc, g[0], g[H], g[2 * H], g[3 * H], f.cells[x.row * H + x.j],
                                   c_prev, di, df, dg, d_o, dc_prev);
    f.store_dgate(x, 0, di);
    f.store_dgate(x, 1, df);
    f.store_dgate(x, 2, dg);
    f.store_dgate(x, 3, d_o);
    *carry = dc_prev;
  }

  template <class F>
  __device__ static void initial_state_grads(const F& f, const Site& x, typename F::acc_t dh_rec) {
    store_acc(f.grad_hx + x.state, dh_rec);
    store_acc(f.grad_cx + x.state, f.carry[x.slot_state]);
  }
};

// GRU, PyTorch's formula and gate order r, z, n (see gru.h). The input projection holds
// x W_i*^T + b_i*; b_h* is added to the recurrent products here. Saved per step (4H): r,
// z, n and W_hn h + b_hn. dgates per step (4H): [dr, dz, dn * r, dn]; the first 3H
// multiply W_hh, [dr, dz, dn] W_ih.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;
  static constexpr bool kCellState = false;
  static constexpr bool kCarry = true;  // dh * z flows to the step before besides W_hh

  template <class F, class P>
  __device__ static typename F::acc_t forward(const F& f, const Site& x, typename F::acc_t h_prev, P rec) {
    using acc_t = typename F::acc_t;
    const int H = f.H;
    const acc_t* p = f.xproj + x.row * 3 * H + x.j;
    acc_t bh[3] = {acc_t(0), acc_t(0), acc_t(0)};
    if (f.bias_hh)
      for (int q = 0; q < 3; ++q) bh[q] = load_acc(f.bias_hh + (static_cast<int64_t>(x.d) * 3 + q) * H + x.j);
    const acc_t hn = rec(2) + bh[2];
    acc_t r, z, n, h;
    cell::gru_forward<CellAct>(p[0], p[H], p[2 * H], rec(0) + bh[0], rec(1) + bh[1], hn, h_prev, r, z, n, h);
    if (f.gates) {
      acc_t* q = f.gates + x.row * 4 * H + x.j;
      q[0] = r, q[H] = z, q[2 * H] = n, q[3 * H] = hn;
    }
    return h;
  }

  template <class F>
  __device__ static void backward(const F& f, const Site& x, typename F::acc_t dh, typename F::acc_t h_before) {
    using acc_t = typename F::acc_t;
    const int H = f.H;
    acc_t* carry = f.carry + x.slot_state;
    if (!x.last) dh += *carry;
    const acc_t* g = f.gates + x.row * 4 * H + x.j;
    acc_t dr, dz, dn, dhn, dh_direct;
    cell::gru_backward<CellAct>(dh, g[0], g[H], g[2 * H], g[3 * H], h_before, dr, dz, dn, dhn, dh_direct);
    f.store_dgate(x, 0, dr);
    f.store_dgate(x, 1, dz);
    f.store_dgate(x, 2, dhn);
    f.store_dgate(x, 3, dn);
    *carry = dh_direct;
  }

  template <class F>
  __device__ static void initial_state_grads(const F& f, const Site& x, typename F::acc_t dh_rec) {
    store_acc(f.grad_hx + x.state, dh_rec + f.carry[x.slot_state]);
  }
};

// Elman RNN, h' = act(x W_ih^T + h W_hh^T + b). Saves nothing: both activations'
// derivatives are functions of the output. dgates per step (H): dh * act'.
template <bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;  // the width of dgates, in H
  static constexpr bool kCellState = false;
  static constexpr bool kCarry = false;

  template <class F, class P>
  __device__ static typename F::acc_t forward(const F& f, const Site& x, typename F::acc_t /*h_prev*/, P rec) {
    return cell::rnn_forward<kRelu, CellAct>(f.xproj[x.row * f.H + x.j] + rec(0));
  }

  template <class F>
  __device__ static void backward(const F& f, const Site& x, typename F::acc_t dh, typename F::acc_t /*h_before*/) {
    const typename F::acc_t y = load_acc(f.out + x.row * f.H + x.j);
    f.store_dgate(x, 0, cell::rnn_backward<kRelu, CellAct>(dh, y));
  }

  template <class F>
  __device__ static void initial_state_grads(const F& f, const Site& x, typename F::acc_t dh_rec) {
    store_acc(f.grad_hx + x.state, dh_rec);
  }
};

// ---------------------------------------------------------------------------------
// Steps: what recurrence_cuda.cuh's engine multiplies and what it does with the products
// (the interface is listed at the top of that file).
// ---------------------------------------------------------------------------------

// Forward: A = h_{s-1} (K = H) times W_hh^T; a block's columns are all G gates of its units.
template <class Cell, typename scalar_t>
struct ForwardStep {
  using acc_t = cuda::acc_t<scalar_t>;
  using w_t = scalar_t;
  static constexpr int kProdGates = Cell::kGates;
  static constexpr bool kTransposeW = true;

  DeviceOrder order;
  int B, H, D;
  const acc_t* a_buf;       // h_state
  const scalar_t* w_hh;     // [D, G*H, H]
  const acc_t* xproj;       // [T, B, D, G*H]: x W_ih^T + the folded bias
  const scalar_t* bias_hh;  // GRU: [D, 3H] or null
  acc_t* gates;             // [T, B, D, kSaved*H] or null (inference); the LSTM's is xproj
  acc_t* cells;             // LSTM: [T, B, D, H] or null
  scalar_t* out;            // [T, B, D*H]
  scalar_t* h_n;            // [D, B, H]
  scalar_t* c_n;            // LSTM: [D, B, H]
  acc_t* h_state;           // [D, 2, B, H] slot-ordered; step s reads buffer s % 2
  acc_t* c_state;           // LSTM: [D, B, H] slot-ordered

  __host__ __device__ int K() const { return H; }
  __host__ __device__ int n_steps() const { return order.max_len; }
  __host__ __device__ static int step_of(int n, int /*max_len*/) { return n; }
  __host__ __device__ static int product_step(int s) { return s; }
  __host__ __device__ static int column(int g, int u, int U) { return g * U + u; }

  // Column c = g*U + u of a block is row g*H + j0 + u of W_hh[d].
  __device__ w_t weight(int d, int j0, int U, int c, int k) const {
    const int g = c / U, j = j0 + c % U;
    return j < H ? w_hh[((static_cast<int64_t>(d) * Cell::kGates + g) * H + j) * H + k] : w_t(0);
  }

  template <class P>
  __device__ void epilogue(int d, int s, int slot, int j, P rec) const {
    const Site x = make_site(order, B, D, H, d, s, slot, j);
    acc_t* h = h_state + (static_cast<int64_t>(d) * 2 * B + slot) * H + j;
    const int64_t buffer = static_cast<int64_t>(B) * H;
    const acc_t h_new = Cell::forward(*this, x, __ldcg(h + (s & 1) * buffer), rec);
    h[((s + 1) & 1) * buffer] = h_new;
    store_acc(out + x.row * H + j, h_new);
    if (x.last) store_acc(h_n + x.state, h_new);
  }

  // The row ended before step s: its time step s is padding, zero in every output.
  __device__ void inactive(int d, int s, int slot, int j) const {
    const int64_t row = (static_cast<int64_t>(s) * B + order.batch(slot)) * D + d;
    store_acc(out + row * H + j, acc_t(0));
    if (gates)
      for (int q = 0; q < Cell::kSaved; ++q) gates[(row * Cell::kSaved + q) * H + j] = acc_t(0);
    if (cells) cells[row * H + j] = acc_t(0);
  }
};

// Backward: A = the recurrent-side gate gradients of step s+1 (K = G*H) times W_hh; a
// block's columns are its units. Step n runs time step s = max_len-1-n; the last pass
// (s = -1) multiplies step 0's gradients for the initial state's.
template <class Cell, typename scalar_t>
struct BackwardStep {
  using acc_t = cuda::acc_t<scalar_t>;
  using w_t = scalar_t;
  static constexpr int kProdGates = 1;
  static constexpr bool kTransposeW = false;

  DeviceOrder order;
  int B, H, D;
  const acc_t* a_buf;          // dg_rows
  const scalar_t* w_hh;        // [D, G*H, H]
  const scalar_t* grad_out;    // [T, B, D*H]
  const scalar_t* grad_h_n;    // [D, B, H]
  const scalar_t* grad_c_n;    // LSTM: [D, B, H]
  const scalar_t* hx;          // [D, B, H]
  const scalar_t* cx;          // LSTM: [D, B, H]
  const scalar_t* out;         // the forward's output: every step's h
  const acc_t* gates;          // the forward's saved gates (LSTM, GRU)
  const acc_t* cells;          // LSTM: the forward's saved cell states
  acc_t* dgates;               // [T, B, D, kSaved*H]: pre-activation gradients
  acc_t* dg_rows;              // [D, 2, B, G*H] slot-ordered recurrent side of dgates; step s writes s % 2
  acc_t* h_prev;               // [T, B, D, H]: the h each step read, for grad_weight_hh
  acc_t* carry;                // [D, B, H] slot-ordered (Cell::kCarry)
  scalar_t* grad_hx;           // [D, B, H]
  scalar_t* grad_cx;           // LSTM: [D, B, H]

  __host__ __device__ int K() const { return Cell::kGates * H; }
  __host__ __device__ int n_steps() const { return order.max_len + 1; }
  __host__ __device__ static int step_of(int n, int max_len) { return max_len - 1 - n; }
  __host__ __device__ static int product_step(int s) { return s + 1; }
  __host__ __device__ static int column(int /*g*/, int u, int /*U*/) { return u; }

  __device__ w_t weight(int d, int j0, int /*U*/, int c, int k) const {
    const int j = j0 + c;
    return j < H ? w_hh[(static_cast<int64_t>(d) * K() + k) * H + j] : w_t(0);
  }

  // Gate gradient q of a unit: into dgates, and, for the gates that multiply W_hh, into
  // the rows the step before reads.
  __device__ void store_dgate(const Site& x, int q, acc_t v) const {
    dgates[(x.row * Cell::kSaved + q) * H + x.j] = v;
    if (q < Cell::kGates)
      dg_rows[((static_cast<int64_t>(x.d) * 2 + (x.s & 1)) * B + x.slot) * K() + q * H + x.j] = v;
  }

  template <class P>
  __device__ void epilogue(int d, int s, int slot, int j, P rec) const {
    const Site x = make_site(order, B, D, H, d, s, slot, j);
    if (s < 0) {
      Cell::initial_state_grads(*this, x, rec(0));
      return;
    }
    acc_t dh = rec(0) + load_acc(grad_out + x.row * H + j);
    if (x.last) dh += load_acc(grad_h_n + x.state);
    const acc_t h_before = x.first ? load_acc(hx + x.state) : load_acc(out + x.prev_row * H + j);
    h_prev[x.row * H + j] = h_before;
    Cell::backward(*this, x, dh, h_before);
  }

  // Padding gets zero gradients, which the GEMMs over all steps rely on.
  __device__ void inactive(int d, int s, int slot, int j) const {
    const int64_t row = (static_cast<int64_t>(s) * B + order.batch(slot)) * D + d;
    for (int q = 0; q < Cell::kSaved; ++q) dgates[(row * Cell::kSaved + q) * H + j] = acc_t(0);
    h_prev[row * H + j] = acc_t(0);
  }
};

// h_state[d][0][slot] = hx[d][batch(slot)] (and c_state from cx), in the compute type.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) init_state(const DeviceOrder order, int D, int B, int H,
                                                       const scalar_t* hx, const scalar_t* cx,
                                                       acc_t<scalar_t>* h_state, acc_t<scalar_t>* c_state) {
  const int64_t total = static_cast<int64_t>(D) * B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int j = static_cast<int>(idx % H), slot = static_cast<int>(idx / H % B);
    const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
    const int64_t from = (static_cast<int64_t>(d) * B + order.batch(slot)) * H + j;
    h_state[(static_cast<int64_t>(d) * 2 * B + slot) * H + j] = load_acc(hx + from);
    if (c_state) c_state[(static_cast<int64_t>(d) * B + slot) * H + j] = load_acc(cx + from);
  }
}

// ---------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

int grid_for(int64_t total) { return static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 1 << 20)); }

// x [T, B, I] times W_ih [D, G, I]^T for every step and both directions in one GEMM, the
// bias [D, G] (if any) folded in: [T, B, D, G] in the compute dtype. The half types
// multiply in their own type and accumulate and write float32 (mm's out_dtype overload),
// so the pre-activations are not rounded to the half type.
at::Tensor input_projection(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& bias) {
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), G = weight_ih.size(1);
  const at::Tensor x = input.reshape({T * B, I}), w = weight_ih.reshape({D * G, I}).t();
  at::Tensor p;
  if (acc_dtype(input.scalar_type()) == input.scalar_type()) {
    p = bias.defined() ? at::addmm(bias.reshape({D * G}), x, w) : at::mm(x, w);
  } else {
    p = at::mm(x, w, at::kFloat);
    if (bias.defined()) p.add_(bias.reshape({D * G}));
  }
  return p.view({T, B, D, G});
}

struct ForwardResult {
  at::Tensor output, h_n, c_n, gates, cells;
};

// One layer forward. bias_x: folded into the input projection (the LSTM's and RNN's
// b_ih + b_hh, the GRU's b_ih); bias_hh: the GRU's, added to the recurrent products.
template <class Cell>
ForwardResult layer_forward(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                            const at::Tensor& bias_x, const at::Tensor& bias_hh, const at::Tensor& hx,
                            const at::Tensor& cx, const std::optional<at::Tensor>& lengths, bool keep) {
  const int64_t T = input.size(0), B = input.size(1), D = weight_hh.size(0), H = weight_hh.size(2);
  const at::TensorOptions opts = input.options(), acc_opts = opts.dtype(acc_dtype(input.scalar_type()));
  const HostOrder order(lengths, T, B);
  at::Tensor order_storage;
  const DeviceOrder device_order = order.upload(input.device(), order_storage);

  const at::Tensor xproj = input_projection(input, weight_ih, bias_x);
  ForwardResult r;
  // The LSTM's activated gates replace its pre-activations (same layout); the GRU's 4H
  // per unit get a tensor of their own.
  // Saved activations, kept or not, carry the activation dtype (float32 for the half
  // types), as on CPU and in ops.py's fake.
  r.gates = !keep ? at::empty({0}, acc_opts)
            : Cell::kSaved == Cell::kGates ? xproj
                                           : at::empty({T, B, D, Cell::kSaved * H}, acc_opts);
  r.cells = keep && Cell::kCellState ? at::empty({T, B, D, H}, acc_opts) : at::empty({0}, acc_opts);
  r.output = at::empty({T, B, D * H}, opts);
  r.h_n = at::empty({D, B, H}, opts);
  r.c_n = Cell::kCellState ? at::empty({D, B, H}, opts) : at::Tensor();
  const at::Tensor h_state = at::empty({D, 2, B, H}, acc_opts);
  const at::Tensor c_state = Cell::kCellState ? at::empty({D, B, H}, acc_opts) : at::Tensor();
  const at::Tensor w_hh = weight_hh.contiguous(), h0 = hx.contiguous();
  const at::Tensor c0 = cx.defined() ? cx.contiguous() : cx, b_hh = bias_hh.defined() ? bias_hh.contiguous() : bias_hh;

  SEQFUSE_DISPATCH_CUDA_TYPES(input.scalar_type(), "seqfuse_recurrent_forward_cuda", [&] {
    using acc_t = cuda::acc_t<scalar_t>;
    init_state<scalar_t><<<grid_for(D * B * H), kThreads, 0, current_stream()>>>(
        device_order, D, B, H, h0.data_ptr<scalar_t>(), ptr<scalar_t>(c0), h_state.data_ptr<acc_t>(),
        ptr<acc_t>(c_state));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ForwardStep<Cell, scalar_t> step;
    step.order = device_order;
    step.B = static_cast<int>(B), step.H = static_cast<int>(H), step.D = static_cast<int>(D);
    step.a_buf = h_state.data_ptr<acc_t>();
    step.w_hh = w_hh.data_ptr<scalar_t>();
    step.xproj = xproj.data_ptr<acc_t>();
    step.bias_hh = ptr<scalar_t>(b_hh);
    step.gates = ptr<acc_t>(r.gates);
    step.cells = ptr<acc_t>(r.cells);
    step.out = r.output.data_ptr<scalar_t>();
    step.h_n = r.h_n.data_ptr<scalar_t>();
    step.c_n = ptr<scalar_t>(r.c_n);
    step.h_state = h_state.data_ptr<acc_t>();
    step.c_state = ptr<acc_t>(c_state);
    run_recurrence(step, order, w_hh, h_state);
  });
  // The steps zero the padding before the longest sequence ends; past it, no step runs.
  if (order.max_len < T) {
    const int64_t n = T - order.max_len;
    r.output.narrow(0, order.max_len, n).zero_();
    if (r.gates.numel() > 0) r.gates.narrow(0, order.max_len, n).zero_();
    if (r.cells.numel() > 0) r.cells.narrow(0, order.max_len, n).zero_();
  }
  return r;
}

struct BackwardResult {
  at::Tensor dgates, h_prev, grad_hx, grad_cx;
};

// One layer's recurrence backward: the pre-activation gradients of every step (dgates,
// [T, B, D, kSaved*H], zero at padding), the h each step read (h_prev, [T, B, D, H]) and
// the initial state's gradients. gates/cells: the forward's saved activations (any
// floating dtype; used in the compute dtype).
template <class Cell>
BackwardResult layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                              const at::Tensor& grad_c_n, const at::Tensor& weight_hh, const at::Tensor& hx,
                              const at::Tensor& cx, const at::Tensor& output, const at::Tensor& gates,
                              const at::Tensor& cells, const std::optional<at::Tensor>& lengths) {
  const int64_t T = output.size(0), B = hx.size(1), D = weight_hh.size(0), H = weight_hh.size(2);
  const at::TensorOptions opts = hx.options(), acc_opts = opts.dtype(acc_dtype(hx.scalar_type()));
  const HostOrder order(lengths, T, B);
  at::Tensor order_storage;
  const DeviceOrder device_order = order.upload(hx.device(), order_storage);

  BackwardResult r;
  r.dgates = at::empty({T, B, D, Cell::kSaved * H}, acc_opts);
  r.h_prev = at::empty({T, B, D, H}, acc_opts);
  r.grad_hx = at::empty({D, B, H}, opts);
  r.grad_cx = Cell::kCellState ? at::empty({D, B, H}, opts) : at::Tensor();
  const at::Tensor dg_rows = at::empty({D, 2, B, Cell::kGates * H}, acc_opts);
  // Every slot writes its carry at its last step (the first the backward runs) before
  // anything reads it, and at step 0 before the initial-state pass.
  const at::Tensor carry = Cell::kCarry ? at::empty({D, B, H}, acc_opts) : at::Tensor();
  auto in_acc = [&](const at::Tensor& t) { return t.defined() ? t.to(acc_opts.dtype()).contiguous() : t; };
  auto dense = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  const at::Tensor g_out = dense(grad_output), g_hn = dense(grad_h_n), g_cn = dense(grad_c_n);
  const at::Tensor w_hh = dense(weight_hh), h0 = dense(hx), c0 = dense(cx), out = dense(output);
  const at::Tensor saved_gates = in_acc(gates), saved_cells = in_acc(cells);

  SEQFUSE_DISPATCH_CUDA_TYPES(hx.scalar_type(), "seqfuse_recurrent_backward_cuda", [&] {
    using acc_t = cuda::acc_t<scalar_t>;
    BackwardStep<Cell, scalar_t> step;
    step.order = device_order;
    step.B = static_cast<int>(B), step.H = static_cast<int>(H), step.D = static_cast<int>(D);
    step.a_buf = dg_rows.data_ptr<acc_t>();
    step.w_hh = w_hh.data_ptr<scalar_t>();
    step.grad_out = g_out.data_ptr<scalar_t>();
    step.grad_h_n = g_hn.data_ptr<scalar_t>();
    step.grad_c_n = ptr<scalar_t>(g_cn);
    step.hx = h0.data_ptr<scalar_t>();
    step.cx = ptr<scalar_t>(c0);
    step.out = out.data_ptr<scalar_t>();
    step.gates = ptr<acc_t>(saved_gates);
    step.cells = ptr<acc_t>(saved_cells);
    step.dgates = r.dgates.data_ptr<acc_t>();
    step.dg_rows = dg_rows.data_ptr<acc_t>();
    step.h_prev = r.h_prev.data_ptr<acc_t>();
    step.carry = ptr<acc_t>(carry);
    step.grad_hx = r.grad_hx.data_ptr<scalar_t>();
    step.grad_cx = ptr<scalar_t>(r.grad_cx);
    run_recurrence(step, order, w_hh, dg_rows);
  });
  if (order.max_len < T) {
    const int64_t n = T - order.max_len;
    r.dgates.narrow(0, order.max_len, n).zero_();
    r.h_prev.narrow(0, order.max_len, n).zero_();
  }
  return r;
}

// From the input side's pre-activation gradients dgi [T, B, D, Gi] (zero at padding):
// grad_input, grad_weight_ih and the bias gradient, one GEMM or reduction each over every
// step and both directions, in the compute dtype; results in the input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> input_side_grads(const at::Tensor& dgi, const at::Tensor& input,
                                                                const at::Tensor& weight_ih) {
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t D = weight_ih.size(0), Gi = weight_ih.size(1);
  const at::ScalarType dt = input.scalar_type(), acc = dgi.scalar_type();
  const at::Tensor dg = dgi.reshape({T * B, D * Gi});
  const at::Tensor grad_input = at::mm(dg, weight_ih.to(acc).reshape({D * Gi, I})).view({T, B, I});
  const at::Tensor grad_weight_ih = at::mm(dg.t(), input.to(acc).reshape({T * B, I})).view({D, Gi, I});
  const at::Tensor grad_bias = dg.sum(0).view({D, Gi});
  return {grad_input.to(dt), grad_weight_ih.to(dt), grad_bias.to(dt)};
}

// grad_weight_hh[d] = dgates[:, :, d, :G]^T h_prev[:, :, d], one batched GEMM over both
// directions and all steps. dgates: [T, B, D, >= G]; h_prev: [T, B, D, H].
at::Tensor recurrent_weight_grad(const at::Tensor& dgates, const at::Tensor& h_prev, int64_t G, at::ScalarType dt) {
  const int64_t T = h_prev.size(0), B = h_prev.size(1), D = h_prev.size(2), H = h_prev.size(3);
  const at::Tensor dg = dgates.reshape({T * B, D, dgates.size(3)}).narrow(2, 0, G).permute({1, 2, 0});  // [D, G, T*B]
  const at::Tensor h = h_prev.reshape({T * B, D, H}).transpose(0, 1);                                 // [D, T*B, H]
  return at::bmm(dg, h).to(dt);
}

template <typename Fn>
void with_rnn_cell(c10::string_view nonlinearity, Fn&& fn) {
  if (nonlinearity == "relu")
    fn(RnnCell<true>{});
  else
    fn(RnnCell<false>{});
}

}  // namespace
}  // namespace cuda

// ---------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths_arg, bool keep_activations,
    const std::optional<at::Tensor>& packed_weights) {
  TORCH_CHECK(!packed_weights.has_value(), "lstm_layer: packed_weights are CPU tile panels; the CUDA kernels take the weights alone");
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);  // check_format.h
  check_lstm_layer_args(input, weight_ih, weight_hh, bias, hx, cx, lengths);
  const c10::cuda::CUDAGuard guard(input.device());
  cuda::ForwardResult r = cuda::layer_forward<cuda::LstmCell>(
      input, weight_ih, weight_hh, bias.value_or(at::Tensor()), at::Tensor(), hx, cx, lengths, keep_activations);
  return {r.output, r.h_n, r.c_n, r.gates, r.cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const at::Tensor& cx, const std::optional<at::Tensor>& lengths_arg, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells) {
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);  // check_format.h
  check_lstm_layer_backward_args(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, hx,
                                 cx, lengths, output, gates, cells);
  const int64_t H = weight_hh.size(2);
  const c10::cuda::CUDAGuard guard(input.device());
  const cuda::BackwardResult r = cuda::layer_backward<cuda::LstmCell>(
      grad_output, grad_h_n, grad_c_n, weight_hh, hx, cx, output, gates, cells, lengths);
  auto [grad_input, grad_weight_ih, grad_bias] = cuda::input_side_grads(r.dgates, input, weight_ih);
  const at::Tensor grad_weight_hh = cuda::recurrent_weight_grad(r.dgates, r.h_prev, 4 * H, input.scalar_type());
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, r.grad_hx, r.grad_cx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths_arg, bool keep_activations,
    const std::optional<at::Tensor>& packed_weights) {
  TORCH_CHECK(!packed_weights.has_value(), "gru_layer: packed_weights are CPU tile panels; the CUDA kernels take the weights alone");
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);  // check_format.h
  check_gru_layer_args(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths);
  const c10::cuda::CUDAGuard guard(input.device());
  cuda::ForwardResult r = cuda::layer_forward<cuda::GruCell>(
      input, weight_ih, weight_hh, bias_ih.value_or(at::Tensor()), bias_hh.value_or(at::Tensor()), hx,
      at::Tensor(), lengths, keep_activations);
  return {r.output, r.h_n, r.gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths_arg, const at::Tensor& output, const at::Tensor& gates) {
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);  // check_format.h
  check_gru_layer_backward_args(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                output, gates);
  const int64_t H = weight_hh.size(2);
  const c10::cuda::CUDAGuard guard(input.device());
  const cuda::BackwardResult r = cuda::layer_backward<cuda::GruCell>(
      grad_output, grad_h_n, at::Tensor(), weight_hh, hx, at::Tensor(), output, gates, at::Tensor(), lengths);
  // dgates rows are [dr, dz, dn * r, dn]: the input side takes [dr, dz, dn], the recurrent
  // side (and b_hh) [dr, dz, dn * r].
  const at::Tensor dgi = at::cat({r.dgates.narrow(3, 0, 2 * H), r.dgates.narrow(3, 3 * H, H)}, 3);
  auto [grad_input, grad_weight_ih, grad_bias_ih] = cuda::input_side_grads(dgi, input, weight_ih);
  const at::Tensor grad_weight_hh = cuda::recurrent_weight_grad(r.dgates, r.h_prev, 3 * H, input.scalar_type());
  const at::Tensor grad_bias_hh = r.dgates.narrow(3, 0, 3 * H).sum({0, 1}).to(input.scalar_type());
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, r.grad_hx};
}

std::tuple<at::Tensor, at::Tensor> rnn_layer_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const std::optional<at::Tensor>& lengths_arg,
    c10::string_view nonlinearity,
    const std::optional<at::Tensor>& packed_weights) {
  TORCH_CHECK(!packed_weights.has_value(), "rnn_layer: packed_weights are CPU tile panels; the CUDA kernels take the weights alone");
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);  // check_format.h
  check_rnn_layer_args(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity);
  const c10::cuda::CUDAGuard guard(input.device());
  cuda::ForwardResult r;
  cuda::with_rnn_cell(nonlinearity, [&](auto cell) {
    // Nothing to keep: the backward needs only the output.
    r = cuda::layer_forward<decltype(cell)>(input, weight_ih, weight_hh, bias.value_or(at::Tensor()),
                                            at::Tensor(), hx, at::Tensor(), lengths, /*keep=*/false);
  });
  return {r.output, r.h_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths_arg, const at::Tensor& output, c10::string_view nonlinearity) {
  const std::optional<at::Tensor> lengths = private_copy(lengths_arg);  // check_format.h
  check_rnn_layer_backward_args(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                output, nonlinearity);
  const int64_t H = weight_hh.size(2);
  const c10::cuda::CUDAGuard guard(input.device());
  cuda::BackwardResult r;
  cuda::with_rnn_cell(nonlinearity, [&](auto cell) {
    r = cuda::layer_backward<decltype(cell)>(grad_output, grad_h_n, at::Tensor(), weight_hh, hx, at::Tensor(),
                                             output, at::Tensor(), at::Tensor(), lengths);
  });
  auto [grad_input, grad_weight_ih, grad_bias] = cuda::input_side_grads(r.dgates, input, weight_ih);
  const at::Tensor grad_weight_hh = cuda::recurrent_weight_grad(r.dgates, r.h_prev, H, input.scalar_type());
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, r.grad_hx};
}

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("lstm_layer", &lstm_layer_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
  m.impl("gru_layer", &gru_layer_cuda);
  m.impl("gru_layer_backward", &gru_layer_backward_cuda);
  m.impl("rnn_layer", &rnn_layer_cuda);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cuda);
}

}  // namespace seqfuse
