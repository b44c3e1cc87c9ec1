#pragma once
// The plans of one public object (RingDilatedAttention, BlockSparseRingDilatedAttention),
// kept per shape: a call whose problem has the shape of an earlier one reuses that plan
// instead of planning again. A plan depends on the object's configuration (fixed) and on
// the problem's shape and shard; a few shapes are kept, the most recently used first.
// Thread-safe (copies of an object share its cache).

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "src/plan/problem.h"

namespace ringattn::detail {

template <typename Plan>
class PlanCache {
 public:
  static constexpr size_t kShapes = 8;

  // The plan of p's shape on rank `rank` of `world`, made by make() (which may throw: then
  // nothing is kept) when no earlier call had that shape.
  template <typename Make>
  std::shared_ptr<const Plan> get(const Problem& p, int rank, int world, Make&& make) {
    std::vector<int64_t> key = {rank,    world,      p.batch,   p.shard_rows,
                                p.heads, p.kv_heads, p.head_dim};
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->first == key) {
        entries_.splice(entries_.begin(), entries_, it);
        return entries_.front().second;
      }
    }
    entries_.emplace_front(std::move(key), std::make_shared<const Plan>(make()));
    if (entries_.size() > kShapes) entries_.pop_back();
    return entries_.front().second;
  }

 private:
  std::mutex mutex_;
  std::list<std::pair<std::vector<int64_t>, std::shared_ptr<const Plan>>> entries_;
};

}  // namespace ringattn::detail
