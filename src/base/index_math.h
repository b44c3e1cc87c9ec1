#pragma once
// Row arithmetic of dilated branches, shared by the planner, the reference and every
// backend (host and device).
//
// Branch (s, r) with offset o keeps, in segment j, the rows j*s + o + t*r for
// t = 0 .. kept_count(s, r, o) - 1. Rows are addressed by (segment, t): a dilated
// branch is a dense attention over a strided view.

#include <cstdint>

#include "src/base/host_device.h"

namespace ringattn {

// The ceiling of a / b for b >= 1 and any a (no overflow near INT64_MAX).
RA_HD int64_t ceil_div(int64_t a, int64_t b) {
  return a / b + (a % b > 0 ? 1 : 0);
}
RA_HD int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}
RA_HD int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}
RA_HD int64_t max64(int64_t a, int64_t b) {
  return a > b ? a : b;
}

// Number of rows a branch keeps in one segment (0 <= o < r <= s).
RA_HD int64_t kept_count(int64_t s, int64_t r, int64_t o) {
  return ceil_div(s - o, r);
}

// The first kept index t whose row (relative to the segment start) is >= rel,
// clamped to [0, kept_count].
RA_HD int64_t first_kept_at_or_after(int64_t rel, int64_t s, int64_t r, int64_t o) {
  if (rel <= o) return 0;
  return min64(ceil_div(rel - o, r), kept_count(s, r, o));
}

// The kept rows of one branch segment that fall inside the row window [n0, n1):
// rows seg_start + o + t*r for t in [t_begin, t_end).
struct KeptSpan {
  int64_t seg_start;
  int64_t t_begin;
  int64_t t_end;
};

RA_HD KeptSpan kept_span_in_window(int64_t segment, int64_t s, int64_t r, int64_t o, int64_t n0,
                                   int64_t n1) {
  const int64_t start = segment * s;
  KeptSpan span;
  span.seg_start = start;
  span.t_begin = first_kept_at_or_after(max64(n0, start) - start, s, r, o);
  span.t_end = first_kept_at_or_after(min64(n1, start + s) - start, s, r, o);
  if (span.t_end < span.t_begin) span.t_end = span.t_begin;
  return span;
}

// The kept index t of global row n in its segment of branch (s, r) with offset o, or -1 when
// the branch does not keep row n.
RA_HD int64_t kept_index_of_row(int64_t n, int64_t s, int64_t r, int64_t o) {
  const int64_t rel = n % s - o;
  if (rel < 0 || rel % r != 0) return -1;
  return rel / r;
}

}  // namespace ringattn
