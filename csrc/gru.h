// The fused GRU layer: declarations shared by the op registration, the CPU kernel and
// the tests. One call runs one layer in one or both directions, PyTorch's formula
// (the reset gate multiplies the recurrent product plus its bias):
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//   h' = (1 - z) * n + z * h
//
// Shapes (D = directions; T = time steps; B = batch; I = input; H = hidden):
//   input      [T, B, I]          time-major
//   weight_ih  [D, 3H, I]         gate order r, z, n
//   weight_hh  [D, 3H, H]
//   bias_ih, bias_hh  [D, 3H] or absent (kept apart: b_hn sits inside r * (...))
//   hx         [D, B, H]
//   lengths    [B] int64 on CPU, 1 <= lengths[b] <= T, or absent (all T)
// Outputs:
//   output     [T, B, D*H]        zero past each sequence's length
//   h_n        [D, B, H]          state at each sequence's last valid step
//   gates      [T, B, D, 4H]      r, z, n and W_hn h + b_hn of every step (saved for the
//                                 backward); empty ([0]) when keep_activations is false
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace seqfuse {

// The CPU kernels' signatures are in cpu/kernels.h; the notes below are the ops'.

// Gradients of gru_layer. grad_output: [T, B, D*H]; grad_h_n: [D, B, H]; the rest are
// gru_layer's inputs and outputs. Returns (grad_input, grad_weight_ih, grad_weight_hh,
// grad_bias_ih [D, 3H], grad_bias_hh [D, 3H], grad_hx).

// Inference from a projected input: projected [T, B, D, 3H] = input W_ih^T + bias_ih of each
// direction (bias_hh stays apart, inside the reset gate). Returns (output, h_n).
void check_gru_layer_projected_args(const at::Tensor& projected, const at::Tensor& weight_hh,
                                    const std::optional<at::Tensor>& bias_hh, const at::Tensor& hx,
                                    const std::optional<at::Tensor>& lengths);
void check_gru_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const at::Tensor& hx, const std::optional<at::Tensor>& lengths);

// gru_layer_backward's arguments, for the CPU and CUDA kernels alike.
void check_gru_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output, const at::Tensor& gates);

}  // namespace seqfuse
