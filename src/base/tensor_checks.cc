#include "src/base/tensor_checks.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "ringattn/error.h"
#include "src/base/check.h"

namespace ringattn {

namespace {

__extension__ typedef __int128 i128;  // exact sums of products of int64 extents and strides

int dims_of(const TensorView& t) {
  return std::clamp(t.ndim, 0, TensorView::kMaxDims);
}

// One index variable of an overlap search: its byte coefficient and range [lo, hi].
struct Var {
  i128 coef;
  int64_t lo, hi;
};

// Does some choice of each var in its range make sum(coef * value) land in [lo, hi]?
// Variables are tried largest coefficient first; each level only visits the values for
// which the rest can still reach the target, so nested (ordinary) strides need a handful of
// steps. `budget` bounds the work: when it runs out the answer is "yes".
class OverlapSearch {
 public:
  explicit OverlapSearch(std::vector<Var> vars) : vars_(std::move(vars)) {
    std::sort(vars_.begin(), vars_.end(), [](const Var& a, const Var& b) {
      return (a.coef < 0 ? -a.coef : a.coef) > (b.coef < 0 ? -b.coef : b.coef);
    });
    rest_min_.assign(vars_.size() + 1, 0);
    rest_max_.assign(vars_.size() + 1, 0);
    for (size_t i = vars_.size(); i-- > 0;) {
      const i128 a = vars_[i].coef * vars_[i].lo, b = vars_[i].coef * vars_[i].hi;
      rest_min_[i] = rest_min_[i + 1] + std::min(a, b);
      rest_max_[i] = rest_max_[i + 1] + std::max(a, b);
    }
  }

  bool reachable(i128 lo, i128 hi) { return visit(0, lo, hi); }

 private:
  static i128 floor_div(i128 a, i128 b) {
    const i128 q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
  }
  static i128 ceil_div(i128 a, i128 b) { return -floor_div(-a, b); }

  bool visit(size_t i, i128 lo, i128 hi) {
    if (lo > hi || rest_max_[i] < lo || rest_min_[i] > hi) return false;
    if (i == vars_.size()) return true;  // lo <= 0 <= hi
    if (--budget_ < 0) return true;
    const Var& v = vars_[i];
    if (v.coef == 0) return visit(i + 1, lo, hi);
    // coef * x + [rest_min, rest_max] must meet [lo, hi].
    i128 x0, x1;
    if (v.coef > 0) {
      x0 = ceil_div(lo - rest_max_[i + 1], v.coef);
      x1 = floor_div(hi - rest_min_[i + 1], v.coef);
    } else {
      x0 = ceil_div(hi - rest_min_[i + 1], v.coef);
      x1 = floor_div(lo - rest_max_[i + 1], v.coef);
    }
    x0 = std::max<i128>(x0, v.lo);
    x1 = std::min<i128>(x1, v.hi);
    for (i128 x = x0; x <= x1; ++x) {
      if (visit(i + 1, lo - v.coef * x, hi - v.coef * x)) return true;
      if (budget_ < 0) return true;
    }
    return false;
  }

  std::vector<Var> vars_;
  std::vector<i128> rest_min_, rest_max_;
  int64_t budget_ = 200000;
};

// The byte offsets of t's elements: base + sum over dims of stride * esize * index.
void add_vars(const TensorView& t, int sign, std::vector<Var>& vars) {
  const i128 esize = static_cast<i128>(dtype_size(t.dtype));
  for (int d = 0; d < dims_of(t); ++d) {
    if (t.shape[d] > 1) vars.push_back({sign * t.strides[d] * esize, 0, t.shape[d] - 1});
  }
}

i128 address(const TensorView& t) {
  return static_cast<i128>(reinterpret_cast<uintptr_t>(t.data));
}

// The bytes [first, last] t's elements can touch.
void byte_range(const TensorView& t, i128& first, i128& last) {
  i128 span = 0;
  for (int d = 0; d < dims_of(t); ++d) span += static_cast<i128>(t.shape[d] - 1) * t.strides[d];
  first = address(t);
  last = first + (span + 1) * static_cast<i128>(dtype_size(t.dtype)) - 1;
}

}  // namespace

std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int d = 0; d < dims_of(t); ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
  return s + "]";
}

void check_view_fields(const TensorView& t, const char* name) {
  require(t.ndim >= 1 && t.ndim <= TensorView::kMaxDims, name, ".ndim = ", t.ndim,
          " is outside [1, ", TensorView::kMaxDims, "]; build views with TensorView::contiguous ",
          "or TensorView::strided");
  const int dtype = static_cast<int>(t.dtype), device = static_cast<int>(t.device);
  require(dtype >= 0 && dtype <= static_cast<int>(DType::kBF16), name, ".dtype = ", dtype,
          " is not a DType; use DType::kF32, kF16 or kBF16");
  require(device >= 0 && device <= static_cast<int>(Device::kCUDA), name, ".device = ", device,
          " is not a Device; use Device::kCPU or Device::kCUDA");
  i128 span = 0;
  for (int d = 0; d < t.ndim; ++d) {
    require(t.shape[d] >= 1, name, ".shape[", d, "] = ", t.shape[d], " in ", shape_str(t),
            "; every extent must be >= 1");
    require(t.strides[d] >= 0, name, ".strides[", d, "] = ", t.strides[d],
            "; strides must be >= 0");
    span += static_cast<i128>(t.shape[d] - 1) * t.strides[d];  // < 4 * 2^126: no overflow
  }
  const i128 bytes = (span + 1) * static_cast<i128>(dtype_size(t.dtype));
  const i128 limit = std::numeric_limits<int64_t>::max();
  require(bytes <= limit && address(t) + bytes <= static_cast<i128>(UINTPTR_MAX), name, " is ",
          shape_str(t), " with strides [", t.strides[0], ", ", t.strides[1], ", ", t.strides[2],
          ", ", t.strides[3], "]: its elements span more memory than an address space holds; ",
          "pass the shape and strides of the buffer you have");
}

bool views_overlap(const TensorView& a, const TensorView& b) {
  if (a.device != b.device || a.data == nullptr || b.data == nullptr) return false;
  i128 a0, a1, b0, b1;
  byte_range(a, a0, a1);
  byte_range(b, b0, b1);
  if (a1 < b0 || b1 < a0) return false;
  // An element of a covers bytes [A, A + ea), one of b [B, B + eb): they meet iff
  // B - A lies in [-(eb - 1), ea - 1].
  const i128 ea = static_cast<i128>(dtype_size(a.dtype)),
             eb = static_cast<i128>(dtype_size(b.dtype));
  std::vector<Var> vars;
  add_vars(b, 1, vars);
  add_vars(a, -1, vars);
  const i128 base = address(b) - address(a);
  return OverlapSearch(std::move(vars)).reachable(-(eb - 1) - base, ea - 1 - base);
}

bool overlaps_itself(const TensorView& t) {
  // Two indices i != j with |offset(i) - offset(j)| < esize: with delta = i - j, the first
  // non-zero delta (in dims order) positive, the rest anywhere in [-(E - 1), E - 1].
  const i128 esize = static_cast<i128>(dtype_size(t.dtype));
  for (int first = 0; first < dims_of(t); ++first) {
    if (t.shape[first] <= 1) continue;
    std::vector<Var> vars;
    vars.push_back({t.strides[first] * esize, 1, t.shape[first] - 1});
    for (int d = first + 1; d < dims_of(t); ++d) {
      if (t.shape[d] > 1) vars.push_back({t.strides[d] * esize, 1 - t.shape[d], t.shape[d] - 1});
    }
    if (OverlapSearch(std::move(vars)).reachable(-(esize - 1), esize - 1)) return true;
  }
  return false;
}

bool same_view(const TensorView& a, const TensorView& b) {
  return a.data == b.data && a.dtype == b.dtype && a.device == b.device && a.ndim == b.ndim &&
         a.shape == b.shape && a.strides == b.strides;
}

void check_outputs_disjoint(const std::vector<NamedView>& outputs,
                            const std::vector<NamedView>& inputs) {
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    if (out->view == nullptr) continue;
    require(!overlaps_itself(*out->view), out->name, " is ", shape_str(*out->view),
            " with strides [", out->view->strides[0], ", ", out->view->strides[1], ", ",
            out->view->strides[2], ", ", out->view->strides[3],
            "], whose elements overlap each other; an output needs a distinct element for "
            "every index: pass a tensor without zero or interleaving strides");
    for (auto other = outputs.begin(); other != out; ++other) {
      if (other->view == nullptr) continue;
      require(!views_overlap(*out->view, *other->view), "the outputs ", other->name, " and ",
              out->name, " overlap in memory; every output needs memory of its own");
    }
    for (const NamedView& in : inputs) {
      if (in.view == nullptr) continue;
      require(!views_overlap(*out->view, *in.view), "the output ", out->name,
              " overlaps the input ", in.name,
              " in memory; ringattn does not compute in place: pass an output that shares no "
              "memory with the inputs");
    }
  }
}

}  // namespace ringattn
