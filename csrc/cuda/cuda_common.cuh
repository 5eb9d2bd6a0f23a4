// What every seqfuse CUDA source needs: the current stream, checked launches and the
// device activation policy of cell_math.h.
//
// Only c10/cuda headers are used for streams and guards (ATen/cuda/CUDAContext.h pulls in
// cuBLAS/cuSPARSE headers): GEMMs are ATen calls (at::matmul/at::addmm/at::bmm) made
// from host code, which reach cuBLAS through torch.
#pragma once

#include "../cell_math.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace seqfuse {
namespace cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// cell_math.h's activation policy on the device: one float per thread. __expf is the
// hardware exp2-based approximation (~2 ulp), the accuracy cuDNN's cells use.
struct DeviceAct {
  static __device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }
  static __device__ __forceinline__ float tanh(float x) { return tanhf(x); }
  static __device__ __forceinline__ float relu(float x) { return fmaxf(x, 0.0f); }
  static __device__ __forceinline__ float fma(float a, float b, float c) { return fmaf(a, b, c); }
  static __device__ __forceinline__ float relu_grad(float dy, float y) { return y > 0.0f ? dy : 0.0f; }
  // float64 layers compute in double throughout (the tests' tight oracle).
  static __device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
  static __device__ __forceinline__ double tanh(double x) { return ::tanh(x); }
  static __device__ __forceinline__ double relu(double x) { return fmax(x, 0.0); }
  static __device__ __forceinline__ double fma(double a, double b, double c) { return ::fma(a, b, c); }
  static __device__ __forceinline__ double relu_grad(double dy, double y) { return y > 0.0 ? dy : 0.0; }
};

// The type a kernel computes in: double for double, float for float and the half types.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Loads float/double/half/bfloat16 (c10 types) in the compute type, and stores it back.
template <typename T>
__device__ __forceinline__ acc_t<T> load_acc(const T* p) { return static_cast<acc_t<T>>(*p); }
template <typename T>
__device__ __forceinline__ void store_acc(T* p, acc_t<T> v) { *p = static_cast<T>(v); }

}  // namespace cuda
}  // namespace seqfuse

// The dtypes every CUDA kernel takes: float32, float64 and the two half types (which
// accumulate in float32).
#define SEQFUSE_DISPATCH_CUDA_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
