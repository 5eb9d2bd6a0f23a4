// The CPU kernels of one capability (vector ISA), as a table, and the run-time choice among
// the capabilities this build compiled.
//
// csrc/cpu/kernels/*.cpp are compiled once per capability (setup.py, CMakeLists.txt): with
// no ISA flags (DEFAULT), -mavx2 -mfma (AVX2), -mavx512{f,bw,vl,dq} (AVX512) and those plus
// -mavx512bf16 (AVX512_BF16), each time with CPU_CAPABILITY set to the capability's name,
// so that their code (and ATen's Vectorized, and our fast_math.h and tile_gemm.h) lands in
// namespace seqfuse::<CPU_CAPABILITY>, as ATen does for its own kernels. Each compilation
// defines that namespace's kCpuKernels (kernels/kernel_table.cpp). Everything else in the
// library is compiled for the baseline x86-64 and never executes an instruction its CPU
// lacks: dispatch.cpp registers the ops and forwards each call to the table of the active
// capability (the best the CPU supports; SEQFUSE_CPU_CAPABILITY or set_cpu_capability()
// choose a lower one). AMX is the AVX512_BF16 table with the tile products on (amx.h).
//
// One rule keeps this safe: the baseline objects link first and the capabilities' objects
// follow in increasing order, because the linker keeps the first copy of an inline function
// that several objects emit (torch's headers, std::). A copy from an AVX-512 object is
// therefore only ever kept when no lower object has one, and such a function is only called
// from AVX-512 code. tests/ops/test_cpu_dispatch.py disassembles the library to check it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace seqfuse {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The kernels' signatures (the ops' schemas in csrc/ops.cpp; shapes in lstm.h, gru.h,
// rnn.h and attention.h). A kernel source declares nothing else: a definition that drifts
// from its type here fails to link.
using LstmLayerFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias,
    const Tensor& hx, const Tensor& cx, const OptTensor& lengths, bool keep_activations,
    const OptTensor& packed_weights);
using LstmLayerBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& hx,
    const Tensor& cx, const OptTensor& lengths, const Tensor& output, const Tensor& gates,
    const Tensor& cells);
using LstmLayerProjectedFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor& projected, const Tensor& weight_hh, const Tensor& hx, const Tensor& cx,
    const OptTensor& lengths, const OptTensor& packed_weights);
using LstmProjLayerFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias,
    const Tensor& weight_hr, const Tensor& hx, const Tensor& cx, const OptTensor& lengths,
    bool keep_activations);
using LstmProjLayerBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh,
    const Tensor& weight_hr, const Tensor& hx, const Tensor& cx, const OptTensor& lengths,
    const Tensor& output, const Tensor& gates, const Tensor& cells);
using GruLayerFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh,
    const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& hx,
    const OptTensor& lengths, bool keep_activations, const OptTensor& packed_weights);
using GruLayerBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& hx, const OptTensor& lengths,
    const Tensor& output, const Tensor& gates);
using GruLayerProjectedFn = std::tuple<Tensor, Tensor>(
    const Tensor& projected, const Tensor& weight_hh, const OptTensor& bias_hh, const Tensor& hx,
    const OptTensor& lengths, const OptTensor& packed_weights);
using RnnLayerFn = std::tuple<Tensor, Tensor>(
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias,
    const Tensor& hx, const OptTensor& lengths, c10::string_view nonlinearity,
    const OptTensor& packed_weights);
using RnnLayerBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& hx, const OptTensor& lengths,
    const Tensor& output, c10::string_view nonlinearity);
// pack_recurrent_weights: the panels' layout depends on the capability's vector width, so
// its Meta kernel (the shape torch.export traces) is per capability too.
using PackRecurrentWeightsFn = Tensor(const Tensor& weight_ih, const Tensor& weight_hh);
using AdditiveAttentionFn = std::tuple<Tensor, Tensor>(
    const Tensor& query, const Tensor& key, const Tensor& w_v, const Tensor& value,
    const OptTensor& valid_lens, const OptTensor& mask);
using AdditiveAttentionBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& query,
    const Tensor& key, const Tensor& w_v, const Tensor& value, const Tensor& weights);
using SdpaFn = std::tuple<Tensor, Tensor>(
    const Tensor& query, const Tensor& key, const Tensor& value, const OptTensor& attn_mask,
    const OptTensor& valid_lens, bool is_causal, std::optional<double> scale, double dropout_p,
    int64_t seed);
using SdpaBackwardFn = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor& grad_output, const Tensor& query, const Tensor& key, const Tensor& value,
    const OptTensor& attn_mask, const OptTensor& valid_lens, const Tensor& output,
    const Tensor& softmax_stats, bool is_causal, std::optional<double> scale, double dropout_p,
    int64_t seed);

using QuantizedRnnLayerFn = std::tuple<Tensor, Tensor, Tensor>(
    c10::string_view mode, const Tensor& input, const Tensor& weight_ih, const Tensor& scale_ih,
    const Tensor& weight_hh, const Tensor& scale_hh, const OptTensor& bias_ih,
    const OptTensor& bias_hh, const Tensor& hx, const OptTensor& cx, const OptTensor& lengths);

struct CpuKernels {
  LstmLayerFn* lstm_layer;
  LstmLayerBackwardFn* lstm_layer_backward;
  LstmLayerProjectedFn* lstm_layer_projected;
  LstmProjLayerFn* lstm_proj_layer;
  LstmProjLayerBackwardFn* lstm_proj_layer_backward;
  GruLayerFn* gru_layer;
  GruLayerBackwardFn* gru_layer_backward;
  GruLayerProjectedFn* gru_layer_projected;
  RnnLayerFn* rnn_layer;
  RnnLayerBackwardFn* rnn_layer_backward;
  PackRecurrentWeightsFn* pack_recurrent_weights;
  PackRecurrentWeightsFn* pack_recurrent_weights_meta;
  AdditiveAttentionFn* additive_attention;
  AdditiveAttentionBackwardFn* additive_attention_backward;
  SdpaFn* scaled_dot_product_attention;
  SdpaBackwardFn* scaled_dot_product_attention_backward;
  QuantizedRnnLayerFn* quantized_rnn_layer;
};

// Each compiled capability's table (constant-initialised: loading the library runs no code
// of a capability, so an AVX-512 object never executes on a CPU without AVX-512). Declared
// for dispatch.cpp only: a kernel source's own namespace is inline (kernel_table.cpp).
#if !defined(CPU_CAPABILITY)
#define SEQFUSE_DECLARE_CPU_KERNELS(cap) \
  namespace cap {                        \
  extern const CpuKernels kCpuKernels;   \
  }
#if defined(SEQFUSE_CPU_KERNELS_DEFAULT)
SEQFUSE_DECLARE_CPU_KERNELS(DEFAULT)
#endif
#if defined(SEQFUSE_CPU_KERNELS_AVX2)
SEQFUSE_DECLARE_CPU_KERNELS(AVX2)
#endif
#if defined(SEQFUSE_CPU_KERNELS_AVX512)
SEQFUSE_DECLARE_CPU_KERNELS(AVX512)
#endif
#if defined(SEQFUSE_CPU_KERNELS_AVX512_BF16)
SEQFUSE_DECLARE_CPU_KERNELS(AVX512_BF16)
#endif
#undef SEQFUSE_DECLARE_CPU_KERNELS
#endif

// The active capability's kernels (dispatch.cpp). The first call settles the choice from
// SEQFUSE_CPU_CAPABILITY and cpuid; an unknown name there raises, naming the variable.
const CpuKernels& active_cpu_kernels();

// The capability the kernels run with: "amx", "avx512_bf16", "avx512", "avx2" or "default".
std::string cpu_capability();

// Makes `name` the active capability, or the best one at or below it that this CPU and
// build support (cpu_capability() says which), and returns the previous one. For tests
// and benchmarks: a call running meanwhile finishes on the kernels it started with.
std::string set_cpu_capability(const std::string& name);

// The capabilities this CPU and build support, lowest first.
std::vector<std::string> cpu_capabilities();

}  // namespace seqfuse
