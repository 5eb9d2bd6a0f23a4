// The fused LSTM layer: declarations shared by the op registration, the CPU kernel
// and the C++ tests. One call runs one layer in one or both directions.
//
// Shapes (D = directions, 1 or 2; T = time steps; B = batch; I = input; H = hidden):
//   input      [T, B, I]          time-major
//   weight_ih  [D, 4H, I]         PyTorch gate order i, f, g, o
//   weight_hh  [D, 4H, H]
//   bias       [D, 4H] or absent  b_ih + b_hh
//   hx, cx     [D, B, H]
//   lengths    [B] int64 on CPU, 1 <= lengths[b] <= T, or absent (all T)
// Outputs:
//   output     [T, B, D*H]        zero past each sequence's length
//   h_n, c_n   [D, B, H]          state at each sequence's last valid step
//   gates      [T, B, D, 4H]      activated gates (saved for backward); direction-inner so
//                                 that the input projection of both directions, and the
//                                 weight gradients, are each one GEMM
//   cells      [T, B, D, H]       cell state after each step (saved for backward)
// gates and cells are empty ([0]) when keep_activations is false (inference), which
// lets the kernel skip writing them.
#pragma once

#include "check_format.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace seqfuse {

// The CPU kernels' signatures are in cpu/kernels.h; the notes below are the ops'.

// Gradients of lstm_layer. grad_output: [T, B, D*H]; grad_h_n, grad_c_n: [D, B, H];
// the rest are lstm_layer's inputs and outputs. Returns
// (grad_input, grad_weight_ih, grad_weight_hh, grad_bias [D, 4H], grad_hx, grad_cx).

// packed_weights (every layer op, CPU): pack_recurrent_weights(weight_ih, weight_hh), the
// panels the kernel would pack, for inference in float32/float64 (csrc/ops.cpp).

// Inference from a projected input (csrc/ops.cpp): projected [T, B, D, 4H] = input W_ih^T +
// bias of each direction. Returns (output, h_n, c_n) as lstm_layer.
void check_lstm_layer_projected_args(const at::Tensor& projected, const at::Tensor& weight_hh,
                                     const at::Tensor& hx, const at::Tensor& cx,
                                     const std::optional<at::Tensor>& lengths);
// Shape/dtype/device checks shared by every backend: TORCH_CHECK with messages that
// name the argument, the expected and the actual value.
void check_lstm_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths);

// lstm_layer_backward's arguments (the forward's, then the gradients and saved
// activations), for the CPU and CUDA kernels alike.
void check_lstm_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& lengths,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells);

// The LSTM layer with a projection (torch.nn.LSTM's proj_size P < H): the cell's
// m_t = o * tanh(c_t) [H] is projected to h_t = W_hr m_t [P], the output and the recurrent
// input. Shapes as lstm_layer's, except weight_hh [D, 4H, P], weight_hr [D, P, H],
// hx and h_n [D, B, P], output [T, B, D*P]; cx, c_n [D, B, H]; gates and cells as lstm_layer's.

// Returns (grad_input, grad_weight_ih, grad_weight_hh, grad_bias [D, 4H], grad_weight_hr,
// grad_hx, grad_cx).

void check_lstm_proj_layer_args(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias, const at::Tensor& weight_hr, const at::Tensor& hx,
    const at::Tensor& cx, const std::optional<at::Tensor>& lengths);
void check_lstm_proj_layer_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& weight_hr, const at::Tensor& hx, const at::Tensor& cx,
    const std::optional<at::Tensor>& lengths, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells);

}  // namespace seqfuse
