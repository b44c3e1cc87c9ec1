#pragma once
// The fused CPU kernel: flash-style (O, lse) partials over strided (dilated) rows, merged
// per row block; OpenMP threads over (batch, head, row block); SIMD through Highway with
// runtime dispatch.

#include <cstdint>

#include "../problem.h"

namespace ringattn::cpu {

constexpr int64_t kMaxHeadDim = 256;

// Computes p.out (and p.lse when set). `num_threads` = 0 uses OpenMP's default.
void forward(const Problem& p, int num_threads);

// The SIMD target chosen at run time for this CPU (e.g. "AVX2", "AVX3").
const char* simd_target();

namespace detail {

// Tile geometry of one forward call, shared by the driver and the per-target kernels.
struct Tiles {
  static constexpr int64_t kRowsPerMicro = 6;  // rows of a register micro-tile
  static constexpr int64_t kMaxVecFloats = 16;
  static constexpr int64_t kQueryTile = 96;  // query rows per tile (multiple of 6)
  static constexpr int64_t kKeyTile = 128;   // key rows per tile (multiple of 2 vectors)
  int64_t padded_dim;  // D rounded up to 2 vectors of the widest target
  int64_t row_block;   // sequence rows per task
};

// Per-thread scratch: every buffer is O(tile), none depends on N.
struct Scratch {
  float* q;       // [kQueryTile][padded_dim], scaled by scale*log2(e)
  float* kt;      // [kKeyTile / W][padded_dim][W], K^T in panels of W = 2 vectors
  float* v;       // [kKeyTile][padded_dim]
  float* s;       // [kQueryTile][kKeyTile], scores then probabilities
  float* o;       // [kQueryTile][padded_dim], unnormalised output accumulator
  float* m;       // [kQueryTile], running max (log2 units)
  float* l;       // [kQueryTile], running sum
  float* alpha;   // [kQueryTile], rescale factor of the current key tile
  float* acc_o;   // [row_block][padded_dim], merged normalised output of the block
  float* acc_l;   // [row_block], merged lse (natural log)
};

// One task: rows [n0, n1) of head h in batch b, all branches of that head.
void forward_block(const Problem& p, const Tiles& tiles, int64_t b, int64_t h, int64_t n0,
                   int64_t n1, const Scratch& scratch);

}  // namespace detail
}  // namespace ringattn::cpu
