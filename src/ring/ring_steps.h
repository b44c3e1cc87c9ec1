#pragma once
// What the rings read off their plans' steps: the K/V transfers (KvRing) and the message
// tags of a step.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "src/base/dtype.h"
#include "src/plan/block_sparse_plan.h"
#include "src/plan/ring_plan.h"
#include "src/ring/kv_ring.h"

namespace ringattn {

// Tags of the four kinds of message of a step: K/V blocks, their gradients, balanced
// queries and the partial results that answer them.
struct Tags {
  int stride;
  int kv(const RingStep& st) const { return st.tag; }
  int grads(const RingStep& st) const { return stride + st.tag; }
  int queries(const RingStep& st) const { return 2 * stride + st.tag; }
  int partial(const RingStep& st) const { return 3 * stride + st.tag; }
};

// The dilated ring's transfers: the packed K/V blocks of the spanning branches.
inline std::vector<Transfer> kv_transfers(const Problem& p, const RingPlan& plan) {
  const auto bytes = [&](int span, int sender) {
    return static_cast<size_t>(plan.block_elements(p, span, sender)) * dtype_size(p.dtype);
  };
  std::vector<Transfer> t;
  for (const RingStep& st : plan.steps) {
    t.push_back({st.send_to, st.recv_from, st.tag, st.send_to >= 0 ? bytes(st.span, plan.rank) : 0,
                 st.recv_from >= 0 ? bytes(st.span, st.recv_from) : 0});
  }
  return t;
}

// The block-sparse ring's transfers: the K and V rows of each step's key blocks (empty sets
// move nothing).
inline std::vector<Transfer> block_transfers(const Problem& p, const BlockSparsePlan& plan) {
  const auto bytes = [&](const BlockSet& set) {
    return 2 * static_cast<size_t>(p.batch * set.slots() * plan.bs * p.head_dim) *
           dtype_size(p.dtype);
  };
  std::vector<Transfer> t;
  for (const BlockSparsePlan::Step& st : plan.steps) {
    t.push_back({st.send.slots() > 0 ? st.send_to : -1, st.recv.slots() > 0 ? st.recv_from : -1,
                 st.tag, bytes(st.send), bytes(st.recv)});
  }
  return t;
}

inline Tags tags_of(const RingPlan& plan) {
  return {static_cast<int>(plan.spans.size() + 1) * plan.world};
}

}  // namespace ringattn
