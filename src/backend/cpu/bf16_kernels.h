#pragma once
// The bf16 products of the CPU kernels on AVX512_BF16 dot products (vdpbf16ps) and AMX-BF16
// tiles: which of them this CPU has, and the forward and backward bodies that use them.
// Q, K and V are packed as bf16 pairs along each product's reduction axis; P (and dS in
// backward) is rounded to bf16 for the second product; the softmax state, the accumulators
// and the merge are fp32.

#include <cstdint>

#include "src/backend/cpu/attention_cpu.h"

namespace ringattn::cpu {

// The kernel a request means on this CPU: kWiden, kDot or kAmx (never kAuto). kDot and kAmx
// on a CPU without them (or AMX refused by the OS) throw Error(kUnsupported) naming the
// option and the fix. The first call asks Linux for the AMX tile state (once per process).
CpuBf16 resolve_bf16(CpuBf16 requested);

namespace detail {

// Bytes of the per-thread scratch of forward_rows_bf16 / backward_piece_bf16.
int64_t bf16_forward_scratch_bytes(const Tiles& tiles);
int64_t bf16_backward_scratch_bytes(const BackwardTiles& tiles);

// forward_rows and backward_piece of a bf16 problem with tiles.kernel = kDot or kAmx.
// tiles.padded_dim must be D rounded up to 32; scratch.bf16 holds the bytes above.
void forward_rows_bf16(const Problem& p, const Tiles& tiles, const QueryRows& rows,
                       const KeySource* sources, int64_t num_sources, const Scratch& scratch);
void backward_piece_bf16(const BackwardProblem& bp, const BackwardTiles& tiles,
                         const BackwardWork& w, const BackwardScratch& scratch, const GradRows& dq);

}  // namespace detail
}  // namespace ringattn::cpu
