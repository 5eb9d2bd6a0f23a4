// The fused Elman RNN layer: declarations shared by the op registration, the CPU kernel
// and the tests. One call runs one layer in one or both directions:
//   h' = act(W_ih x + W_hh h + b),   act = tanh or relu,   b = b_ih + b_hh
//
// Shapes (D = directions; T = time steps; B = batch; I = input; H = hidden):
//   input      [T, B, I]          time-major
//   weight_ih  [D, H, I]
//   weight_hh  [D, H, H]
//   bias       [D, H] or absent   b_ih + b_hh (they only ever appear summed)
//   hx         [D, B, H]
//   lengths    [B] int64 on CPU, 1 <= lengths[b] <= T, or absent (all T)
//   nonlinearity  "tanh" or "relu"
// Outputs:
//   output     [T, B, D*H]        zero past each sequence's length
//   h_n        [D, B, H]          state at each sequence's last valid step
// Nothing else is saved for the backward: the derivative of either activation is a
// function of its output (1 - h'^2, or h' > 0), and the output is kept anyway.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace seqfuse {

// The CPU kernels' signatures are in cpu/kernels.h; the notes below are the ops'.

// Gradients of rnn_layer. grad_output: [T, B, D*H]; grad_h_n: [D, B, H]; the rest are
// rnn_layer's inputs and output. Returns (grad_input, grad_weight_ih, grad_weight_hh,
// grad_bias [D, H], grad_hx).

void check_rnn_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, c10::string_view nonlinearity);

// rnn_layer_backward's arguments, for the CPU and CUDA kernels alike.
void check_rnn_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& hx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output,
    c10::string_view nonlinearity);

}  // namespace seqfuse
