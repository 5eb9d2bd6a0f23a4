// large_mm (gemm.h): oneDNN's float32 matmul where it beats at::mm's BLAS.
#include "gemm.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

// ATen's oneDNN matmul (aten/src/ATen/native/mkldnn/Matmul.h, not among torch's installed
// headers): result = beta * result + alpha * mat1 @ mat2. Weak: a torch without it (or
// without oneDNN) leaves the address null, and at::mm runs.
namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                                         const at::Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace seqfuse {
namespace {

bool genuine_intel() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13];
  std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
  vendor[12] = '\0';
  return std::strcmp(vendor, "GenuineIntel") == 0;
#else
  return false;
#endif
}

bool use_onednn() {
  static const bool use = [] {
    if (&at::native::mkldnn_matmul == nullptr || !at::hasMKLDNN()) return false;
    const char* forced = std::getenv("SEQFUSE_GEMM");
    if (forced != nullptr && forced[0] != '\0') return std::strcmp(forced, "onednn") == 0;
    return !genuine_intel();
  }();
  return use;
}

}  // namespace

void large_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  // bfloat16 at::mm is oneDNN's already; empty and degenerate shapes stay with at::mm, and so
  // do operands with row gaps (a bidirectional GRU's dgates columns), which oneDNN took
  // 1.4x longer on than MKL (BiGRU B32 T128 H128 backward).
  const auto plain = [](const at::Tensor& t) { return t.is_contiguous() || t.t().is_contiguous(); };
  if (use_onednn() && plain(a) && plain(b) && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      out.scalar_type() == at::kFloat && a.dim() == 2 && b.dim() == 2 && out.is_contiguous() &&
      a.numel() > 0 && b.numel() > 0 && out.size(0) == a.size(0) && out.size(1) == b.size(1)) {
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
    return;
  }
  at::mm_out(out, a, b);
}

at::Tensor large_mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  large_mm_out(out, a, b);
  return out;
}

const char* large_mm_backend() { return use_onednn() ? "onednn" : "blas"; }

}  // namespace seqfuse
