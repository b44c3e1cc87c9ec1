#pragma once
// A validated forward problem: shapes, strides, dtype and the branch assignment of every
// head. Built once per call by make_problem(), before any compute; all backends and the
// reference read it.

#include <optional>
#include <vector>

#include "ringattn/config.h"
#include "ringattn/dilated_attention.h"
#include "ringattn/tensor.h"

namespace ringattn {

struct Branch {
  int64_t segment;  // s_i
  int64_t rate;     // r_i
};

// One (branch, offset) a head computes.
struct HeadBranch {
  int branch;
  int64_t offset;  // o, 0 <= o < r
};

// Element strides of a [B, N, H, D] view (D is contiguous) or of lse [B, H, N].
struct Strides3 {
  int64_t b, n, h;
};

struct Problem {
  int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  // Global rows [shard_begin, shard_begin + shard_rows) are the rows of the local views
  // (the whole sequence on one device; one rank's shard in a ring).
  int64_t shard_begin = 0, shard_rows = 0;
  DType dtype = DType::kF32;
  Mode mode = Mode::kGroups;
  bool causal = false;
  float scale = 1.0f;
  float out_factor = 1.0f;  // 1/G in groups mode, 1 in longnet mode
  std::vector<Branch> branches;
  // Head h computes head_branches[head_begin[h] .. head_begin[h+1]).
  std::vector<int> head_begin;
  std::vector<HeadBranch> head_branches;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // null: not written (a forward run for lse_precise alone)
  float* lse = nullptr;  // optional
  Strides3 q_st{}, k_st{}, v_st{}, out_st{};
  Strides3 lse_st{};  // b, n, h element strides of lse [B, H, N]
  // Optional (CPU): the lse in double, [B, H, N] at lse_precise_st. A backward whose fp32 lse
  // is too large for the fp32 rounding of it to be harmless (kPreciseLse) runs the forward
  // again for this, and reads it instead.
  double* lse_precise = nullptr;
  Strides3 lse_precise_st{};

  int64_t kv_head(int64_t h) const { return h / (heads / kv_heads); }
  // The index into head_branches of head h's entry for `branch`, or -1 if h skips it.
  int head_branch(int64_t h, int branch) const {
    for (int hb = head_begin[h]; hb < head_begin[h + 1]; ++hb) {
      if (head_branches[hb].branch == branch) return hb;
    }
    return -1;
  }
};

// Assigns branches to heads as SPEC.md says for `mode`.
void assign_heads(Mode mode, const std::vector<Branch>& branches, int64_t heads,
                  std::vector<int>& head_begin, std::vector<HeadBranch>& head_branches);

// |lse| from which a backward recomputes the row statistics (Problem::lse_precise): an fp32
// lse is rounded by up to |lse| * 2^-24, and exp(s - lse) inherits that as a relative error
// of every probability (6e-8 at |lse| = 1, 3.8e-6 at 64, 3% at 1e6).
inline constexpr float kPreciseLse = 64.0f;

// A validated backward call: the forward problem (q, k, v, out, lse) plus the incoming
// gradient and the gradients to write.
struct BackwardProblem {
  Problem fwd;
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides3 dout_st{}, dq_st{}, dk_st{}, dv_st{};
};

// Which rows of the sequence the local views hold: rank `rank` of `world` holds the
// contiguous rows [rank * N_loc, (rank + 1) * N_loc), N = world * N_loc.
struct Shard {
  int rank = 0;
  int world = 1;
};

// Validates everything SPEC.md lists (config, shapes, strides, dtypes, every tensor on
// `device`, head dim limit `max_head_dim` of the backend) and returns the problem. Throws Error.
Problem make_problem(const DilatedConfig& config, const TensorView& q, const TensorView& k,
                     const TensorView& v, const TensorView& out,
                     const std::optional<TensorView>& lse, int64_t max_head_dim,
                     const char* backend, Shard shard = {}, Device device = Device::kCPU);

// Validates a backward call: `out` and `lse` are the forward's results (lse is required),
// dout/dq have q's shape, dk/dv have k's shape, all in q's dtype. Throws Error.
BackwardProblem make_backward_problem(const DilatedConfig& config, const TensorView& dout,
                                      const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& out, const TensorView& lse,
                                      const TensorView& dq, const TensorView& dk,
                                      const TensorView& dv, int64_t max_head_dim,
                                      const char* backend, Shard shard = {},
                                      Device device = Device::kCPU);

struct AgreedField;  // ringattn/comm.h

// The fields of a problem every rank of a ring must agree on: B, N_loc, H, Hkv, D, dtype and
// the softmax scale (its bits).
std::vector<AgreedField> shape_fields(const Problem& p);

}  // namespace ringattn
