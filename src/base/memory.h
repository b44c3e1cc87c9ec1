#pragma once
// Buffers the library allocates: a failed allocation (or one whose size overflows) is an
// Error(kOutOfMemory) naming the buffer and its size, never std::bad_alloc, and never a
// null pointer written through.

#include <hwy/aligned_allocator.h>

#include <cstddef>
#include <new>
#include <string>
#include <vector>

#include "src/base/check.h"
#include "src/base/fault.h"

namespace ringattn {

// "1.5 GiB", "640 KiB", "12 bytes".
std::string byte_size(double bytes);

// Throws Error(kOutOfMemory): `what` (the buffer, e.g. "the ring's fp32 output
// accumulators") needs `count` elements of `elem_bytes` bytes.
[[noreturn]] void fail_alloc(const char* what, size_t count, size_t elem_bytes);

// count * elem_bytes, or fail_alloc when that overflows size_t; also the fault point "alloc".
size_t alloc_bytes(const char* what, size_t count, size_t elem_bytes);

// v.resize(count) / v.assign(count, value), failing as above.
template <typename T>
void resize_buffer(std::vector<T>& v, size_t count, const char* what) {
  alloc_bytes(what, count, sizeof(T));
  try {
    v.resize(count);
  } catch (const std::bad_alloc&) {
    fail_alloc(what, count, sizeof(T));
  } catch (const std::length_error&) {
    fail_alloc(what, count, sizeof(T));
  }
}
template <typename T>
void assign_buffer(std::vector<T>& v, size_t count, const T& value, const char* what) {
  alloc_bytes(what, count, sizeof(T));
  try {
    v.assign(count, value);
  } catch (const std::bad_alloc&) {
    fail_alloc(what, count, sizeof(T));
  } catch (const std::length_error&) {
    fail_alloc(what, count, sizeof(T));
  }
}

// An aligned array of `count` floats (uninitialised), failing as above.
hwy::AlignedFreeUniquePtr<float[]> aligned_floats(size_t count, const char* what);

}  // namespace ringattn
