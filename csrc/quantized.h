// int8 dynamically quantised LSTM and GRU layers (inference): the op
// quantized_rnn_layer(mode, input, weight_ih, scale_ih, weight_hh, scale_hh, bias_ih,
// bias_hh, hx, cx, lengths) -> (output, h_n, c_n).
//
// Shapes (D directions, T steps, B batch, I input, H hidden, G = 4H for "lstm", 3H for "gru"):
//   input               [T, B, I] float32, time-major
//   weight_ih, _hh      [D, G, I], [D, G, H] int8 (torch's gate order)
//   scale_ih, _hh       [D, G] float32 > 0: weight = int8 * scale, per row
//   bias_ih             [D, G] float32 or absent: the LSTM's b_ih + b_hh, the GRU's b_ih
//   bias_hh             [D, G] float32 or absent: the GRU's b_hh (inside r * (.)); absent for the LSTM
//   hx, cx              [D, B, H] float32 (cx: LSTM only)
//   lengths             [B] int64 on CPU, 1 <= lengths[b] <= T, or absent
// Outputs: output [T, B, D*H] (zero past each length), h_n [D, B, H], c_n [D, B, H] (LSTM;
// [0] for the GRU). Activations are quantised per row and step (csrc/cpu/kernels/quantized_cpu.cpp).
#pragma once

#include "check_format.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace seqfuse {

void check_quantized_rnn_layer_args(
    c10::string_view mode, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& scale_ih, const at::Tensor& weight_hh, const at::Tensor& scale_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    const std::optional<at::Tensor>& lengths);

}  // namespace seqfuse
