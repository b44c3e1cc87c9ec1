// Links the installed ringattn through find_package: the CPU kernel against the fp64
// reference backend on one small causal dilated problem. Exits 1 on a mismatch.
#include <ringattn/ringattn.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  using namespace ringattn;
  constexpr int64_t B = 1, N = 64, H = 4, D = 16;
  DilatedConfig cfg;
  cfg.segment_lengths = {16, 64};
  cfg.dilation_rates = {1, 4};
  cfg.causal = true;
  std::vector<float> q(B * N * H * D), k(q.size()), v(q.size()), out(q.size()), ref(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = std::sin(0.37f * static_cast<float>(i));
    k[i] = std::cos(0.11f * static_cast<float>(i));
    v[i] = std::sin(0.05f * static_cast<float>(i) + 1.0f);
  }
  const auto view = [&](std::vector<float>& t) {
    return TensorView::contiguous(t.data(), DType::kF32, {B, N, H, D});
  };
  DilatedAttention(cfg).forward(view(q), view(k), view(v), view(out));
  DilatedAttention(cfg, ExecOptions{Backend::kReference})
      .forward(view(q), view(k), view(v), view(ref));
  double worst = 0.0, norm = 0.0;
  for (size_t i = 0; i < out.size(); ++i) {
    worst = std::fmax(worst, std::fabs(static_cast<double>(out[i]) - ref[i]));
    norm += std::fabs(static_cast<double>(ref[i]));
  }
  std::printf("ringattn %s (%s): max |cpu - reference| = %.3g, mean |reference| = %.3g\n",
              version(), cpu_simd_target(), worst, norm / static_cast<double>(out.size()));
  return worst <= 1e-5 && norm > 0.0 ? 0 : 1;
}
