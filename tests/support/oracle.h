#pragma once
// Brute-force oracle: materialises, for each head, the N x N multiplicity matrix
// W[n][k] = number of branches (of that head) that keep both rows n and k in one segment
// (k <= n when causal), then computes a dense softmax weighted by W. Independent of the
// library's planner, index math and merge. `round` is applied to the result of every operation
// (scores, probabilities, P.V, output), so the same code gives the fp64 oracle (identity) and the
// naive low-precision computation that SPEC.md's fp16/bf16 rule compares against.

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "ringattn/ringattn.h"
#include "tests/support/test_util.h"

namespace ringattn::test {

struct OracleResult {
  std::vector<double> out;  // [B, N, H, D]
  std::vector<double> lse;  // [B, H, N]
};

inline OracleResult oracle_forward(const DilatedConfig& cfg, const Tensor& q, const Tensor& k,
                                   const Tensor& v,
                                   const std::function<double(double)>& round = nullptr) {
  auto rnd = [&](double x) { return round ? round(x) : x; };
  const TensorView qv = q.view();
  const int64_t B = qv.shape[0], N = qv.shape[1], H = qv.shape[2], D = qv.shape[3];
  const int64_t Hkv = k.view().shape[2];
  const int64_t G = static_cast<int64_t>(cfg.segment_lengths.size());
  // The library's scale is an fp32 value: 1/sqrt(D) rounded to fp32 unless given.
  const double scale = cfg.scale ? *cfg.scale : 1.0f / std::sqrt(static_cast<float>(D));

  // Branches (and offsets) of each head, written out from SPEC.md's text.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> head_br(static_cast<size_t>(H));
  if (cfg.mode == Mode::kLongNet) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < G; ++i) head_br[h].push_back({i, h % cfg.dilation_rates[i]});
  } else {
    int64_t h = 0;
    for (int64_t i = 0; i < G; ++i) {
      const int64_t size = H / G + (i < H % G ? 1 : 0);
      for (int64_t j = 0; j < size; ++j) head_br[h++].push_back({i, i % cfg.dilation_rates[i]});
    }
  }
  auto keeps = [&](int64_t i, int64_t o, int64_t n) {
    return (n % cfg.segment_lengths[i]) % cfg.dilation_rates[i] == o;
  };

  OracleResult r;
  r.out.assign(static_cast<size_t>(B * N * H * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * H * N), -std::numeric_limits<double>::infinity());
  std::vector<double> w(static_cast<size_t>(N)), s(static_cast<size_t>(N));
  const double factor = cfg.mode == Mode::kGroups ? 1.0 / static_cast<double>(G) : 1.0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hkv);
      for (int64_t n = 0; n < N; ++n) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t kk = 0; kk < N; ++kk) {
          w[kk] = 0.0;
          for (auto [i, o] : head_br[h]) {
            const int64_t seg = cfg.segment_lengths[i];
            if (n / seg == kk / seg && keeps(i, o, n) && keeps(i, o, kk) &&
                (!cfg.causal || kk <= n))
              w[kk] += 1.0;
          }
          if (w[kk] == 0.0) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d)
            dot += static_cast<double>(q.get(b, n, h, d)) * k.get(b, kk, hk, d);
          s[kk] = rnd(rnd(dot) * scale);
          mx = std::max(mx, s[kk]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;
        double sum = 0.0;
        for (int64_t kk = 0; kk < N; ++kk) {
          if (w[kk] != 0.0) sum += w[kk] * std::exp(s[kk] - mx);
        }
        // Normalised probabilities rounded once (a softmax op), then P.V with exact
        // accumulation rounded once (a matmul op), as a framework computes it.
        std::vector<double> acc(static_cast<size_t>(D), 0.0);
        for (int64_t kk = 0; kk < N; ++kk) {
          if (w[kk] == 0.0) continue;
          const double p = rnd(w[kk] * std::exp(s[kk] - mx) / sum);
          for (int64_t d = 0; d < D; ++d) acc[d] += p * v.get(b, kk, hk, d);
        }
        for (int64_t d = 0; d < D; ++d)
          r.out[static_cast<size_t>(((b * N + n) * H + h) * D + d)] = rnd(rnd(acc[d]) * factor);
        r.lse[static_cast<size_t>((b * H + h) * N + n)] = mx + std::log(sum);
      }
    }
  }
  return r;
}

}  // namespace ringattn::test
