// Every seqfuse op schema, declared once for all devices so that TorchScript,
// torch.export and C++ loaders see the same ops whatever hardware is present.
// Kernels attach per device in cpu/*.cpp and cuda/*.cu.
#include <torch/library.h>

TORCH_LIBRARY(seqfuse, m) {
  // One LSTM layer, both directions in one call; see lstm.h for the shapes.
  m.def(
      "lstm_layer(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, "
      "Tensor hx, Tensor cx, Tensor? lengths, bool keep_activations=True, "
      "Tensor? packed_weights=None) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor hx, Tensor cx, "
      "Tensor? lengths, Tensor output, Tensor gates, Tensor cells) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias, Tensor grad_hx, Tensor grad_cx)");
  // One LSTM layer with a projection (torch.nn.LSTM's proj_size); see lstm.h.
  m.def(
      "lstm_proj_layer(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, "
      "Tensor weight_hr, Tensor hx, Tensor cx, Tensor? lengths, bool keep_activations=True) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_proj_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor weight_hr, Tensor hx, Tensor cx, "
      "Tensor? lengths, Tensor output, Tensor gates, Tensor cells) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias, Tensor grad_weight_hr, Tensor grad_hx, Tensor grad_cx)");
  // int8 dynamically quantised LSTM or GRU layer, inference only; see quantized.h.
  m.def(
      "quantized_rnn_layer(str mode, Tensor input, Tensor weight_ih, Tensor scale_ih, "
      "Tensor weight_hh, Tensor scale_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor hx, "
      "Tensor? cx, Tensor? lengths) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // One GRU layer, both directions in one call; see gru.h.
  m.def(
      "gru_layer(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor hx, Tensor? lengths, bool keep_activations=True, "
      "Tensor? packed_weights=None) -> (Tensor output, Tensor h_n, Tensor gates)");
  m.def(
      "gru_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor hx, Tensor? lengths, Tensor output, Tensor gates) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh, Tensor grad_hx)");
  // One Elman RNN layer (tanh or relu), both directions in one call; see rnn.h.
  m.def(
      "rnn_layer(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, Tensor hx, "
      "Tensor? lengths, str nonlinearity=\"tanh\", Tensor? packed_weights=None) -> "
      "(Tensor output, Tensor h_n)");
  m.def(
      "rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor hx, Tensor? lengths, Tensor output, str nonlinearity=\"tanh\") -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_hx)");
  // Inference from a projected input: `projected` [T, B, D, G] = x W_ih^T + b_ih (the LSTM's
  // b_ih + b_hh) of each direction, e.g. an embedding folded through W_ih and gathered per
  // token. No backward: the modules use it only when no gradient is needed.
  m.def(
      "lstm_layer_projected(Tensor projected, Tensor weight_hh, Tensor hx, Tensor cx, "
      "Tensor? lengths, Tensor? packed_weights=None) -> (Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "gru_layer_projected(Tensor projected, Tensor weight_hh, Tensor? bias_hh, Tensor hx, "
      "Tensor? lengths, Tensor? packed_weights=None) -> (Tensor output, Tensor h_n)");
  // The recurrent weights [D, G, I] and [D, G, H] in the tile panels the CPU kernels read
  // (float32/float64), for the packed_weights argument above: a module that keeps its
  // weights packed across inference calls saves the packing every call repeats (a third
  // of a 16-step BiLSTM call). The caller keeps them matched to the weights it passes.
  m.def("pack_recurrent_weights(Tensor weight_ih, Tensor weight_hh) -> Tensor");
  // Masked additive (Bahdanau) attention and masked scaled dot-product attention; see
  // attention.h for the shapes and the mask conventions.
  m.def(
      "additive_attention(Tensor query, Tensor key, Tensor w_v, Tensor value, "
      "Tensor? valid_lens, Tensor? mask) -> (Tensor context, Tensor weights)");
  m.def(
      "additive_attention_backward(Tensor grad_context, Tensor grad_weights, Tensor query, "
      "Tensor key, Tensor w_v, Tensor value, Tensor weights) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_w_v, Tensor grad_value)");
  m.def(
      "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? valid_lens, bool is_causal=False, float? scale=None, float dropout_p=0.0, "
      "int seed=0) -> (Tensor output, Tensor softmax_stats)");
  m.def(
      "scaled_dot_product_attention_backward(Tensor grad_output, Tensor query, Tensor key, "
      "Tensor value, Tensor? attn_mask, Tensor? valid_lens, Tensor output, Tensor softmax_stats, "
      "bool is_causal, float? scale, float dropout_p, int seed) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}
