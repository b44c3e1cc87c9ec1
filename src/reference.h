#pragma once
// The reference: SPEC.md written as plain loops with fp64 accumulation. Slow and obviously
// correct; every backend is tested against it.

#include <vector>

#include "problem.h"

namespace ringattn {

struct ReferenceResult {
  std::vector<double> out;  // [B, N, H, D], contiguous, already scaled by out_factor
  std::vector<double> lse;  // [B, H, N], contiguous, natural log, -inf for empty rows
};

// Per branch dense softmax attention among kept rows, merged with SPEC.md's merge.
ReferenceResult reference_forward(const Problem& p);

// Runs reference_forward and writes its result into p.out (cast to p.dtype) and p.lse.
void reference_forward_into(const Problem& p);

}  // namespace ringattn
