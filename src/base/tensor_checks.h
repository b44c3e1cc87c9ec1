#pragma once
// Checks of TensorViews shared by every entry point: the fields a caller can set to anything
// (ndim, dtype, device), the memory a view addresses (checked arithmetic), and overlaps
// between outputs and the other tensors of a call.

#include <cstdint>
#include <string>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

// "[2, 64, 8, 32]" (at most TensorView::kMaxDims extents, whatever ndim says).
std::string shape_str(const TensorView& t);

// ndim in [1, kMaxDims], a known dtype and device, every extent >= 1 and every stride >= 0;
// the elements addressed (the largest offset plus one) and their bytes fit in int64 and do
// not wrap the address space. Throws Error(kInvalidArgument) naming `name`.
void check_view_fields(const TensorView& t, const char* name);

// Whether the elements of a and b share a byte. Exact for any strides (a bounded search over
// the index space; in the rare case it gives up, the answer is "yes"). Views on different
// kinds of device never overlap.
bool views_overlap(const TensorView& a, const TensorView& b);
// Whether two different indices of t address the same byte (a stride 0 of an extent > 1, or
// strides that interleave).
bool overlaps_itself(const TensorView& t);

struct NamedView {
  const char* name;
  const TensorView* view;  // nullptr: absent (an optional tensor), skipped
};

// Every output must not overlap itself, another output or an input (inputs may overlap each
// other: self-attention passes one tensor as q, k and v). Throws Error(kInvalidArgument)
// naming both tensors. Call after check_view_fields.
void check_outputs_disjoint(const std::vector<NamedView>& outputs,
                            const std::vector<NamedView>& inputs);

// The same data, dtype, device, shape and strides.
bool same_view(const TensorView& a, const TensorView& b);

}  // namespace ringattn
