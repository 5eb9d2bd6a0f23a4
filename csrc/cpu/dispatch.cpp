// The run-time choice of the CPU kernels' capability, and the ops' CPU (and Meta)
// registrations, which forward each call to the active capability's table (kernels.h).
#include "amx.h"
#include "kernels.h"

#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>

namespace seqfuse {
namespace {

// The capabilities, lowest first; "amx" is the AVX512_BF16 kernels with AMX tile products.
enum Cap : int { kDefault, kAvx2, kAvx512, kAvx512Bf16, kAmx, kNumCaps };

constexpr std::array<const char*, kNumCaps> kNames = {"default", "avx2", "avx512", "avx512_bf16",
                                                      "amx"};

// The table compiled for a capability, or nullptr.
const CpuKernels* compiled(int cap) {
  switch (cap) {
#if defined(SEQFUSE_CPU_KERNELS_DEFAULT)
    case kDefault: return &DEFAULT::kCpuKernels;
#endif
#if defined(SEQFUSE_CPU_KERNELS_AVX2)
    case kAvx2: return &AVX2::kCpuKernels;
#endif
#if defined(SEQFUSE_CPU_KERNELS_AVX512)
    case kAvx512: return &AVX512::kCpuKernels;
#endif
#if defined(SEQFUSE_CPU_KERNELS_AVX512_BF16)
    case kAvx512Bf16:
    case kAmx: return &AVX512_BF16::kCpuKernels;
#endif
    default: return nullptr;
  }
}

// Whether this CPU (and OS: libgcc's cpu model checks that XCR0 enables the AVX and
// AVX-512 state) runs the capability's instructions.
bool cpu_supports(int cap) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  // AVX512_BF16 is compiled with AVX512-VNNI too (the int8 kernels): every CPU with
  // AVX512-BF16 has it.
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
  switch (cap) {
    case kDefault: return true;
    case kAvx2: return avx2;
    case kAvx512: return avx512;
    case kAvx512Bf16: return bf16;
    case kAmx: return bf16 && amx_bf16_available();
    default: return false;
  }
#else
  return cap == kDefault;
#endif
}

bool usable(int cap) { return compiled(cap) != nullptr && cpu_supports(cap); }

// The best usable capability at or below `cap`, or -1.
int best_at_most(int cap) {
  for (int c = cap; c >= 0; --c)
    if (usable(c)) return c;
  return -1;
}

int parse(const std::string& text, const char* what) {
  std::string name(text);
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  for (int c = 0; c < kNumCaps; ++c)
    if (name == kNames[c]) return c;
  TORCH_CHECK_VALUE(false, what, " '", text, "' is not a CPU capability: use one of default, avx2, "
              "avx512, avx512_bf16, amx");
}

// The capability asked for, lowered to what the CPU and build support (with a warning).
int choose(int wanted, const char* what) {
  const int cap = best_at_most(wanted);
  TORCH_CHECK(cap >= 0, "seqfuse: this build has no CPU kernels this CPU can run (compiled: ",
              [] {
                std::string s;
                for (int c = 0; c < kNumCaps; ++c)
                  if (compiled(c)) s += std::string(s.empty() ? "" : ", ") + kNames[c];
                return s;
              }(), ")");
  if (cap != wanted && what[0] != '\0')  // "": nothing was asked for, the best runs
    TORCH_WARN(what, " asks for the CPU capability '", kNames[wanted], "', which this ",
               compiled(wanted) ? "CPU" : "build", " does not support: running '", kNames[cap],
               "'");
  return cap;
}

std::atomic<int> g_active{-1};  // process-wide: the capability every kernel call runs
std::mutex g_choose;            // process-wide: guards the first choice and set_cpu_capability

int active() {
  const int cap = g_active.load(std::memory_order_acquire);
  if (cap >= 0) return cap;
  std::lock_guard<std::mutex> lock(g_choose);
  if (g_active.load(std::memory_order_relaxed) < 0) {
    // An unknown name raises on every call (nothing is stored), naming the variable.
    const char* forced = std::getenv("SEQFUSE_CPU_CAPABILITY");
    const int chosen = forced != nullptr && forced[0] != '\0'
                           ? choose(parse(forced, "SEQFUSE_CPU_CAPABILITY"), "SEQFUSE_CPU_CAPABILITY")
                           : choose(kNumCaps - 1, "");
    g_active.store(chosen, std::memory_order_release);
  }
  return g_active.load(std::memory_order_relaxed);
}

// op(args...) on the active capability's kernel: one function per table entry, with the
// kernel's own signature (which m.impl checks against the op's schema).
template <auto Entry>
struct Forward;
template <typename R, typename... Args, R (*CpuKernels::*Entry)(Args...)>
struct Forward<Entry> {
  static R call(Args... args) { return (active_cpu_kernels().*Entry)(args...); }
};

}  // namespace

const CpuKernels& active_cpu_kernels() { return *compiled(active()); }

bool amx_bf16_usable() { return active() == kAmx; }

std::string cpu_capability() { return kNames[active()]; }

std::string set_cpu_capability(const std::string& name) {
  const int wanted = parse(name, "set_cpu_capability: capability");
  std::string previous;
  try {
    previous = cpu_capability();
  } catch (const c10::Error&) {  // a bad SEQFUSE_CPU_CAPABILITY: replaced by this choice
  }
  std::lock_guard<std::mutex> lock(g_choose);
  g_active.store(choose(wanted, ""), std::memory_order_release);  // Python warns (ops/__init__.py)
  return previous;
}

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (int c = 0; c < kNumCaps; ++c)
    if (usable(c)) names.emplace_back(kNames[c]);
  return names;
}

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // seqfuse.cpu_capability(), seqfuse.set_cpu_capability(), seqfuse.cpu_capabilities().
  m.def("cpu_capability() -> str", [] { return cpu_capability(); });
  m.def("set_cpu_capability(str name) -> str",
        [](c10::string_view name) { return set_cpu_capability(std::string(name)); });
  m.def("cpu_capabilities() -> str[]", [] { return cpu_capabilities(); });
}

#define SEQFUSE_FORWARD(entry) &Forward<&CpuKernels::entry>::call

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("lstm_layer", SEQFUSE_FORWARD(lstm_layer));
  m.impl("lstm_layer_backward", SEQFUSE_FORWARD(lstm_layer_backward));
  m.impl("lstm_layer_projected", SEQFUSE_FORWARD(lstm_layer_projected));
  m.impl("lstm_proj_layer", SEQFUSE_FORWARD(lstm_proj_layer));
  m.impl("lstm_proj_layer_backward", SEQFUSE_FORWARD(lstm_proj_layer_backward));
  m.impl("gru_layer", SEQFUSE_FORWARD(gru_layer));
  m.impl("gru_layer_backward", SEQFUSE_FORWARD(gru_layer_backward));
  m.impl("gru_layer_projected", SEQFUSE_FORWARD(gru_layer_projected));
  m.impl("rnn_layer", SEQFUSE_FORWARD(rnn_layer));
  m.impl("rnn_layer_backward", SEQFUSE_FORWARD(rnn_layer_backward));
  m.impl("pack_recurrent_weights", SEQFUSE_FORWARD(pack_recurrent_weights));
  m.impl("additive_attention", SEQFUSE_FORWARD(additive_attention));
  m.impl("additive_attention_backward", SEQFUSE_FORWARD(additive_attention_backward));
  m.impl("scaled_dot_product_attention", SEQFUSE_FORWARD(scaled_dot_product_attention));
  m.impl("scaled_dot_product_attention_backward",
         SEQFUSE_FORWARD(scaled_dot_product_attention_backward));
  m.impl("quantized_rnn_layer", SEQFUSE_FORWARD(quantized_rnn_layer));
}

TORCH_LIBRARY_IMPL(seqfuse, Meta, m) {
  m.impl("pack_recurrent_weights", SEQFUSE_FORWARD(pack_recurrent_weights_meta));
}

#undef SEQFUSE_FORWARD

}  // namespace seqfuse
