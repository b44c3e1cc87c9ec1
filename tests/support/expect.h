#pragma once
// The accuracy contract of SPEC.md as test assertions, shared by every backend's tests.

#include "src/backend/ref/reference.h"
#include "tests/support/test_util.h"

namespace ringattn::test {

// out and lse of a forward on (q, k, v) under `cfg` against the fp64 reference `ref`:
// fp32 within 1e-5; fp16/bf16 within twice the error of the naive computation in the same
// precision (the brute-force oracle rounding every intermediate); lse within 2e-5 relative;
// outputs finite, non-zero where the reference is clearly non-zero (fp16/bf16: farther from 0
// than the allowed error).
void expect_forward_close(const DilatedConfig& cfg, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& out, const Tensor& lse,
                          const ReferenceResult& ref);

// The bound on max |out - ref.out| of SPEC.md: 1e-5 for fp32; for fp16/bf16 twice the error
// of the naive computation in the dtype of q (the brute-force oracle rounding every
// intermediate), which must itself be non-zero.
double forward_error_bound(const DilatedConfig& cfg, const Tensor& q, const Tensor& k,
                           const Tensor& v, const ReferenceResult& ref);

// Stats of a result against its fp64 reference: finite, non-zero where the reference is
// clearly non-zero, and within tol * max(1, max |ref|).
void expect_close(const Stats& s, double tol, const char* name);

// dq, dk, dv against the fp64 reference gradients: within 2e-5 (fp32), 4e-3 (fp16) or 3e-2
// (bf16) of max(1, max |ref|); finite, non-zero where the reference is clearly non-zero.
void expect_grads_close(DType dtype, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                        const ReferenceGrads& ref);

// A rank's shard of a ring's forward, out [B, rows, H, D] and lse [B, H, rows] (fp32; global
// rows row0, row0 + 1, ...), against the same rows of the single-device result `single`
// [B, N, H, D] and of the fp64 reference `ref` of the whole sequence.
struct ShardStats {
  double err = 0.0;         // max |out - ref.out|
  double single_err = 0.0;  // max |single - ref.out|: the single-device result's own error
  double vs_single = 0.0;   // max |out - single|
  double max_ref = 0.0;     // max |ref.out|
  double lse_err = 0.0;     // max |lse - ref.lse| where ref.lse is finite
  double max_lse = 0.0;     // max |ref.lse| where it is finite
  int64_t bad = 0;          // outputs not finite, or lse not -inf where ref.lse is
  int64_t missing = 0;      // outputs exactly 0 where |ref.out| > kClearlyNonZero
  int64_t ref_nonzero = 0;  // entries of ref.out in the shard that are not zero
};
ShardStats compare_shard(const Tensor& out, const Tensor& lse, int64_t row0, const Tensor& single,
                         const ReferenceResult& ref);

}  // namespace ringattn::test
