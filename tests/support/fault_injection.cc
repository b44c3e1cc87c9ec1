#include "tests/support/fault_injection.h"

#include <cstring>
#include <new>

#include "ringattn/error.h"
#include "src/base/fault.h"

namespace ringattn::test {
namespace {

thread_local const char* t_site = nullptr;
thread_local int t_count = 0;
thread_local bool t_bad_alloc = false;

void fail_here(const char* site) {
  if (t_site == nullptr || std::strcmp(site, t_site) != 0 || --t_count != 0) return;
  t_site = nullptr;
  if (t_bad_alloc) throw std::bad_alloc();
  throw Error(ErrorCode::kDevice, "injected failure");
}

}  // namespace

FaultHookScope::FaultHookScope() {
  detail::set_fault_hook(&fail_here);
}
FaultHookScope::~FaultHookScope() {
  detail::set_fault_hook(nullptr);
}

void arm_fault(const char* site, int count, bool bad_alloc) {
  t_site = site;
  t_count = count;
  t_bad_alloc = bad_alloc;
}

void disarm_fault() {
  t_site = nullptr;
}

}  // namespace ringattn::test
