#pragma once
// DistributedDilatedAttention: MultiheadDilatedAttention over a grid of ranks.
//
// The ranks form a grid of seq_ranks x head_ranks, given as two communicators per rank:
//   - seq_comm: the ranks sharing this rank's heads, each holding a shard of the sequence
//     (sequence parallelism: rank p of seq_comm holds rows [p * N_loc, (p + 1) * N_loc); the
//     attention is RingDilatedAttention over seq_comm);
//   - head_comm: the ranks sharing this rank's rows, each computing a slice of the heads
//     (head parallelism, as in Megatron-LM: column-parallel q/k/v projections, the
//     LayerNorms' row statistics summed over head_comm, a row-parallel output projection
//     followed by an allreduce of y; dx is allreduced in backward).
// Sequence parallel only: head_comm = a self communicator; head parallel only: seq_comm =
// a self communicator; both: make_mpi_grid (ringattn/comm_mpi.h) splits a world.
//
// Weights: each rank holds its slice of the heads (MultiheadWeights sized for H / head_ranks
// heads and Hkv / head_ranks kv heads; bo is whole), the same on every rank of seq_comm.
// shard_weights() cuts a whole layer's weights; a rank's slice equals the same rows / columns
// of MultiheadDilatedAttention's weights, so the two layers compute the same function.
// Weight gradients are this rank's slice; by default they are summed over seq_comm (every
// rank of seq_comm then holds the gradient of the whole sequence).

#include <cstdint>
#include <memory>

#include "ringattn/comm.h"
#include "ringattn/multihead.h"
#include "ringattn/ring_attention.h"

namespace ringattn {

struct DistributedOptions {
  // Sum the weight gradients over seq_comm in backward. false: leave each rank's gradient
  // of its own rows (for a framework that reduces gradients itself).
  bool reduce_weight_grads = true;
};

class DistributedDilatedAttention {
 public:
  // Collective over both communicators (which must outlive this object). The weights are the
  // slice of MultiheadWeights::xavier(config, seed) (the same seed on every rank). Checks that
  // every rank has the same configuration and options, that head_comm's size divides num_heads
  // and kv_heads; any error is thrown on every rank.
  DistributedDilatedAttention(MultiheadConfig config, Communicator& seq_comm,
                              Communicator& head_comm, uint64_t seed,
                              DistributedOptions distributed = {}, ExecOptions options = {});
  // The same with this rank's slice of the weights (sizes checked as in set_weights).
  DistributedDilatedAttention(MultiheadConfig config, Communicator& seq_comm,
                              Communicator& head_comm, MultiheadWeights weights,
                              DistributedOptions distributed = {}, ExecOptions options = {});

  // Rows and columns of a whole layer's weights that rank `head_rank` of `head_ranks` holds.
  static MultiheadWeights shard_weights(const MultiheadConfig& config,
                                        const MultiheadWeights& whole, int head_rank,
                                        int head_ranks);

  // Collective over both communicators. x (or query, key, value): [B, N_loc, E] (fp32, bf16 or
  // fp16, as in MultiheadDilatedAttention), this rank's rows (the same on every rank of head_comm);
  // y: [B, N_loc, E] written (the same on every rank of head_comm). Every check (shapes, every
  // branch fitting the shards, ranks agreeing on B and N_loc) runs before any compute, and an error
  // is thrown on every rank.
  void forward(const TensorView& x, const TensorView& y, MultiheadSaved* saved = nullptr);
  void forward(const TensorView& query, const TensorView& key, const TensorView& value,
               const TensorView& y, MultiheadSaved* saved = nullptr);

  // The exact gradient of forward, collective like it. dy: [B, N_loc, E] (the same on every
  // rank of head_comm); dx (or dquery, dkey, dvalue) written: this rank's rows, summed over
  // the head slices; grads: this rank's slice, summed over seq_comm unless
  // reduce_weight_grads is false.
  void backward(const TensorView& x, const TensorView& dy, const MultiheadSaved& saved,
                const TensorView& dx, MultiheadWeights& grads);
  void backward(const TensorView& query, const TensorView& key, const TensorView& value,
                const TensorView& dy, const MultiheadSaved& saved, const TensorView& dquery,
                const TensorView& dkey, const TensorView& dvalue, MultiheadWeights& grads);

  const MultiheadWeights& weights() const { return weights_; }
  // Replaces this rank's slice; throws Error(kInvalidArgument) naming a buffer of the wrong
  // size (local check, no communication).
  void set_weights(MultiheadWeights weights);
  const MultiheadConfig& config() const { return config_; }
  // Statistics of the attention ring in the last forward or backward.
  const RingStats& ring_stats() const { return ring_->last_stats(); }

 private:
  // Everything but the weights (the public constructors add them).
  struct Unweighted {};
  DistributedDilatedAttention(Unweighted, MultiheadConfig config, Communicator& seq_comm,
                              Communicator& head_comm, DistributedOptions distributed,
                              ExecOptions options);
  void run_forward(const TensorView& query, const TensorView& key, const TensorView& value,
                   const TensorView& y, MultiheadSaved* saved);
  void run_backward(const TensorView& query, const TensorView& key, const TensorView& value,
                    const TensorView& dy, const MultiheadSaved& saved, const TensorView& dquery,
                    const TensorView& dkey, const TensorView& dvalue, MultiheadWeights& grads);
  // Sums the weight gradients over seq_comm (one allreduce of every buffer).
  void reduce_weight_grads(MultiheadWeights& grads);

  MultiheadConfig config_;
  Communicator& seq_comm_;
  Communicator& head_comm_;
  DistributedOptions distributed_;
  ExecOptions options_;
  // The ring over seq_comm and the layer around it: made once, shared by copies.
  std::shared_ptr<RingDilatedAttention> ring_;
  std::shared_ptr<const detail::MultiheadLayer> layer_;
  MultiheadWeights weights_;
};

}  // namespace ringattn
