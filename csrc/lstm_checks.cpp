// Argument checks for the LSTM layer op, shared by every device's kernel. Messages
// name the argument, the expected and the actual value.
#include "lstm.h"

#include <ATen/ATen.h>

namespace seqfuse {

void check_lstm_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(input.dim() == 3, "lstm_layer: input must be 3-D [T, B, I], got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(input.is_floating_point(), "lstm_layer: input must be a floating-point tensor, got ",
              input.scalar_type());
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(T >= 1, "lstm_layer: input must have at least one time step, got T=", T);
  TORCH_CHECK(B >= 1, "lstm_layer: input must have a batch of at least 1, got B=", B);
  TORCH_CHECK(weight_ih.dim() == 3 && (weight_ih.size(0) == 1 || weight_ih.size(0) == 2),
              "lstm_layer: weight_ih must be [D, 4H, I] with D in {1, 2}, got ", weight_ih.sizes());
  const int64_t D = weight_ih.size(0);
  TORCH_CHECK(weight_hh.dim() == 3 && weight_hh.size(0) == D && weight_hh.size(1) % 4 == 0 &&
                  weight_hh.size(1) == 4 * weight_hh.size(2) && weight_hh.size(2) >= 1,
              "lstm_layer: weight_hh must be [D=", D, ", 4H, H], got ", weight_hh.sizes());
  const int64_t H = weight_hh.size(2);
  TORCH_CHECK(weight_ih.size(1) == 4 * H && weight_ih.size(2) == I,
              "lstm_layer: weight_ih must be [", D, ", ", 4 * H, ", ", I,
              "] for input features I=", I, " and hidden size H=", H, ", got ", weight_ih.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({D, 4 * H}), "lstm_layer: bias must be [", D,
                ", ", 4 * H, "], got ", bias->sizes());
  TORCH_CHECK(hx.sizes() == at::IntArrayRef({D, B, H}), "lstm_layer: hx must be [", D, ", ", B,
              ", ", H, "], got ", hx.sizes());
  TORCH_CHECK(cx.sizes() == at::IntArrayRef({D, B, H}), "lstm_layer: cx must be [", D, ", ", B,
              ", ", H, "], got ", cx.sizes());

  const std::pair<const char*, const at::Tensor*> same[] = {
      {"weight_ih", &weight_ih}, {"weight_hh", &weight_hh}, {"hx", &hx}, {"cx", &cx}};
  for (const auto& [name, t] : same) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), "lstm_layer: ", name,
                " must have the input's dtype ", input.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == input.device(), "lstm_layer: ", name,
                " must be on the input's device ", input.device(), ", got ", t->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "lstm_layer: bias must have dtype ",
                input.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), "lstm_layer: bias must be on device ",
                input.device(), ", got ", bias->device());
  }
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK(len.scalar_type() == at::kLong, "lstm_layer: lengths must be int64, got ",
                len.scalar_type());
    TORCH_CHECK(len.device().is_cpu(), "lstm_layer: lengths must be a CPU tensor, got device ",
                len.device());
    TORCH_CHECK(len.dim() == 1 && len.size(0) == B, "lstm_layer: lengths must be [B=", B,
                "], got shape ", len.sizes());
    const int64_t lo = len.min().item<int64_t>(), hi = len.max().item<int64_t>();
    TORCH_CHECK(lo >= 1, "lstm_layer: every length must be >= 1, got min(lengths)=", lo);
    TORCH_CHECK(hi <= T, "lstm_layer: every length must be <= T=", T, ", got max(lengths)=", hi);
  }
}

}  // namespace seqfuse
