// Per-target SIMD code of the CPU forward kernel. Highway compiles this file once for
// each enabled x86 target (AVX-512, AVX2, and a 128-bit baseline) and picks the best one
// for the running CPU.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/cpu/attention_kernels.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
//
#include <hwy/highway.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "src/cpu/attention_cpu.h"
#include "src/dtype.h"
#include "src/index_math.h"

HWY_BEFORE_NAMESPACE();
namespace ringattn::cpu::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t MR = Tiles::kRowsPerMicro;
constexpr int64_t MQ = Tiles::kQueryTile;
constexpr int64_t NK = Tiles::kKeyTile;

// 2^x for x <= 0 (x = -inf gives 0): 2^round(x) times a degree-6 polynomial on [-0.5, 0.5]
// (relative error about 1.2e-7).
HWY_INLINE VF Exp2(DF df, VF x) {
  const hn::RebindToSigned<DF> di;
  x = hn::Max(x, hn::Set(df, -127.0f));
  const VF n = hn::Round(x);
  const VF f = hn::Sub(x, n);
  VF p = hn::Set(df, 1.5403530393381608e-4f);
  p = hn::MulAdd(p, f, hn::Set(df, 1.3333558146428443e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 9.6181291076284772e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.5504108664821580e-2f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.4022650695910071e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.9314718055994531e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.0f));
  const auto e = hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127)));
  return hn::Mul(p, hn::BitCast(df, e));
}

// Copies `count` strided rows of D elements into a dense [rows][dp] fp32 tile, multiplied by
// `mul`; rows past `count` up to `rows` and columns past D are zero.
template <typename T>
void PackRows(const T* src, int64_t row_stride, int64_t count, int64_t rows, int64_t d,
              int64_t dp, float mul, float* dst) {
  for (int64_t i = 0; i < count; ++i) {
    const T* row = src + i * row_stride;
    float* out = dst + i * dp;
    for (int64_t c = 0; c < d; ++c) out[c] = to_f32(row[c]) * mul;
    for (int64_t c = d; c < dp; ++c) out[c] = 0.0f;
  }
  std::memset(dst + count * dp, 0, sizeof(float) * static_cast<size_t>((rows - count) * dp));
}

// Copies `count` strided K rows into panels of W columns: kt[j / W][c][j % W] = k[j][c].
template <typename T>
void PackKeysT(const T* src, int64_t row_stride, int64_t count, int64_t d, int64_t dp, int64_t w,
               float* kt) {
  const int64_t cols = round_up(count, w);
  std::memset(kt, 0, sizeof(float) * static_cast<size_t>(cols * dp));
  for (int64_t j = 0; j < count; ++j) {
    const T* row = src + j * row_stride;
    float* panel = kt + (j / w) * dp * w + (j % w);
    for (int64_t c = 0; c < d; ++c) panel[c * w] = to_f32(row[c]);
  }
}

template <typename Fn>
void WithType(DType dtype, const void* base, Fn&& fn) {
  switch (dtype) {
    case DType::kF32:
      fn(static_cast<const float*>(base));
      break;
    case DType::kF16:
      fn(static_cast<const fp16_t*>(base));
      break;
    case DType::kBF16:
      fn(static_cast<const bf16_t*>(base));
      break;
  }
}

// s[i][j] = q[i] . k[j] for rows i < rows (a multiple of MR) and panels of W columns
// covering `cols`.
void ScoresTile(const float* HWY_RESTRICT q, const float* HWY_RESTRICT kt, int64_t dp,
                int64_t rows, int64_t cols, float* HWY_RESTRICT s) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df)), W = 2 * L;
  for (int64_t jp = 0; jp * W < cols; ++jp) {
    const float* kp = kt + jp * dp * W;
    for (int64_t i = 0; i < rows; i += MR) {
      const float* q0 = q + i * dp;
      VF c00 = hn::Zero(df), c01 = hn::Zero(df), c10 = hn::Zero(df), c11 = hn::Zero(df);
      VF c20 = hn::Zero(df), c21 = hn::Zero(df), c30 = hn::Zero(df), c31 = hn::Zero(df);
      VF c40 = hn::Zero(df), c41 = hn::Zero(df), c50 = hn::Zero(df), c51 = hn::Zero(df);
      for (int64_t c = 0; c < dp; ++c) {
        const VF b0 = hn::Load(df, kp + c * W);
        const VF b1 = hn::Load(df, kp + c * W + L);
        VF a = hn::Set(df, q0[c]);
        c00 = hn::MulAdd(a, b0, c00);
        c01 = hn::MulAdd(a, b1, c01);
        a = hn::Set(df, q0[dp + c]);
        c10 = hn::MulAdd(a, b0, c10);
        c11 = hn::MulAdd(a, b1, c11);
        a = hn::Set(df, q0[2 * dp + c]);
        c20 = hn::MulAdd(a, b0, c20);
        c21 = hn::MulAdd(a, b1, c21);
        a = hn::Set(df, q0[3 * dp + c]);
        c30 = hn::MulAdd(a, b0, c30);
        c31 = hn::MulAdd(a, b1, c31);
        a = hn::Set(df, q0[4 * dp + c]);
        c40 = hn::MulAdd(a, b0, c40);
        c41 = hn::MulAdd(a, b1, c41);
        a = hn::Set(df, q0[5 * dp + c]);
        c50 = hn::MulAdd(a, b0, c50);
        c51 = hn::MulAdd(a, b1, c51);
      }
      float* out = s + i * NK + jp * W;
      hn::Store(c00, df, out);
      hn::Store(c01, df, out + L);
      hn::Store(c10, df, out + NK);
      hn::Store(c11, df, out + NK + L);
      hn::Store(c20, df, out + 2 * NK);
      hn::Store(c21, df, out + 2 * NK + L);
      hn::Store(c30, df, out + 3 * NK);
      hn::Store(c31, df, out + 3 * NK + L);
      hn::Store(c40, df, out + 4 * NK);
      hn::Store(c41, df, out + 4 * NK + L);
      hn::Store(c50, df, out + 5 * NK);
      hn::Store(c51, df, out + 5 * NK + L);
    }
  }
}

// o[i] = alpha[i] * o[i] + sum_j p[i][j] * v[j] for rows i < rows (a multiple of MR).
void AccumulateTile(const float* HWY_RESTRICT p, const float* HWY_RESTRICT v,
                    const float* HWY_RESTRICT alpha, int64_t dp, int64_t rows, int64_t keys,
                    float* HWY_RESTRICT o) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df)), W = 2 * L;
  for (int64_t i = 0; i < rows; i += MR) {
    const float* p0 = p + i * NK;
    for (int64_t c = 0; c < dp; c += W) {
      float* o0 = o + i * dp + c;
      VF a = hn::Set(df, alpha[i]);
      VF c00 = hn::Mul(a, hn::Load(df, o0)), c01 = hn::Mul(a, hn::Load(df, o0 + L));
      a = hn::Set(df, alpha[i + 1]);
      VF c10 = hn::Mul(a, hn::Load(df, o0 + dp)), c11 = hn::Mul(a, hn::Load(df, o0 + dp + L));
      a = hn::Set(df, alpha[i + 2]);
      VF c20 = hn::Mul(a, hn::Load(df, o0 + 2 * dp));
      VF c21 = hn::Mul(a, hn::Load(df, o0 + 2 * dp + L));
      a = hn::Set(df, alpha[i + 3]);
      VF c30 = hn::Mul(a, hn::Load(df, o0 + 3 * dp));
      VF c31 = hn::Mul(a, hn::Load(df, o0 + 3 * dp + L));
      a = hn::Set(df, alpha[i + 4]);
      VF c40 = hn::Mul(a, hn::Load(df, o0 + 4 * dp));
      VF c41 = hn::Mul(a, hn::Load(df, o0 + 4 * dp + L));
      a = hn::Set(df, alpha[i + 5]);
      VF c50 = hn::Mul(a, hn::Load(df, o0 + 5 * dp));
      VF c51 = hn::Mul(a, hn::Load(df, o0 + 5 * dp + L));
      for (int64_t j = 0; j < keys; ++j) {
        const VF b0 = hn::Load(df, v + j * dp + c);
        const VF b1 = hn::Load(df, v + j * dp + c + L);
        a = hn::Set(df, p0[j]);
        c00 = hn::MulAdd(a, b0, c00);
        c01 = hn::MulAdd(a, b1, c01);
        a = hn::Set(df, p0[NK + j]);
        c10 = hn::MulAdd(a, b0, c10);
        c11 = hn::MulAdd(a, b1, c11);
        a = hn::Set(df, p0[2 * NK + j]);
        c20 = hn::MulAdd(a, b0, c20);
        c21 = hn::MulAdd(a, b1, c21);
        a = hn::Set(df, p0[3 * NK + j]);
        c30 = hn::MulAdd(a, b0, c30);
        c31 = hn::MulAdd(a, b1, c31);
        a = hn::Set(df, p0[4 * NK + j]);
        c40 = hn::MulAdd(a, b0, c40);
        c41 = hn::MulAdd(a, b1, c41);
        a = hn::Set(df, p0[5 * NK + j]);
        c50 = hn::MulAdd(a, b0, c50);
        c51 = hn::MulAdd(a, b1, c51);
      }
      hn::Store(c00, df, o0);
      hn::Store(c01, df, o0 + L);
      hn::Store(c10, df, o0 + dp);
      hn::Store(c11, df, o0 + dp + L);
      hn::Store(c20, df, o0 + 2 * dp);
      hn::Store(c21, df, o0 + 2 * dp + L);
      hn::Store(c30, df, o0 + 3 * dp);
      hn::Store(c31, df, o0 + 3 * dp + L);
      hn::Store(c40, df, o0 + 4 * dp);
      hn::Store(c41, df, o0 + 4 * dp + L);
      hn::Store(c50, df, o0 + 5 * dp);
      hn::Store(c51, df, o0 + 5 * dp + L);
    }
  }
}

// Online-softmax step for one row of scores (log2 units) over `cols` columns, where columns
// at or past `visible` are masked: turns the row into probabilities relative to the new
// running max and updates (m, l); returns the factor that rescales the old accumulator.
HWY_INLINE float SoftmaxRow(float* HWY_RESTRICT row, int64_t cols, int64_t visible, float& m,
                            float& l) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t j = visible < 0 ? 0 : visible; j < cols; ++j) row[j] = kNegInf;
  VF vmax = hn::Set(df, kNegInf);
  for (int64_t j = 0; j < cols; j += L) vmax = hn::Max(vmax, hn::Load(df, row + j));
  const float tile_max = hn::GetLane(hn::MaxOfLanes(df, vmax));
  const float m_new = m > tile_max ? m : tile_max;
  const float m_ref = m_new == kNegInf ? 0.0f : m_new;
  const float alpha = std::exp2(m - m_ref);
  const VF vref = hn::Set(df, m_ref);
  VF vsum = hn::Zero(df);
  for (int64_t j = 0; j < cols; j += L) {
    const VF e = Exp2(df, hn::Sub(hn::Load(df, row + j), vref));
    hn::Store(e, df, row + j);
    vsum = hn::Add(vsum, e);
  }
  l = l * alpha + hn::GetLane(hn::SumOfLanes(df, vsum));
  m = m_new;
  return alpha;
}

void ForwardBlockImpl(const Problem& p, const Tiles& tiles, int64_t b, int64_t h, int64_t n0,
                      int64_t n1, const Scratch& sc) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df)), W = 2 * L;
  const int64_t D = p.head_dim, dp = tiles.padded_dim, hk = p.kv_head(h);
  const int64_t rows = n1 - n0;
  const float q_mul = p.scale * 1.4426950408889634f;  // log2(e): scores in log2 units
  constexpr float kLn2 = 0.6931471805599453f;

  std::memset(sc.acc_o, 0, sizeof(float) * static_cast<size_t>(rows * dp));
  for (int64_t i = 0; i < rows; ++i) sc.acc_l[i] = kNegInf;

  const char* q_base = static_cast<const char*>(p.q);
  const char* k_base = static_cast<const char*>(p.k);
  const char* v_base = static_cast<const char*>(p.v);
  const int64_t esize = static_cast<int64_t>(dtype_size(p.dtype));

  for (int hb = p.head_begin[h]; hb < p.head_begin[h + 1]; ++hb) {
    const Branch br = p.branches[p.head_branches[hb].branch];
    const int64_t o = p.head_branches[hb].offset, r = br.rate;
    const int64_t kept = kept_count(br.segment, r, o);
    for (int64_t seg = n0 / br.segment; seg * br.segment < n1; ++seg) {
      const KeptSpan span = kept_span_in_window(seg, br.segment, r, o, n0, n1);
      const int64_t row0 = span.seg_start + o;  // global row of kept index 0
      for (int64_t tq0 = span.t_begin; tq0 < span.t_end; tq0 += MQ) {
        const int64_t mq = min64(MQ, span.t_end - tq0);
        const int64_t mq_pad = round_up(mq, MR);
        WithType(p.dtype, q_base + esize * (b * p.q_st.b + (row0 + tq0 * r) * p.q_st.n + h * p.q_st.h),
                 [&](auto* src) { PackRows(src, r * p.q_st.n, mq, mq_pad, D, dp, q_mul, sc.q); });
        for (int64_t i = 0; i < mq_pad; ++i) {
          sc.m[i] = kNegInf;
          sc.l[i] = 0.0f;
        }
        std::memset(sc.o, 0, sizeof(float) * static_cast<size_t>(mq_pad * dp));

        const int64_t k_end = p.causal ? tq0 + mq : kept;
        for (int64_t tk0 = 0; tk0 < k_end; tk0 += NK) {
          const int64_t nk = min64(NK, k_end - tk0);
          const int64_t cols = round_up(nk, W);
          const int64_t kv_row = row0 + tk0 * r;
          WithType(p.dtype, k_base + esize * (b * p.k_st.b + kv_row * p.k_st.n + hk * p.k_st.h),
                   [&](auto* src) { PackKeysT(src, r * p.k_st.n, nk, D, dp, W, sc.kt); });
          WithType(p.dtype, v_base + esize * (b * p.v_st.b + kv_row * p.v_st.n + hk * p.v_st.h),
                   [&](auto* src) { PackRows(src, r * p.v_st.n, nk, nk, D, dp, 1.0f, sc.v); });
          ScoresTile(sc.q, sc.kt, dp, mq_pad, cols, sc.s);
          const bool diagonal = p.causal && tk0 + nk - 1 > tq0;
          for (int64_t i = 0; i < mq_pad; ++i) {
            const int64_t visible = diagonal ? min64(nk, tq0 + i - tk0 + 1) : nk;
            sc.alpha[i] = SoftmaxRow(sc.s + i * NK, cols, visible, sc.m[i], sc.l[i]);
          }
          AccumulateTile(sc.s, sc.v, sc.alpha, dp, mq_pad, nk, sc.o);
        }

        // Normalise each row and merge it into the block's accumulator (SPEC.md merge).
        for (int64_t i = 0; i < mq; ++i) {
          const int64_t local = row0 + (tq0 + i) * r - n0;
          float* acc = sc.acc_o + local * dp;
          const float* part = sc.o + i * dp;
          const float lse = sc.l[i] > 0.0f ? (sc.m[i] + std::log2(sc.l[i])) * kLn2 : kNegInf;
          if (lse == kNegInf) continue;  // no visible key: nothing to merge
          const float prev = sc.acc_l[local];
          const float mx = prev > lse ? prev : lse;
          const float w_prev = std::exp(prev - mx), w_part = std::exp(lse - mx);
          const float total = w_prev + w_part;
          const float a_prev = w_prev / total, a_part = w_part / (total * sc.l[i]);
          const VF va = hn::Set(df, a_prev), vb = hn::Set(df, a_part);
          for (int64_t c = 0; c < dp; c += L) {
            hn::Store(hn::MulAdd(va, hn::Load(df, acc + c), hn::Mul(vb, hn::Load(df, part + c))),
                      df, acc + c);
          }
          sc.acc_l[local] = mx + std::log(total);
        }
      }
    }
  }
}

const char* TargetNameImpl() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace ringattn::cpu::detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ringattn::cpu {
namespace detail {

HWY_EXPORT(ForwardBlockImpl);
HWY_EXPORT(TargetNameImpl);

void forward_block(const Problem& p, const Tiles& tiles, int64_t b, int64_t h, int64_t n0,
                   int64_t n1, const Scratch& scratch) {
  HWY_DYNAMIC_DISPATCH(ForwardBlockImpl)(p, tiles, b, h, n0, n1, scratch);
}

}  // namespace detail

const char* simd_target() { return HWY_DYNAMIC_DISPATCH(detail::TargetNameImpl)(); }

}  // namespace ringattn::cpu
#endif  // HWY_ONCE
