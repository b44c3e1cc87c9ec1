#pragma once
// Fault injection for tests: the library calls fault_point(site) at named points (every
// buffer it allocates: "alloc"; every step of a ring: "ring.step"; before a ring's
// agreement: "agree"), and a hook installed by a test may throw there to make this rank
// fail. Without a hook (the default) a fault point does nothing but one atomic load.

namespace ringattn::detail {

using FaultHook = void (*)(const char* site);

// Installs `hook` (nullptr removes it) for every thread of the process.
void set_fault_hook(FaultHook hook);
void fault_point(const char* site);

}  // namespace ringattn::detail
