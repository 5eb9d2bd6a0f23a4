// This capability's kernel table (kernels.h): the entry points of the kernel sources of
// this directory, compiled with the same CPU_CAPABILITY.
#include "../kernels.h"

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/kernels/ is compiled once per capability, with CPU_CAPABILITY set (setup.py)"
#endif

namespace seqfuse {
inline namespace CPU_CAPABILITY {

// Defined in recurrent_cpu.cpp, lstm_proj_cpu.cpp, attention_cpu.cpp and quantized_cpu.cpp.
LstmLayerFn lstm_layer_cpu;
LstmLayerBackwardFn lstm_layer_backward_cpu;
LstmLayerProjectedFn lstm_layer_projected_cpu;
LstmProjLayerFn lstm_proj_layer_cpu;
LstmProjLayerBackwardFn lstm_proj_layer_backward_cpu;
GruLayerFn gru_layer_cpu;
GruLayerBackwardFn gru_layer_backward_cpu;
GruLayerProjectedFn gru_layer_projected_cpu;
RnnLayerFn rnn_layer_cpu;
RnnLayerBackwardFn rnn_layer_backward_cpu;
PackRecurrentWeightsFn pack_recurrent_weights_cpu;
PackRecurrentWeightsFn pack_recurrent_weights_meta;
AdditiveAttentionFn additive_attention_cpu;
AdditiveAttentionBackwardFn additive_attention_backward_cpu;
SdpaFn scaled_dot_product_attention_cpu;
SdpaBackwardFn scaled_dot_product_attention_backward_cpu;
QuantizedRnnLayerFn quantized_rnn_layer_cpu;

extern const CpuKernels kCpuKernels;
const CpuKernels kCpuKernels = {
    &lstm_layer_cpu,
    &lstm_layer_backward_cpu,
    &lstm_layer_projected_cpu,
    &lstm_proj_layer_cpu,
    &lstm_proj_layer_backward_cpu,
    &gru_layer_cpu,
    &gru_layer_backward_cpu,
    &gru_layer_projected_cpu,
    &rnn_layer_cpu,
    &rnn_layer_backward_cpu,
    &pack_recurrent_weights_cpu,
    &pack_recurrent_weights_meta,
    &additive_attention_cpu,
    &additive_attention_backward_cpu,
    &scaled_dot_product_attention_cpu,
    &scaled_dot_product_attention_backward_cpu,
    &quantized_rnn_layer_cpu,
};

}  // namespace CPU_CAPABILITY
}  // namespace seqfuse
