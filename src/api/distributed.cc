// DistributedDilatedAttention: agree on the grid, then run the multihead layer with the ring
// over the sequence ranks as its core and the head group's sums.

#include "ringattn/distributed.h"

#include <initializer_list>
#include <utility>

#include "src/base/agreement.h"
#include "src/base/check.h"
#include "src/layer/cores.h"
#include "src/layer/multihead_layer.h"

namespace ringattn {

DistributedDilatedAttention::DistributedDilatedAttention(Unweighted, MultiheadConfig config,
                                                         Communicator& seq_comm,
                                                         Communicator& head_comm,
                                                         DistributedOptions distributed,
                                                         ExecOptions options)
    : config_(detail::agreed_config(std::move(config), seq_comm, head_comm, distributed, options)),
      seq_comm_(seq_comm),
      head_comm_(head_comm),
      distributed_(distributed),
      options_(options),
      ring_(detail::head_slice_ring(config_, seq_comm, head_comm, options)),
      layer_(detail::distributed_layer(config_, ring_, seq_comm, head_comm, options)) {}

DistributedDilatedAttention::DistributedDilatedAttention(MultiheadConfig config,
                                                         Communicator& seq_comm,
                                                         Communicator& head_comm, uint64_t seed,
                                                         DistributedOptions distributed,
                                                         ExecOptions options)
    : DistributedDilatedAttention(Unweighted{}, std::move(config), seq_comm, head_comm, distributed,
                                  options) {
  weights_ = shard_weights(config_, MultiheadWeights::xavier(config_, seed), head_comm.rank(),
                           head_comm.size());
}

DistributedDilatedAttention::DistributedDilatedAttention(
    MultiheadConfig config, Communicator& seq_comm, Communicator& head_comm,
    MultiheadWeights weights, DistributedOptions distributed, ExecOptions options)
    : DistributedDilatedAttention(Unweighted{}, std::move(config), seq_comm, head_comm, distributed,
                                  options) {
  check_on_grid(seq_comm_, head_comm_, [&] { set_weights(std::move(weights)); });
}

void DistributedDilatedAttention::set_weights(MultiheadWeights weights) {
  detail::check_weights(config_, detail::LayerShape::of(config_, head_comm_.size()), weights,
                        "weights");
  weights_ = std::move(weights);
}

namespace {

// The head group's sums move host memory (head parallel), and the CUDA layer around the GPU
// ring (sequence parallel; both of its directions exist) has no test on a device yet: the
// distributed layer takes host tensors only.
void reject_cuda(std::initializer_list<const TensorView*> views) {
  for (const TensorView* t : views) {
    if (t->device == Device::kCUDA) {
      fail(ErrorCode::kUnsupported,
           "DistributedDilatedAttention runs on host tensors only: the head-parallel sums "
           "move host memory and the sequence-parallel layer is not enabled on CUDA tensors "
           "yet; pass host tensors (MultiheadDilatedAttention takes CUDA tensors on one GPU, "
           "RingDilatedAttention on several)");
    }
  }
}

}  // namespace

void DistributedDilatedAttention::forward(const TensorView& x, const TensorView& y,
                                          MultiheadSaved* saved) {
  forward(x, x, x, y, saved);
}

void DistributedDilatedAttention::forward(const TensorView& query, const TensorView& key,
                                          const TensorView& value, const TensorView& y,
                                          MultiheadSaved* saved) {
  guarded("DistributedDilatedAttention::forward",
          [&] { run_forward(query, key, value, y, saved); });
}

void DistributedDilatedAttention::run_forward(const TensorView& query, const TensorView& key,
                                              const TensorView& value, const TensorView& y,
                                              MultiheadSaved* saved) {
  MultiheadSaved local;
  MultiheadSaved& s = saved ? *saved : local;
  detail::ForwardCall call;
  check_on_grid(seq_comm_, head_comm_, [&] {
    reject_cuda({&query, &key, &value, &y});
    call = detail::forward_call(config_.embed_dim, query, key, value, y);
    layer_->prepare(call.in, s);
  });
  agree_on_grid(seq_comm_, head_comm_, "the shapes of DistributedDilatedAttention::forward",
                {{"B", {call.in.batch}}, {"N_loc", {call.in.seq}}});
  run_on_grid(seq_comm_, head_comm_, "the distributed layer", [&] {
    layer_->forward(weights_, call.in, call.y, s);
    call.finish();
  });
}

void DistributedDilatedAttention::backward(const TensorView& x, const TensorView& dy,
                                           const MultiheadSaved& saved, const TensorView& dx,
                                           MultiheadWeights& grads) {
  backward(x, x, x, dy, saved, dx, dx, dx, grads);
}

void DistributedDilatedAttention::backward(const TensorView& query, const TensorView& key,
                                           const TensorView& value, const TensorView& dy,
                                           const MultiheadSaved& saved, const TensorView& dquery,
                                           const TensorView& dkey, const TensorView& dvalue,
                                           MultiheadWeights& grads) {
  guarded("DistributedDilatedAttention::backward",
          [&] { run_backward(query, key, value, dy, saved, dquery, dkey, dvalue, grads); });
}

void DistributedDilatedAttention::run_backward(const TensorView& query, const TensorView& key,
                                               const TensorView& value, const TensorView& dy,
                                               const MultiheadSaved& saved,
                                               const TensorView& dquery, const TensorView& dkey,
                                               const TensorView& dvalue, MultiheadWeights& grads) {
  detail::BackwardCall call;
  check_on_grid(seq_comm_, head_comm_, [&] {
    reject_cuda({&query, &key, &value, &dy, &dquery, &dkey, &dvalue});
    call = detail::backward_call(config_.embed_dim, query, key, value, dy, dquery, dkey, dvalue);
    layer_->check_saved(call.in, saved);
  });
  agree_on_grid(seq_comm_, head_comm_, "the shapes of DistributedDilatedAttention::backward",
                {{"B", {call.in.batch}}, {"N_loc", {call.in.seq}}});
  run_on_grid(seq_comm_, head_comm_, "the distributed layer", [&] {
    layer_->backward(weights_, call.in, call.dy, saved, call.dquery, call.dkey, call.dvalue, grads);
    call.finish();
    if (distributed_.reduce_weight_grads && seq_comm_.size() > 1) reduce_weight_grads(grads);
  });
}

void DistributedDilatedAttention::reduce_weight_grads(MultiheadWeights& grads) {
  detail::sum_weight_grads(config_, detail::LayerShape::of(config_, head_comm_.size()), grads,
                           seq_comm_);
}

}  // namespace ringattn
