#pragma once
// RingDilatedAttention: dilated attention with the sequence sharded over the ranks of a
// communicator. Rank p holds the contiguous rows [p * N_loc, (p + 1) * N_loc) of q, k and v
// and gets the same rows of the single-device result.

#include <memory>
#include <optional>

#include "ringattn/comm.h"
#include "ringattn/dilated_attention.h"

namespace ringattn {

struct RingPlan;  // internal (src/plan/ring_plan.h)
namespace detail {
template <typename Plan>
class PlanCache;  // internal (src/plan/plan_cache.h)
}  // namespace detail

// What the last forward or backward moved and how long it waited (this rank).
struct RingStats {
  int64_t bytes_sent = 0;     // payload bytes this rank sent
  int64_t messages_sent = 0;  // point-to-point sends
  double comm_wait_ms = 0.0;  // time blocked waiting for transfers (not hidden by compute)
  double total_ms = 0.0;      // the whole forward on this rank
};

class RingDilatedAttention {
 public:
  // Borrows `comm` (it must outlive this object). Validates the configuration.
  RingDilatedAttention(DilatedConfig config, Communicator& comm, ExecOptions options = {});

  // Collective over the communicator: every rank calls it with its shard.
  // q:   [B, N_loc, H, D]    read (global rows rank * N_loc ...)
  // k,v: [B, N_loc, Hkv, D]  read
  // out: [B, N_loc, H, D]    written
  // lse: [B, H, N_loc] fp32  written when given
  // The global sequence is N = size * N_loc. Every branch must fit the shards: a segment
  // either lies inside one rank (N_loc % s == 0) or covers whole ranks (s % N_loc == 0).
  // Ranks check at the start that they agree on configuration, shapes and device; any bad
  // input or disagreement throws Error on every rank, before any compute.
  // CUDA tensors (every tensor of the call, on every rank) run the GPU ring on the current
  // device and ExecOptions::cuda_stream; the call returns when out and lse are written.
  void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const std::optional<TensorView>& lse = std::nullopt);

  // The exact gradient of forward, collective like it. Shapes as in forward (local shards)
  // and as in DilatedAttention::backward; out and lse are this rank's forward results.
  // K/V blocks travel as in forward; the gradients of received keys travel back to the
  // rank that owns them (fp32) and are added there in a fixed order. CUDA tensors run the
  // GPU ring backward (as forward; the call returns when dq, dk and dv are written).
  void backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                const TensorView& v, const TensorView& out, const TensorView& lse,
                const TensorView& dq, const TensorView& dk, const TensorView& dv);

  // Statistics of the last forward or backward on this rank.
  const RingStats& last_stats() const { return stats_; }
  const DilatedConfig& config() const { return config_; }

 private:
  DilatedConfig config_;
  Communicator& comm_;
  ExecOptions options_;
  RingStats stats_;
  std::shared_ptr<detail::PlanCache<RingPlan>> plans_;  // per shape
};

}  // namespace ringattn
