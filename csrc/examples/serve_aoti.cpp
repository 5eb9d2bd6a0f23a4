// Serves a seqfuse model's AOTInductor package (model.aoti.pt2, `seqfuse export --formats
// ...,aoti`) from C++, without Python: the package's compiled graph calls seqfuse's fused
// ops through the dispatcher, which finds them because this program links libseqfuse.
//
//   serve_aoti PACKAGE INPUTS [CALLS]
//
// INPUTS: a file written by torch.save((inputs, expected_outputs)) (two lists of tensors),
// e.g. by make_aoti_package.py. The program runs the package on the inputs, checks every
// output against the expected one (|diff| <= 1e-5 * max(1, |expected|)), then times CALLS
// calls (default 200) and prints the median latency. Exit code 0 when every output
// matches, 1 when one does not, 2 on bad arguments.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<at::Tensor> tensors_of(const c10::IValue& v) {
  std::vector<at::Tensor> out;
  for (const auto& t : v.toListRef()) out.push_back(t.toTensor());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: serve_aoti PACKAGE INPUTS [CALLS]\n");
    return 2;
  }
  const int calls = argc > 3 ? std::max(1, std::atoi(argv[3])) : 200;
  std::ifstream file(argv[2], std::ios::binary);
  if (!file) {
    std::fprintf(stderr, "serve_aoti: cannot read %s\n", argv[2]);
    return 2;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto saved = torch::jit::pickle_load(bytes).toTuple();
  const std::vector<at::Tensor> inputs = tensors_of(saved->elements()[0]);
  const std::vector<at::Tensor> expected = tensors_of(saved->elements()[1]);

  c10::InferenceMode guard;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  const std::vector<at::Tensor> outputs = loader.run(inputs);
  if (outputs.size() != expected.size()) {
    std::fprintf(stderr, "serve_aoti: %zu outputs, expected %zu\n", outputs.size(), expected.size());
    return 1;
  }
  bool ok = true;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const at::Tensor e = expected[i].to(at::kDouble), o = outputs[i].to(at::kDouble);
    if (o.sizes() != e.sizes()) {
      std::fprintf(stderr, "output %zu: shape differs from the expected one\n", i);
      ok = false;
      continue;
    }
    const double scaled = ((o - e).abs() / e.abs().clamp_min(1.0)).max().item<double>();
    std::printf("output %zu: max scaled difference %.3g\n", i, scaled);
    ok = ok && scaled <= 1e-5;
  }
  std::vector<double> us;
  for (int i = 0; i < calls; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    loader.run(inputs);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
  std::printf("median latency over %d calls: %.1f us (%d intra-op threads)\n", calls,
              us[us.size() / 2], at::get_num_threads());
  std::printf("%s\n", ok ? "parity: ok" : "parity: FAILED");
  return ok ? 0 : 1;
}
