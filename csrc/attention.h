// The fused attention ops: declarations shared by the op registration, the CPU kernels
// and the tests.
//
// Masks. Both ops take `valid_lens` (the classic models' convention) and an explicit mask;
// both may be given, and a key then takes part only where both allow it:
//   valid_lens  [B] or [B, Q] int64 on the input's device: row (b, q) sees keys
//               k < valid_lens[b] (or valid_lens[b, q]); 0 <= valid_lens <= K
// A query row with no key left gives zeros (output, weights, and every gradient it
// sends back), never NaN.
//
// Additive (Bahdanau) attention, on projected queries and keys:
//   score[b, q, k] = w_v . tanh(query[b, q] + key[b, k])
//   weights = masked softmax of score over k;  context = weights @ value
//   query   [B, Q, A]     key [B, K, A]     w_v [A]     value [B, K, Dv]
//   mask    bool, broadcastable to [B, Q, K], true = attend
//   context [B, Q, Dv]    weights [B, Q, K] (zero where masked; saved for the backward)
// The [B, Q, K, A] tensor of tanh features is never formed: scores are computed one
// (query row, key row) pair at a time, and the backward recomputes tanh.
//
// Scaled dot-product attention (flash-style: key blocks with an online softmax, so no
// [Q, K] matrix is formed beyond one block of rows):
//   query [B, H, Q, D]    key [B, H, K, D]    value [B, H, K, Dv]
//   attn_mask  bool (true = attend) or floating (added to the scores), broadcastable to
//              [B, H, Q, K]
//   is_causal  query q sees keys k <= q (top-left aligned, as torch)
//   scale      default 1/sqrt(D)
//   dropout_p, seed  dropout on the attention weights; the keep/drop decision of
//              (b, h, q, k) is a hash of (seed, index), so the backward recomputes it
//              instead of storing a mask (sdpa_dropout_keep below is the definition)
//   output [B, H, Q, Dv]  softmax_stats [B, H, Q, 2] float32/64: each row's maximum score m
//              and log of its sum of exp(s - m); (+inf, 0) for a row with no key. Apart
//              rather than summed to a logsumexp: m + log(l) rounds to m when |m| is huge
//              (a finfo.min mask on every key). Every backend saves this same layout.
#pragma once

#include "check_format.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

// The dropout hash below runs on the host and in the CUDA kernels. Defined as in
// cell_math.h (one definition whichever header comes first).
#ifndef SEQFUSE_HD
#if defined(__CUDACC__)
#define SEQFUSE_HD __host__ __device__ __forceinline__
#else
#define SEQFUSE_HD inline
#endif
#endif

namespace seqfuse {

// The CPU kernels' signatures are in cpu/kernels.h; the notes below are the ops'.

// grad_context [B, Q, Dv]; grad_weights [B, Q, K] (zeros when the weights were not used).
// Returns (grad_query, grad_key, grad_w_v, grad_value).

void check_additive_attention_args(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& w_v, const at::Tensor& value,
                                   const std::optional<at::Tensor>& valid_lens,
                                   const std::optional<at::Tensor>& mask);

void check_sdpa_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& attn_mask,
                     const std::optional<at::Tensor>& valid_lens, std::optional<double> scale,
                     double dropout_p);

// The backward ops' arguments (the forward's, then the gradients and saved tensors), for
// the CPU and CUDA kernels alike.
void check_additive_attention_backward_args(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& w_v, const at::Tensor& value,
    const at::Tensor& weights);

void check_sdpa_backward_args(const at::Tensor& grad_output, const at::Tensor& query,
                              const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& valid_lens,
                              const at::Tensor& output, const at::Tensor& softmax_stats,
                              std::optional<double> scale, double dropout_p);

// Dropout decision for element `index` = ((b * H + h) * Q + q) * K + k: murmur3's 32-bit
// finaliser over the index's two halves and the seed; keep when the top 24 bits are at
// least dropout_p * 2^24. seqfuse.reference computes the same hash in torch ops.
SEQFUSE_HD uint32_t sdpa_fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}
SEQFUSE_HD uint32_t sdpa_dropout_hash(int64_t seed, uint64_t index) {
  const uint32_t s = sdpa_fmix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  return sdpa_fmix32(static_cast<uint32_t>(index) ^ sdpa_fmix32(static_cast<uint32_t>(index >> 32) ^ s));
}
SEQFUSE_HD uint32_t sdpa_dropout_threshold(double dropout_p) {
  return static_cast<uint32_t>(dropout_p * 16777216.0 + 0.5);
}
SEQFUSE_HD bool sdpa_dropout_keep(uint32_t hash, uint32_t threshold) { return (hash >> 8) >= threshold; }

}  // namespace seqfuse
