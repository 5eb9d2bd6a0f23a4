// The backward's large GEMMs (weight and input gradients over all T * B rows): at::mm, or
// oneDNN's matmul where at::mm's BLAS is the slower of the two. torch's MKL takes its
// AVX2 code path on AMD CPUs: [2048 x 1024] x [1024 x 256] in float32 took 4.9 ms there
// against 2.1 ms in oneDNN (AMD EPYC, 2 threads, docs/RESULTS.md), and the LSTM backward
// spent 70% of its time in these GEMMs. On Intel CPUs at::mm stays (MKL's own CPUs).
// SEQFUSE_GEMM=blas or =onednn overrides the choice.
#pragma once

#include <ATen/core/Tensor.h>

namespace seqfuse {

// out = a @ b (2-D; out contiguous, of a's dtype).
void large_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
at::Tensor large_mm(const at::Tensor& a, const at::Tensor& b);

// "onednn" or "blas": what float32 GEMMs of large_mm run on.
const char* large_mm_backend();

}  // namespace seqfuse
