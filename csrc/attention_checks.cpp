// Argument checks for the attention ops, shared by every device's kernel. Messages name
// the op, the argument, the expected and the actual value.
#include "attention.h"
#include "check_format.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace seqfuse {

namespace {

// The CUDA kernels index query rows and keys with 32-bit ints.
void check_cuda_sizes(const char* op, const at::Tensor& query, int64_t Q, int64_t K) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (query.is_cuda())
    TORCH_CHECK(Q <= kMax && K <= kMax, op,
                ": query and key must have fewer than 2^31 rows on CUDA (32-bit indices), got Q=",
                Q, " and K=", K);
}

void check_dtype_device(const char* op, const char* name, const at::Tensor& t,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name,
              " must have the query's dtype ", dtype_name(ref.scalar_type()), ", got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the query's device ",
              ref.device(), ", got ", t.device());
}

void check_floating(const char* op, const at::Tensor& query) {
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                  (dt == at::kHalf && query.is_cuda()),
              op, ": query dtype must be float32, float64 or bfloat16 (or float16 on CUDA), got ", dtype_name(dt));
}

// valid_lens: [B] or [B, Q], integer, on the query's device, values in [0, K].
void check_valid_lens(const char* op, const at::Tensor& lens, const at::Tensor& query, int64_t B,
                      int64_t Q, int64_t K) {
  TORCH_CHECK(at::isIntegralType(lens.scalar_type(), /*includeBool=*/false), op,
              ": valid_lens must be an integer tensor, got ", dtype_name(lens.scalar_type()));
  TORCH_CHECK(lens.device() == query.device(), op, ": valid_lens must be on the query's device ",
              query.device(), ", got ", lens.device());
  TORCH_CHECK((lens.dim() == 1 && lens.size(0) == B) ||
                  (lens.dim() == 2 && lens.size(0) == B && lens.size(1) == Q),
              op, ": valid_lens must be [B=", B, "] or [B, Q]=[", B, ", ", Q, "], got shape ",
              lens.sizes());
  if (lens.numel() == 0) return;
  const int64_t lo = lens.min().item<int64_t>(), hi = lens.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi <= K, op, ": valid_lens must be in [0, K=", K,
              "], got values in [", lo, ", ", hi, "]");
}

// A mask broadcastable to `target` (trailing-aligned, each size 1 or equal).
void check_mask_shape(const char* op, const char* name, const at::Tensor& mask,
                      at::IntArrayRef target) {
  bool ok = mask.dim() <= static_cast<int64_t>(target.size());
  for (int64_t i = 1; ok && i <= mask.dim(); ++i) {
    const int64_t m = mask.size(-i), t = target[target.size() - i];
    ok = m == 1 || m == t;
  }
  TORCH_CHECK(ok, op, ": ", name, " must be broadcastable to ", target, ", got shape ",
              mask.sizes());
}

}  // namespace

void check_additive_attention_args(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& w_v, const at::Tensor& value,
                                   const std::optional<at::Tensor>& valid_lens,
                                   const std::optional<at::Tensor>& mask) {
  const char* op = "additive_attention";
  TORCH_CHECK(query.dim() == 3, op, ": query must be 3-D [B, Q, A], got shape ", query.sizes());
  check_floating(op, query);
  const int64_t B = query.size(0), Q = query.size(1), A = query.size(2);
  TORCH_CHECK(B >= 1 && Q >= 1 && A >= 1, op, ": query must have B, Q, A >= 1, got shape ",
              query.sizes());
  TORCH_CHECK(key.dim() == 3 && key.size(0) == B && key.size(2) == A && key.size(1) >= 1, op,
              ": key must be [B=", B, ", K>=1, A=", A, "], got shape ", key.sizes());
  const int64_t K = key.size(1);
  TORCH_CHECK(w_v.dim() == 1 && w_v.size(0) == A, op, ": w_v must be [A=", A, "], got shape ",
              w_v.sizes());
  TORCH_CHECK(value.dim() == 3 && value.size(0) == B && value.size(1) == K, op,
              ": value must be [B=", B, ", K=", K, ", Dv], got shape ", value.sizes());
  check_dtype_device(op, "key", key, query);
  check_dtype_device(op, "w_v", w_v, query);
  check_cuda_sizes(op, query, Q, K);
  check_dtype_device(op, "value", value, query);
  if (valid_lens.has_value()) check_valid_lens(op, *valid_lens, query, B, Q, K);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool (True = attend), got ",
                dtype_name(mask->scalar_type()));
    TORCH_CHECK(mask->device() == query.device(), op, ": mask must be on the query's device ",
                query.device(), ", got ", mask->device());
    check_mask_shape(op, "mask", *mask, {B, Q, K});
  }
}

void check_sdpa_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& attn_mask,
                     const std::optional<at::Tensor>& valid_lens, std::optional<double> scale,
                     double dropout_p) {
  const char* op = "scaled_dot_product_attention";
  TORCH_CHECK(query.dim() == 4, op, ": query must be 4-D [B, H, Q, D], got shape ",
              query.sizes());
  check_floating(op, query);
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2), D = query.size(3);
  TORCH_CHECK(B >= 1 && H >= 1 && Q >= 1 && D >= 1, op,
              ": query must have B, H, Q, D >= 1, got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 4 && key.size(0) == B && key.size(1) == H && key.size(2) >= 1 &&
                  key.size(3) == D,
              op, ": key must be [B=", B, ", H=", H, ", K>=1, D=", D, "], got shape ", key.sizes());
  const int64_t K = key.size(2);
  TORCH_CHECK(value.dim() == 4 && value.size(0) == B && value.size(1) == H && value.size(2) == K &&
                  value.size(3) >= 1,
              op, ": value must be [B=", B, ", H=", H, ", K=", K, ", Dv>=1], got shape ",
              value.sizes());
  check_dtype_device(op, "key", key, query);
  check_dtype_device(op, "value", value, query);
  check_cuda_sizes(op, query, Q, K);
  if (attn_mask.has_value()) {
    const auto mt = attn_mask->scalar_type();
    TORCH_CHECK(mt == at::kBool || at::isFloatingType(mt), op,
                ": attn_mask must be bool (True = attend) or floating (added to the scores), got ",
                dtype_name(mt));
    TORCH_CHECK(attn_mask->device() == query.device(), op,
                ": attn_mask must be on the query's device ", query.device(), ", got ",
                attn_mask->device());
    check_mask_shape(op, "attn_mask", *attn_mask, {B, H, Q, K});
  }
  if (valid_lens.has_value()) check_valid_lens(op, *valid_lens, query, B, Q, K);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), op, ": scale must be finite, got ",
              scale.has_value() ? *scale : 0.0);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
}

void check_additive_attention_backward_args(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& w_v, const at::Tensor& value,
    const at::Tensor& weights) {
  const char* op = "additive_attention_backward";
  check_additive_attention_args(query, key, w_v, value, std::nullopt, std::nullopt);
  const int64_t B = query.size(0), Q = query.size(1), K = key.size(1);
  TORCH_CHECK(grad_context.sizes() == at::IntArrayRef({B, Q, value.size(2)}), op,
              ": grad_context must be [", B, ", ", Q, ", ", value.size(2), "], got ",
              grad_context.sizes());
  TORCH_CHECK(grad_weights.sizes() == at::IntArrayRef({B, Q, K}) &&
                  weights.sizes() == grad_weights.sizes(),
              op, ": weights and grad_weights must be [", B, ", ", Q, ", ", K, "], got ",
              weights.sizes(), " and ", grad_weights.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_context", &grad_context},
                                {"grad_weights", &grad_weights}, {"weights", &weights}})
    TORCH_CHECK(t->device() == query.device(), op, ": ", name, " must be on the query's device ",
                query.device(), ", got ", t->device());
}

void check_sdpa_backward_args(const at::Tensor& grad_output, const at::Tensor& query,
                              const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& valid_lens,
                              const at::Tensor& output, const at::Tensor& softmax_stats,
                              std::optional<double> scale, double dropout_p) {
  const char* op = "scaled_dot_product_attention_backward";
  check_sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p);
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2);
  TORCH_CHECK(grad_output.sizes() == output.sizes() &&
                  output.sizes() == at::IntArrayRef({B, H, Q, value.size(3)}),
              op, ": grad_output and output must be [", B, ", ", H, ", ", Q, ", ", value.size(3),
              "], got ", grad_output.sizes(), " and ", output.sizes());
  TORCH_CHECK(softmax_stats.sizes() == at::IntArrayRef({B, H, Q, 2}), op,
              ": softmax_stats must be [", B, ", ", H, ", ", Q, ", 2], got ", softmax_stats.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_output", &grad_output},
                                {"output", &output}, {"softmax_stats", &softmax_stats}})
    TORCH_CHECK(t->device() == query.device(), op, ": ", name, " must be on the query's device ",
                query.device(), ", got ", t->device());
}

}  // namespace seqfuse
