#pragma once
// The reference: SPEC.md written as plain loops with fp64 accumulation. Slow and obviously
// correct; every backend is tested against it.

#include <vector>

#include "src/plan/problem.h"

namespace ringattn {

struct ReferenceResult {
  std::vector<double> out;  // [B, N, H, D], contiguous, already scaled by out_factor
  std::vector<double> lse;  // [B, H, N], contiguous, natural log, -inf for empty rows
};

// Per branch dense softmax attention among kept rows, merged with SPEC.md's merge.
ReferenceResult reference_forward(const Problem& p);

// Runs reference_forward and writes its result into p.out (cast to p.dtype) and p.lse.
void reference_forward_into(const Problem& p);

struct ReferenceGrads {
  std::vector<double> dq;  // [B, N, H, D], contiguous
  std::vector<double> dk;  // [B, N, Hkv, D]
  std::vector<double> dv;  // [B, N, Hkv, D]
};

// SPEC.md's backward in fp64: per branch, P = exp(scale q.k - lse), Dr = rowsum(dout * out),
// dS = P * (f dout.v - Dr), dq += scale dS.k, dk += scale dS^T.q, dv += f P^T.dout, with
// out and lse recomputed in fp64 (merged over branches in longnet mode) and f the output
// factor (1/G in groups mode).
ReferenceGrads reference_backward(const BackwardProblem& bp);

// Runs reference_backward and writes dq, dk, dv (cast to the dtype).
void reference_backward_into(const BackwardProblem& bp);

}  // namespace ringattn
