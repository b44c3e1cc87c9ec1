#pragma once
// What the public layer classes put into a MultiheadLayer: the attention cores (one process,
// or the ring over the sequence ranks) and the head group's sums; and the distributed
// layer's configuration agreement and weight-gradient sum.

#include <memory>

#include "ringattn/distributed.h"
#include "ringattn/multihead.h"
#include "ringattn/ring_attention.h"
#include "src/layer/multihead_layer.h"

namespace ringattn::detail {

// DilatedAttention on one process: the core holds copies of `attention` and `options`.
AttentionCore dilated_core(const DilatedAttention& attention, const ExecOptions& options);
// RingDilatedAttention over the sequence ranks `seq` (which must outlive the core); the core
// shares the ring.
AttentionCore ring_core(std::shared_ptr<RingDilatedAttention> ring, Communicator& seq,
                        const ExecOptions& options);
// The sums over the ranks of `head` (which must outlive the group); none for one rank.
HeadGroup head_group(Communicator& head);

// DistributedDilatedAttention's ring over `seq` (this rank's slice of the heads: head.rank()
// of head.size()) and the multihead layer around it (both communicators must outlive it).
std::shared_ptr<RingDilatedAttention> head_slice_ring(const MultiheadConfig& config,
                                                      Communicator& seq, Communicator& head,
                                                      const ExecOptions& options);
std::shared_ptr<const MultiheadLayer> distributed_layer(
    const MultiheadConfig& config, const std::shared_ptr<RingDilatedAttention>& ring,
    Communicator& seq, Communicator& head, const ExecOptions& options);

// DistributedDilatedAttention's configuration, validated on every rank of the grid and
// agreed by all of them (an Error on every rank otherwise).
MultiheadConfig agreed_config(MultiheadConfig config, Communicator& seq, Communicator& head,
                              const DistributedOptions& distributed, const ExecOptions& options);
// Sums every weight gradient over `seq` (one allreduce, in param_specs order).
void sum_weight_grads(const MultiheadConfig& config, const LayerShape& shape,
                      MultiheadWeights& grads, Communicator& seq);

}  // namespace ringattn::detail
