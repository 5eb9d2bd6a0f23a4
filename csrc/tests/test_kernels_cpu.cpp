// C++ tests of the fused GRU, Elman RNN and attention kernels, and of every recurrent
// layer's backward, called through the dispatcher as a C++ user of libseqfuse would.
// The references are plain compositions of libtorch ops in float64 (the semantics of
// py_src/seqfuse/reference.py: one sequence at a time, step by step, so lengths need no
// packing), and their gradients come from libtorch's autograd. Odd sizes, length-1 and
// fully padded rows, both directions, every threading plan of the recurrences (serial,
// rows split, units split), multi-block attention, masks of every kind; then bad
// arguments, which must throw c10::Error and never crash (the sanitized build, make
// ctest-sanitize, runs all of this under ASan and UBSan).
#include "attention.h"
#include "cpu/recurrence.h"  // SeqOrder, TeamPlan: scalar, the same for every capability
#include "cpu/team_tasks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

int failures = 0, checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// max |got - want| <= atol + rtol * max |want| (NaN anywhere fails); shapes must agree.
void expect_close(const Tensor& got, const Tensor& want, double atol, double rtol,
                  const std::string& what) {
  if (got.sizes() != want.sizes()) {
    std::ostringstream os;
    os << what << ": shape " << got.sizes() << ", want " << want.sizes();
    expect(false, os.str());
    return;
  }
  const Tensor g = got.detach().to(at::kDouble), w = want.detach().to(at::kDouble);
  const double scale = w.numel() ? w.abs().max().item<double>() : 0.0;
  const double err = g.numel() ? (g - w).abs().max().item<double>() : 0.0;
  const double tol = atol + rtol * scale;
  expect(err <= tol, what + ": max diff " + std::to_string(err) + " > tol " + std::to_string(tol));
}

void expect_throws(const std::string& what, const std::function<void()>& f,
                   const std::string& needle) {
  try {
    f();
    expect(false, what + ": did not throw");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos,
           what + ": message lacks '" + needle + "': " + e.what());
  }
}

// Prints one line per case ("ok" or "FAIL" with its name) when it goes out of scope.
struct CaseReport {
  std::string name;
  int failures_before = failures;
  ~CaseReport() {
    const bool ok = failures == failures_before && std::uncaught_exceptions() == 0;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", name.c_str());
  }
};

// Runs one case; an exception from a valid call is a failure of that case, not the end.
void guarded(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    expect(false, std::string("unexpected exception: ") + e.what());
  }
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using T2 = std::tuple<Tensor, Tensor>;
using T3 = std::tuple<Tensor, Tensor, Tensor>;
using T4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using T5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using T6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Op handles, with the schemas of csrc/ops.cpp.
struct Ops {
  c10::TypedOperatorHandle<T5(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                              const Tensor&, const Tensor&, const OptT&, bool, const OptT&)>
      lstm = op<T5(const Tensor&, const Tensor&, const Tensor&, const OptT&, const Tensor&,
                   const Tensor&, const OptT&, bool, const OptT&)>("seqfuse::lstm_layer");
  c10::TypedOperatorHandle<T6(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const OptT&, const Tensor&, const Tensor&, const Tensor&)>
      lstm_bwd = op<T6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, const Tensor&, const OptT&, const Tensor&,
                       const Tensor&, const Tensor&)>("seqfuse::lstm_layer_backward");
  c10::TypedOperatorHandle<T3(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                              const OptT&, const Tensor&, const OptT&, bool, const OptT&)>
      gru = op<T3(const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&,
                  const Tensor&, const OptT&, bool, const OptT&)>("seqfuse::gru_layer");
  c10::TypedOperatorHandle<T6(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const OptT&, const Tensor&,
                              const Tensor&)>
      gru_bwd = op<T6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const OptT&, const Tensor&, const Tensor&)>(
          "seqfuse::gru_layer_backward");
  c10::TypedOperatorHandle<T2(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                              const Tensor&, const OptT&, c10::string_view, const OptT&)>
      rnn = op<T2(const Tensor&, const Tensor&, const Tensor&, const OptT&, const Tensor&,
                  const OptT&, c10::string_view, const OptT&)>("seqfuse::rnn_layer");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> pack =
      op<Tensor(const Tensor&, const Tensor&)>("seqfuse::pack_recurrent_weights");
  c10::TypedOperatorHandle<T5(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const OptT&, const Tensor&,
                              c10::string_view)>
      rnn_bwd = op<T5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const OptT&, const Tensor&, c10::string_view)>(
          "seqfuse::rnn_layer_backward");
  c10::TypedOperatorHandle<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const OptT&, const OptT&)>
      additive = op<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
                       const OptT&)>("seqfuse::additive_attention");
  c10::TypedOperatorHandle<T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor&)>
      additive_bwd = op<T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&)>(
          "seqfuse::additive_attention_backward");
  c10::TypedOperatorHandle<T2(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                              const OptT&, bool, std::optional<double>, double, int64_t)>
      sdpa = op<T2(const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, bool,
                   std::optional<double>, double, int64_t)>("seqfuse::scaled_dot_product_attention");
  c10::TypedOperatorHandle<T3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const OptT&, const OptT&, const Tensor&, const Tensor&, bool,
                              std::optional<double>, double, int64_t)>
      sdpa_bwd = op<T3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
                       const OptT&, const Tensor&, const Tensor&, bool, std::optional<double>,
                       double, int64_t)>("seqfuse::scaled_dot_product_attention_backward");
};

const Ops& ops() {
  static const Ops o;
  return o;
}

const auto f64 = at::TensorOptions().dtype(at::kDouble);

// A float64 tensor of uniform values in [-scale, scale), rounded through `dt` (so the
// reference sees exactly what the kernel sees).
Tensor uniform(at::IntArrayRef shape, double scale, at::ScalarType dt) {
  return (at::rand(shape, f64) * (2 * scale) - scale).to(dt).to(at::kDouble);
}

Tensor leaf(const Tensor& t) { return t.detach().clone().requires_grad_(true); }

// Tolerances of the kernel in dtype `dt` against the float64 reference: float32 is
// compared with the existing LSTM test's 1e-5 on outputs (a little more for gradients,
// which sum over steps); bfloat16 rounds every operand (8 bits of mantissa).
struct Tol {
  double out_atol, out_rtol, grad_atol, grad_rtol;
};
Tol tol_of(at::ScalarType dt) {
  if (dt == at::kDouble) return {1e-10, 1e-10, 1e-9, 1e-9};
  if (dt == at::kFloat) return {2e-5, 2e-5, 1e-4, 1e-4};
  return {4e-2, 2e-2, 1e-1, 5e-2};
}

// ---------------------------------------------------------------------------------
// Recurrent layers
// ---------------------------------------------------------------------------------

enum class Cell { Lstm, Gru, RnnTanh, RnnRelu };

const char* cell_name(Cell c) {
  switch (c) {
    case Cell::Lstm: return "lstm";
    case Cell::Gru: return "gru";
    case Cell::RnnTanh: return "rnn_tanh";
    default: return "rnn_relu";
  }
}
int64_t gates_of(Cell c) { return c == Cell::Lstm ? 4 : c == Cell::Gru ? 3 : 1; }

struct RecParams {
  Tensor x, w_ih, w_hh, b_ih, b_hh, hx, cx;  // b_ih: the LSTM/RNN `bias`; b_hh: GRU only
};

struct RecResult {
  Tensor out, h_n, c_n;
};

// Step-by-step reference, one sequence at a time: the reverse direction starts at each
// row's last valid step; positions past a row's length are zero.
RecResult rec_reference(Cell cell, const RecParams& p, const std::vector<int64_t>& len) {
  const int64_t T = p.x.size(0), B = p.x.size(1), D = p.w_ih.size(0), H = p.w_hh.size(2);
  std::vector<Tensor> out_d, hn_d, cn_d;
  for (int64_t d = 0; d < D; ++d) {
    std::vector<Tensor> out_b, hn_b, cn_b;
    for (int64_t b = 0; b < B; ++b) {
      Tensor h = p.hx[d][b], c = cell == Cell::Lstm ? p.cx[d][b] : Tensor();
      std::vector<Tensor> steps(T, at::zeros({H}, f64));
      for (int64_t s = 0; s < len[b]; ++s) {
        const int64_t t = d == 0 ? s : len[b] - 1 - s;
        Tensor gi = at::mv(p.w_ih[d], p.x[t][b]);
        Tensor gh = at::mv(p.w_hh[d], h);
        if (p.b_ih.defined()) gi = gi + p.b_ih[d];
        if (p.b_hh.defined()) gh = gh + p.b_hh[d];
        if (cell == Cell::Lstm) {
          const auto g = (gi + gh).chunk(4);
          c = at::sigmoid(g[1]) * c + at::sigmoid(g[0]) * at::tanh(g[2]);
          h = at::sigmoid(g[3]) * at::tanh(c);
        } else if (cell == Cell::Gru) {
          const auto a = gi.chunk(3), r_ = gh.chunk(3);
          const Tensor r = at::sigmoid(a[0] + r_[0]), z = at::sigmoid(a[1] + r_[1]);
          const Tensor n = at::tanh(a[2] + r * r_[2]);
          h = (1 - z) * n + z * h;
        } else {
          h = cell == Cell::RnnTanh ? at::tanh(gi + gh) : at::relu(gi + gh);
        }
        steps[t] = h;
      }
      out_b.push_back(at::stack(steps));  // [T, H]
      hn_b.push_back(h);
      if (cell == Cell::Lstm) cn_b.push_back(c);
    }
    out_d.push_back(at::stack(out_b, 1));  // [T, B, H]
    hn_d.push_back(at::stack(hn_b));       // [B, H]
    if (cell == Cell::Lstm) cn_d.push_back(at::stack(cn_b));
  }
  RecResult r{at::cat(out_d, 2), at::stack(hn_d), Tensor()};
  if (cell == Cell::Lstm) r.c_n = at::stack(cn_d);
  return r;
}

struct RecCase {
  int64_t T, B, I, H, D;
  int lengths;  // 0: none; 1: mixed (1..T, one full); 2: every length 1 (fully padded past step 0)
  bool bias;
  bool noncontig = false;
};

// Forward (keep_activations true and false) and backward of one cell in dtype dt.
void run_recurrent(Cell cell, const RecCase& c, at::ScalarType dt) {
  const int64_t T = c.T, B = c.B, I = c.I, H = c.H, D = c.D, G = gates_of(cell) * H;
  at::manual_seed(1000 + T * 7 + B * 13 + I * 17 + H * 19 + D * 23 + static_cast<int>(cell));
  char buf[200];
  std::snprintf(buf, sizeof(buf), "%s %s T=%ld B=%ld I=%ld H=%ld D=%ld lengths=%d bias=%d%s",
                cell_name(cell), c10::toString(dt), (long)T, (long)B, (long)I, (long)H, (long)D,
                c.lengths, (int)c.bias, c.noncontig ? " noncontig" : "");
  const std::string name(buf);
  const CaseReport report{name};

  const double ws = 1.0 / std::sqrt(static_cast<double>(H));
  RecParams p;
  p.x = uniform({T, B, I}, 1.0, dt);
  p.w_ih = uniform({D, G, I}, ws, dt);
  p.w_hh = uniform({D, G, H}, ws, dt);
  if (c.bias) p.b_ih = uniform({D, G}, ws, dt);
  if (c.bias && cell == Cell::Gru) p.b_hh = uniform({D, G}, ws, dt);
  p.hx = uniform({D, B, H}, 0.5, dt);
  if (cell == Cell::Lstm) p.cx = uniform({D, B, H}, 0.5, dt);
  std::vector<int64_t> len(B, T);
  if (c.lengths == 1)
    for (int64_t b = 0; b < B; ++b) len[b] = b == B / 2 ? T : 1 + (b * 5 + 3) % T;
  if (c.lengths == 2) std::fill(len.begin(), len.end(), 1);
  const OptT lengths = c.lengths ? OptT(at::tensor(len, at::kLong)) : std::nullopt;

  // The kernel's arguments in dtype dt (optionally as non-contiguous views).
  auto arg = [&](const Tensor& t) -> Tensor {
    if (!t.defined()) return t;
    Tensor a = t.to(dt);
    if (c.noncontig && a.dim() >= 2) a = a.transpose(0, 1).contiguous().transpose(0, 1);
    return a;
  };
  const Tensor x = arg(p.x), w_ih = arg(p.w_ih), w_hh = arg(p.w_hh), hx = arg(p.hx);
  const OptT b_ih = c.bias ? OptT(arg(p.b_ih)) : std::nullopt;
  const OptT b_hh = c.bias && cell == Cell::Gru ? OptT(arg(p.b_hh)) : std::nullopt;
  const Tensor cx = cell == Cell::Lstm ? arg(p.cx) : Tensor();
  if (c.noncontig) expect(!x.is_contiguous() && !w_ih.is_contiguous(), name + ": views are contiguous");

  // Reference forward with autograd, then the gradients of a random linear loss.
  RecParams lp{leaf(p.x), leaf(p.w_ih), leaf(p.w_hh), p.b_ih.defined() ? leaf(p.b_ih) : Tensor(),
               p.b_hh.defined() ? leaf(p.b_hh) : Tensor(), leaf(p.hx),
               p.cx.defined() ? leaf(p.cx) : Tensor()};
  const RecResult ref = rec_reference(cell, lp, len);
  const Tensor gy = uniform({T, B, D * H}, 1.0, dt), ghn = uniform({D, B, H}, 1.0, dt);
  const Tensor gcn = cell == Cell::Lstm ? uniform({D, B, H}, 1.0, dt) : Tensor();
  Tensor loss = (ref.out * gy).sum() + (ref.h_n * ghn).sum();
  if (cell == Cell::Lstm) loss = loss + (ref.c_n * gcn).sum();
  loss.backward();

  const Tol tol = tol_of(dt);
  auto check_fwd = [&](const Tensor& out, const Tensor& h_n, const Tensor& c_n, const std::string& what) {
    expect(out.scalar_type() == dt && h_n.scalar_type() == dt, name + what + ": result dtype");
    expect_close(out, ref.out, tol.out_atol, tol.out_rtol, name + what + " output");
    expect_close(h_n, ref.h_n, tol.out_atol, tol.out_rtol, name + what + " h_n");
    if (c_n.defined()) expect_close(c_n, ref.c_n, tol.out_atol, tol.out_rtol, name + what + " c_n");
  };
  auto check_grad = [&](const Tensor& got, const Tensor& leaf_t, const std::string& what) {
    expect_close(got, leaf_t.grad(), tol.grad_atol, tol.grad_rtol, name + " grad " + what);
  };
  const bool backward = dt != at::kBFloat16;  // bfloat16 backward: covered in float32
  // Inference again from pack_recurrent_weights' panels (float32/float64): the same bits.
  const OptT packed = dt == at::kBFloat16 ? OptT() : OptT(ops().pack.call(w_ih, w_hh));
  auto same_bits = [&](const Tensor& a, const Tensor& b, const std::string& what) {
    expect(at::equal(a, b), name + ": packed_weights change " + what);
  };

  if (cell == Cell::Lstm) {
    auto [out0, hn0, cn0, g0, c0] = ops().lstm.call(x, w_ih, w_hh, b_ih, hx, cx, lengths, false, std::nullopt);
    check_fwd(out0, hn0, cn0, " inference");
    if (packed) {
      auto [out1, hn1, cn1, g1, c1] = ops().lstm.call(x, w_ih, w_hh, b_ih, hx, cx, lengths, false, packed);
      same_bits(out0, out1, "output");
      same_bits(hn0, hn1, "h_n");
      same_bits(cn0, cn1, "c_n");
    }
    if (!backward) return;
    auto [out, h_n, c_n, gates, cells] = ops().lstm.call(x, w_ih, w_hh, b_ih, hx, cx, lengths, true, std::nullopt);
    check_fwd(out, h_n, c_n, " training");
    auto [gi, gwi, gwh, gb, ghx, gcx] = ops().lstm_bwd.call(
        gy.to(dt), ghn.to(dt), gcn.to(dt), x, w_ih, w_hh, hx, cx, lengths, out, gates, cells);
    check_grad(gi, lp.x, "input");
    check_grad(gwi, lp.w_ih, "weight_ih");
    check_grad(gwh, lp.w_hh, "weight_hh");
    if (c.bias) check_grad(gb, lp.b_ih, "bias");
    check_grad(ghx, lp.hx, "hx");
    check_grad(gcx, lp.cx, "cx");
  } else if (cell == Cell::Gru) {
    auto [out0, hn0, g0] = ops().gru.call(x, w_ih, w_hh, b_ih, b_hh, hx, lengths, false, std::nullopt);
    check_fwd(out0, hn0, Tensor(), " inference");
    if (packed) {
      auto [out1, hn1, g1] = ops().gru.call(x, w_ih, w_hh, b_ih, b_hh, hx, lengths, false, packed);
      same_bits(out0, out1, "output");
      same_bits(hn0, hn1, "h_n");
    }
    expect(g0.numel() == 0, name + ": gates kept without keep_activations");
    if (!backward) return;
    auto [out, h_n, gates] = ops().gru.call(x, w_ih, w_hh, b_ih, b_hh, hx, lengths, true, std::nullopt);
    check_fwd(out, h_n, Tensor(), " training");
    auto [gi, gwi, gwh, gbi, gbh, ghx] = ops().gru_bwd.call(gy.to(dt), ghn.to(dt), x, w_ih, w_hh,
                                                            hx, lengths, out, gates);
    check_grad(gi, lp.x, "input");
    check_grad(gwi, lp.w_ih, "weight_ih");
    check_grad(gwh, lp.w_hh, "weight_hh");
    if (c.bias) {
      check_grad(gbi, lp.b_ih, "bias_ih");
      check_grad(gbh, lp.b_hh, "bias_hh");
    }
    check_grad(ghx, lp.hx, "hx");
  } else {
    const c10::string_view act = cell == Cell::RnnTanh ? "tanh" : "relu";
    auto [out, h_n] = ops().rnn.call(x, w_ih, w_hh, b_ih, hx, lengths, act, std::nullopt);
    check_fwd(out, h_n, Tensor(), "");
    if (packed) {
      auto [out1, hn1] = ops().rnn.call(x, w_ih, w_hh, b_ih, hx, lengths, act, packed);
      same_bits(out, out1, "output");
      same_bits(h_n, hn1, "h_n");
    }
    if (!backward) return;
    auto [gi, gwi, gwh, gb, ghx] =
        ops().rnn_bwd.call(gy.to(dt), ghn.to(dt), x, w_ih, w_hh, hx, lengths, out, act);
    check_grad(gi, lp.x, "input");
    check_grad(gwi, lp.w_ih, "weight_ih");
    check_grad(gwh, lp.w_hh, "weight_hh");
    if (c.bias) check_grad(gb, lp.b_ih, "bias");
    check_grad(ghx, lp.hx, "hx");
  }
}

void recurrent_tests() {
  // With 2 threads: tiny steps run serially; D=1 with B >= 24 splits rows; D=1 with a
  // small batch and enough work per step splits hidden units (they meet every step);
  // D=2 runs one direction per thread. B < 6 projects the input first (a step has less
  // than a register tile of rows); B >= 6 without keep_activations fuses it.
  const std::vector<RecCase> cases = {
      {1, 1, 1, 1, 1, 0, true},           // one step, one unit
      {1, 2, 3, 5, 2, 0, true},           // T=1, bidirectional
      {7, 3, 37, 53, 2, 1, true},         // odd sizes, mixed lengths, bidirectional
      {5, 3, 37, 40, 1, 1, true},         // units split over threads
      {4, 2, 50, 70, 1, 0, false},        // units split (RNN too), no bias
      {6, 30, 20, 40, 1, 1, true},        // rows split over threads
      {9, 7, 5, 17, 2, 2, true},          // every length 1: padded past the first step
      {4, 13, 9, 33, 2, 1, true, true},   // non-contiguous arguments
      {3, 6, 16, 16, 1, 0, true},         // exactly one tile of rows and one vector of units
  };
  for (Cell cell : {Cell::Gru, Cell::RnnTanh, Cell::RnnRelu, Cell::Lstm})
    for (const auto& c : cases)
      for (auto dt : {at::kDouble, at::kFloat}) guarded([&] { run_recurrent(cell, c, dt); });
  // bfloat16 (inference on bfloat16 tiles where the CPU has AVX512-BF16; otherwise via
  // float32): odd K rounds the panels up to pairs.
  for (Cell cell : {Cell::Gru, Cell::RnnTanh, Cell::Lstm})
    for (const RecCase& c : {RecCase{5, 2, 37, 33, 2, 1, true}, RecCase{4, 7, 9, 21, 1, 1, true},
                             RecCase{3, 13, 3, 5, 2, 0, false}})
      guarded([&] { run_recurrent(cell, c, at::kBFloat16); });
  // Single-threaded: every case above again takes the serial plan.
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  for (Cell cell : {Cell::Gru, Cell::RnnRelu, Cell::Lstm})
    guarded([&] { run_recurrent(cell, {5, 3, 37, 40, 1, 1, true}, at::kFloat); });
  at::set_num_threads(threads);
}

// ---------------------------------------------------------------------------------
// The team scheduler (cpu/team_tasks.h)
// ---------------------------------------------------------------------------------

// Runs `n_parts` chains of `n_tasks` under `sync`; each task records that it ran once, in
// order, after what it waits for. stall_ms > 0: part 0's first task sleeps that long while
// holding its thread, so the parts that thread also owns can only run meanwhile if another
// thread takes them over. Returns, per part, the tasks that ran during the stall.
std::vector<int> team_run(int64_t n_parts, int64_t per_dir, int64_t n_tasks, seqfuse::Sync kind,
                          int stall_ms, const std::string& what) {
  std::vector<std::atomic<int64_t>> done(n_parts);
  std::vector<std::atomic<int>> runs(n_parts * n_tasks), during(n_parts);
  std::atomic<bool> ordered{true}, stalled{false};
  auto sync = [&](int64_t) { return kind; };
  seqfuse::run_team_tasks(n_parts, per_dir, n_tasks, sync, [&](int64_t p, int64_t t) {
    if (done[p].load() != t) ordered = false;
    const int64_t q0 = kind == seqfuse::Sync::kAll ? 0 : kind == seqfuse::Sync::kDirection ? p / per_dir * per_dir : p;
    const int64_t q1 = kind == seqfuse::Sync::kAll ? n_parts : kind == seqfuse::Sync::kDirection ? q0 + per_dir : p + 1;
    for (int64_t q = q0; q < q1; ++q)
      if (done[q].load() < t) ordered = false;
    runs[p * n_tasks + t].fetch_add(1);
    if (stalled.load()) during[p].fetch_add(1);
    if (stall_ms > 0 && p == 0 && t == 0) {
      stalled = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(stall_ms));
      stalled = false;
    }
    done[p].store(t + 1);
  });
  bool once = true;
  for (auto& r : runs) once = once && r.load() == 1;
  expect(once, what + ": every task ran exactly once");
  expect(ordered.load(), what + ": every task ran after the tasks it waits for");
  std::vector<int> result;
  for (auto& d : during) result.push_back(d.load());
  return result;
}

void team_tasks_tests() {
  using seqfuse::Sync;
  for (Sync kind : {Sync::kOwn, Sync::kDirection, Sync::kAll}) {
    team_run(1, 1, 50, kind, 0, "one part");
    team_run(2, 2, 200, kind, 0, "two parts, one direction");
    team_run(4, 2, 100, kind, 0, "four parts, two directions");
    team_run(3, 3, 100, kind, 0, "three parts on fewer threads");
  }
  if (at::get_num_threads() < 2) {
    std::printf("skipped: the take-over test needs 2 threads\n");
    return;
  }
  // Three independent chains on two threads (at::parallel_for gives the first thread
  // parts 0 and 1): the first stalls 30 ms inside part 0. Part 1 must move to the other
  // thread and finish during the stall, not wait for it.
  const std::vector<int> during = team_run(3, 1, 400, Sync::kOwn, 30, "a stalled thread");
  expect(during[1] == 400, "a stalled thread's other part is taken over by its partner (" +
                               std::to_string(during[1]) + " of its 400 tasks ran during the stall)");
  // One lost time slice is a hiccup; a second one soon after is a busy machine: the layers
  // run on one thread for kSoloFor, then again on the team. The tests above may have met
  // a busy machine themselves (a loaded CI runner, a sanitizer build): first let that
  // memory lapse, so that the next period is the first one, kSoloFor long.
  for (int waited = 0; seqfuse::team_solo() && waited < 2 * seqfuse::kSoloForMax.count(); waited += 10)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(seqfuse::kSoloProbeWindow + seqfuse::kLostWindow);
  auto plan_size = [] { return seqfuse::TeamPlan(1, 1, 64, 1 << 30, seqfuse::SeqOrder(std::nullopt, 4, 1), 12).size(); };
  const auto team_size = plan_size();
  expect(team_size > 1, "an idle machine's plan has more than one part");
  team_run(3, 1, 400, Sync::kOwn, 30, "a stalled thread, once");
  expect(!seqfuse::team_solo(), "one lost time slice changes nothing");
  team_run(3, 1, 400, Sync::kOwn, 30, "a stalled thread, again");
  expect(seqfuse::team_solo(), "after two lost time slices the layers run on one thread");
  expect(plan_size() == 1, "a plan made while the machine is busy has one part");
  std::this_thread::sleep_for(seqfuse::kSoloFor + std::chrono::milliseconds(20));
  expect(!seqfuse::team_solo(), "the team is tried again after kSoloFor");
  expect(plan_size() == team_size, "then the plan is the idle machine's again");
  // The probe after a period loses a time slice too: the machine is still busy.
  team_run(3, 1, 400, Sync::kOwn, 30, "a stalled thread, right after");
  expect(seqfuse::team_solo(), "right after a period on one thread, one lost time slice is enough");
  std::this_thread::sleep_for(seqfuse::kSoloFor + std::chrono::milliseconds(20));
  expect(seqfuse::team_solo(), "and the next period is twice as long");
}

// ---------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------

// `keep` [.., K] bool or undefined: softmax over the kept entries, zeros (and zero
// gradients) for a row with nothing kept, as reference._masked_softmax.
Tensor masked_softmax(const Tensor& scores, const Tensor& keep_in) {
  if (!keep_in.defined()) return at::softmax(scores, -1);
  const Tensor keep = keep_in.expand_as(scores);
  const Tensor row_any = keep.any(-1, /*keepdim=*/true);
  const Tensor filled = scores.masked_fill(keep.logical_not().logical_and(row_any), -INFINITY)
                            .masked_fill(row_any.logical_not(), 0.0);
  return at::softmax(filled, -1) * keep;
}

// valid_lens [B] or [B, Q] -> bool [B, 1 or Q, K]
Tensor lens_mask(const Tensor& valid_lens, int64_t K) {
  const Tensor lens = valid_lens.reshape({valid_lens.size(0), -1, 1});
  return at::arange(K, valid_lens.options().dtype(at::kLong)) < lens;
}

Tensor and_mask(const Tensor& a, const Tensor& b) {
  return a.defined() ? (b.defined() ? a.logical_and(b) : a) : b;
}

struct AddCase {
  int64_t B, Q, K, A, Dv;
  int lens;  // 0: none; 1: [B] with a 0 and a K; 2: [B, Q]; 3: [B] int32
  int mask;  // 0: none; 1: bool [B, 1, K]; 2: bool [Q, K] with an all-false row
};

void run_additive(const AddCase& c, at::ScalarType dt) {
  const int64_t B = c.B, Q = c.Q, K = c.K, A = c.A, Dv = c.Dv;
  at::manual_seed(2000 + B * 7 + Q * 11 + K * 13 + A * 17 + Dv * 19 + c.lens * 3 + c.mask);
  char buf[200];
  std::snprintf(buf, sizeof(buf), "additive %s B=%ld Q=%ld K=%ld A=%ld Dv=%ld lens=%d mask=%d",
                c10::toString(dt), (long)B, (long)Q, (long)K, (long)A, (long)Dv, c.lens, c.mask);
  const std::string name(buf);
  const CaseReport report{name};
  const Tensor q = uniform({B, Q, A}, 1.0, dt), k = uniform({B, K, A}, 1.0, dt);
  const Tensor w = uniform({A}, 1.0, dt), v = uniform({B, K, Dv}, 1.0, dt);
  OptT valid_lens, mask;
  if (c.lens == 1 || c.lens == 3) {
    std::vector<int64_t> l(B);
    for (int64_t b = 0; b < B; ++b) l[b] = b == 0 ? 0 : b == 1 ? K : (b * 3) % (K + 1);
    valid_lens = at::tensor(l, at::kLong).to(c.lens == 3 ? at::kInt : at::kLong);
  } else if (c.lens == 2) {
    valid_lens = at::randint(0, K + 1, {B, Q}, at::TensorOptions().dtype(at::kLong));
  }
  if (c.mask == 1) mask = at::rand({B, 1, K}, f64) > 0.3;
  if (c.mask == 2) {
    Tensor m = at::rand({Q, K}, f64) > 0.4;
    m[Q - 1].fill_(false);
    mask = m;
  }

  const Tensor lq = leaf(q), lk = leaf(k), lw = leaf(w), lv = leaf(v);
  const Tensor scores = at::matmul(at::tanh(lq.unsqueeze(2) + lk.unsqueeze(1)), lw);  // [B, Q, K]
  Tensor keep;
  if (valid_lens) keep = lens_mask(*valid_lens, K);
  if (mask) keep = and_mask(keep, *mask);
  const Tensor ref_w = masked_softmax(scores, keep);
  const Tensor ref_ctx = at::bmm(ref_w, lv);
  const Tensor gc = uniform({B, Q, Dv}, 1.0, dt), gw = uniform({B, Q, K}, 1.0, dt);
  ((ref_ctx * gc).sum() + (ref_w * gw).sum()).backward();

  const Tol tol = tol_of(dt);
  auto [ctx, weights] = ops().additive.call(q.to(dt), k.to(dt), w.to(dt), v.to(dt), valid_lens, mask);
  expect_close(ctx, ref_ctx, tol.out_atol, tol.out_rtol, name + " context");
  expect_close(weights, ref_w, tol.out_atol, tol.out_rtol, name + " weights");
  auto [dq, dk, dw, dv] = ops().additive_bwd.call(gc.to(dt), gw.to(dt), q.to(dt), k.to(dt),
                                                  w.to(dt), v.to(dt), weights);
  expect_close(dq, lq.grad(), tol.grad_atol, tol.grad_rtol, name + " grad query");
  expect_close(dk, lk.grad(), tol.grad_atol, tol.grad_rtol, name + " grad key");
  expect_close(dw, lw.grad(), tol.grad_atol, tol.grad_rtol, name + " grad w_v");
  expect_close(dv, lv.grad(), tol.grad_atol, tol.grad_rtol, name + " grad value");
}

struct SdpaCase {
  int64_t B, H, Q, K, D, Dv;
  int lens;   // 0: none; 1: [B] with a 0; 2: [B, Q]
  int mask;   // 0: none; 1: bool [B, 1, 1, K]; 2: float [Q, K] with -inf and an all -inf row;
              // 3: bool [B, H, Q, K]
  bool causal;
  double scale;  // 0: default
  double dropout;
};

void run_sdpa(const SdpaCase& c, at::ScalarType dt) {
  const int64_t B = c.B, H = c.H, Q = c.Q, K = c.K, D = c.D, Dv = c.Dv;
  at::manual_seed(3000 + B * 7 + H * 11 + Q * 13 + K * 17 + D * 19 + Dv * 23 + c.lens * 3 +
                  c.mask * 5 + c.causal);
  char buf[220];
  std::snprintf(buf, sizeof(buf),
                "sdpa %s B=%ld H=%ld Q=%ld K=%ld D=%ld Dv=%ld lens=%d mask=%d causal=%d scale=%g "
                "dropout=%g",
                c10::toString(dt), (long)B, (long)H, (long)Q, (long)K, (long)D, (long)Dv, c.lens,
                c.mask, (int)c.causal, c.scale, c.dropout);
  const std::string name(buf);
  const CaseReport report{name};
  const Tensor q = uniform({B, H, Q, D}, 1.0, dt), k = uniform({B, H, K, D}, 1.0, dt);
  const Tensor v = uniform({B, H, K, Dv}, 1.0, dt);
  OptT valid_lens, mask;
  if (c.lens == 1) {
    std::vector<int64_t> l(B);
    for (int64_t b = 0; b < B; ++b) l[b] = b == 0 ? 0 : 1 + (b * 7) % K;
    if (B > 1) l[B - 1] = K;
    valid_lens = at::tensor(l, at::kLong);
  } else if (c.lens == 2) {
    valid_lens = at::randint(0, K + 1, {B, Q}, at::TensorOptions().dtype(at::kLong));
  }
  if (c.mask == 1) mask = at::rand({B, 1, 1, K}, f64) > 0.3;
  if (c.mask == 2) {
    Tensor m = uniform({Q, K}, 1.0, dt).masked_fill(at::rand({Q, K}, f64) < 0.3, -INFINITY);
    m[0].fill_(-INFINITY);
    mask = m.to(dt);
  }
  if (c.mask == 3) mask = at::rand({B, H, Q, K}, f64) > 0.5;
  const std::optional<double> scale = c.scale != 0 ? std::optional<double>(c.scale) : std::nullopt;

  const Tensor lq = leaf(q), lk = leaf(k), lv = leaf(v);
  Tensor scores = at::matmul(lq, lk.transpose(-2, -1)) * (scale ? *scale : 1.0 / std::sqrt(double(D)));
  Tensor keep;
  if (mask) {
    if (mask->scalar_type() == at::kBool) {
      keep = *mask;
    } else {
      const Tensor m = mask->to(at::kDouble);
      keep = m > -INFINITY;
      scores = scores + m.masked_fill(keep.logical_not(), 0.0);  // -inf only where not kept
    }
  }
  if (valid_lens) keep = and_mask(keep, lens_mask(*valid_lens, K).unsqueeze(1));
  if (c.causal) keep = and_mask(keep, at::ones({Q, K}, at::TensorOptions().dtype(at::kBool)).tril());
  Tensor ref_w = masked_softmax(scores, keep);  // [B, H, Q, K]
  // The reference log-sum-exp: +inf for rows with no key.
  const Tensor keep_full = keep.defined() ? keep.expand({B, H, Q, K}) : at::ones({B, H, Q, K}, at::kBool);
  const Tensor ref_lse = at::where(keep_full.any(-1),
                                   at::logsumexp(scores.detach().masked_fill(keep_full.logical_not(), -INFINITY), -1),
                                   INFINITY);
  if (c.dropout > 0) {
    // The kernel's keep/drop decisions: attention.h's hash of (seed, flat index).
    const int64_t seed = 12345;
    const uint32_t thr = seqfuse::sdpa_dropout_threshold(c.dropout);
    std::vector<double> kept(B * H * Q * K);
    for (size_t i = 0; i < kept.size(); ++i)
      kept[i] = seqfuse::sdpa_dropout_keep(seqfuse::sdpa_dropout_hash(seed, i), thr) ? 1.0 : 0.0;
    ref_w = ref_w * at::tensor(kept, f64).reshape({B, H, Q, K}) / (1.0 - c.dropout);
  }
  const Tensor ref_out = at::matmul(ref_w, lv);
  const Tensor go = uniform({B, H, Q, Dv}, 1.0, dt);
  (ref_out * go).sum().backward();

  const Tol tol = tol_of(dt);
  auto [out, stats] = ops().sdpa.call(q.to(dt), k.to(dt), v.to(dt), mask, valid_lens, c.causal,
                                      scale, c.dropout, 12345);
  expect_close(out, ref_out, tol.out_atol, tol.out_rtol, name + " output");
  expect(stats.sizes() == at::IntArrayRef({B, H, Q, 2}), name + ": softmax_stats is [B, H, Q, 2]");
  const Tensor lse = stats.select(-1, 0) + stats.select(-1, 1);  // (max, log sum) -> logsumexp
  const Tensor inf_rows = ref_lse.isinf();
  expect(lse.isinf().equal(inf_rows), name + ": logsumexp +inf exactly on rows without keys");
  expect_close(lse.to(at::kDouble).masked_fill(inf_rows, 0), ref_lse.masked_fill(inf_rows, 0),
               tol.out_atol * 10, tol.out_rtol * 10, name + " logsumexp");
  auto [dq, dk, dv] = ops().sdpa_bwd.call(go.to(dt), q.to(dt), k.to(dt), v.to(dt), mask, valid_lens,
                                          out, stats, c.causal, scale, c.dropout, 12345);
  expect_close(dq, lq.grad(), tol.grad_atol, tol.grad_rtol, name + " grad query");
  expect_close(dk, lk.grad(), tol.grad_atol, tol.grad_rtol, name + " grad key");
  expect_close(dv, lv.grad(), tol.grad_atol, tol.grad_rtol, name + " grad value");
}

void attention_tests() {
  const std::vector<AddCase> add_cases = {
      {1, 1, 1, 1, 1, 0, 0},      // the smallest
      {2, 5, 7, 33, 3, 1, 0},     // odd sizes; a row with valid_lens 0 (fully padded)
      {3, 4, 40, 17, 9, 2, 1},    // [B, Q] lengths and a broadcast key mask
      {4, 6, 35, 16, 5, 3, 2},    // int32 lengths, a [Q, K] mask with an all-false row
      {2, 3, 70, 40, 4, 0, 1},    // more than one key block
  };
  for (const auto& c : add_cases)
    for (auto dt : {at::kDouble, at::kFloat}) guarded([&] { run_additive(c, dt); });
  guarded([&] { run_additive({3, 5, 9, 21, 7, 1, 1}, at::kBFloat16); });

  const std::vector<SdpaCase> sdpa_cases = {
      {1, 1, 1, 1, 1, 1, 0, 0, false, 0, 0},       // the smallest
      {2, 3, 5, 7, 17, 5, 1, 0, false, 0, 0},      // odd sizes, a fully padded batch row
      {2, 2, 50, 300, 8, 3, 2, 1, false, 0, 0},    // 2 query chunks, 2 key blocks, [B, Q] lens
      {2, 1, 13, 13, 64, 64, 0, 0, true, 0, 0},    // causal
      {1, 2, 9, 5, 3, 4, 2, 2, true, 0.7, 0},      // float mask with an all -inf row, causal, Q > K
      {2, 2, 7, 11, 5, 6, 0, 3, false, 0, 0},      // full [B, H, Q, K] bool mask
      {2, 2, 20, 19, 6, 5, 1, 0, false, 0, 0.3},   // dropout
      {1, 1, 60, 260, 7, 9, 0, 2, true, 0, 0.2},   // dropout over several blocks, causal
  };
  for (const auto& c : sdpa_cases)
    for (auto dt : {at::kDouble, at::kFloat}) guarded([&] { run_sdpa(c, dt); });
  guarded([&] { run_sdpa({2, 2, 9, 13, 16, 8, 1, 1, false, 0, 0}, at::kBFloat16); });
}

// ---------------------------------------------------------------------------------
// Bad arguments: c10::Error with a message that says what is wrong, never a crash.
// ---------------------------------------------------------------------------------

void bad_argument_tests() {
  const CaseReport report{"bad arguments"};
  const auto L = at::kLong;
  const int64_t T = 4, B = 3, I = 5, H = 6;
  auto z = [](at::IntArrayRef s) { return at::zeros(s); };
  const Tensor x = z({T, B, I}), hx = z({1, B, H}), len = at::tensor({4, 1, 2}, L);

  // GRU forward: gru(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths)
  auto gru = [&](const Tensor& in, const Tensor& wi, const Tensor& wh, const OptT& bi,
                 const OptT& bh, const Tensor& h, const OptT& l) {
    ops().gru.call(in, wi, wh, bi, bh, h, l, true, std::nullopt);
  };
  const Tensor gwi = z({1, 3 * H, I}), gwh = z({1, 3 * H, H}), gb = z({1, 3 * H});
  gru(x, gwi, gwh, gb, gb, hx, len);  // the baseline call is valid
  expect_throws("gru rank", [&] { gru(z({T, I}), gwi, gwh, gb, gb, hx, len); }, "input must be 3-D");
  expect_throws("gru int input", [&] { gru(x.to(at::kInt), gwi, gwh, gb, gb, hx, len); },
                "input dtype must be");
  expect_throws("gru half on cpu", [&] { gru(x.to(at::kHalf), gwi, gwh, gb, gb, hx, len); },
                "input dtype must be");
  expect_throws("gru T=0", [&] { gru(z({0, B, I}), gwi, gwh, gb, gb, hx, std::nullopt); },
                "at least one time step");
  expect_throws("gru B=0", [&] { gru(z({T, 0, I}), gwi, gwh, gb, gb, z({1, 0, H}), std::nullopt); },
                "batch of at least 1");
  expect_throws("gru D=3", [&] { gru(x, z({3, 3 * H, I}), z({3, 3 * H, H}), gb, gb, z({3, B, H}), len); },
                "weight_ih must be [D");
  expect_throws("gru weight_hh not 3H x H", [&] { gru(x, gwi, z({1, 3 * H, H + 1}), gb, gb, hx, len); },
                "weight_hh must be");
  expect_throws("gru weight_ih input size", [&] { gru(x, z({1, 3 * H, I + 1}), gwh, gb, gb, hx, len); },
                "weight_ih must be [1, 18, 5]");
  expect_throws("gru hx shape", [&] { gru(x, gwi, gwh, gb, gb, z({1, B + 1, H}), len); },
                "hx must be [1, 3, 6]");
  expect_throws("gru bias_ih shape", [&] { gru(x, gwi, gwh, z({1, 2 * H}), gb, hx, len); },
                "bias_ih must be [1, 18]");
  expect_throws("gru bias_hh shape", [&] { gru(x, gwi, gwh, gb, z({3 * H}), hx, len); },
                "bias_hh must be [1, 18]");
  expect_throws("gru weight dtype", [&] { gru(x, gwi.to(at::kDouble), gwh, gb, gb, hx, len); },
                "weight_ih must have the input's dtype");
  expect_throws("gru hx dtype", [&] { gru(x, gwi, gwh, gb, gb, hx.to(at::kDouble), len); },
                "hx must have the input's dtype");
  expect_throws("gru zero length", [&] { gru(x, gwi, gwh, gb, gb, hx, at::tensor({4, 0, 2}, L)); },
                "every length must be >= 1");
  expect_throws("gru negative length", [&] { gru(x, gwi, gwh, gb, gb, hx, at::tensor({4, -3, 2}, L)); },
                "every length must be >= 1");
  expect_throws("gru length > T", [&] { gru(x, gwi, gwh, gb, gb, hx, at::tensor({4, 5, 2}, L)); },
                "every length must be <= T=4");
  expect_throws("gru int32 lengths", [&] { gru(x, gwi, gwh, gb, gb, hx, at::tensor({4, 1, 2}, at::kInt)); },
                "lengths must be int64");
  expect_throws("gru lengths size", [&] { gru(x, gwi, gwh, gb, gb, hx, at::tensor({4, 1}, L)); },
                "lengths must be [B=3]");
  expect_throws("gru lengths 2-D", [&] { gru(x, gwi, gwh, gb, gb, hx, at::ones({B, 1}, L)); },
                "lengths must be [B=3]");

  // GRU backward: inconsistent saved tensors.
  // (std::get rather than structured bindings, which C++17 lambdas cannot capture)
  const T3 gr = ops().gru.call(x, gwi, gwh, gb, gb, hx, len, true, std::nullopt);
  const Tensor gout = std::get<0>(gr), ghn = std::get<1>(gr), ggates = std::get<2>(gr);
  const Tensor ggates0 = std::get<2>(ops().gru.call(x, gwi, gwh, gb, gb, hx, len, false, std::nullopt));
  auto gru_bwd = [&](const Tensor& go, const Tensor& gh, const Tensor& out, const Tensor& gates,
                     const OptT& l) {
    ops().gru_bwd.call(go, gh, x, gwi, gwh, hx, l, out, gates);
  };
  gru_bwd(at::ones_like(gout), at::ones_like(ghn), gout, ggates, len);  // valid
  expect_throws("gru_backward without saved gates",
                [&] { gru_bwd(at::ones_like(gout), at::ones_like(ghn), gout, ggates0, len); },
                "gates must come from gru_layer");
  expect_throws("gru_backward grad_output shape",
                [&] { gru_bwd(z({T, B, H + 1}), at::ones_like(ghn), gout, ggates, len); },
                "grad_output must have shape");
  expect_throws("gru_backward grad_h_n shape",
                [&] { gru_bwd(at::ones_like(gout), z({1, B, 1}), gout, ggates, len); },
                "grad_h_n must have shape");
  expect_throws("gru_backward output shape",
                [&] { gru_bwd(z({T, B, 1}), at::ones_like(ghn), z({T, B, 1}), ggates, len); },
                "output must come from gru_layer");
  expect_throws("gru_backward grad_output dtype",
                [&] { gru_bwd(at::ones_like(gout).to(at::kDouble), at::ones_like(ghn), gout, ggates, len); },
                "");
  expect_throws("gru_backward zero length",
                [&] { gru_bwd(at::ones_like(gout), at::ones_like(ghn), gout, ggates, at::tensor({0, 1, 1}, L)); },
                "every length must be >= 1");

  // RNN
  const Tensor rwi = z({2, H, I}), rwh = z({2, H, H}), rhx = z({2, B, H});
  auto rnn = [&](const Tensor& in, const Tensor& wi, const Tensor& wh, const OptT& b,
                 const Tensor& h, const OptT& l, c10::string_view act) {
    return ops().rnn.call(in, wi, wh, b, h, l, act, std::nullopt);
  };
  const T2 rr = rnn(x, rwi, rwh, z({2, H}), rhx, len, "relu");  // valid
  const Tensor rout = std::get<0>(rr), rhn = std::get<1>(rr);
  expect_throws("rnn nonlinearity", [&] { rnn(x, rwi, rwh, std::nullopt, rhx, len, "sigmoid"); },
                "nonlinearity must be 'tanh' or 'relu'");
  expect_throws("rnn bias shape", [&] { rnn(x, rwi, rwh, z({2, 4 * H}), rhx, len, "tanh"); },
                "bias must be [2, 6]");
  expect_throws("rnn hx directions", [&] { rnn(x, rwi, rwh, std::nullopt, hx, len, "tanh"); },
                "hx must be [2, 3, 6]");
  expect_throws("rnn weight_hh directions", [&] { rnn(x, rwi, z({1, H, H}), std::nullopt, rhx, len, "tanh"); },
                "weight_hh must be [D=2");
  expect_throws("rnn length > T", [&] { rnn(x, rwi, rwh, std::nullopt, rhx, at::tensor({9, 1, 1}, L), "tanh"); },
                "every length must be <= T=4");
  auto rnn_bwd = [&](const Tensor& go, const Tensor& gh, const Tensor& out, c10::string_view act) {
    ops().rnn_bwd.call(go, gh, x, rwi, rwh, rhx, len, out, act);
  };
  rnn_bwd(at::ones_like(rout), at::ones_like(rhn), rout, "relu");  // valid
  expect_throws("rnn_backward output shape",
                [&] { rnn_bwd(z({T, B, H}), at::ones_like(rhn), z({T, B, H}), "relu"); },
                "output must come from rnn_layer");
  expect_throws("rnn_backward grad_h_n shape",
                [&] { rnn_bwd(at::ones_like(rout), z({1, B, H}), rout, "relu"); },
                "grad_h_n must have shape");
  expect_throws("rnn_backward nonlinearity",
                [&] { rnn_bwd(at::ones_like(rout), at::ones_like(rhn), rout, "gelu"); },
                "nonlinearity must be");

  // LSTM backward (the forward's checks are in test_lstm_cpu)
  const Tensor lwi = z({1, 4 * H, I}), lwh = z({1, 4 * H, H});
  const T5 lr = ops().lstm.call(x, lwi, lwh, std::nullopt, hx, hx, len, true, std::nullopt);
  const Tensor lout = std::get<0>(lr), lhn = std::get<1>(lr), lcn = std::get<2>(lr);
  const Tensor lgates = std::get<3>(lr), lcells = std::get<4>(lr);
  const T5 lr0 = ops().lstm.call(x, lwi, lwh, std::nullopt, hx, hx, len, false, std::nullopt);
  const Tensor lgates0 = std::get<3>(lr0), lcells0 = std::get<4>(lr0);
  auto lstm_bwd = [&](const Tensor& go, const Tensor& out, const Tensor& gates, const Tensor& cells) {
    ops().lstm_bwd.call(go, at::ones_like(lhn), at::ones_like(lcn), x, lwi, lwh, hx, hx, len, out,
                        gates, cells);
  };
  lstm_bwd(at::ones_like(lout), lout, lgates, lcells);  // valid
  expect_throws("lstm_backward without saved activations",
                [&] { lstm_bwd(at::ones_like(lout), lout, lgates0, lcells0); },
                "gates/cells must come from lstm_layer");
  expect_throws("lstm_backward output shape",
                [&] { lstm_bwd(z({T, B, 1}), z({T, B, 1}), lgates, lcells); },
                "output must come from lstm_layer");
  expect_throws("lstm_backward grad_output shape",
                [&] { lstm_bwd(z({T, B, 2 * H}), lout, lgates, lcells); },
                "grad_output must have shape");

  // Additive attention: query [B, Q, A], key [B, K, A], w_v [A], value [B, K, Dv]
  const int64_t Q = 3, K = 5, A = 4, Dv = 2;
  const Tensor q = z({B, Q, A}), k = z({B, K, A}), w = z({A}), v = z({B, K, Dv});
  auto add = [&](const Tensor& q_, const Tensor& k_, const Tensor& w_, const Tensor& v_,
                 const OptT& l, const OptT& m) { return ops().additive.call(q_, k_, w_, v_, l, m); };
  const T2 ar = add(q, k, w, v, at::tensor({0, 5, 2}, L), std::nullopt);  // valid
  const Tensor actx = std::get<0>(ar), aw = std::get<1>(ar);
  expect_throws("additive query rank", [&] { add(z({Q, A}), k, w, v, std::nullopt, std::nullopt); },
                "query must be 3-D");
  expect_throws("additive int query", [&] { add(q.to(at::kInt), k, w, v, std::nullopt, std::nullopt); },
                "query dtype must be");
  expect_throws("additive Q=0", [&] { add(z({B, 0, A}), k, w, v, std::nullopt, std::nullopt); },
                "B, Q, A >= 1");
  expect_throws("additive key features", [&] { add(q, z({B, K, A + 1}), w, v, std::nullopt, std::nullopt); },
                "key must be [B=3, K>=1, A=4");
  expect_throws("additive K=0", [&] { add(q, z({B, 0, A}), w, z({B, 0, Dv}), std::nullopt, std::nullopt); },
                "key must be");
  expect_throws("additive w_v", [&] { add(q, k, z({A + 2}), v, std::nullopt, std::nullopt); },
                "w_v must be [A=4]");
  expect_throws("additive value keys", [&] { add(q, k, w, z({B, K - 1, Dv}), std::nullopt, std::nullopt); },
                "value must be [B=3, K=5");
  expect_throws("additive value dtype", [&] { add(q, k, w, v.to(at::kDouble), std::nullopt, std::nullopt); },
                "value must have the query's dtype");
  expect_throws("additive valid_lens > K", [&] { add(q, k, w, v, at::tensor({1, 6, 2}, L), std::nullopt); },
                "valid_lens must be in [0, K=5]");
  expect_throws("additive negative valid_lens", [&] { add(q, k, w, v, at::tensor({1, -1, 2}, L), std::nullopt); },
                "valid_lens must be in [0, K=5]");
  expect_throws("additive float valid_lens", [&] { add(q, k, w, v, at::ones({B}), std::nullopt); },
                "valid_lens must be an integer tensor");
  expect_throws("additive valid_lens shape", [&] { add(q, k, w, v, at::ones({B, Q + 1}, L), std::nullopt); },
                "valid_lens must be [B=3] or [B, Q]");
  expect_throws("additive float mask", [&] { add(q, k, w, v, std::nullopt, at::ones({B, Q, K})); },
                "mask must be bool");
  expect_throws("additive mask shape", [&] { add(q, k, w, v, std::nullopt, at::ones({B, Q, K + 1}, at::kBool)); },
                "mask must be broadcastable to [3, 3, 5]");
  expect_throws("additive mask rank", [&] { add(q, k, w, v, std::nullopt, at::ones({1, B, Q, K}, at::kBool)); },
                "mask must be broadcastable");
  auto add_bwd = [&](const Tensor& gc, const Tensor& gw, const Tensor& q_, const Tensor& k_,
                     const Tensor& w_, const Tensor& v_, const Tensor& weights) {
    ops().additive_bwd.call(gc, gw, q_, k_, w_, v_, weights);
  };
  add_bwd(at::ones_like(actx), at::ones_like(aw), q, k, w, v, aw);  // valid
  expect_throws("additive_backward grad_context shape",
                [&] { add_bwd(z({B, Q, Dv + 1}), at::ones_like(aw), q, k, w, v, aw); },
                "grad_context must be [3, 3, 2]");
  expect_throws("additive_backward weights shape",
                [&] { add_bwd(at::ones_like(actx), z({B, Q, K - 1}), q, k, w, v, z({B, Q, K - 1})); },
                "weights and grad_weights must be");
  // The backward gets the forward's inputs back: they are checked as in the forward.
  expect_throws("additive_backward key features",
                [&] { add_bwd(at::ones_like(actx), at::ones_like(aw), q, z({B, K, 1}), w, v, aw); },
                "key must be [B=3, K>=1, A=4");
  expect_throws("additive_backward w_v",
                [&] { add_bwd(at::ones_like(actx), at::ones_like(aw), q, k, z({1}), v, aw); },
                "w_v must be [A=4]");

  // SDPA: query [B, H, Q, D], key [B, H, K, D], value [B, H, K, Dv]
  const int64_t NH = 2, Dh = 4;
  const Tensor sq = z({B, NH, Q, Dh}), sk = z({B, NH, K, Dh}), sv = z({B, NH, K, Dv});
  auto sdpa = [&](const Tensor& q_, const Tensor& k_, const Tensor& v_, const OptT& m,
                  const OptT& l, std::optional<double> scale, double p) {
    return ops().sdpa.call(q_, k_, v_, m, l, false, scale, p, 0);
  };
  const T2 sr = sdpa(sq, sk, sv, std::nullopt, at::tensor({0, 5, 1}, L), std::nullopt, 0.1);  // valid
  const Tensor sout = std::get<0>(sr), slse = std::get<1>(sr);
  expect_throws("sdpa query rank", [&] { sdpa(z({B, Q, Dh}), sk, sv, std::nullopt, std::nullopt, std::nullopt, 0); },
                "query must be 4-D");
  expect_throws("sdpa key head dim", [&] { sdpa(sq, z({B, NH, K, Dh + 1}), sv, std::nullopt, std::nullopt, std::nullopt, 0); },
                "key must be [B=3, H=2, K>=1, D=4");
  expect_throws("sdpa key heads", [&] { sdpa(sq, z({B, 1, K, Dh}), sv, std::nullopt, std::nullopt, std::nullopt, 0); },
                "key must be");
  expect_throws("sdpa value keys", [&] { sdpa(sq, sk, z({B, NH, K + 1, Dv}), std::nullopt, std::nullopt, std::nullopt, 0); },
                "value must be [B=3, H=2, K=5");
  expect_throws("sdpa value Dv=0", [&] { sdpa(sq, sk, z({B, NH, K, 0}), std::nullopt, std::nullopt, std::nullopt, 0); },
                "value must be");
  expect_throws("sdpa key dtype", [&] { sdpa(sq, sk.to(at::kDouble), sv, std::nullopt, std::nullopt, std::nullopt, 0); },
                "key must have the query's dtype");
  expect_throws("sdpa int mask", [&] { sdpa(sq, sk, sv, at::ones({Q, K}, at::kInt), std::nullopt, std::nullopt, 0); },
                "attn_mask must be bool");
  expect_throws("sdpa mask shape", [&] { sdpa(sq, sk, sv, at::ones({Q, K - 1}, at::kBool), std::nullopt, std::nullopt, 0); },
                "attn_mask must be broadcastable to [3, 2, 3, 5]");
  expect_throws("sdpa valid_lens > K", [&] { sdpa(sq, sk, sv, std::nullopt, at::tensor({6, 1, 1}, L), std::nullopt, 0); },
                "valid_lens must be in [0, K=5]");
  expect_throws("sdpa valid_lens shape", [&] { sdpa(sq, sk, sv, std::nullopt, at::ones({B + 1}, L), std::nullopt, 0); },
                "valid_lens must be [B=3]");
  expect_throws("sdpa bool valid_lens", [&] { sdpa(sq, sk, sv, std::nullopt, at::ones({B}, at::kBool), std::nullopt, 0); },
                "valid_lens must be an integer tensor");
  expect_throws("sdpa NaN scale", [&] { sdpa(sq, sk, sv, std::nullopt, std::nullopt, std::nan(""), 0); },
                "scale must be finite");
  expect_throws("sdpa dropout 1", [&] { sdpa(sq, sk, sv, std::nullopt, std::nullopt, std::nullopt, 1.0); },
                "dropout_p must be in [0, 1)");
  expect_throws("sdpa negative dropout", [&] { sdpa(sq, sk, sv, std::nullopt, std::nullopt, std::nullopt, -0.5); },
                "dropout_p must be in [0, 1)");
  auto sdpa_bwd = [&](const Tensor& go, const Tensor& out, const Tensor& lse, const Tensor& k_) {
    ops().sdpa_bwd.call(go, sq, k_, sv, std::nullopt, at::tensor({0, 5, 1}, L), out, lse, false,
                        std::nullopt, 0.1, 0);
  };
  sdpa_bwd(at::ones_like(sout), sout, slse, sk);  // valid
  expect_throws("sdpa_backward softmax_stats shape", [&] { sdpa_bwd(at::ones_like(sout), sout, z({B, NH, Q}), sk); },
                "softmax_stats must be [3, 2, 3, 2]");
  expect_throws("sdpa_backward grad_output shape",
                [&] { sdpa_bwd(z({B, NH, Q, Dv + 1}), sout, slse, sk); },
                "grad_output and output must be");
  expect_throws("sdpa_backward key shape", [&] { sdpa_bwd(at::ones_like(sout), sout, slse, z({B, NH, K, 1})); },
                "key must be");
}

}  // namespace

int main() {
  recurrent_tests();
  attention_tests();
  guarded(bad_argument_tests);
  // Last: a late thread puts the layers on one thread for a while (team_solo), which
  // would hide the threaded plans from the tests above.
  guarded(team_tasks_tests);
  std::printf("%s: %d check(s), %d failure(s)\n", failures ? "FAILED" : "PASSED", checks, failures);
  return failures ? 1 : 0;
}
