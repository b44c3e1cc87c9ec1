// Allocation failures as errors, the fault hook, and the translation of exceptions into
// ringattn::Error at the library's surface.

#include "src/base/memory.h"

#include <atomic>
#include <cstdio>
#include <limits>
#include <stdexcept>

namespace ringattn {

std::string byte_size(double bytes) {
  static const char* const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 6) {
    bytes /= 1024.0;
    ++u;
  }
  char text[48];
  std::snprintf(text, sizeof(text), u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return text;
}

void fail_alloc(const char* what, size_t count, size_t elem_bytes) {
  const double bytes = static_cast<double>(count) * static_cast<double>(elem_bytes);
  fail(ErrorCode::kOutOfMemory, "could not allocate ", what, ": ", count, " elements of ",
       elem_bytes, " bytes (", byte_size(bytes),
       "); use a smaller batch or fewer rows per rank (more ranks), or free memory");
}

size_t alloc_bytes(const char* what, size_t count, size_t elem_bytes) {
  if (elem_bytes != 0 && count > std::numeric_limits<size_t>::max() / elem_bytes) {
    fail_alloc(what, count, elem_bytes);
  }
  try {
    detail::fault_point("alloc");
  } catch (const std::bad_alloc&) {
    fail_alloc(what, count, elem_bytes);
  }
  return count * elem_bytes;
}

hwy::AlignedFreeUniquePtr<float[]> aligned_floats(size_t count, const char* what) {
  alloc_bytes(what, count, sizeof(float));
  hwy::AlignedFreeUniquePtr<float[]> p = hwy::AllocateAligned<float>(count);
  if (!p && count > 0) fail_alloc(what, count, sizeof(float));
  return p;
}

Error as_error(const std::exception_ptr& error, const char* context) {
  try {
    std::rethrow_exception(error);
  } catch (const Error& e) {
    return e;
  } catch (const std::bad_alloc&) {
    return Error(ErrorCode::kOutOfMemory,
                 std::string(context) +
                     ": an allocation failed; use a smaller batch or fewer rows per rank, or "
                     "free memory");
  } catch (const std::exception& e) {
    return Error(ErrorCode::kInternal, std::string(context) + ": " + e.what());
  } catch (...) {
    return Error(ErrorCode::kInternal, std::string(context) + ": an unknown exception");
  }
}

namespace detail {
namespace {
std::atomic<FaultHook> g_fault_hook{nullptr};
}  // namespace

void set_fault_hook(FaultHook hook) {
  g_fault_hook.store(hook, std::memory_order_release);
}

void fault_point(const char* site) {
  if (const FaultHook hook = g_fault_hook.load(std::memory_order_acquire)) hook(site);
}
}  // namespace detail

}  // namespace ringattn
