#pragma once
// Brute-force fp64 oracle of block-sparse attention: the token mask is materialised from the
// pattern's definition written out here (not from the library's layouts), then dense masked
// softmax attention and its gradients are computed in fp64.

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "ringattn/ringattn.h"
#include "tests/support/expect.h"
#include "tests/support/test_util.h"

namespace ringattn::test {

// Whether query block qb of a sequence of nb blocks lists key block kb under pattern x
// (BlockPattern's documented definition, independent of BlockPattern::layout).
inline bool pattern_lists(const BlockPattern& x, int64_t nb, int64_t qb, int64_t kb) {
  const int64_t w = (x.window + x.block_size - 1) / x.block_size;
  const int64_t dist = qb > kb ? qb - kb : kb - qb;
  switch (x.kind) {
    case BlockPatternKind::kLocalWindow:
      return dist <= w;
    case BlockPatternKind::kDilated:
      return dist == 0 || std::find(x.rates.begin(), x.rates.end(), dist) != x.rates.end();
    case BlockPatternKind::kGlobalLocal:
      return qb < x.global_blocks || kb < x.global_blocks || dist <= w;
    case BlockPatternKind::kBlockList:
      for (int64_t i = x.row_ptr[static_cast<size_t>(qb)];
           i < x.row_ptr[static_cast<size_t>(qb) + 1]; ++i) {
        if (x.cols[static_cast<size_t>(i)] == kb) return true;
      }
      return false;
  }
  (void)nb;
  return false;
}

// mask[(h * N + n) * N + k]: query row n of head h sees key row k.
inline std::vector<char> token_mask(const BlockSparseConfig& cfg, int64_t N, int64_t H) {
  std::vector<char> mask(static_cast<size_t>(H * N * N), 0);
  for (int64_t h = 0; h < H; ++h) {
    const BlockPattern& x = cfg.patterns[cfg.patterns.size() == 1 ? 0 : static_cast<size_t>(h)];
    const int64_t bs = x.block_size, nb = N / bs;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < N; ++k) {
        mask[static_cast<size_t>((h * N + n) * N + k)] =
            pattern_lists(x, nb, n / bs, k / bs) && (!cfg.causal || k <= n);
      }
    }
  }
  return mask;
}

struct SparseOracle {
  std::vector<double> out, lse;    // [B, N, H, D], [B, H, N]
  std::vector<double> dq, dk, dv;  // filled by with_grads
};

// Forward (and, with `dout`, backward) of masked attention in fp64 for q [B, N, H, D] and
// k, v [B, N, Hkv, D] (GQA: head h reads kv head h / (H / Hkv)).
inline SparseOracle sparse_oracle(const BlockSparseConfig& cfg, const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor* dout = nullptr) {
  const TensorView qv = q.view();
  const int64_t B = qv.shape[0], N = qv.shape[1], H = qv.shape[2], D = qv.shape[3];
  const int64_t Hkv = k.view().shape[2];
  const double scale = cfg.scale ? *cfg.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const std::vector<char> mask = token_mask(cfg, N, H);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  SparseOracle r;
  r.out.assign(static_cast<size_t>(B * N * H * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * H * N), neg_inf);
  if (dout) {
    r.dq.assign(r.out.size(), 0.0);
    r.dk.assign(static_cast<size_t>(B * N * Hkv * D), 0.0);
    r.dv.assign(r.dk.size(), 0.0);
  }
  std::vector<double> s(static_cast<size_t>(N)), pr(static_cast<size_t>(N));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hkv);
      for (int64_t n = 0; n < N; ++n) {
        const char* m = mask.data() + (h * N + n) * N;
        double mx = neg_inf;
        for (int64_t kk = 0; kk < N; ++kk) {
          if (!m[kk]) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += double{q.get(b, n, h, d)} * k.get(b, kk, hk, d);
          s[kk] = dot * scale;
          mx = std::max(mx, s[kk]);
        }
        if (mx == neg_inf) continue;
        double sum = 0.0;
        for (int64_t kk = 0; kk < N; ++kk) sum += m[kk] ? std::exp(s[kk] - mx) : 0.0;
        const double lse = mx + std::log(sum);
        r.lse[static_cast<size_t>((b * H + h) * N + n)] = lse;
        double* o = r.out.data() + ((b * N + n) * H + h) * D;
        for (int64_t kk = 0; kk < N; ++kk) {
          pr[kk] = m[kk] ? std::exp(s[kk] - lse) : 0.0;
          for (int64_t d = 0; d < D; ++d) o[d] += pr[kk] * v.get(b, kk, hk, d);
        }
        if (!dout) continue;
        // dS = P * (dO.v - rowsum(dO * O)); dq = scale dS k, dk = scale dS q, dv = P dO.
        double dr = 0.0;
        for (int64_t d = 0; d < D; ++d) dr += double{dout->get(b, n, h, d)} * o[d];
        for (int64_t kk = 0; kk < N; ++kk) {
          if (!m[kk]) continue;
          double dp = 0.0;
          for (int64_t d = 0; d < D; ++d) dp += double{dout->get(b, n, h, d)} * v.get(b, kk, hk, d);
          const double ds = pr[kk] * (dp - dr);
          double* dq = r.dq.data() + ((b * N + n) * H + h) * D;
          double* dk = r.dk.data() + ((b * N + kk) * Hkv + hk) * D;
          double* dv = r.dv.data() + ((b * N + kk) * Hkv + hk) * D;
          for (int64_t d = 0; d < D; ++d) {
            dq[d] += scale * ds * k.get(b, kk, hk, d);
            dk[d] += scale * ds * q.get(b, n, h, d);
            dv[d] += pr[kk] * dout->get(b, n, h, d);
          }
        }
      }
    }
  }
  return r;
}

// Random inputs of one block-sparse case and the outputs the library writes.
struct SparseInputs {
  Tensor q, k, v, dout, out, lse, dq, dk, dv;

  SparseInputs(DType dtype, int64_t B, int64_t N, int64_t H, int64_t Hkv, int64_t D, uint32_t seed)
      : q(dtype, {B, N, H, D}),
        k(dtype, {B, N, Hkv, D}),
        v(dtype, {B, N, Hkv, D}),
        dout(dtype, {B, N, H, D}),
        out(dtype, {B, N, H, D}),
        lse(DType::kF32, {B, H, N}),
        dq(dtype, {B, N, H, D}),
        dk(dtype, {B, N, Hkv, D}),
        dv(dtype, {B, N, Hkv, D}) {
    std::mt19937 rng(seed);
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
    dout.fill_normal(rng);
  }

  void forward(BlockSparseRingDilatedAttention& attn) {
    attn.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
  }
  void backward(BlockSparseRingDilatedAttention& attn) {
    attn.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                  dk.view(), dv.view());
  }
};

// Tolerances against the fp64 oracle: SPEC.md's 1e-5 for fp32 (scaled by max |ref| for
// gradients), and the low-precision bounds the dilated tests use.
inline double out_tol(DType dtype) {
  return dtype == DType::kF32 ? 1e-5 : dtype == DType::kF16 ? 2e-3 : 1.6e-2;
}
inline double grad_tol(DType dtype) {
  return dtype == DType::kF32 ? 2e-5 : dtype == DType::kF16 ? 4e-3 : 3e-2;
}

// Rows that see no key: block size 16 over N = 64, causal; query block 1 lists nothing and
// query block 0 only a later block, so rows 0-31 see none.
inline BlockSparseConfig rows_that_see_nothing() {
  return {{BlockPattern::block_list(16, {0, 1, 1, 3, 4}, {2, 0, 2, 3})}, true, {}};
}

// The forward and backward results in `in` (fp32, B = 1, N = 64) of rows_that_see_nothing():
// out and dq 0 and lse -inf in rows 0-31; out and dk against the fp64 oracle.
inline void expect_rows_that_see_nothing(const SparseInputs& in) {
  const int64_t H = in.out.view().shape[2], D = in.out.view().shape[3];
  for (int64_t n = 0; n < 32; ++n) {
    for (int64_t h = 0; h < H; ++h) {
      EXPECT_EQ(in.lse.get(0, h, n), -std::numeric_limits<float>::infinity()) << n;
      for (int64_t d = 0; d < D; ++d) {
        EXPECT_EQ(in.out.get(0, n, h, d), 0.0f);
        EXPECT_EQ(in.dq.get(0, n, h, d), 0.0f);
      }
    }
  }
  const SparseOracle ref = sparse_oracle(rows_that_see_nothing(), in.q, in.k, in.v, &in.dout);
  expect_close(compare_bnhd(in.out, ref.out), 1e-5, "out");
  expect_close(compare_bnhd(in.dk, ref.dk), 2e-5, "dk");
}

// One block-sparse test configuration.
struct SparseCase {
  int64_t B, N, H, Hkv, D;
  BlockSparseConfig cfg;
  DType dtype = DType::kF32;
};

// "B=1 N=256 ... fp32 causal patterns: local_window(bs=32)", for SCOPED_TRACE.
inline std::string describe(const SparseCase& c) {
  std::ostringstream os;
  os << "B=" << c.B << " N=" << c.N << " H=" << c.H << " Hkv=" << c.Hkv << " D=" << c.D << " "
     << dtype_name(c.dtype) << (c.cfg.causal ? " causal" : " full") << " patterns:";
  for (const BlockPattern& x : c.cfg.patterns) {
    os << " " << block_pattern_kind_name(x.kind) << "(bs=" << x.block_size << ")";
  }
  return os.str();
}

}  // namespace ringattn::test
