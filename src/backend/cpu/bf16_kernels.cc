// The bf16 forward and backward bodies on AVX512_BF16 dot products and AMX-BF16 tiles (see
// bf16_kernels.h). Everything after the target pragma is compiled for AVX-512 with BF16 and
// AMX and runs only where resolve_bf16() found those instructions; the CPU checks themselves
// sit before it, in the baseline instruction set.

#include "src/backend/cpu/bf16_kernels.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

#include "src/base/check.h"
#include "src/base/dtype.h"
#include "src/base/index_math.h"

namespace ringattn::cpu {
namespace {

struct Bf16Support {
  bool dot = false;  // AVX512_BF16 (with AVX-512 F/BW/VL/DQ and the OS's zmm state)
  bool amx = false;  // AMX-TILE and AMX-BF16, tile state enabled by the OS and granted
};

uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

Bf16Support detect() {
  Bf16Support s;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return s;
  const uint64_t xcr = xcr0();
  constexpr uint64_t kZmmState = 0xe6;  // SSE, AVX, opmask, zmm
  constexpr uint64_t kTileState = (uint64_t{1} << 17) | (uint64_t{1} << 18);  // cfg, data
  unsigned ebx7 = 0, edx7 = 0, eax71 = 0;
  if (!__get_cpuid_count(7, 0, &a, &ebx7, &c, &edx7)) return s;
  __get_cpuid_count(7, 1, &eax71, &b, &c, &d);
  const bool avx512 = (ebx7 & bit_AVX512F) && (ebx7 & bit_AVX512BW) && (ebx7 & bit_AVX512VL) &&
                      (ebx7 & bit_AVX512DQ) && (xcr & kZmmState) == kZmmState;
  s.dot = avx512 && (eax71 & (1u << 5));                                   // AVX512_BF16
  const bool amx = s.dot && (edx7 & (1u << 22)) && (edx7 & (1u << 24)) &&  // AMX-BF16, -TILE
                   (xcr & kTileState) == kTileState;
  // Linux (5.16+) hands out the tile data state only on request, once per process.
  constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  s.amx = amx && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  return s;
}

const Bf16Support& support() {
  static const Bf16Support s = detect();
  return s;
}

}  // namespace

CpuBf16 resolve_bf16(CpuBf16 requested) {
  const Bf16Support& s = support();
  if (requested == CpuBf16::kAuto) {
    return s.amx ? CpuBf16::kAmx : s.dot ? CpuBf16::kDot : CpuBf16::kWiden;
  }
  require_supported(requested != CpuBf16::kDot || s.dot,
                    "cpu_bf16 = dot, but this CPU has no AVX512_BF16 dot-product instructions; "
                    "use cpu_bf16 = auto (picks what the CPU has) or widen");
  require_supported(requested != CpuBf16::kAmx || s.amx,
                    "cpu_bf16 = amx, but this CPU has no AMX-BF16 tiles or the OS refused the "
                    "tile state (Linux 5.16+ grants it through arch_prctl); use cpu_bf16 = auto "
                    "or dot");
  return requested;
}

}  // namespace ringattn::cpu

// ---------------------------------------------------------------------------------------------
// From here on: AVX-512 (F, BW, VL, DQ, BF16) and AMX code. No standard-library templates are
// instantiated below, so no out-of-line copy of one can be compiled for these instructions.
#if defined(__clang__)
#pragma clang attribute push(                                                                \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile," \
                          "amx-bf16"))),                                                     \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which this warning flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ringattn::cpu::detail {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kPanel = 32;     // queries per forward panel: 2 vectors, 2 AMX tile columns
constexpr int64_t kKeyTile = 96;   // keys per forward tile: 6 AMX row tiles, 3 reduction steps
constexpr int64_t kKeyBlock = 64;  // keys per backward block
constexpr int64_t kQueryBlock = BackwardTiles::kQueryBlock;  // 64
constexpr int64_t kAhead = 8;  // strided rows fetched ahead of the one being read or written

// Which product unit the GEMMs below run on.
enum class Unit { kDot, kAmx };

// 2^x for x <= 0 (x = -inf gives 0): scalef(p(f), n) with n = round(x), f = x - n in
// [-0.5, 0.5] and p a degree-5 fit of 2^f (relative error 1.4e-7); below -160 the result
// underflows to 0.
inline __m512 Exp2(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.32669751e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67546458e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55074265e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40221217e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93146949e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000007f));
  return _mm512_scalef_ps(p, n);
}

// Rounds two vectors to bf16 (nearest even) and interleaves them: lane i holds the pair
// (lo[i], hi[i]), the layout of one row of a pair-packed operand.
inline __m512i PairBf16(__m512 lo, __m512 hi) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

// 32 fp32 lanes rounded to bf16, in order.
inline __m512i RowBf16(__m512 lo, __m512 hi) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// The A operand of a GEMM: the pair (A[m][2x], A[m][2x + 1]) at pairs[m * row + x * step].
// Rows of bf16 `ld` elements apart (Rows) serve both units; the dot products also take
// consecutive rows of a matrix paired (PackRowPairs: row = 1, step = its dp), its transpose
// without a transposing copy.
struct PairOperand {
  const uint32_t* pairs;
  int64_t row, step;
};
inline PairOperand Rows(const uint16_t* a, int64_t ld) {
  return {reinterpret_cast<const uint32_t*>(a), ld / 2, 1};
}

// The GEMM all products run on:
//   C[m][n] (+)= sum_k A[m][k] * B[k / 2][n][k % 2],  m < M, n < N, k < K
// A: a PairOperand (AMX: Rows only), B: bf16 pairs along k (ldb pairs apart), C: fp32 rows
// (ldc apart). M % 16 == 0, N % 32 == 0, K % 32 == 0.
//
// Dot products: 8 rows x 32 columns of accumulators (16 vectors); per pair of k, two vectors
// of B and one broadcast pair of A per row.
template <bool kAccumulate>
void GemmDot(int64_t M, int64_t N, int64_t K, const PairOperand& A, const uint32_t* B, int64_t ldb,
             float* C, int64_t ldc) {
  constexpr int kRows = 8;
  const int64_t pairs = K / 2, a_row = A.row, a_step = A.step;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const uint32_t* a = A.pairs + m0 * a_row;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      float* c = C + m0 * ldc + n0;
      __m512 acc[kRows][2];
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        acc[r][0] = kAccumulate ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
        acc[r][1] = kAccumulate ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
      }
      const uint32_t* b = B + n0;
      const uint32_t* ax = a;
      for (int64_t x = 0; x < pairs; ++x, b += ldb, ax += a_step) {
        const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b));
        const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + 16));
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
          const __m512bh ar =
              reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(ax[r * a_row])));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        _mm512_storeu_ps(c + r * ldc, acc[r][0]);
        _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
      }
    }
  }
}

// The tile configuration of every AMX product: all 8 tiles 16 rows x 64 bytes (A: 16 x 32
// bf16, B: 16 pair rows x 16 pairs, C: 16 x 16 fp32).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
constexpr TileConfig kTileConfig{};

// Loads the tile configuration for the calling thread's products and releases the tile
// state (so the OS need not save it) when the body is done.
class TileScope {
 public:
  explicit TileScope(Unit unit) : on_(unit == Unit::kAmx) {
    if (on_) _tile_loadconfig(&kTileConfig);
  }
  ~TileScope() {
    if (on_) _tile_release();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool on_;
};

// AMX: 32 x 32 blocks of C (four accumulator tiles 0-3; A in tiles 4-5, B in tiles 6-7),
// or 16 x 32 for the last 16 rows of an odd count.
template <bool kAccumulate>
void GemmAmx(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B,
             int64_t ldb, float* C, int64_t ldc) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;  // strides in bytes
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const bool two = M - m0 >= 32;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      float* c0 = C + m0 * ldc + n0;
      float* c1 = c0 + 16 * ldc;
      if (kAccumulate) {
        _tile_loadd(0, c0, sc);
        _tile_loadd(1, c0 + 16, sc);
        if (two) {
          _tile_loadd(2, c1, sc);
          _tile_loadd(3, c1 + 16, sc);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        const uint16_t* a = A + m0 * lda + k0;
        const uint32_t* b = B + (k0 / 2) * ldb + n0;
        _tile_loadd(4, a, sa);
        _tile_loadd(6, b, sb);
        _tile_loadd(7, b + 16, sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, a + 16 * lda, sa);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c0, sc);
      _tile_stored(1, c0 + 16, sc);
      if (two) {
        _tile_stored(2, c1, sc);
        _tile_stored(3, c1 + 16, sc);
      }
    }
  }
}

template <bool kAccumulate>
inline void Gemm(Unit unit, int64_t M, int64_t N, int64_t K, const PairOperand& A,
                 const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
  if (unit == Unit::kAmx) {
    GemmAmx<kAccumulate>(M, N, K, reinterpret_cast<const uint16_t*>(A.pairs), 2 * A.row, B, ldb, C,
                         ldc);
  } else {
    GemmDot<kAccumulate>(M, N, K, A, B, ldb, C, ldc);
  }
}

// Carves typed buffers out of one scratch allocation (64-byte aligned pieces); with no
// allocation it only counts the bytes.
class Carve {
 public:
  explicit Carve(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += round_up(count * static_cast<int64_t>(sizeof(T)), 64);
    return p;
  }
  int64_t used() const { return used_; }

 private:
  char* base_;
  int64_t used_ = 0;
};

inline uint16_t Bits(const bf16_t* row, int64_t c) {
  return row[c].bits;
}

// The pair (row[2x], row[2x + 1]) of a D-element row, 0 past its end; `flip` negates both.
inline uint32_t PairOf(const bf16_t* row, int64_t x, int64_t d, uint32_t flip) {
  const int64_t c = 2 * x;
  if (c + 1 < d) {
    uint32_t u;
    std::memcpy(&u, row + c, sizeof(u));
    return u ^ flip;
  }
  return c < d ? (Bits(row, c) ^ (flip & 0xffffu)) : 0u;
}

// Fetches the `count` strided rows of `bytes` bytes from row `first` on into cache (rows
// of a dilated view are too far apart for the hardware prefetcher and miss the TLB).
inline void PrefetchRows(const void* base, int64_t stride_bytes, int64_t first, int64_t count,
                         int64_t bytes) {
  const char* row = static_cast<const char*>(base) + first * stride_bytes;
  for (int64_t i = 0; i < count; ++i, row += stride_bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
  }
}

// Rows of D bf16 elements (`stride` apart) into [rows][dp] bf16, zero past D and past count.
void PackRows(const bf16_t* src, int64_t stride, int64_t count, int64_t rows, int64_t d, int64_t dp,
              uint16_t* dst) {
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAhead < count) PrefetchRows(src, 2 * stride, i + kAhead, 1, 2 * d);
    std::memcpy(dst + i * dp, src + i * stride, sizeof(uint16_t) * static_cast<size_t>(d));
    std::memset(dst + i * dp + d, 0, sizeof(uint16_t) * static_cast<size_t>(dp - d));
  }
  std::memset(dst + count * dp, 0, sizeof(uint16_t) * static_cast<size_t>((rows - count) * dp));
}

// Rows as the columns of [dp][ld] bf16 (the transpose), zero past count up to `cols` and in
// the rows past D. Row by row: each source row is read once, and the D lines written stay
// in L1 while consecutive rows fill them.
void PackTransposed(const bf16_t* src, int64_t stride, int64_t count, int64_t cols, int64_t d,
                    int64_t dp, int64_t ld, uint16_t* dst) {
  for (int64_t i = 0; i < count; ++i) {
    const bf16_t* row = src + i * stride;
    for (int64_t c = 0; c < d; ++c) dst[c * ld + i] = Bits(row, c);
  }
  for (int64_t c = 0; c < dp; ++c) {
    const int64_t from = c < d ? count : 0;
    std::memset(dst + c * ld + from, 0, sizeof(uint16_t) * static_cast<size_t>(cols - from));
  }
}

// sum_c a[c] b[c] of two D-element bf16 rows, in fp32.
inline float DotBf16(const bf16_t* a, const bf16_t* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 m =
        d - c >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (d - c)) - 1);
    const __m512 x = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + c)), 16));
    const __m512 y = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + c)), 16));
    acc = _mm512_fmadd_ps(x, y, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Rows as the columns of pairs [dp / 2][ld]: column i holds row i's pairs along D (the B
// operand of a product over D), zero past count up to `cols`.
void PackPairsTransposed(const bf16_t* src, int64_t stride, int64_t count, int64_t cols, int64_t d,
                         int64_t dp, int64_t ld, uint32_t flip, uint32_t* dst) {
  constexpr int64_t kBlock = 16;  // a block's pair x fills one cache line of the tile
  for (int64_t x = 0; x < dp / 2; ++x) {
    std::memset(dst + x * ld + count, 0, sizeof(uint32_t) * static_cast<size_t>(cols - count));
  }
  for (int64_t i0 = 0; i0 < count; i0 += kBlock) {
    const int64_t n = min64(kBlock, count - i0);
    for (int64_t x = 0; x < dp / 2; ++x) {
      uint32_t* out = dst + x * ld + i0;
      for (int64_t i = 0; i < n; ++i) out[i] = PairOf(src + (i0 + i) * stride, x, d, flip);
    }
  }
}

// Consecutive rows paired: pair row j holds (row 2j, row 2j + 1) interleaved along D (the B
// operand of a product over the rows, or the A operand of one over them with row = 1,
// step = dp), [rows / 2][dp]; rows past count and columns past D are zero.
void PackRowPairs(const bf16_t* src, int64_t stride, int64_t count, int64_t rows, int64_t d,
                  int64_t dp, uint32_t* dst) {
  // Words 2i and 2i + 1 of a result: element i of the first row and of the second (lo: the
  // first 16 elements of 32, hi: the last 16).
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const auto* base = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < rows / 2; ++j) {
    const int64_t r0 = 2 * j, r1 = 2 * j + 1;
    if (r1 + kAhead < count) PrefetchRows(base, 2 * stride, r0 + kAhead, 2, 2 * d);
    uint32_t* out = dst + j * dp;
    for (int64_t c0 = 0; c0 < dp; c0 += 32) {
      const __mmask32 m =
          d - c0 >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << (d - c0)) - 1);
      const __m512i a = r0 < count ? _mm512_maskz_loadu_epi16(m, base + r0 * stride + c0)
                                   : _mm512_setzero_si512();
      const __m512i b = r1 < count ? _mm512_maskz_loadu_epi16(m, base + r1 * stride + c0)
                                   : _mm512_setzero_si512();
      _mm512_storeu_si512(out + c0, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(out + c0 + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// Online-softmax step of one panel (bf16 products): s is S^T [keys][kPanel], raw dot
// products; scores are s * c in log2 units (c > 0). Turns the rows into P^T, rounded to bf16
// and pair-packed along the keys into p2 [round_up(keys, 32) / 2][kPanel] (zero rows past
// the keys), and updates (m, l) and alpha as SoftmaxPanel does.
void SoftmaxPanelBf16(const float* s, int64_t keys, float c, float* m, float* l, float* alpha,
                      uint32_t* p2) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf), vc = _mm512_set1_ps(c);
  const int64_t pairs = ceil_div(keys, 2), rows = round_up(keys, 32) / 2;
  for (int64_t off = 0; off < kPanel; off += 16) {
    __m512 t_max = neg_inf;
    for (int64_t j = 0; j < keys; ++j)
      t_max = _mm512_max_ps(t_max, _mm512_loadu_ps(s + j * kPanel + off));
    // The running max m is kept in raw score units (an exact score): s - m is exact where it
    // matters and never above 0, so no probability exceeds 1, at any score magnitude (with m
    // in log2 units, s c - fl(m c) reached ulp(m c) / 2, and exp2 of that overflowed).
    const __m512 m_old = _mm512_loadu_ps(m + off);
    const __m512 m_new = _mm512_max_ps(m_old, t_max);
    // Guard of SPEC.md: never (-inf) - (-inf).
    const __m512 m_ref =
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_NEQ_OQ), m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < pairs; ++j) {
      const __m512 e0 =
          Exp2(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + 2 * j * kPanel + off), m_ref), vc));
      const __m512 e1 =
          2 * j + 1 < keys
              ? Exp2(_mm512_mul_ps(
                    _mm512_sub_ps(_mm512_loadu_ps(s + (2 * j + 1) * kPanel + off), m_ref), vc))
              : _mm512_setzero_ps();
      sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
      _mm512_storeu_si512(p2 + j * kPanel + off, PairBf16(e0, e1));
    }
    for (int64_t j = pairs; j < rows; ++j) {
      _mm512_storeu_si512(p2 + j * kPanel + off, _mm512_setzero_si512());
    }
    // alpha is exactly 1 where the max did not move (RescalePanel then skips the panel).
    const __m512 a = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_old, m_new, _CMP_EQ_OQ),
                                          Exp2(_mm512_mul_ps(_mm512_sub_ps(m_old, m_ref), vc)),
                                          _mm512_set1_ps(1.0f));
    _mm512_storeu_ps(alpha + off, a);
    _mm512_storeu_ps(l + off, _mm512_fmadd_ps(_mm512_loadu_ps(l + off), a, sum));
    _mm512_storeu_ps(m + off, m_new);
  }
}

// O^T panel [dp][kPanel columns, ld apart] times alpha per column; nothing when all are 1.
void RescalePanel(float* ot, int64_t ld, int64_t dp, const float* alpha) {
  const __m512 a0 = _mm512_loadu_ps(alpha), a1 = _mm512_loadu_ps(alpha + 16);
  const __m512 one = _mm512_set1_ps(1.0f);
  if ((_mm512_cmp_ps_mask(a0, one, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(a1, one, _CMP_EQ_OQ)) ==
      0xffff) {
    return;
  }
  for (int64_t r = 0; r < dp; ++r) {
    float* row = ot + r * ld;
    _mm512_storeu_ps(row, _mm512_mul_ps(a0, _mm512_loadu_ps(row)));
    _mm512_storeu_ps(row + 16, _mm512_mul_ps(a1, _mm512_loadu_ps(row + 16)));
  }
}

// The forward scratch of one thread, carved from Scratch::bf16.
struct ForwardBuffers {
  uint32_t* qt2;  // [dp / 2][ld], Q^T pair-packed along D (raw, sign of the scale folded in)
  uint16_t* k;    // [kKeyTile][dp], the key tile
  uint16_t* vt;   // AMX: [dp][kKeyTile], V^T of the tile; dot: [kKeyTile / 2][dp] V's row pairs
  float* s;       // [kKeyTile][kPanel], S^T of one panel
  uint32_t* p2;   // [kKeyTile / 2][kPanel], P^T pair-packed along the keys
  ForwardBuffers(void* base, int64_t dp, int64_t ld, int64_t* bytes = nullptr) {
    Carve carve(base);
    qt2 = carve.take<uint32_t>(dp / 2 * ld);
    k = carve.take<uint16_t>(kKeyTile * dp);
    vt = carve.take<uint16_t>(dp * kKeyTile);
    s = carve.take<float>(kKeyTile * kPanel);
    p2 = carve.take<uint32_t>(kKeyTile / 2 * kPanel);
    if (bytes) *bytes = carve.used();
  }
};

// Keys of x that some query of qr may see: [x.t_begin, KeyEnd).
inline int64_t KeyEnd(const Problem& p, const QueryRows& qr, const KeySource& x) {
  return p.causal ? min64(x.t_end, qr.t_end) : x.t_end;
}

void ForwardRows(Unit unit, const Problem& p, const Tiles& tiles, const QueryRows& qr,
                 const KeySource* srcs, int64_t num_srcs, const Scratch& sc) {
  const int64_t D = p.head_dim, dp = tiles.padded_dim, ld = tiles.ld_rows();
  const int64_t t0 = qr.t_begin, rows = qr.t_end - qr.t_begin;
  // Scores in log2 units are (q . k) * c; a negative scale is folded into Q's sign (exact).
  const float c = std::fabs(p.scale) * kLog2e;
  const uint32_t flip = p.scale < 0.0f ? 0x80008000u : 0u;
  bool any = false;
  for (int64_t x = 0; x < num_srcs; ++x) any = any || KeyEnd(p, qr, srcs[x]) > srcs[x].t_begin;
  if (rows == 0 || !any) return;

  const ForwardBuffers buf(sc.bf16, dp, ld);
  const TileScope tiles_on(unit);
  const int64_t cols = round_up(rows, kPanel);
  PackPairsTransposed(static_cast<const bf16_t*>(qr.q), qr.q_stride, rows, cols, D, dp, ld, flip,
                      buf.qt2);
  for (int64_t i = 0; i < cols; ++i) {
    sc.m[i] = kNegInf;
    sc.l[i] = 0.0f;
  }
  PanelBits started;
  float alpha[kPanel];
  const int64_t panels = ceil_div(rows, kPanel), row_bytes = 2 * D;
  for (int64_t x = 0; x < num_srcs; ++x) {
    const KeySource& src = srcs[x];
    const int64_t k_end = KeyEnd(p, qr, src);
    for (int64_t tk0 = src.t_begin; tk0 < k_end; tk0 += kKeyTile) {
      const int64_t nk = min64(kKeyTile, k_end - tk0), at = tk0 - src.t_begin;
      // While this tile's panels run, the next tile's K and V rows are fetched into cache a
      // few rows per panel (strided rows miss the hardware prefetcher and the TLB).
      int64_t nx = x, ntk0 = tk0 + kKeyTile;
      while (nx < num_srcs && ntk0 >= KeyEnd(p, qr, srcs[nx])) {
        if (++nx < num_srcs) ntk0 = srcs[nx].t_begin;
      }
      const KeySource* nsrc = nx < num_srcs ? &srcs[nx] : nullptr;
      const int64_t n_next = nsrc ? min64(kKeyTile, KeyEnd(p, qr, *nsrc) - ntk0) : 0;
      const int64_t pf_step = ceil_div(n_next, panels);
      PackRows(static_cast<const bf16_t*>(src.k) + at * src.k_stride, src.k_stride, nk,
               round_up(nk, 16), D, dp, buf.k);
      // V^T as the A operand of O^T += V^T P^T: AMX tiles load it as rows of V^T; the dot
      // products broadcast pairs of keys, which V's row pairs hold without a transpose.
      const bf16_t* v = static_cast<const bf16_t*>(src.v) + at * src.v_stride;
      PairOperand vt{reinterpret_cast<const uint32_t*>(buf.vt), 1, dp};
      if (unit == Unit::kAmx) {
        PackTransposed(v, src.v_stride, nk, round_up(nk, 32), D, dp, kKeyTile, buf.vt);
        vt = Rows(buf.vt, kKeyTile);
      } else {
        PackRowPairs(v, src.v_stride, nk, round_up(nk, 32), D, dp,
                     reinterpret_cast<uint32_t*>(buf.vt));
      }
      for (int64_t ip = 0; ip < rows; ip += kPanel) {
        const int64_t pf_end = min64(n_next, (ip / kPanel + 1) * pf_step);
        for (int64_t j = ip / kPanel * pf_step; j < pf_end; ++j) {
          const int64_t row = ntk0 - nsrc->t_begin + j;
          const char* k_row = reinterpret_cast<const char*>(static_cast<const bf16_t*>(nsrc->k) +
                                                            row * nsrc->k_stride);
          const char* v_row = reinterpret_cast<const char*>(static_cast<const bf16_t*>(nsrc->v) +
                                                            row * nsrc->v_stride);
          for (int64_t b = 0; b < row_bytes; b += 64) {
            _mm_prefetch(k_row + b, _MM_HINT_T0);
            _mm_prefetch(v_row + b, _MM_HINT_T0);
          }
        }
        const int64_t t_first = t0 + ip, t_last = t0 + min64(ip + kPanel, rows) - 1;
        const int64_t keys = p.causal ? min64(nk, t_last - tk0 + 1) : nk;
        if (keys <= 0) continue;
        Gemm<false>(unit, round_up(keys, 16), kPanel, dp, Rows(buf.k, dp), buf.qt2 + ip, ld, buf.s,
                    kPanel);
        if (p.causal && tk0 + keys - 1 > t_first) {
          for (int64_t j = max64(0, t_first - tk0 + 1); j < keys; ++j) {
            // Query w sees key j iff tk0 + j <= t_first + w.
            const int64_t w_end = min64(kPanel, tk0 + j - t_first);
            for (int64_t w = 0; w < w_end; ++w) buf.s[j * kPanel + w] = kNegInf;
          }
        }
        SoftmaxPanelBf16(buf.s, keys, c, sc.m + ip, sc.l + ip, alpha, buf.p2);
        if (started.test(ip / kPanel)) {
          RescalePanel(sc.ot + ip, ld, dp, alpha);
          Gemm<true>(unit, dp, kPanel, round_up(keys, 32), vt, buf.p2, kPanel, sc.ot + ip, ld);
        } else {
          Gemm<false>(unit, dp, kPanel, round_up(keys, 32), vt, buf.p2, kPanel, sc.ot + ip, ld);
          started.set(ip / kPanel);
        }
      }
    }
  }
  merge_queries(p, tiles, qr, sc.ot, sc.m, sc.l, c);
}

// The backward scratch of one thread, carved from BackwardScratch::bf16.
struct BackwardBuffers {
  uint16_t* k;     // [keys][dp], K of the piece
  uint16_t* v;     // [keys][dp], V
  uint16_t* kt;    // AMX: [dp][keys], K^T; dot: [keys / 2][dp], K's row pairs
  float* dk;       // [keys][dp], dK of the piece (unscaled)
  float* dv;       // [keys][dp], dV (without the output factor)
  uint32_t* qt2;   // [dp / 2][kQueryBlock], Q^T pair-packed along D (sign of the scale folded in)
  uint32_t* dot2;  // [dp / 2][kQueryBlock], dO^T pair-packed along D
  uint32_t* q2;    // [kQueryBlock / 2][dp], Q pair-packed along the queries
  uint32_t* do2;   // [kQueryBlock / 2][dp], dO pair-packed along the queries
  float* s;        // [kKeyBlock][kQueryBlock], S^T
  float* dpt;      // [kKeyBlock][kQueryBlock], dP^T
  uint16_t* pt;    // [kKeyBlock][kQueryBlock], P^T in bf16
  uint16_t* dst;   // [kKeyBlock][kQueryBlock], dS^T in bf16
  uint32_t* ds2;   // [kKeyBlock / 2][kQueryBlock], dS^T pair-packed along the keys
  float* dqt;      // [dp][kQueryBlock], dQ^T of the query block (unscaled)
  float* lse2;     // [kQueryBlock], lse in log2 units, hi (+inf for padding queries)
  float* lse2_lo;  // [kQueryBlock], its lo part (lse2_of)
  float* dr;       // [kQueryBlock], rowsum(dout * out)
  BackwardBuffers(void* base, int64_t dp, int64_t keys, int64_t* bytes = nullptr) {
    Carve carve(base);
    k = carve.take<uint16_t>(keys * dp);
    v = carve.take<uint16_t>(keys * dp);
    kt = carve.take<uint16_t>(dp * keys);
    dk = carve.take<float>(keys * dp);
    dv = carve.take<float>(keys * dp);
    qt2 = carve.take<uint32_t>(dp / 2 * kQueryBlock);
    dot2 = carve.take<uint32_t>(dp / 2 * kQueryBlock);
    q2 = carve.take<uint32_t>(kQueryBlock / 2 * dp);
    do2 = carve.take<uint32_t>(kQueryBlock / 2 * dp);
    s = carve.take<float>(kKeyBlock * kQueryBlock);
    dpt = carve.take<float>(kKeyBlock * kQueryBlock);
    pt = carve.take<uint16_t>(kKeyBlock * kQueryBlock);
    dst = carve.take<uint16_t>(kKeyBlock * kQueryBlock);
    ds2 = carve.take<uint32_t>(kKeyBlock / 2 * kQueryBlock);
    dqt = carve.take<float>(dp * kQueryBlock);
    lse2 = carve.take<float>(kQueryBlock);
    lse2_lo = carve.take<float>(kQueryBlock);
    dr = carve.take<float>(kQueryBlock);
    if (bytes) *bytes = carve.used();
  }
};

int64_t BackwardKeys(const BackwardTiles& tiles) {
  return round_up(tiles.max_kept, kKeyBlock);
}

// P = exp2(S c - lse2) (0 where masked and past the keys), dS = P (f dP - dr) of one key
// block, vectorised across queries: P^T and dS^T as bf16 rows, dS^T also pair-packed.
void BlockProbabilities(const BackwardBuffers& buf, int64_t nk, int64_t j0, int64_t i0,
                        bool diagonal, float c, float f) {
  const __m512 vc = _mm512_set1_ps(c), vf = _mm512_set1_ps(f), zero = _mm512_setzero_ps();
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j = 0; j < kKeyBlock; j += 2) {
    for (int64_t i = 0; i < kQueryBlock; i += 32) {
      __m512 prob[2][2], ds[2][2];
      for (int64_t u = 0; u < 2; ++u) {
        const int64_t row = j + u;
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t at = row * kQueryBlock + i + 16 * h, col = i + 16 * h;
          prob[u][h] = ds[u][h] = zero;
          if (row >= nk) continue;  // padding rows: P = dS = 0
          // (s c - hi) - lo keeps the precision of a large lse; P <= 1, as it is exactly.
          __m512 pr =
              Exp2(_mm512_min_ps(_mm512_sub_ps(_mm512_fmsub_ps(_mm512_loadu_ps(buf.s + at), vc,
                                                               _mm512_loadu_ps(buf.lse2 + col)),
                                               _mm512_loadu_ps(buf.lse2_lo + col)),
                                 zero));
          if (diagonal) {
            const __m512 query = _mm512_add_ps(_mm512_set1_ps(static_cast<float>(i0 + col)), iota);
            const __mmask16 later =
                _mm512_cmp_ps_mask(_mm512_set1_ps(static_cast<float>(j0 + row)), query, _CMP_GT_OQ);
            pr = _mm512_mask_mov_ps(pr, later, zero);
          }
          prob[u][h] = pr;
          ds[u][h] = _mm512_mul_ps(pr, _mm512_fmsub_ps(_mm512_loadu_ps(buf.dpt + at), vf,
                                                       _mm512_loadu_ps(buf.dr + col)));
        }
        _mm512_storeu_si512(buf.pt + (j + u) * kQueryBlock + i, RowBf16(prob[u][0], prob[u][1]));
        _mm512_storeu_si512(buf.dst + (j + u) * kQueryBlock + i, RowBf16(ds[u][0], ds[u][1]));
      }
      _mm512_storeu_si512(buf.ds2 + j / 2 * kQueryBlock + i, PairBf16(ds[0][0], ds[1][0]));
      _mm512_storeu_si512(buf.ds2 + j / 2 * kQueryBlock + i + 16, PairBf16(ds[0][1], ds[1][1]));
    }
  }
}

inline const bf16_t* RowAt(const void* base, const Strides3& st, int64_t b, int64_t n, int64_t h) {
  return static_cast<const bf16_t*>(base) + (b * st.b + n * st.n + h * st.h);
}

void BackwardPiece(Unit unit, const BackwardProblem& bp, const BackwardTiles& tiles,
                   const BackwardWork& w, const BackwardScratch& sc, const GradRows& dq_rows) {
  const Problem& p = bp.fwd;
  const int64_t D = p.head_dim, dp = tiles.padded_dim;
  const Branch br = p.branches[static_cast<size_t>(w.branch)];
  const int64_t r = br.rate, h = w.h, b = w.b;
  const float c = std::fabs(p.scale) * kLog2e, f = p.out_factor;
  const uint32_t flip = p.scale < 0.0f ? 0x80008000u : 0u;
  const int64_t keys = BackwardKeys(tiles);
  const BackwardBuffers buf(sc.bf16, dp, keys);
  const TileScope tiles_on(unit);

  // Keys: kept indices [tk0, tk1), packed row t - tk0.
  const int64_t tk0 = w.keys.t_begin, tk1 = w.keys.t_end, mk = tk1 - tk0;
  const int64_t mkp = round_up(mk, kKeyBlock);
  const auto* kin = static_cast<const bf16_t*>(w.keys.k);
  const auto* vin = static_cast<const bf16_t*>(w.keys.v);
  PackRows(kin, w.keys.k_stride, mk, mkp, D, dp, buf.k);
  PackRows(vin, w.keys.v_stride, mk, mkp, D, dp, buf.v);
  // K^T as the A operand of dQ^T += K^T dS^T (see the forward's V^T).
  PairOperand kt{reinterpret_cast<const uint32_t*>(buf.kt), 1, dp};
  if (unit == Unit::kAmx) {
    PackTransposed(kin, w.keys.k_stride, mk, mkp, D, dp, keys, buf.kt);
    kt = Rows(buf.kt, keys);
  } else {
    PackRowPairs(kin, w.keys.k_stride, mk, mkp, D, dp, reinterpret_cast<uint32_t*>(buf.kt));
  }
  std::memset(buf.dk, 0, sizeof(float) * static_cast<size_t>(mkp * dp));
  std::memset(buf.dv, 0, sizeof(float) * static_cast<size_t>(mkp * dp));

  const int64_t row0 = w.segment * br.segment + w.offset - p.shard_begin;  // local row of t = 0
  for (int64_t i0 = w.tq_begin; i0 < w.tq_end; i0 += kQueryBlock) {
    const int64_t nq = min64(kQueryBlock, w.tq_end - i0);
    const int64_t k_end = p.causal ? min64(tk1, i0 + nq) : tk1;
    if (k_end <= tk0) continue;
    const int64_t n0 = row0 + i0 * r;  // local row of the block's first query
    const bf16_t* q = RowAt(p.q, p.q_st, b, n0, h);
    const bf16_t* dout = RowAt(bp.dout, bp.dout_st, b, n0, h);
    const bf16_t* out = RowAt(p.out, p.out_st, b, n0, h);
    const int64_t qs = r * p.q_st.n, ds = r * bp.dout_st.n, os = r * p.out_st.n;
    PackPairsTransposed(q, qs, nq, kQueryBlock, D, dp, kQueryBlock, flip, buf.qt2);
    PackPairsTransposed(dout, ds, nq, kQueryBlock, D, dp, kQueryBlock, 0u, buf.dot2);
    PackRowPairs(q, qs, nq, kQueryBlock, D, dp, buf.q2);
    PackRowPairs(dout, ds, nq, kQueryBlock, D, dp, buf.do2);
    backward_row_lse(p, b, h, row0 + i0 * r, r, nq, kQueryBlock, buf.lse2, buf.lse2_lo, buf.dr);
    for (int64_t i = 0; i < nq; ++i) buf.dr[i] = DotBf16(dout + i * ds, out + i * os, D);
    std::memset(buf.dqt, 0, sizeof(float) * static_cast<size_t>(dp * kQueryBlock));

    for (int64_t j0 = tk0; j0 < k_end; j0 += kKeyBlock) {
      const int64_t nk = min64(kKeyBlock, k_end - j0), m = round_up(nk, 16);
      const int64_t jr = j0 - tk0;  // packed row of key j0
      Gemm<false>(unit, m, kQueryBlock, dp, Rows(buf.k + jr * dp, dp), buf.qt2, kQueryBlock, buf.s,
                  kQueryBlock);
      Gemm<false>(unit, m, kQueryBlock, dp, Rows(buf.v + jr * dp, dp), buf.dot2, kQueryBlock,
                  buf.dpt, kQueryBlock);
      BlockProbabilities(buf, nk, j0, i0, p.causal && j0 + nk - 1 > i0, c, f);
      // dV += P^T dO and dK += dS^T Q (rows: keys); dQ^T += K^T dS^T (rows: D).
      Gemm<true>(unit, m, dp, kQueryBlock, Rows(buf.pt, kQueryBlock), buf.do2, dp, buf.dv + jr * dp,
                 dp);
      Gemm<true>(unit, m, dp, kQueryBlock, Rows(buf.dst, kQueryBlock), buf.q2, dp, buf.dk + jr * dp,
                 dp);
      const PairOperand kt_j{kt.pairs + jr / 2 * kt.step, kt.row, kt.step};  // from key j0
      Gemm<true>(unit, dp, kQueryBlock, round_up(nk, 32), kt_j, buf.ds2, kQueryBlock, buf.dqt,
                 kQueryBlock);
    }
    const float scale = p.scale;
    for (int64_t i = 0; i < nq; ++i) {
      float col[kMaxHeadDim];  // column i of dQ^T
      for (int64_t e = 0; e < D; ++e) col[e] = buf.dqt[e * kQueryBlock + i];
      if (i + kAhead < nq) {
        PrefetchRows(dq_rows.row(b, row0 + (i0 + i + kAhead) * r, h), 0, 0, 1, 4 * D);
      }
      float* dq_row = dq_rows.row(b, row0 + (i0 + i) * r, h);
      for (int64_t e = 0; e < D; ++e) dq_row[e] += scale * col[e];
    }
  }
  const float scale = p.scale;
  for (int64_t j = 0; j < mk; ++j) {
    if (j + kAhead < mk) {
      PrefetchRows(w.dk, 4 * w.dk_stride, j + kAhead, 1, 4 * D);
      PrefetchRows(w.dv, 4 * w.dv_stride, j + kAhead, 1, 4 * D);
    }
    float* dk_row = w.dk + j * w.dk_stride;
    float* dv_row = w.dv + j * w.dv_stride;
    const float* dk = buf.dk + j * dp;
    const float* dv = buf.dv + j * dp;
    for (int64_t e = 0; e < D; ++e) dk_row[e] += scale * dk[e];
    for (int64_t e = 0; e < D; ++e) dv_row[e] += f * dv[e];
  }
}

inline Unit UnitOf(CpuBf16 kernel) {
  return kernel == CpuBf16::kAmx ? Unit::kAmx : Unit::kDot;
}

}  // namespace

int64_t bf16_forward_scratch_bytes(const Tiles& tiles) {
  int64_t bytes = 0;
  (void)ForwardBuffers(nullptr, tiles.padded_dim, tiles.ld_rows(), &bytes);
  return bytes;
}

int64_t bf16_backward_scratch_bytes(const BackwardTiles& tiles) {
  int64_t bytes = 0;
  (void)BackwardBuffers(nullptr, tiles.padded_dim, BackwardKeys(tiles), &bytes);
  return bytes;
}

void forward_rows_bf16(const Problem& p, const Tiles& tiles, const QueryRows& rows,
                       const KeySource* sources, int64_t num_sources, const Scratch& scratch) {
  ForwardRows(UnitOf(tiles.kernel), p, tiles, rows, sources, num_sources, scratch);
}

void backward_piece_bf16(const BackwardProblem& bp, const BackwardTiles& tiles,
                         const BackwardWork& w, const BackwardScratch& scratch,
                         const GradRows& dq) {
  BackwardPiece(UnitOf(tiles.kernel), bp, tiles, w, scratch, dq);
}

}  // namespace ringattn::cpu::detail

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
