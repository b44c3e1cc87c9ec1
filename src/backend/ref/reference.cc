#include "src/backend/ref/reference.h"

#include <cmath>
#include <limits>

#include "src/backend/ref/tensor_access.h"
#include "src/base/index_math.h"

namespace ringattn {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// merge((O_a, L_a), (O_b, L_b)) of SPEC.md, in place into (o_a, l_a).
void merge_into(double* o_a, double& l_a, const double* o_b, double l_b, int64_t d) {
  const double m = std::max(l_a, l_b);
  if (m == kNegInf) return;
  const double w_a = std::exp(l_a - m), w_b = std::exp(l_b - m), s = w_a + w_b;
  for (int64_t i = 0; i < d; ++i) o_a[i] = (w_a * o_a[i] + w_b * o_b[i]) / s;
  l_a = m + std::log(s);
}

// One query row of one branch: row qn of (b, h) attends keys start + u * rate, u < keys.
struct QueryRow {
  int64_t b, h, hk, qn, start, rate, keys;
};

// Calls fn(QueryRow) for every (batch, head, branch, kept query row) of SPEC.md, in order.
template <typename Fn>
void for_each_query_row(const Problem& p, Fn&& fn) {
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int hb = p.head_begin[h]; hb < p.head_begin[h + 1]; ++hb) {
        const Branch br = p.branches[p.head_branches[hb].branch];
        const int64_t o = p.head_branches[hb].offset;
        const int64_t m = kept_count(br.segment, br.rate, o);
        for (int64_t seg = 0; seg < p.seq / br.segment; ++seg) {
          const int64_t start = seg * br.segment + o;
          for (int64_t t = 0; t < m; ++t) {
            fn(QueryRow{b, h, p.kv_head(h), start + t * br.rate, start, br.rate,
                        p.causal ? t + 1 : m});
          }
        }
      }
    }
  }
}

}  // namespace

ReferenceResult reference_forward(const Problem& p) {
  const int64_t B = p.batch, N = p.seq, H = p.heads, D = p.head_dim;
  ReferenceResult r;
  r.out.assign(static_cast<size_t>(B * N * H * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * H * N), kNegInf);
  std::vector<double> scores, o_part(static_cast<size_t>(D));
  for_each_query_row(p, [&](const QueryRow& row) {
    const int64_t b = row.b, h = row.h, hk = row.hk, qn = row.qn;
    scores.resize(static_cast<size_t>(row.keys));
    double mx = kNegInf;
    for (int64_t u = 0; u < row.keys; ++u) {
      const int64_t kn = row.start + u * row.rate;
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        dot += static_cast<double>(load_f32(p.q, p.dtype, offset_of(p.q_st, b, qn, h) + d)) *
               static_cast<double>(load_f32(p.k, p.dtype, offset_of(p.k_st, b, kn, hk) + d));
      }
      scores[u] = dot * static_cast<double>(p.scale);
      mx = std::max(mx, scores[u]);
    }
    double sum = 0.0;
    for (int64_t d = 0; d < D; ++d) o_part[d] = 0.0;
    for (int64_t u = 0; u < row.keys; ++u) {
      const double w = std::exp(scores[u] - mx);
      sum += w;
      const int64_t kn = row.start + u * row.rate;
      for (int64_t d = 0; d < D; ++d) {
        o_part[d] += w * load_f32(p.v, p.dtype, offset_of(p.v_st, b, kn, hk) + d);
      }
    }
    for (int64_t d = 0; d < D; ++d) o_part[d] /= sum;
    double* o_row = &r.out[static_cast<size_t>(((b * N + qn) * H + h) * D)];
    double& l_row = r.lse[static_cast<size_t>((b * H + h) * N + qn)];
    merge_into(o_row, l_row, o_part.data(), mx + std::log(sum), D);
  });
  const double factor =
      p.mode == Mode::kGroups ? 1.0 / static_cast<double>(p.branches.size()) : 1.0;
  for (double& x : r.out) x *= factor;
  return r;
}

void reference_forward_into(const Problem& p) {
  const ReferenceResult r = reference_forward(p);
  const int64_t B = p.batch, N = p.seq, H = p.heads, D = p.head_dim;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base = offset_of(p.out_st, b, n, h);
        for (int64_t d = 0; d < D; ++d) {
          store_f32(p.out, p.dtype, base + d,
                    static_cast<float>(r.out[static_cast<size_t>(((b * N + n) * H + h) * D + d)]));
        }
        if (p.lse) {
          p.lse[offset_of(p.lse_st, b, n, h)] =
              static_cast<float>(r.lse[static_cast<size_t>((b * H + h) * N + n)]);
        }
      }
    }
  }
}

ReferenceGrads reference_backward(const BackwardProblem& bp) {
  const Problem& p = bp.fwd;
  const int64_t B = p.batch, N = p.seq, H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const ReferenceResult fwd = reference_forward(p);
  const double f = p.mode == Mode::kGroups ? 1.0 / static_cast<double>(p.branches.size()) : 1.0;
  const double scale = p.scale;
  ReferenceGrads g;
  g.dq.assign(static_cast<size_t>(B * N * H * D), 0.0);
  g.dk.assign(static_cast<size_t>(B * N * Hkv * D), 0.0);
  g.dv.assign(static_cast<size_t>(B * N * Hkv * D), 0.0);
  auto load = [&](const void* base, const Strides3& st, int64_t b, int64_t n, int64_t h,
                  int64_t d) {
    return static_cast<double>(load_f32(base, p.dtype, offset_of(st, b, n, h) + d));
  };
  for_each_query_row(p, [&](const QueryRow& row) {
    const int64_t b = row.b, h = row.h, hk = row.hk, qn = row.qn;
    const double lse = fwd.lse[static_cast<size_t>((b * H + h) * N + qn)];
    if (lse == kNegInf) return;
    double dr = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      dr += load(bp.dout, bp.dout_st, b, qn, h, d) *
            fwd.out[static_cast<size_t>(((b * N + qn) * H + h) * D + d)];
    }
    for (int64_t u = 0; u < row.keys; ++u) {
      const int64_t kn = row.start + u * row.rate;
      double dot = 0.0, dp = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        dot += load(p.q, p.q_st, b, qn, h, d) * load(p.k, p.k_st, b, kn, hk, d);
        dp += load(bp.dout, bp.dout_st, b, qn, h, d) * load(p.v, p.v_st, b, kn, hk, d);
      }
      const double prob = std::exp(dot * scale - lse);
      const double ds = prob * (f * dp - dr);
      for (int64_t d = 0; d < D; ++d) {
        g.dq[static_cast<size_t>(((b * N + qn) * H + h) * D + d)] +=
            scale * ds * load(p.k, p.k_st, b, kn, hk, d);
        g.dk[static_cast<size_t>(((b * N + kn) * Hkv + hk) * D + d)] +=
            scale * ds * load(p.q, p.q_st, b, qn, h, d);
        g.dv[static_cast<size_t>(((b * N + kn) * Hkv + hk) * D + d)] +=
            f * prob * load(bp.dout, bp.dout_st, b, qn, h, d);
      }
    }
  });
  return g;
}

void reference_backward_into(const BackwardProblem& bp) {
  const Problem& p = bp.fwd;
  const ReferenceGrads g = reference_backward(bp);
  const int64_t B = p.batch, N = p.seq, D = p.head_dim;
  const struct {
    const std::vector<double>& src;
    void* dst;
    Strides3 st;
    int64_t heads;
  } outs[] = {{g.dq, bp.dq, bp.dq_st, p.heads},
              {g.dk, bp.dk, bp.dk_st, p.kv_heads},
              {g.dv, bp.dv, bp.dv_st, p.kv_heads}};
  for (const auto& o : outs) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < o.heads; ++h)
          for (int64_t d = 0; d < D; ++d) {
            const size_t i = static_cast<size_t>(((b * N + n) * o.heads + h) * D + d);
            store_f32(o.dst, p.dtype, offset_of(o.st, b, n, h) + d, static_cast<float>(o.src[i]));
          }
  }
}

}  // namespace ringattn
