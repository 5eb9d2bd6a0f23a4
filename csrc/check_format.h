// Shared by the argument checks (layer_checks.cpp, attention_checks.cpp) and the ops'
// entries. dtypes print under their Python names (torch.float32, not Float), so that every
// message equals the Python check layer's (py_src/seqfuse/ops/checks.py) word for word,
// whichever backend raised it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>

#include <string>

namespace seqfuse {

inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    case c10::kLong: return "torch.int64";
    case c10::kInt: return "torch.int32";
    case c10::kShort: return "torch.int16";
    case c10::kChar: return "torch.int8";
    case c10::kByte: return "torch.uint8";
    case c10::kBool: return "torch.bool";
    case c10::kComplexFloat: return "torch.complex64";
    case c10::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The op's own copy of a small index tensor (lengths, valid_lens: B or B * Q integers),
// taken once at its entry: the checks validate this copy and the kernel reads only it,
// so another thread writing the caller's tensor meanwhile cannot put an index that was
// never checked in front of the kernel (it read out of bounds and crashed).
inline std::optional<at::Tensor> private_copy(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->clone(at::MemoryFormat::Contiguous);
}

}  // namespace seqfuse
