// Argument checks for the recurrent layer ops, shared by every device's kernel.
// Messages name the op, the argument, the expected and the actual value.
#include "check_format.h"
#include "gru.h"
#include "lstm.h"
#include "quantized.h"
#include "rnn.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace seqfuse {

namespace {

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// What every layer op checks after its input and weights: the states' shapes, every
// tensor's dtype and device against `ref` (the op's first tensor, named ref_name), the
// biases' shapes and the lengths. same: the weights, checked for dtype and device.
void check_state_args(const char* op, int64_t NG, const char* bias_name, const char* ref_name,
                      const at::Tensor& ref, int64_t T, int64_t B, int64_t D, int64_t H,
                      std::vector<std::pair<const char*, const at::Tensor*>> same,
                      const std::optional<at::Tensor>& bias_ih,
                      const std::optional<at::Tensor>& bias_hh, const at::Tensor& hx,
                      const at::Tensor* cx, const std::optional<at::Tensor>& lengths,
                      int64_t P = -1) {
  // P: the LSTM projection's size, the width of hx (H without a projection).
  const int64_t HX = P < 0 ? H : P;
  TORCH_CHECK(hx.sizes() == at::IntArrayRef({D, B, HX}), op, ": hx must be [", D, ", ", B,
              ", ", HX, "], got ", hx.sizes());
  if (cx)
    TORCH_CHECK(cx->sizes() == at::IntArrayRef({D, B, H}), op, ": cx must be [", D, ", ", B,
                ", ", H, "], got ", cx->sizes());

  same.push_back({"hx", &hx});
  if (cx) same.push_back({"cx", cx});
  if (bias_ih.has_value()) same.push_back({bias_name, &*bias_ih});
  if (bias_hh.has_value()) same.push_back({"bias_hh", &*bias_hh});
  for (const auto& [name, t] : same) {
    TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": ", name, " must have the ",
                ref_name, "'s dtype ", dtype_name(ref.scalar_type()), ", got ",
                dtype_name(t->scalar_type()));
    TORCH_CHECK(t->device() == ref.device(), op, ": ", name, " must be on the ", ref_name,
                "'s device ", ref.device(), ", got ", t->device());
  }
  for (const auto* b : {bias_ih.has_value() ? &*bias_ih : nullptr, bias_hh.has_value() ? &*bias_hh : nullptr})
    if (b)
      TORCH_CHECK(b->sizes() == at::IntArrayRef({D, NG * H}), op, ": ",
                  b == &*bias_hh ? "bias_hh" : bias_name, " must be [", D, ", ",
                  NG * H, "], got ", b->sizes());
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK(len.scalar_type() == at::kLong, op, ": lengths must be int64, got ",
                dtype_name(len.scalar_type()));
    TORCH_CHECK(len.device().is_cpu(), op, ": lengths must be a CPU tensor, got device ",
                len.device());
    TORCH_CHECK(len.dim() == 1 && len.size(0) == B, op, ": lengths must be [B=", B,
                "], got shape ", len.sizes());
    // One pass in C++ over the B values (two ATen reductions cost more than the rest of
    // the checks at batch 1). The op's private copy is contiguous.
    const at::Tensor lc = len.contiguous();
    const int64_t* lp = lc.const_data_ptr<int64_t>();
    int64_t lo = lp[0], hi = lp[0];
    for (int64_t i = 1; i < B; ++i) {
      lo = std::min(lo, lp[i]);
      hi = std::max(hi, lp[i]);
    }
    TORCH_CHECK(lo >= 1, op, ": every length must be >= 1, got min(lengths)=", lo);
    TORCH_CHECK(hi <= T, op, ": every length must be <= T=", T, ", got max(lengths)=", hi);
  }
}


// input [T, B, I] of every layer op: dtype, sizes, the kernels' 32-bit limits.
void check_input_arg(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D [T, B, I], got ", input.dim(),
              "-D with shape ", input.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                  (dt == at::kHalf && input.is_cuda()),
              op, ": input dtype must be float32, float64 or bfloat16 (or float16 on CUDA), got ", dtype_name(dt));
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(T >= 1, op, ": input must have at least one time step, got T=", T);
  TORCH_CHECK(B >= 1, op, ": input must have a batch of at least 1, got B=", B);
  // The kernels take a weight row's length (I or H) as a 32-bit int (and, on CUDA, time
  // steps and batch rows too): larger sizes are refused here rather than truncated there.
  TORCH_CHECK(I <= kMaxInt32, op, ": input must have fewer than 2^31 features, got I=", I);
  if (input.is_cuda())
    TORCH_CHECK(T <= kMaxInt32 && B <= kMaxInt32, op,
                ": input must have T and B below 2^31 on CUDA (32-bit indices), got T=", T,
                " and B=", B);
}

// op: the op's name for messages; NG: gate blocks (4 LSTM, 3 GRU, 1 RNN); cx: the LSTM's
// only; bias_name: "bias" for a combined b_ih + b_hh, "bias_ih" when bias_hh is apart.
void check_layer_args(const char* op, int64_t NG, const char* bias_name, const at::Tensor& input,
                      const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                      const std::optional<at::Tensor>& bias_ih,
                      const std::optional<at::Tensor>& bias_hh, const at::Tensor& hx,
                      const at::Tensor* cx, const std::optional<at::Tensor>& lengths) {
  check_input_arg(op, input);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(weight_ih.dim() == 3 && (weight_ih.size(0) == 1 || weight_ih.size(0) == 2),
              op, ": weight_ih must be [D, ", NG, "H, I] with D in {1, 2}, got ", weight_ih.sizes());
  const int64_t D = weight_ih.size(0);
  TORCH_CHECK(weight_hh.dim() == 3 && weight_hh.size(0) == D && weight_hh.size(1) % NG == 0 &&
                  weight_hh.size(1) == NG * weight_hh.size(2) && weight_hh.size(2) >= 1,
              op, ": weight_hh must be [D=", D, ", ", NG, "H, H], got ", weight_hh.sizes());
  const int64_t H = weight_hh.size(2);
  TORCH_CHECK(H <= kMaxInt32, op, ": weight_hh must have a hidden size H below 2^31, got H=", H);
  TORCH_CHECK(weight_ih.size(1) == NG * H && weight_ih.size(2) == I,
              op, ": weight_ih must be [", D, ", ", NG * H, ", ", I,
              "] for input features I=", I, " and hidden size H=", H, ", got ", weight_ih.sizes());
  check_state_args(op, NG, bias_name, "input", input, T, B, D, H,
                   {{"weight_ih", &weight_ih}, {"weight_hh", &weight_hh}}, bias_ih, bias_hh, hx,
                   cx, lengths);
}

// The backward ops' own arguments, after their forward's (check_*_layer_args): the
// forward's outputs and the incoming gradients have its output shapes, on the input's
// device. Shared by the CPU and CUDA kernels. more: the op's further tensors (devices).
void check_backward_args(const char* op, const char* forward, const at::Tensor& input,
                         const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                         const at::Tensor& grad_output, const at::Tensor& output,
                         const at::Tensor& grad_h_n, const at::Tensor& hx,
                         std::initializer_list<std::pair<const char*, const at::Tensor*>> more) {
  const int64_t T = input.size(0), B = input.size(1);
  const int64_t DH = weight_ih.size(0) * weight_hh.size(2);
  TORCH_CHECK(output.sizes() == at::IntArrayRef({T, B, DH}), op, ": output must come from ",
              forward, " on the same input, [", T, ", ", B, ", ", DH, "], got ", output.sizes());
  TORCH_CHECK(grad_output.sizes() == output.sizes(), op, ": grad_output must have shape ",
              output.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_h_n.sizes() == hx.sizes(), op, ": grad_h_n must have shape ", hx.sizes(),
              ", got ", grad_h_n.sizes());
  std::vector<std::pair<const char*, const at::Tensor*>> all = {
      {"grad_output", &grad_output}, {"output", &output}, {"grad_h_n", &grad_h_n}};
  all.insert(all.end(), more.begin(), more.end());
  for (const auto& [name, t] : all)
    TORCH_CHECK(t->device() == input.device(), op, ": ", name, " must be on the input's device ",
                input.device(), ", got ", t->device());
}


// The projected-input ops (inference): projected [T, B, D, G] float32/float64 on CPU, then
// what every layer op checks.
void check_projected_args(const char* op, int64_t NG, const at::Tensor& projected,
                          const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_hh,
                          const at::Tensor& hx, const at::Tensor* cx,
                          const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(projected.dim() == 4, op, ": projected must be 4-D [T, B, D, ", NG,
              "H], got ", projected.dim(), "-D with shape ", projected.sizes());
  const auto dt = projected.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op,
              ": projected dtype must be float32 or float64, got ", dtype_name(dt));
  TORCH_CHECK(projected.device().is_cpu(), op, ": projected must be a CPU tensor, got device ",
              projected.device());
  const int64_t T = projected.size(0), B = projected.size(1), D = projected.size(2);
  TORCH_CHECK(T >= 1, op, ": projected must have at least one time step, got T=", T);
  TORCH_CHECK(B >= 1, op, ": projected must have a batch of at least 1, got B=", B);
  TORCH_CHECK(D == 1 || D == 2, op, ": projected must have D in {1, 2} directions, got D=", D);
  TORCH_CHECK(weight_hh.dim() == 3 && weight_hh.size(0) == D && weight_hh.size(2) >= 1 &&
                  weight_hh.size(1) == NG * weight_hh.size(2),
              op, ": weight_hh must be [D=", D, ", ", NG, "H, H], got ", weight_hh.sizes());
  const int64_t H = weight_hh.size(2);
  TORCH_CHECK(H <= kMaxInt32, op, ": weight_hh must have a hidden size H below 2^31, got H=", H);
  TORCH_CHECK(projected.size(3) == NG * H, op, ": projected must be [", T, ", ", B, ", ", D,
              ", ", NG * H, "] for hidden size H=", H, ", got ", projected.sizes());
  check_state_args(op, NG, "bias_ih", "projected", projected, T, B, D, H,
                   {{"weight_hh", &weight_hh}}, std::nullopt, bias_hh, hx, cx, lengths);
}
}  // namespace

void check_lstm_proj_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& weight_hr, const at::Tensor& hx,
    const at::Tensor& cx, const std::optional<at::Tensor>& lengths) {
  const char* op = "lstm_proj_layer";
  check_input_arg(op, input);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(weight_hr.dim() == 3 && (weight_hr.size(0) == 1 || weight_hr.size(0) == 2) &&
                  weight_hr.size(1) >= 1 && weight_hr.size(2) > weight_hr.size(1),
              op, ": weight_hr must be [D, P, H] with D in {1, 2} and 1 <= P < H (torch.nn.LSTM's "
              "proj_size < hidden_size), got ", weight_hr.sizes());
  const int64_t D = weight_hr.size(0), P = weight_hr.size(1), H = weight_hr.size(2);
  TORCH_CHECK(H <= kMaxInt32, op, ": weight_hr must have a hidden size H below 2^31, got H=", H);
  TORCH_CHECK(weight_ih.sizes() == at::IntArrayRef({D, 4 * H, I}), op, ": weight_ih must be [", D,
              ", ", 4 * H, ", ", I, "] for input features I=", I, " and hidden size H=", H,
              ", got ", weight_ih.sizes());
  TORCH_CHECK(weight_hh.sizes() == at::IntArrayRef({D, 4 * H, P}), op, ": weight_hh must be [", D,
              ", ", 4 * H, ", ", P, "] for hidden size H=", H, " and proj_size P=", P, ", got ",
              weight_hh.sizes());
  check_state_args(op, 4, "bias", "input", input, T, B, D, H,
                   {{"weight_ih", &weight_ih}, {"weight_hh", &weight_hh}, {"weight_hr", &weight_hr}},
                   bias, std::nullopt, hx, &cx, lengths, P);
}

void check_lstm_proj_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& weight_hr, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells) {
  const char* op = "lstm_proj_layer_backward";
  check_lstm_proj_layer_args(input, weight_ih, weight_hh, std::nullopt, weight_hr, hx, cx, lengths);
  // check_backward_args reads D * (last dim of its weight_hh) as the output width: D * P.
  check_backward_args(op, "lstm_proj_layer", input, weight_ih, weight_hh, grad_output, output,
                      grad_h_n, hx, {{"grad_c_n", &grad_c_n}, {"gates", &gates}, {"cells", &cells}});
  TORCH_CHECK(grad_c_n.sizes() == cx.sizes(), op, ": grad_c_n must have shape ", cx.sizes(),
              ", got ", grad_c_n.sizes());
  const int64_t T = input.size(0), B = input.size(1), D = weight_hr.size(0), H = weight_hr.size(2);
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({T, B, D, 4 * H}) &&
                  cells.sizes() == at::IntArrayRef({T, B, D, H}),
              op, ": gates/cells must come from lstm_proj_layer on the same input with "
              "keep_activations=True; got gates ", gates.sizes(), " and cells ", cells.sizes());
}

void check_lstm_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths) {
  check_layer_args("lstm_layer", 4, "bias", input, weight_ih, weight_hh, bias, std::nullopt, hx, &cx, lengths);
}

void check_gru_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const at::Tensor& hx, const std::optional<at::Tensor>& lengths) {
  check_layer_args("gru_layer", 3, "bias_ih", input, weight_ih, weight_hh, bias_ih, bias_hh, hx, nullptr, lengths);
}

void check_lstm_layer_projected_args(const at::Tensor& projected, const at::Tensor& weight_hh,
                                     const at::Tensor& hx, const at::Tensor& cx,
                                     const std::optional<at::Tensor>& lengths) {
  check_projected_args("lstm_layer_projected", 4, projected, weight_hh, std::nullopt, hx, &cx, lengths);
}

void check_gru_layer_projected_args(const at::Tensor& projected, const at::Tensor& weight_hh,
                                    const std::optional<at::Tensor>& bias_hh, const at::Tensor& hx,
                                    const std::optional<at::Tensor>& lengths) {
  check_projected_args("gru_layer_projected", 3, projected, weight_hh, bias_hh, hx, nullptr, lengths);
}

void check_rnn_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, c10::string_view nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu",
              "rnn_layer: nonlinearity must be 'tanh' or 'relu', got '", nonlinearity, "'");
  check_layer_args("rnn_layer", 1, "bias", input, weight_ih, weight_hh, bias, std::nullopt, hx,
                   nullptr, lengths);
}

void check_lstm_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& lengths,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells) {
  const char* op = "lstm_layer_backward";
  check_lstm_layer_args(input, weight_ih, weight_hh, std::nullopt, hx, cx, lengths);
  check_backward_args(op, "lstm_layer", input, weight_ih, weight_hh, grad_output, output, grad_h_n,
                      hx, {{"grad_c_n", &grad_c_n}, {"gates", &gates}, {"cells", &cells}});
  TORCH_CHECK(grad_c_n.sizes() == cx.sizes(), op, ": grad_c_n must have shape ", cx.sizes(),
              ", got ", grad_c_n.sizes());
  const int64_t T = input.size(0), B = input.size(1), D = weight_ih.size(0), H = weight_hh.size(2);
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({T, B, D, 4 * H}) &&
                  cells.sizes() == at::IntArrayRef({T, B, D, H}),
              op, ": gates/cells must come from lstm_layer on the same input with "
              "keep_activations=True; got gates ", gates.sizes(), " and cells ", cells.sizes());
}

void check_gru_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output, const at::Tensor& gates) {
  const char* op = "gru_layer_backward";
  check_gru_layer_args(input, weight_ih, weight_hh, std::nullopt, std::nullopt, hx, lengths);
  check_backward_args(op, "gru_layer", input, weight_ih, weight_hh, grad_output, output, grad_h_n,
                      hx, {{"gates", &gates}});
  const int64_t T = input.size(0), B = input.size(1), D = weight_ih.size(0), H = weight_hh.size(2);
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({T, B, D, 4 * H}), op,
              ": gates must come from gru_layer on the same input with keep_activations=True; "
              "got gates ", gates.sizes());
}

void check_rnn_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output,
    c10::string_view nonlinearity) {
  check_rnn_layer_args(input, weight_ih, weight_hh, std::nullopt, hx, lengths, nonlinearity);
  check_backward_args("rnn_layer_backward", "rnn_layer", input, weight_ih, weight_hh, grad_output,
                      output, grad_h_n, hx, {});
}


void check_quantized_rnn_layer_args(
    c10::string_view mode, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& scale_ih, const at::Tensor& weight_hh, const at::Tensor& scale_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    const std::optional<at::Tensor>& lengths) {
  const char* op = "quantized_rnn_layer";
  TORCH_CHECK(mode == "lstm" || mode == "gru", op, ": mode must be 'lstm' or 'gru', got '",
              std::string(mode), "'");
  const bool lstm = mode == "lstm";
  const int64_t NG = lstm ? 4 : 3;
  TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D [T, B, I], got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": input must be float32, got ",
              dtype_name(input.scalar_type()));
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got device ", input.device());
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(I <= kMaxInt32, op, ": input must have fewer than 2^31 features, got I=", I);
  TORCH_CHECK(weight_hh.dim() == 3 && (weight_hh.size(0) == 1 || weight_hh.size(0) == 2) &&
                  weight_hh.size(2) > 0 && weight_hh.size(1) == NG * weight_hh.size(2),
              op, ": weight_hh must be [D, ", NG, "H, H] with D in {1, 2}, got ", weight_hh.sizes());
  const int64_t D = weight_hh.size(0), H = weight_hh.size(2);
  TORCH_CHECK(weight_ih.sizes() == at::IntArrayRef({D, NG * H, I}), op, ": weight_ih must be [", D,
              ", ", NG * H, ", ", I, "], got ", weight_ih.sizes());
  for (const auto& [name, w] : {std::pair<const char*, const at::Tensor*>{"weight_ih", &weight_ih},
                                {"weight_hh", &weight_hh}})
    TORCH_CHECK(w->scalar_type() == at::kChar && w->device().is_cpu(), op, ": ", name,
                " must be an int8 CPU tensor, got ", dtype_name(w->scalar_type()), " on ", w->device());
  for (const auto& [name, sc] : {std::pair<const char*, const at::Tensor*>{"scale_ih", &scale_ih},
                                 {"scale_hh", &scale_hh}}) {
    TORCH_CHECK(sc->sizes() == at::IntArrayRef({D, NG * H}) && sc->scalar_type() == at::kFloat &&
                    sc->device().is_cpu(),
                op, ": ", name, " must be a float32 CPU tensor [", D, ", ", NG * H, "], got ",
                dtype_name(sc->scalar_type()), " ", sc->sizes(), " on ", sc->device());
    TORCH_CHECK(at::isfinite(*sc).all().item<bool>() && (*sc > 0).all().item<bool>(), op, ": ", name,
                " must be finite and positive");
  }
  TORCH_CHECK(!(lstm && bias_hh.has_value()), op,
              ": the LSTM takes one combined bias (b_ih + b_hh) as bias_ih; bias_hh must be None");
  TORCH_CHECK(lstm == cx.has_value(), op, lstm ? ": the LSTM needs cx" : ": the GRU takes no cx");
  TORCH_CHECK(at::isfinite(input).all().item<bool>(), op,
              ": input has NaN or Inf, which int8 quantisation cannot represent");
  check_state_args(op, NG, "bias_ih", "input", input, T, B, D, H, {}, bias_ih, bias_hh, hx,
                   cx.has_value() ? &*cx : nullptr, lengths);
}

}  // namespace seqfuse
