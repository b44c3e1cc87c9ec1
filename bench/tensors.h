#pragma once
// The tensors of one measured row, for the whole sequence or one rank's shard of it, and
// the tolerances the --check passes compare with.
//
// q, k and v hold N(0,1) samples that depend only on (tensor, global element index): a
// counter-based hash mapped through Box-Muller, so any shard of rows is made alone, in
// parallel, and holds exactly the values the whole-sequence tensors hold in those rows.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ringattn/ringattn.h"

namespace ringattn::bench {

struct DilatedShape;

// Rows [begin, begin + count) of the sequence (all B batches).
struct RowRange {
  int64_t begin = 0, count = 0;
};

// The views of one row's tensors: q [B, n, H, D], k and v [B, n, Hkv, D], out [B, n, H, D]
// in the row's dtype, lse [B, H, n] fp32; all contiguous, n = the rows held.
struct Views {
  TensorView q, k, v, out, lse;
};

// Fills `t` ([B, rows.count, heads, D]) with the samples of tensor `id` that the same
// tensor over the whole sequence ([B, seq, heads, D]) holds in those rows, rounded to the dtype.
void fill_normal(const TensorView& t, int id, int64_t seq, RowRange rows, int threads);

Views make_views(const DilatedShape& s, int64_t rows, void* q, void* k, void* v, void* out,
                 float* lse);

// Owns the storage of one row's tensors for `rows` of the sequence; q, k and v are filled
// (OpenMP threads: `threads`, 0 = OpenMP's default), out and lse zeroed.
class Tensors {
 public:
  Tensors(const DilatedShape& s, RowRange rows, int threads);

  Tensors(const Tensors&) = delete;  // the views point into this object's buffers
  Tensors& operator=(const Tensors&) = delete;

  const Views& views() const { return views_; }
  RowRange rows() const { return rows_; }
  size_t bytes() const;

  // The bytes of q, k, v, out and lse for the whole sequence of `s`.
  static size_t full_bytes(const DilatedShape& s);

 private:
  RowRange rows_;
  std::vector<std::byte> q_, k_, v_, out_;
  std::vector<float> lse_;
  Views views_;
};

// The backward's extra tensors for the same rows: dout (filled like q, k and v) and the
// gradients dq [B, n, H, D], dk and dv [B, n, Hkv, D] (zeroed), in the row's dtype.
class Gradients {
 public:
  Gradients(const DilatedShape& s, RowRange rows, int threads);
  Gradients(const Gradients&) = delete;
  Gradients& operator=(const Gradients&) = delete;

  TensorView dout, dq, dk, dv;
  size_t bytes() const { return dout_.size() + dq_.size() + dk_.size() + dv_.size(); }

 private:
  std::vector<std::byte> dout_, dq_, dk_, dv_;
};

// |x - ref| <= abs + rel * |ref|; an infinite ref must match exactly.
struct Tolerance {
  double abs, rel;
};

// For out in `dtype`; lse (fp32) uses kLseTolerance.
Tolerance out_tolerance(DType dtype);
// For dq, dk, dv in `dtype` (sums over many keys or queries: looser than out's).
Tolerance grad_tolerance(DType dtype);
inline constexpr Tolerance kLseTolerance{1e-4, 1e-5};

bool within(double x, double ref, Tolerance tol);

}  // namespace ringattn::bench
