#include "tests/support/thread_world.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "ringattn/error.h"

namespace ringattn::test {
namespace {

using Clock = std::chrono::steady_clock;

struct Group;

// One isend or irecv. Sends copy their bytes when posted (as an eager MPI send would), so
// a dropped request never leaves a dangling pointer.
struct Op {
  bool recv = false;
  int src = 0, dst = 0, tag = 0;
  void* buf = nullptr;     // receives
  std::vector<char> data;  // sends
  size_t bytes = 0;
  bool matched = false, cancelled = false;
  std::string error;  // a size mismatch
  std::shared_ptr<Group> group;
};

// Operations started together (kNccl) or alone (kMpi).
struct Group {
  int pending = 0;                // unmatched operations
  std::shared_ptr<Group> before;  // the previous group of the rank (kNccl stream order)
  // Complete: matched, and so is every group before it (the chain is cut once complete).
  bool done() {
    if (pending > 0 || (before && !before->done())) return false;
    before.reset();
    return true;
  }
};

// A collective in progress: each rank's contribution, by call number.
struct Collective {
  std::vector<std::vector<char>> parts;
  int arrived = 0, left = 0;
};

struct World {
  explicit World(int n, Matching m) : size(n), matching(m), aborted(static_cast<size_t>(n)) {}
  const int size;
  const Matching matching;
  std::mutex mutex;
  std::condition_variable changed;
  // Unmatched flushed operations by (src, dst): sends and receives in posting order.
  std::map<std::pair<int, int>, std::deque<std::shared_ptr<Op>>> sends, recvs;
  std::map<int64_t, Collective> collectives;
  std::vector<std::string> aborted;  // per rank: its abort reason ("" = none)

  // Matches the heads of the (src, dst) queues (under mutex).
  void match(int src, int dst) {
    auto& s = sends[{src, dst}];
    auto& r = recvs[{src, dst}];
    bool progress = true;
    while (progress) {
      progress = false;
      for (auto ri = r.begin(); ri != r.end(); ++ri) {
        auto si = std::find_if(s.begin(), s.end(), [&](const std::shared_ptr<Op>& x) {
          return matching == Matching::kNccl || x->tag == (*ri)->tag;
        });
        if (si == s.end()) {
          if (matching == Matching::kNccl) break;  // in order: the first receive waits
          continue;
        }
        Op& send = **si;
        Op& recv = **ri;
        if (send.bytes != recv.bytes) {
          recv.error = "a receive of " + std::to_string(recv.bytes) + " bytes matched a send of " +
                       std::to_string(send.bytes) + " bytes (tag " + std::to_string(send.tag) + ")";
        } else if (send.bytes > 0) {
          std::memcpy(recv.buf, send.data.data(), send.bytes);
        }
        for (Op* op : {&send, &recv}) {
          op->matched = true;
          --op->group->pending;
        }
        s.erase(si);
        r.erase(ri);
        progress = true;
        break;
      }
    }
  }
};

struct State : CommRequest::State {
  explicit State(std::shared_ptr<World> w, std::shared_ptr<Op> o)
      : world(std::move(w)), op(std::move(o)) {}
  ~State() override {
    // A receive dropped before it matched is cancelled (as MPI does).
    const std::lock_guard<std::mutex> lock(world->mutex);
    if (op->recv && !op->matched) {
      op->cancelled = true;
      auto& q = world->recvs[{op->src, op->dst}];
      q.erase(std::remove(q.begin(), q.end(), op), q.end());
    }
  }
  std::shared_ptr<World> world;
  std::shared_ptr<Op> op;
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(std::shared_ptr<World> world, int rank, double timeout_s)
      : world_(std::move(world)), rank_(rank) {
    set_timeout(timeout_s);
  }

  int rank() const override { return rank_; }
  int size() const override { return world_->size; }
  const char* name() const override {
    return world_->matching == Matching::kMpi ? "thread-mpi" : "thread-nccl";
  }
  int max_tag() const override { return 1 << 30; }

  CommRequest isend(const void* buf, size_t bytes, int peer, int tag) override {
    std::shared_ptr<Op> op = transfer(false, buf, bytes, peer, tag);
    op->data.assign(static_cast<const char*>(buf), static_cast<const char*>(buf) + bytes);
    count_sent(bytes);
    return post(std::move(op));
  }

  CommRequest irecv(void* buf, size_t bytes, int peer, int tag) override {
    std::shared_ptr<Op> op = transfer(true, buf, bytes, peer, tag);
    op->buf = buf;
    return post(std::move(op));
  }

  // Starts nothing (kNccl): a communicator may start queued operations only at wait() or a
  // collective, and a protocol must hold whenever they start.
  void progress() override { check_usable("progress"); }

  void wait(CommRequest& req) override {
    if (req.complete()) return;
    check_usable("wait");
    auto* state = static_cast<State*>(req.state());
    const std::shared_ptr<Op> op = state->op;
    std::unique_lock<std::mutex> lock(world_->mutex);
    flush();
    const std::string what = std::string(op->recv ? "the irecv of " : "the isend of ") +
                             std::to_string(op->bytes) + " bytes " + (op->recv ? "from" : "to") +
                             " peer " + std::to_string(op->recv ? op->src : op->dst) + ", tag " +
                             std::to_string(op->tag);
    block(
        lock, [&] { return op->group->done(); }, "wait: " + what);
    lock.unlock();
    if (!op->error.empty()) {
      mark_broken(op->error);
      throw Error(ErrorCode::kCommunication, "wait: " + op->error);
    }
    req.reset();
  }

  void allreduce_sum(float* data, size_t n) override { reduce(data, n, Sum{}); }
  void allreduce_sum(int64_t* data, size_t n) override { reduce(data, n, Sum{}); }
  void allreduce_sum(double* data, size_t n) override { reduce(data, n, Sum{}); }
  void allreduce_max(int64_t* data, size_t n) override { reduce(data, n, Max{}); }
  void allreduce_min(int64_t* data, size_t n) override { reduce(data, n, Min{}); }

  void allgather(const void* send, void* recv, size_t bytes_per_rank) override {
    const std::vector<std::vector<char>> parts =
        collective(static_cast<const char*>(send), bytes_per_rank, "allgather");
    for (size_t r = 0; r < parts.size(); ++r) {
      if (bytes_per_rank > 0) {
        std::memcpy(static_cast<char*>(recv) + r * bytes_per_rank, parts[r].data(), bytes_per_rank);
      }
    }
  }
  void broadcast(void* buf, size_t bytes, int root) override {
    const std::vector<std::vector<char>> parts =
        collective(static_cast<const char*>(buf), bytes, "broadcast");
    if (bytes > 0) std::memcpy(buf, parts[static_cast<size_t>(root)].data(), bytes);
  }
  void barrier() override { collective(nullptr, 0, "barrier"); }

 private:
  struct Sum {
    template <typename T>
    T operator()(T a, T b) const {
      return a + b;
    }
  };
  struct Max {
    template <typename T>
    T operator()(T a, T b) const {
      return std::max(a, b);
    }
  };
  struct Min {
    template <typename T>
    T operator()(T a, T b) const {
      return std::min(a, b);
    }
  };

  // The operation of an irecv (`recv`) or isend of `bytes` with `peer`, its arguments checked
  // (its buffer not yet set).
  std::shared_ptr<Op> transfer(bool recv, const void* buf, size_t bytes, int peer, int tag) {
    const char* call = recv ? "irecv" : "isend";
    check_usable(call);
    check_transfer_args(call, buf, bytes, peer, tag);
    auto op = std::make_shared<Op>();
    op->recv = recv;
    op->src = recv ? peer : rank_;
    op->dst = recv ? rank_ : peer;
    op->tag = tag;
    op->bytes = bytes;
    return op;
  }

  CommRequest post(std::shared_ptr<Op> op) {
    const std::lock_guard<std::mutex> lock(world_->mutex);
    queued_.push_back(op);
    if (world_->matching == Matching::kMpi) flush();  // every operation starts at once, alone
    return CommRequest(this, std::make_unique<State>(world_, std::move(op)));
  }

  // Starts the queued operations (under mutex): one group for all of them (kNccl; after the
  // previous group), or one each (kMpi).
  void flush() {
    if (queued_.empty()) return;
    std::shared_ptr<Group> group;
    for (const std::shared_ptr<Op>& op : queued_) {
      if (op->recv && op.use_count() == 1) continue;  // its request is gone: cancelled
      if (!group || world_->matching == Matching::kMpi) {
        group = std::make_shared<Group>();
        if (world_->matching == Matching::kNccl) group->before = last_group_;
      }
      op->group = group;
      ++group->pending;
      (op->recv ? world_->recvs : world_->sends)[{op->src, op->dst}].push_back(op);
    }
    if (world_->matching == Matching::kNccl && group) last_group_ = group;
    for (const std::shared_ptr<Op>& op : queued_) world_->match(op->src, op->dst);
    queued_.clear();
    world_->changed.notify_all();
  }

  // Waits (lock held) until ready(), another rank's abort, or the deadline.
  template <typename Ready>
  void block(std::unique_lock<std::mutex>& lock, Ready&& ready, const std::string& what) {
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(timeout_seconds()));
    while (!ready()) {
      for (int r = 0; r < world_->size; ++r) {
        const std::string& reason = world_->aborted[static_cast<size_t>(r)];
        if (r == rank_ || reason.empty()) continue;
        const std::string m =
            "rank " + std::to_string(r) + " of this communicator failed: " + reason;
        lock.unlock();
        mark_broken(m);
        throw Error(ErrorCode::kCommunication, m + "; every rank stops");
      }
      if (world_->changed.wait_until(lock, deadline) == std::cv_status::timeout && !ready()) {
        lock.unlock();
        fail_timeout(what);
      }
    }
  }

  // Every rank's `bytes` bytes of its call number `calls_`, once all have arrived.
  std::vector<std::vector<char>> collective(const char* data, size_t bytes, const char* what) {
    check_usable(what);
    std::unique_lock<std::mutex> lock(world_->mutex);
    flush();
    const int64_t id = calls_++;
    Collective& c = world_->collectives[id];
    c.parts.resize(static_cast<size_t>(world_->size));
    c.parts[static_cast<size_t>(rank_)].assign(data, data + bytes);
    ++c.arrived;
    world_->changed.notify_all();
    block(
        lock, [&] { return c.arrived == world_->size; },
        std::string(what) + " (collective call " + std::to_string(id) + ")");
    std::vector<std::vector<char>> parts = c.parts;
    if (++c.left == world_->size) world_->collectives.erase(id);
    return parts;
  }

  template <typename T, typename Op>
  void reduce(T* data, size_t n, Op op) {
    const std::vector<std::vector<char>> parts =
        collective(reinterpret_cast<const char*>(data), n * sizeof(T), "allreduce");
    for (size_t i = 0; i < n; ++i) {
      T acc;
      std::memcpy(&acc, parts[0].data() + i * sizeof(T), sizeof(T));
      for (size_t r = 1; r < parts.size(); ++r) {
        T x;
        std::memcpy(&x, parts[r].data() + i * sizeof(T), sizeof(T));
        acc = op(acc, x);
      }
      data[i] = acc;
    }
  }

  void notify_abort(const std::string& reason) noexcept override {
    try {
      const std::lock_guard<std::mutex> lock(world_->mutex);
      world_->aborted[static_cast<size_t>(rank_)] = reason;
      world_->changed.notify_all();
    } catch (...) {
    }
  }

  std::shared_ptr<World> world_;
  int rank_;
  int64_t calls_ = 0;
  std::vector<std::shared_ptr<Op>> queued_;  // posted, not started (kNccl)
  std::shared_ptr<Group> last_group_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_thread_world(int size, Matching matching,
                                                             double timeout_s) {
  auto world = std::make_shared<World>(size, matching);
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < size; ++r) comms.push_back(std::make_unique<ThreadComm>(world, r, timeout_s));
  return comms;
}

std::vector<RankResult> run_ranks(const std::vector<std::unique_ptr<Communicator>>& comms,
                                  const std::function<void(Communicator&, int)>& fn) {
  std::vector<RankResult> results(comms.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < comms.size(); ++r) {
    threads.emplace_back([&, r] {
      const auto t0 = Clock::now();
      RankResult& res = results[r];
      try {
        fn(*comms[r], static_cast<int>(r));
      } catch (const Error& e) {
        res.ok = false;
        res.code = e.code();
        res.message = e.what();
      } catch (const std::exception& e) {
        res.ok = false;
        res.message = std::string("not a ringattn::Error: ") + e.what();
      }
      res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

}  // namespace ringattn::test
