// Per-target SIMD code of the CPU forward kernel. Highway compiles this file once for
// each enabled x86 target (AVX-512, AVX2, and a 128-bit baseline) and picks the best one
// for the running CPU.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/backend/cpu/attention_kernels.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
//
#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "src/backend/cpu/attention_cpu.h"
#include "src/backend/cpu/bf16_kernels.h"
#include "src/base/dtype.h"
#include "src/base/index_math.h"

HWY_BEFORE_NAMESPACE();
namespace ringattn::cpu::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for x <= 0 (x = -inf gives 0): 2^n times a degree-5 fit of 2^f, f = x - n in
// [-0.5, 0.5] (relative error 1.4e-7; the bf16 kernels' fit), n = round(x). Adding 1.5 * 2^23
// rounds x into the low mantissa bits, so n's bits shifted into the exponent field need no
// conversion.
HWY_INLINE VF Exp2(DF df, VF x) {
  const hn::RebindToSigned<DF> di;
  const VF round = hn::Set(df, 12582912.0f);
  x = hn::Max(x, hn::Set(df, -127.0f));
  const VF t = hn::Add(x, round);
  const VF f = hn::Sub(x, hn::Sub(t, round));
  VF p = hn::Set(df, 1.32669751e-3f);
  p = hn::MulAdd(p, f, hn::Set(df, 9.67546458e-3f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.55074265e-2f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.40221217e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.93146949e-1f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.00000007f));
  // bits(t) = bits(1.5 * 2^23) + n; shifted by 23, the first term leaves 32 bits.
  const auto e = hn::Add(hn::ShiftLeft<23>(hn::BitCast(di, t)), hn::Set(di, 127 << 23));
  return hn::Mul(p, hn::BitCast(df, e));
}

// Copies `count` strided rows of D elements, times `mul`, into a dense [rows][dp] fp32
// tile; rows past `count` up to `rows` and columns past D are zero.
template <typename T>
void PackRows(const T* src, int64_t row_stride, int64_t count, int64_t rows, int64_t d, int64_t dp,
              float mul, float* dst) {
  for (int64_t i = 0; i < count; ++i) {
    const T* row = src + i * row_stride;
    float* out = dst + i * dp;
    for (int64_t c = 0; c < d; ++c) out[c] = to_f32(row[c]) * mul;
    for (int64_t c = d; c < dp; ++c) out[c] = 0.0f;
  }
  std::memset(dst + count * dp, 0, sizeof(float) * static_cast<size_t>((rows - count) * dp));
}

// Copies `count` strided rows of D elements, times `mul`, into the columns of a transposed
// [dp][ld] tile; columns from `count` to `cols` and rows past D are zero.
template <typename T>
void PackTransposed(const T* src, int64_t row_stride, int64_t count, int64_t cols, int64_t d,
                    int64_t dp, int64_t ld, float mul, float* dst) {
  for (int64_t c = 0; c < dp; ++c) {
    std::memset(dst + c * ld + count, 0, sizeof(float) * static_cast<size_t>(cols - count));
  }
  // Blocks of 16 rows: a block's column c fills one cache line of the tile (row by row,
  // every row would touch D lines, each on its own page when ld is large).
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < count; i0 += kBlock) {
    const int64_t n = min64(kBlock, count - i0);
    const T* rows[kBlock];
    for (int64_t i = 0; i < n; ++i) rows[i] = src + (i0 + i) * row_stride;
    for (int64_t c = 0; c < d; ++c) {
      float* out = dst + c * ld + i0;
      for (int64_t i = 0; i < n; ++i) out[i] = to_f32(rows[i][c]) * mul;
    }
  }
  for (int64_t c = d; c < dp; ++c) {
    std::memset(dst + c * ld, 0, sizeof(float) * static_cast<size_t>(cols));
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

// How a micro-tile's accumulators start.
enum class Init {
  kZero,   // c = 0 + ...
  kScale,  // c = scale (per query lane) * c + ...   (online-softmax rescale)
  kLoad,   // c = c + ...                             (accumulate)
};

// The register micro-tile of every product, 6 rows by 2 vectors:
//   c[r][0..2L) = init_r + sum_{x < steps} a[r * a_row + x * a_step] * b[x * ldb + 0..2L)
// Forward scores:  a = K rows (a_row = dp, a_step = 1), b = Q^T panel, c = S^T.
// Forward output:  a = V columns (a_row = 1, a_step = dp), b = P^T panel, c = O^T.
// Backward:        the same shapes for S^T and dP^T; dV, dK, dQ with b a row-major tile.
// MicroTiles runs `count` of them down a column of tiles: tile i reads a + i * a_next and
// writes c + i * c_next (same b). With `col_max`, the 2L maxima of every c written are
// merged into col_max[0..2L) (the forward's row maxima for the online softmax).
// Not inlined: inside the larger drivers the compiler ran out of registers for the twelve
// accumulators and reloaded operands from the stack in the inner loop (the forward ran 35-50%
// slower); as a function of its own the loop keeps everything in registers, and one call
// per column of tiles keeps the call and epilogue overhead off short products (steps = D).
template <Init kInit, int kRows = Tiles::kMicroRows>
HWY_NOINLINE void MicroTiles(int64_t count, const float* HWY_RESTRICT a, int64_t a_next,
                             int64_t a_row, int64_t a_step, const float* HWY_RESTRICT b,
                             int64_t ldb, int64_t steps, const float* HWY_RESTRICT scale,
                             float* HWY_RESTRICT c, int64_t c_next, int64_t ldc,
                             float* HWY_RESTRICT col_max = nullptr) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  VF max0 = hn::Set(df, kNegInf), max1 = max0;
  if (col_max) {
    max0 = hn::LoadU(df, col_max);
    max1 = hn::LoadU(df, col_max + L);
  }
  for (int64_t i = 0; i < count; ++i, a += a_next, c += c_next) {
    VF acc0[kRows], acc1[kRows];
    VF s0 = hn::Set(df, 1.0f), s1 = s0;
    if constexpr (kInit == Init::kScale) {
      s0 = hn::LoadU(df, scale);
      s1 = hn::LoadU(df, scale + L);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      if constexpr (kInit == Init::kZero) {
        acc0[r] = acc1[r] = hn::Zero(df);
      } else {
        acc0[r] = hn::Mul(s0, hn::LoadU(df, c + r * ldc));
        acc1[r] = hn::Mul(s1, hn::LoadU(df, c + r * ldc + L));
      }
    }
    for (int64_t x = 0; x < steps; ++x) {
      const float* bx = b + x * ldb;
      const float* ax = a + x * a_step;
      const VF b0 = hn::LoadU(df, bx), b1 = hn::LoadU(df, bx + L);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const VF s = hn::Set(df, ax[r * a_row]);
        acc0[r] = hn::MulAdd(s, b0, acc0[r]);
        acc1[r] = hn::MulAdd(s, b1, acc1[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      hn::StoreU(acc0[r], df, c + r * ldc);
      hn::StoreU(acc1[r], df, c + r * ldc + L);
      if (col_max) {
        max0 = hn::Max(max0, acc0[r]);
        max1 = hn::Max(max1, acc1[r]);
      }
    }
  }
  if (col_max) {
    hn::StoreU(max0, df, col_max);
    hn::StoreU(max1, df, col_max + L);
  }
}

// O^T [D][panel] (+)= V^T P^T of one panel: V is the [keys][dp] tile, P^T [keys][panel]. Rows
// D..dp of O^T (the tile's padding) are not computed: full micro-tiles, then one of D % 6
// rows (D = 64: 64 of 66 rows, 3% fewer products).
template <Init kInit>
void OutputProduct(int64_t D, const float* v, int64_t dp, const float* pt, int64_t panel,
                   int64_t keys, const float* alpha, float* ot, int64_t ld) {
  constexpr int64_t MR = Tiles::kMicroRows;
  static_assert(MR == 6, "kTails holds the tiles of 1..5 rows");
  const int64_t full = D / MR;
  MicroTiles<kInit>(full, v, MR, 1, dp, pt, panel, keys, alpha, ot, MR * ld, ld);
  using Tail = void (*)(int64_t, const float*, int64_t, int64_t, int64_t, const float*, int64_t,
                        int64_t, const float*, float*, int64_t, int64_t, float*);
  static constexpr Tail kTails[MR] = {nullptr,
                                      &MicroTiles<kInit, 1>,
                                      &MicroTiles<kInit, 2>,
                                      &MicroTiles<kInit, 3>,
                                      &MicroTiles<kInit, 4>,
                                      &MicroTiles<kInit, 5>};
  if (const int64_t rows = D % MR; rows > 0) {
    kTails[rows](1, v + full * MR, MR, 1, dp, pt, panel, keys, alpha, ot + full * MR * ld, MR * ld,
                 ld, nullptr);
  }
}

// Online-softmax step of one query panel: s is S^T [keys][panel] in log2 units and
// tile_max holds the maxima of its rows [0, max_from); turns S^T into P^T relative to the
// new running max, updates (m, l) and writes the factor that rescales the old output
// accumulator into alpha. Vectorised across queries. Not inlined, for the reason MicroTiles
// isn't: inside the driver the polynomial's constants were reloaded from the stack.
HWY_NOINLINE void SoftmaxPanel(float* HWY_RESTRICT s, int64_t panel, int64_t keys,
                               const float* HWY_RESTRICT tile_max, int64_t max_from,
                               float* HWY_RESTRICT m, float* HWY_RESTRICT l,
                               float* HWY_RESTRICT alpha) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  const VF neg_inf = hn::Set(df, kNegInf);
  for (int64_t off = 0; off < panel; off += L) {
    const VF m_old = hn::LoadU(df, m + off);
    VF t_max = hn::LoadU(df, tile_max + off);
    for (int64_t j = max_from; j < keys; ++j)
      t_max = hn::Max(t_max, hn::LoadU(df, s + j * panel + off));
    const VF m_new = hn::Max(m_old, t_max);
    // Guard of SPEC.md: never (-inf) - (-inf).
    const VF m_ref = hn::IfThenZeroElse(hn::Eq(m_new, neg_inf), m_new);
    VF sum = hn::Zero(df);
    for (int64_t j = 0; j < keys; ++j) {
      float* sj = s + j * panel + off;
      const VF e = Exp2(df, hn::Sub(hn::LoadU(df, sj), m_ref));
      hn::StoreU(e, df, sj);
      sum = hn::Add(sum, e);
    }
    const VF a = Exp2(df, hn::Sub(m_old, m_ref));
    hn::StoreU(a, df, alpha + off);
    hn::StoreU(hn::MulAdd(hn::LoadU(df, l + off), a, sum), df, l + off);
    hn::StoreU(m_new, df, m + off);
  }
}

// Query rows [qr.t_begin, qr.t_end) against every key of `srcs` with one online softmax
// (see forward_rows in attention_cpu.h); the normalised result is merged into qr's rows.
void ForwardRowsImpl(const Problem& p, const Tiles& tiles, const QueryRows& qr,
                     const KeySource* srcs, int64_t num_srcs, const Scratch& sc) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  const int64_t panel = Tiles::kMicroVecs * L, MR = Tiles::kMicroRows;
  const int64_t D = p.head_dim, dp = tiles.padded_dim, ld = tiles.ld_rows();
  const float q_mul = p.scale * 1.4426950408889634f;  // log2(e): scores in log2 units
  float alpha[Tiles::kMaxPanel], tile_max[Tiles::kMaxPanel];
  const int64_t esize = static_cast<int64_t>(dtype_size(p.dtype));
  const int64_t t0 = qr.t_begin, rows = qr.t_end - qr.t_begin;
  // Keys of source x that some query may see: [t_begin, key_end(x)).
  const auto key_end = [&](const KeySource& x) {
    return p.causal ? min64(x.t_end, qr.t_end) : x.t_end;
  };
  bool any = false;
  for (int64_t x = 0; x < num_srcs; ++x) any = any || key_end(srcs[x]) > srcs[x].t_begin;
  if (rows == 0 || !any) return;

  const int64_t cols = round_up(rows, panel);
  WithType(p.dtype, qr.q,
           [&](auto* q) { PackTransposed(q, qr.q_stride, rows, cols, D, dp, ld, q_mul, sc.qt); });
  for (int64_t i = 0; i < cols; ++i) {
    sc.m[i] = kNegInf;
    sc.l[i] = 0.0f;
  }
  PanelBits started;  // no zeroing of O^T (it cost 1.7% of a forward)

  // The tile after (x, tk0), or x == num_srcs when there is none.
  const auto next_tile = [&](int64_t x, int64_t tk0) {
    tk0 += Tiles::kKeyTile;
    while (x < num_srcs && tk0 >= key_end(srcs[x])) {
      if (++x < num_srcs) tk0 = srcs[x].t_begin;
    }
    return std::pair<int64_t, int64_t>(x, tk0);
  };
  const int64_t row_bytes = esize * D, panels = ceil_div(rows, panel);
  for (int64_t x = 0; x < num_srcs; ++x) {
    const KeySource& src = srcs[x];
    const int64_t k_end = key_end(src);
    for (int64_t tk0 = src.t_begin; tk0 < k_end; tk0 += Tiles::kKeyTile) {
      const int64_t nk = min64(Tiles::kKeyTile, k_end - tk0);
      const int64_t at = esize * (tk0 - src.t_begin);
      // While this tile's panels run, the next tile's K and V rows are fetched into cache a
      // few rows per panel (strided rows miss the hardware prefetcher and the TLB).
      const auto [nx, ntk0] = next_tile(x, tk0);
      const KeySource* nsrc = nx < num_srcs ? &srcs[nx] : nullptr;
      const int64_t n_next = nsrc ? min64(Tiles::kKeyTile, key_end(*nsrc) - ntk0) : 0;
      const int64_t pf_step = ceil_div(n_next, panels);
      WithType(p.dtype, static_cast<const char*>(src.k) + at * src.k_stride, [&](auto* k) {
        PackRows(k, src.k_stride, nk, round_up(nk, MR), D, dp, 1.0f, sc.k);
      });
      WithType(p.dtype, static_cast<const char*>(src.v) + at * src.v_stride,
               [&](auto* v) { PackRows(v, src.v_stride, nk, nk, D, dp, 1.0f, sc.v); });

      for (int64_t ip = 0; ip < rows; ip += panel) {
        for (int64_t j = ip / panel * pf_step; j < min64(n_next, (ip / panel + 1) * pf_step); ++j) {
          const int64_t row = esize * (ntk0 - nsrc->t_begin + j);
          const char* k_row = static_cast<const char*>(nsrc->k) + row * nsrc->k_stride;
          const char* v_row = static_cast<const char*>(nsrc->v) + row * nsrc->v_stride;
          for (int64_t c = 0; c < row_bytes; c += 64) {
            hwy::Prefetch(k_row + c);
            hwy::Prefetch(v_row + c);
          }
        }
        // Keys of this tile visible to the panel's last query (causal), or all of them.
        const int64_t t_first = t0 + ip, t_last = t0 + min64(ip + panel, rows) - 1;
        const int64_t keys = p.causal ? min64(nk, t_last - tk0 + 1) : nk;
        if (keys <= 0) continue;
        const float* qt = sc.qt + ip;
        // The first `fused` keys are visible to every query of the panel: their maxima come
        // with the scores. The rest (the causal diagonal, the last tile's padding rows) are
        // masked first and scanned by the softmax.
        const int64_t all_see = p.causal ? min64(keys, max64(0, t_first - tk0 + 1)) : keys;
        const int64_t fused = all_see / MR * MR;
        std::fill_n(tile_max, panel, kNegInf);
        MicroTiles<Init::kZero>(fused / MR, sc.k, MR * dp, dp, 1, qt, ld, D, nullptr, sc.s,
                                MR * panel, panel, tile_max);
        MicroTiles<Init::kZero>(ceil_div(keys - fused, MR), sc.k + fused * dp, MR * dp, dp, 1, qt,
                                ld, D, nullptr, sc.s + fused * panel, MR * panel, panel);
        if (p.causal && tk0 + keys - 1 > t_first) {
          for (int64_t j = max64(0, t_first - tk0 + 1); j < keys; ++j) {
            // Query w sees key j iff tk0 + j <= t_first + w.
            const int64_t w_end = min64(panel, tk0 + j - t_first);
            for (int64_t w = 0; w < w_end; ++w) sc.s[j * panel + w] = kNegInf;
          }
        }
        SoftmaxPanel(sc.s, panel, keys, tile_max, fused, sc.m + ip, sc.l + ip, alpha);
        if (started.test(ip / panel)) {
          OutputProduct<Init::kScale>(D, sc.v, dp, sc.s, panel, keys, alpha, sc.ot + ip, ld);
        } else {
          OutputProduct<Init::kZero>(D, sc.v, dp, sc.s, panel, keys, nullptr, sc.ot + ip, ld);
          started.set(ip / panel);
        }
      }
    }
  }

  merge_queries(p, tiles, qr, sc.ot, sc.m, sc.l, 1.0);
}

// In place over a key block's rows of sc.p (S^T) and sc.ds (dP^T), [keys][queries]: P =
// exp(S - lse) (0 where masked: rows nk.., and on the causal diagonal keys after their query),
// dS = P * (dP - dr); vectorised across the queries i0.. of the block.
HWY_INLINE void BlockProbabilities(const BackwardScratch& sc, int64_t nk, int64_t j0, int64_t i0,
                                   bool diagonal) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  const int64_t QB = BackwardTiles::kQueryBlock, QR = BackwardTiles::kQueryRows;
  const VF zero = hn::Zero(df), iota = hn::Iota(df, 0.0f);
  for (int64_t j = 0; j < round_up(nk, Tiles::kMicroRows); ++j) {
    const VF key = hn::Set(df, static_cast<float>(j0 + j));
    for (int64_t i = 0; i < QB; i += L) {
      float* pj = sc.p + j * QR + i;
      float* dsj = sc.ds + j * QR + i;
      // (s - hi) - lo keeps the precision of a large lse; P <= 1, as it is exactly.
      VF prob =
          j < nk ? Exp2(df, hn::Min(hn::Sub(hn::Sub(hn::LoadU(df, pj), hn::LoadU(df, sc.lse2 + i)),
                                            hn::LoadU(df, sc.lse2_lo + i)),
                                    zero))
                 : zero;
      if (diagonal) {
        const VF query = hn::Add(hn::Set(df, static_cast<float>(i0 + i)), iota);
        prob = hn::IfThenZeroElse(hn::Gt(key, query), prob);
      }
      hn::StoreU(prob, df, pj);
      hn::StoreU(hn::Mul(prob, hn::Sub(hn::LoadU(df, dsj), hn::LoadU(df, sc.dr + i))), df, dsj);
    }
  }
}

// Gradients of one piece (see backward_piece in attention_cpu.h). The keys are packed
// once; query blocks outer (their Q, dO, lse and rowsum(dO * O) packed once), key blocks
// inner; dQ of a query block and dK, dV of all the keys stay in scratch until they are added
// to their destinations, so every row is written by one task in a fixed order.
void BackwardPieceImpl(const BackwardProblem& bp, const BackwardTiles& tiles, const BackwardWork& w,
                       const BackwardScratch& sc, const GradRows& dq_rows) {
  const Problem& p = bp.fwd;
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df)), panel = Tiles::kMicroVecs * L;
  const int64_t MR = Tiles::kMicroRows, KB = BackwardTiles::kKeyBlock;
  const int64_t QB = BackwardTiles::kQueryBlock, QR = BackwardTiles::kQueryRows;
  const int64_t D = p.head_dim, dp = tiles.padded_dim;
  const Branch br = p.branches[static_cast<size_t>(w.branch)];
  const int64_t r = br.rate, h = w.h, b = w.b;
  constexpr float kLog2e = 1.4426950408889634f;
  const float q_mul = p.scale * kLog2e;
  const int64_t esize = static_cast<int64_t>(dtype_size(p.dtype));

  // Keys: kept indices [tk0, tk1), packed row t - tk0.
  const int64_t tk0 = w.keys.t_begin, tk1 = w.keys.t_end, mk = tk1 - tk0;
  WithType(p.dtype, w.keys.k,
           [&](auto* k) { PackRows(k, w.keys.k_stride, mk, round_up(mk, KB), D, dp, 1.0f, sc.k); });
  WithType(p.dtype, w.keys.v,
           [&](auto* v) { PackRows(v, w.keys.v_stride, mk, round_up(mk, KB), D, dp, 1.0f, sc.v); });
  std::memset(sc.dk, 0, sizeof(float) * static_cast<size_t>(round_up(mk, KB) * dp));
  std::memset(sc.dv, 0, sizeof(float) * static_cast<size_t>(round_up(mk, KB) * dp));

  // Queries: kept indices [tq_begin, tq_end) of the local views.
  const int64_t row0 = w.segment * br.segment + w.offset - p.shard_begin;  // local row of t = 0
  auto at = [&](const void* base, const Strides3& st, int64_t t) {
    return static_cast<const char*>(base) + esize * (b * st.b + (row0 + t * r) * st.n + h * st.h);
  };
  for (int64_t i0 = w.tq_begin; i0 < w.tq_end; i0 += QB) {
    const int64_t nq = min64(QB, w.tq_end - i0);
    // With causal, keys after the block's last query are skipped.
    const int64_t k_end = p.causal ? min64(tk1, i0 + nq) : tk1;
    if (k_end <= tk0) continue;
    WithType(p.dtype, at(p.q, p.q_st, i0), [&](auto* q) {
      PackTransposed(q, r * p.q_st.n, nq, QB, D, D, QB, q_mul, sc.qt);
      PackRows(q, r * p.q_st.n, nq, QR, D, dp, 1.0f, sc.q);
    });
    WithType(p.dtype, at(bp.dout, bp.dout_st, i0), [&](auto* dout) {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(dout)>>;
      PackTransposed(dout, r * bp.dout_st.n, nq, QB, D, D, QB, p.out_factor, sc.dot);
      PackRows(dout, r * bp.dout_st.n, nq, QR, D, dp, p.out_factor, sc.dout);
      const T* out = reinterpret_cast<const T*>(at(p.out, p.out_st, i0));
      backward_row_lse(p, b, h, row0 + i0 * r, r, nq, QB, sc.lse2, sc.lse2_lo, sc.dr);
      for (int64_t i = 0; i < nq; ++i) {
        float dr = 0.0f;
        for (int64_t c = 0; c < D; ++c) {
          dr += to_f32(dout[i * r * bp.dout_st.n + c]) * to_f32(out[i * r * p.out_st.n + c]);
        }
        sc.dr[i] = dr;
      }
    });
    std::memset(sc.dq, 0, sizeof(float) * static_cast<size_t>(QR * dp));

    for (int64_t j0 = tk0; j0 < k_end; j0 += KB) {
      const int64_t nk = min64(KB, k_end - j0);
      const float* k = sc.k + (j0 - tk0) * dp;
      const float* v = sc.v + (j0 - tk0) * dp;
      // S^T = K Q^T and dP^T = V dO^T, [keys][queries].
      for (int64_t ip = 0; ip < QB; ip += panel) {
        MicroTiles<Init::kZero>(ceil_div(nk, MR), k, MR * dp, dp, 1, sc.qt + ip, QB, D, nullptr,
                                sc.p + ip, MR * QR, QR);
        MicroTiles<Init::kZero>(ceil_div(nk, MR), v, MR * dp, dp, 1, sc.dot + ip, QB, D, nullptr,
                                sc.ds + ip, MR * QR, QR);
      }
      BlockProbabilities(sc, nk, j0, i0, p.causal && j0 + nk - 1 > i0);
      // dV += P^T dO and dK += dS^T Q (rows: keys); dQ += dS K (rows: queries).
      for (int64_t c = 0; c < dp; c += panel) {
        MicroTiles<Init::kLoad>(ceil_div(nk, MR), sc.p, MR * QR, QR, 1, sc.dout + c, dp, nq,
                                nullptr, sc.dv + (j0 - tk0) * dp + c, MR * dp, dp);
        MicroTiles<Init::kLoad>(ceil_div(nk, MR), sc.ds, MR * QR, QR, 1, sc.q + c, dp, nq, nullptr,
                                sc.dk + (j0 - tk0) * dp + c, MR * dp, dp);
        MicroTiles<Init::kLoad>(ceil_div(nq, MR), sc.ds, MR, 1, QR, k + c, dp, nk, nullptr,
                                sc.dq + c, MR * dp, dp);
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      float* dq_row = dq_rows.row(b, row0 + (i0 + i) * r, h);
      for (int64_t c = 0; c < D; ++c) dq_row[c] += p.scale * sc.dq[i * dp + c];
    }
  }
  for (int64_t j = 0; j < mk; ++j) {
    float* dk_row = w.dk + j * w.dk_stride;
    float* dv_row = w.dv + j * w.dv_stride;
    for (int64_t c = 0; c < D; ++c) {
      dk_row[c] += p.scale * sc.dk[j * dp + c];
      dv_row[c] += sc.dv[j * dp + c];
    }
  }
}

const char* TargetNameImpl() {
  return hwy::TargetName(HWY_TARGET);
}

}  // namespace HWY_NAMESPACE
}  // namespace ringattn::cpu::detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ringattn::cpu {
namespace detail {

HWY_EXPORT(TargetNameImpl);
HWY_EXPORT(BackwardPieceImpl);
HWY_EXPORT(ForwardRowsImpl);

// The one dispatch point of the kernels: bf16 products where the tiles ask for them
// (resolve_bf16 checked the CPU), else Highway's best target for this CPU.
void forward_rows(const Problem& p, const Tiles& tiles, const QueryRows& rows,
                  const KeySource* sources, int64_t num_sources, const Scratch& scratch) {
  if (tiles.kernel != CpuBf16::kWiden) {
    return forward_rows_bf16(p, tiles, rows, sources, num_sources, scratch);
  }
  HWY_DYNAMIC_DISPATCH(ForwardRowsImpl)(p, tiles, rows, sources, num_sources, scratch);
}

void backward_piece(const BackwardProblem& bp, const BackwardTiles& tiles, const BackwardWork& w,
                    const BackwardScratch& scratch, const GradRows& dq) {
  if (tiles.kernel != CpuBf16::kWiden) return backward_piece_bf16(bp, tiles, w, scratch, dq);
  HWY_DYNAMIC_DISPATCH(BackwardPieceImpl)(bp, tiles, w, scratch, dq);
}

}  // namespace detail

const char* simd_target() {
  return HWY_DYNAMIC_DISPATCH(detail::TargetNameImpl)();
}

}  // namespace ringattn::cpu
#endif  // HWY_ONCE
