// Every seqfuse op schema, declared once for all devices so that TorchScript,
// torch.export and C++ loaders see the same ops whatever hardware is present.
// Kernels attach per device in cpu/*.cpp and cuda/*.cu.
#include <torch/library.h>

TORCH_LIBRARY(seqfuse, m) {
  // One LSTM layer, both directions in one call; see lstm.h for the shapes.
  m.def(
      "lstm_layer(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, "
      "Tensor hx, Tensor cx, Tensor? lengths, bool keep_activations=True) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor hx, Tensor cx, "
      "Tensor? lengths, Tensor output, Tensor gates, Tensor cells) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias, Tensor grad_hx, Tensor grad_cx)");
  // One GRU layer, both directions in one call; see gru.h.
  m.def(
      "gru_layer(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor hx, Tensor? lengths, bool keep_activations=True) -> "
      "(Tensor output, Tensor h_n, Tensor gates)");
  m.def(
      "gru_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor hx, Tensor? lengths, Tensor output, Tensor gates) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh, Tensor grad_hx)");
  // One Elman RNN layer (tanh or relu), both directions in one call; see rnn.h.
  m.def(
      "rnn_layer(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, Tensor hx, "
      "Tensor? lengths, str nonlinearity=\"tanh\") -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor hx, Tensor? lengths, Tensor output, str nonlinearity=\"tanh\") -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_hx)");
}
