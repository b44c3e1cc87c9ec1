#pragma once

namespace ringattn {

// "major.minor.patch" of this build.
const char* version();

// The SIMD target the CPU kernels dispatch to on this machine ("AVX2", "AVX3", "EMU128").
const char* cpu_simd_target();

}  // namespace ringattn
