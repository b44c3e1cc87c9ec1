#pragma once
// What the CPU and GPU rings read off a RingPlan's steps: the message tags of a step, and
// the largest buffer a set of steps needs.

#include <algorithm>
#include <cstdint>

#include "src/plan/ring_plan.h"

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

inline Tags tags_of(const RingPlan& plan) {
  return {static_cast<int>(plan.spans.size() + 1) * plan.world};
}

// The largest `elements(step)` over the steps that `use(step)`.
template <typename Use, typename Elements>
int64_t most_over_steps(const RingPlan& plan, Use&& use, Elements&& elements) {
  int64_t most = 0;
  for (const RingStep& st : plan.steps) {
    if (use(st)) most = std::max(most, elements(st));
  }
  return most;
}

}  // namespace ringattn
