#pragma once
// Failures injected through the library's fault hook (src/base/fault.h), per thread: the thread
// (a rank, in a thread world or an MPI process) that armed it fails at its n-th visit of a
// site, with a ringattn::Error(kDevice, "injected failure") or a std::bad_alloc.

namespace ringattn::test {

// Installs the hook for its lifetime (the process has one).
class FaultHookScope {
 public:
  FaultHookScope();
  ~FaultHookScope();
  FaultHookScope(const FaultHookScope&) = delete;
  FaultHookScope& operator=(const FaultHookScope&) = delete;
};

// This thread fails at its `count`-th visit of `site` from now on (once).
void arm_fault(const char* site, int count, bool bad_alloc);
void disarm_fault();

}  // namespace ringattn::test
