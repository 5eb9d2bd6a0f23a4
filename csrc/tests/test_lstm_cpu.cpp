// C++ tests of the fused LSTM kernel against a plain C++ reference loop (no ATen ops
// in the reference), called through the dispatcher as a C++ user of libseqfuse would.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Reference: D directions, lengths, plain loops in double.
// Returns output [T][B][D*H] and h_n/c_n [D][B][H] as flat vectors.
void reference(const std::vector<float>& x, const std::vector<float>& wih, const std::vector<float>& whh,
               const std::vector<float>& bias, const std::vector<int64_t>& len, int64_t T, int64_t B,
               int64_t I, int64_t H, int64_t D, std::vector<double>& out, std::vector<double>& hn,
               std::vector<double>& cn) {
  const int64_t G = 4 * H;
  out.assign(T * B * D * H, 0.0);
  hn.assign(D * B * H, 0.0);
  cn.assign(D * B * H, 0.0);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t b = 0; b < B; ++b) {
      std::vector<double> h(H, 0.0), c(H, 0.0), g(G);
      for (int64_t s = 0; s < len[b]; ++s) {
        const int64_t t = d == 0 ? s : len[b] - 1 - s;
        for (int64_t r = 0; r < G; ++r) {
          double acc = bias[d * G + r];
          for (int64_t k = 0; k < I; ++k) acc += wih[(d * G + r) * I + k] * x[(t * B + b) * I + k];
          for (int64_t k = 0; k < H; ++k) acc += whh[(d * G + r) * H + k] * h[k];
          g[r] = acc;
        }
        for (int64_t j = 0; j < H; ++j) {
          c[j] = sigmoid(g[H + j]) * c[j] + sigmoid(g[j]) * std::tanh(g[2 * H + j]);
          h[j] = sigmoid(g[3 * H + j]) * std::tanh(c[j]);
          out[(t * B + b) * D * H + d * H + j] = h[j];
        }
      }
      for (int64_t j = 0; j < H; ++j) {
        hn[(d * B + b) * H + j] = h[j];
        cn[(d * B + b) * H + j] = c[j];
      }
    }
}

std::vector<float> random_vec(int64_t n, unsigned& seed, float scale) {
  std::vector<float> v(n);
  for (auto& e : v) {
    seed = seed * 1664525u + 1013904223u;
    e = scale * (static_cast<float>(seed >> 8) / static_cast<float>(1 << 24) * 2.0f - 1.0f);
  }
  return v;
}

double max_diff(const at::Tensor& got, const std::vector<double>& want) {
  const at::Tensor g = got.contiguous().to(at::kDouble);
  const double* p = g.data_ptr<double>();
  double m = 0;
  for (size_t i = 0; i < want.size(); ++i) m = std::max(m, std::abs(p[i] - want[i]));
  return m;
}

void run_case(int64_t T, int64_t B, int64_t I, int64_t H, int64_t D, bool with_lengths, bool keep) {
  unsigned seed = 1234u + static_cast<unsigned>(T * 7 + B * 13 + I * 17 + H * 19 + D);
  const int64_t G = 4 * H;
  auto x = random_vec(T * B * I, seed, 1.0f);
  auto wih = random_vec(D * G * I, seed, 0.3f);
  auto whh = random_vec(D * G * H, seed, 0.3f);
  auto bias = random_vec(D * G, seed, 0.3f);
  std::vector<int64_t> len(B, T);
  if (with_lengths)
    for (int64_t b = 0; b < B; ++b) len[b] = 1 + (b * 5 + 3) % T;

  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto tensor = [&](std::vector<float>& v, at::IntArrayRef shape) {
    return at::from_blob(v.data(), shape, f32).clone();
  };
  const at::Tensor lengths = at::from_blob(len.data(), {B}, at::kLong).clone();
  const at::Tensor zeros = at::zeros({D, B, H}, f32);

  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("seqfuse::lstm_layer", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, bool,
                           const std::optional<at::Tensor>&)>();
  auto [out, h_n, c_n, gates, cells] =
      op.call(tensor(x, {T, B, I}), tensor(wih, {D, G, I}), tensor(whh, {D, G, H}),
              tensor(bias, {D, G}), zeros, zeros,
              with_lengths ? std::optional<at::Tensor>(lengths) : std::nullopt, keep, std::nullopt);

  std::vector<double> ro, rh, rc;
  reference(x, wih, whh, bias, len, T, B, I, H, D, ro, rh, rc);
  char name[160];
  std::snprintf(name, sizeof(name), "T=%ld B=%ld I=%ld H=%ld D=%ld lengths=%d keep=%d", (long)T,
                (long)B, (long)I, (long)H, (long)D, (int)with_lengths, (int)keep);
  const double e_out = max_diff(out, ro), e_h = max_diff(h_n, rh), e_c = max_diff(c_n, rc);
  expect(e_out < 1e-5, std::string(name) + " output max diff " + std::to_string(e_out));
  expect(e_h < 1e-5, std::string(name) + " h_n max diff " + std::to_string(e_h));
  expect(e_c < 1e-5, std::string(name) + " c_n max diff " + std::to_string(e_c));
  std::printf("%-48s output %.2e  h_n %.2e  c_n %.2e\n", name, e_out, e_h, e_c);
}

void expect_throws(const std::string& what, const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    expect(false, what + ": did not throw");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos,
           what + ": message lacks '" + needle + "': " + e.what());
  }
}

}  // namespace

int main() {
  const int64_t shapes[][4] = {{1, 1, 1, 1}, {7, 3, 37, 53}, {5, 1, 16, 128}, {9, 6, 20, 33}, {12, 2, 8, 64},
                               {6, 30, 20, 40}, {4, 13, 9, 70}};
  for (const auto& s : shapes)
    for (int64_t D : {1, 2})
      for (bool with_lengths : {false, true})
        for (bool keep : {false, true}) run_case(s[0], s[1], s[2], s[3], D, with_lengths, keep);

  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("seqfuse::lstm_layer", "");
  auto call = [&](const at::Tensor& x, const at::Tensor& lengths) {
    auto typed = op.typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool,
        const std::optional<at::Tensor>&)>();
    typed.call(x, at::zeros({1, 8, 3}), at::zeros({1, 8, 2}), std::nullopt, at::zeros({1, 2, 2}),
               at::zeros({1, 2, 2}), lengths, true, std::nullopt);
  };
  expect_throws("zero length", [&] { call(at::zeros({4, 2, 3}), at::tensor({4, 0}, at::kLong)); },
                "every length must be >= 1");
  expect_throws("length > T", [&] { call(at::zeros({4, 2, 3}), at::tensor({4, 5}, at::kLong)); },
                "every length must be <= T=4");
  expect_throws("rank", [&] { call(at::zeros({4, 3}), at::tensor({4, 4}, at::kLong)); },
                "input must be 3-D");

  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
