#pragma once
// Shared test helpers: random tensors in any dtype and layout, comparisons against fp64.

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "ringattn/ringattn.h"
#include "src/plan/problem.h"

namespace ringattn::test {

// Owns the storage of a [B, N, H, D] tensor (or [B, H, N] lse) with an optional padded,
// permuted layout so that B, N and H strides are not the contiguous ones.
class Tensor {
 public:
  // `layout_bnh` = true: memory order B, N, H, D; false: B, H, N, D (heads outer).
  // `pad` extra elements between consecutive D-rows (non-contiguous strides).
  Tensor(DType dtype, std::vector<int64_t> shape, bool layout_bnh = true, int64_t pad = 0);

  TensorView view() const { return view_; }
  DType dtype() const { return view_.dtype; }
  // Element offset of index (i0, i1, i2, i3) in elements.
  int64_t offset(int64_t i0, int64_t i1, int64_t i2, int64_t i3 = 0) const;
  float get(int64_t i0, int64_t i1, int64_t i2, int64_t i3 = 0) const;
  void set(int64_t i0, int64_t i1, int64_t i2, int64_t i3, float value);
  // Fills with N(0, 1) samples rounded to the dtype.
  void fill_normal(std::mt19937& rng, float stddev = 1.0f);
  void fill(float value);
  // Raw bytes, for bitwise comparisons.
  const std::vector<uint8_t>& bytes() const { return data_; }

 private:
  std::vector<uint8_t> data_;
  TensorView view_;
};

// One dilated-attention test configuration.
struct Case {
  int64_t B, N, H, Hkv, D;
  std::vector<int64_t> s, r;  // segment lengths, dilation rates
  Mode mode;
  bool causal;
  DType dtype = DType::kF32;
  bool strided = false;  // heads-outer layouts with padding between rows

  DilatedConfig config() const { return {s, r, mode, causal, std::nullopt}; }
};

// "B=1 N=256 ... s=[64,128] r=[1,2] groups causal fp32", for SCOPED_TRACE.
std::string describe(const Case& c);

// The tensors of one forward + backward case: inputs (q, k, v, dout) random from `seed`,
// outputs poisoned with NaN (Tensor's initial state), in the case's layout (strided: padded
// rows, heads outer).
struct CaseTensors {
  Case c;
  Tensor q, k, v, dout, out, lse, dq, dk, dv;
  CaseTensors(const Case& cs, uint32_t seed);
  // The backward problem over these tensors, validated as the reference backend would.
  BackwardProblem problem() const;
};

// A random configuration: B 1-2, 1-3 branches of doubling segments (16, 32 or 64 first),
// rates 1-5 (not always dividing s), GQA, either mode, causal or not, maybe strided; D
// drawn from `dims`; fp32.
Case random_case(std::mt19937& rng, const std::vector<int64_t>& dims);

// Rows [row0, row0 + rows) along dimension `seq_dim` (1 for [B, N, H, D], 2 for lse
// [B, H, N]) of a tensor, as a view: a rank's shard of a whole-sequence tensor.
TensorView rows_of(const Tensor& t, int64_t row0, int64_t rows, int seq_dim = 1);

// Runs fn and expects a ringattn::Error of `code` whose message contains every word.
void expect_error(const std::function<void()>& fn, ErrorCode code,
                  std::initializer_list<const char*> words);

// Runs `fn` and returns the ringattn::Error it throws (fails the test if it throws none).
template <typename Fn>
Error error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no ringattn::Error thrown";
  return Error(ErrorCode::kInternal, "none");
}

inline constexpr double kClearlyNonZero = 1e-6;

struct Stats {
  double max_abs_err = 0.0;  // max |x - ref|
  double max_ref = 0.0;      // max |ref|
  int64_t nonfinite = 0;     // NaN or inf in x where ref is finite
  int64_t nonzero = 0;       // entries of x that are not zero
  int64_t ref_nonzero = 0;   // entries of ref that are not zero
  // Entries where x is exactly 0 but |ref| > clearly_nonzero (kClearlyNonZero unless given):
  // a kernel that skipped work.
  // (Values that cancel to ~1e-17 in the reference may legitimately come out as 0.)
  int64_t missing = 0;
  int64_t count = 0;
};

// Compares a [B, N, H, D] tensor against a contiguous fp64 array of the same shape. `missing`
// counts zeros where |ref| > clearly_nonzero (for low precision: the error the rule allows,
// since products of rounded values can cancel to exactly 0).
Stats compare_bnhd(const Tensor& x, const std::vector<double>& ref,
                   double clearly_nonzero = kClearlyNonZero);
// Compares lse [B, H, N] (fp32) against fp64; -inf must match exactly.
Stats compare_lse(const Tensor& x, const std::vector<double>& ref);

// The contiguous fp64 values of a [B, N, H, D] tensor.
std::vector<double> to_double(const Tensor& x);

}  // namespace ringattn::test
