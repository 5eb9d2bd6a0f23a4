// The per-element math of the recurrent cells, forward and backward, written once for
// every backend: `__host__ __device__` on CUDA (V = float, one hidden unit per thread) and
// plain inline on CPU (V = at::vec::Vectorized<scalar_t>, one vector of units), so the CPU
// tests exercise the very formulas the CUDA kernels run.
//
// `Act` supplies the activations and the fused multiply-add for V:
//   Act::sigmoid(x), Act::tanh(x), Act::relu(x), Act::fma(a, b, c) = a * b + c,
//   Act::relu_grad(dy, y) = y > 0 ? dy : 0.
// Everything else is +, -, * on V and V(1.0f).
#pragma once

#if defined(__CUDACC__)
#define SEQFUSE_HD __host__ __device__ __forceinline__
#else
#define SEQFUSE_HD inline
#endif

namespace seqfuse {
namespace cell {

// ---- LSTM (PyTorch's gate order i, f, g, o) -----------------------------------------
// pi..po: pre-activations (x W_ih^T + h W_hh^T + b). Returns the activated gates (saved
// for the backward), the new cell state c and hidden state h.
template <typename Act, typename V>
SEQFUSE_HD void lstm_forward(V pi, V pf, V pg, V po, V c_prev, V& i, V& f, V& g, V& o, V& c,
                             V& h) {
  i = Act::sigmoid(pi);
  f = Act::sigmoid(pf);
  g = Act::tanh(pg);
  o = Act::sigmoid(po);
  c = Act::fma(f, c_prev, i * g);
  h = o * Act::tanh(c);
}

// One step back. dh: gradient reaching h_t (from the output, the next step and h_n);
// dc: gradient reaching c_t from the next step (or c_n). i..o: the saved gates; c: c_t;
// c_prev: c_{t-1}. Returns the pre-activation gradients and the gradient for c_{t-1}.
template <typename Act, typename V>
SEQFUSE_HD void lstm_backward(V dh, V dc, V i, V f, V g, V o, V c, V c_prev, V& di, V& df,
                              V& dg, V& d_o, V& dc_prev) {
  const V one(1.0f);
  const V tc = Act::tanh(c);
  const V dc_t = Act::fma(dh * o, one - tc * tc, dc);
  di = dc_t * g * i * (one - i);
  df = dc_t * c_prev * f * (one - f);
  dg = dc_t * i * (one - g * g);
  d_o = dh * tc * o * (one - o);
  dc_prev = dc_t * f;
}

// ---- GRU (PyTorch's formula, gate order r, z, n) ------------------------------------
//   r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r * h_n),
//   h' = (1 - z) * n + z * h
// x_*: input side (x W_i*^T + b_i*); h_*: recurrent side (h W_h*^T + b_h*), kept apart for
// n because r multiplies h_n only.
template <typename Act, typename V>
SEQFUSE_HD void gru_forward(V x_r, V x_z, V x_n, V h_r, V h_z, V h_n, V h_prev, V& r, V& z,
                            V& n, V& h) {
  r = Act::sigmoid(x_r + h_r);
  z = Act::sigmoid(x_z + h_z);
  n = Act::tanh(Act::fma(r, h_n, x_n));
  h = Act::fma(z, h_prev - n, n);
}

// One step back. dh: gradient reaching h_t; r, z, n, h_n: saved; h_prev: h_{t-1}.
// Returns the pre-activation gradients dr, dz, dn (of x_n + r * h_n), dh_n = dn * r (of the
// recurrent product h_n) and the direct part of dh_{t-1}, dh * z (the rest flows through
// W_hh).
template <typename Act, typename V>
SEQFUSE_HD void gru_backward(V dh, V r, V z, V n, V h_n, V h_prev, V& dr, V& dz, V& dn, V& dh_n,
                             V& dh_prev_direct) {
  const V one(1.0f);
  dn = dh * (one - z) * (one - n * n);
  dz = dh * (h_prev - n) * z * (one - z);
  dr = dn * h_n * r * (one - r);
  dh_n = dn * r;
  dh_prev_direct = dh * z;
}

// ---- Elman RNN: h' = act(pre), act = tanh or relu -----------------------------------
template <bool kRelu, typename Act, typename V>
SEQFUSE_HD V rnn_forward(V pre) {
  if constexpr (kRelu)
    return Act::relu(pre);
  else
    return Act::tanh(pre);
}

// Gradient of the pre-activation from dh and the output y = act(pre): both activations'
// derivatives are functions of y.
template <bool kRelu, typename Act, typename V>
SEQFUSE_HD V rnn_backward(V dh, V y) {
  if constexpr (kRelu)
    return Act::relu_grad(dh, y);
  else
    return dh * (V(1.0f) - y * y);
}

}  // namespace cell
}  // namespace seqfuse
