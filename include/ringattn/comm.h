#pragma once
// Communicators: move bytes between the ranks of a job.
//
// A Communicator offers non-blocking point-to-point transfers (isend / irecv / wait) for
// the K/V blocks of a ring, and a few blocking collectives on small host arrays for setup
// (agreeing on shapes and configurations, reducing statistics).
//
// Implementations: "self" (one process, no MPI; make_self_communicator below), "mpi"
// (ringattn/comm_mpi.h, only in builds with RINGATTN_HAVE_MPI) and "nccl" (device buffers;
// ringattn/comm_nccl.h, only in builds with RINGATTN_HAVE_NCCL).
//
// Rules every implementation follows:
//   - Every failure throws ringattn::Error; library code never exits or aborts.
//     Bad arguments: kInvalidArgument. A failed transfer or disagreeing ranks:
//     kCommunication.
//   - A receive must name the exact byte count of the matching send (a mismatch is an
//     Error(kCommunication) at wait()).
//   - Messages between one pair of ranks with the same tag are matched in the order they
//     were posted (MPI's non-overtaking rule).
//   - Collectives are called in the same order with the same sizes on every rank.
//   - Nothing waits forever. Every blocking call (wait and the collectives) has a deadline,
//     timeout_seconds() after it started; when it passes, the call throws
//     Error(kCommunication) naming the peer (or collective), the tag and the size, and the
//     communicator is broken. A broken communicator throws Error(kCommunication) from every
//     later call at once (make a new one). A failed transfer breaks it too, and so does
//     abort(), which ring code calls when this rank fails in the middle of a collective
//     operation: where the implementation can (mpi, and the in-process test worlds), the
//     other ranks' waits then fail at once with this rank's reason instead of at their
//     deadline.
//   - Only one thread uses a communicator at a time (MPI_THREAD_FUNNELED is enough): a
//     communicator, and every object that holds one, must not be shared between threads
//     without a lock.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace ringattn {

class Communicator;

// A non-blocking transfer in flight, returned by Communicator::isend / irecv and completed
// by Communicator::wait. Movable, not copyable. An empty (default-constructed) request is
// complete, and waiting on it does nothing.
//
// Always wait() on a request. Destroying one that is still in flight (for example while an
// exception unwinds) never blocks: an unmatched receive is cancelled, and a send is left to
// finish in the background (its buffer must then stay valid until the peer has received
// it). A request must not outlive the communicator that made it.
class CommRequest {
 public:
  // Per-implementation state of a transfer in flight (for Communicator implementations).
  class State {
   public:
    virtual ~State() = default;
  };

  CommRequest() = default;
  // For Communicator implementations: a request in flight owned by `owner`.
  CommRequest(const Communicator* owner, std::unique_ptr<State> state)
      : owner_(owner), state_(std::move(state)) {}
  CommRequest(CommRequest&& other) noexcept = default;
  CommRequest& operator=(CommRequest&& other) noexcept = default;
  CommRequest(const CommRequest&) = delete;
  CommRequest& operator=(const CommRequest&) = delete;
  ~CommRequest() = default;

  // True when nothing is left to wait for (an empty request, or one already waited on).
  bool complete() const { return state_ == nullptr; }

  // For Communicator implementations.
  const Communicator* owner() const { return owner_; }
  State* state() const { return state_.get(); }
  // Marks the request complete (destroys the state).
  void reset() {
    state_.reset();
    owner_ = nullptr;
  }

 private:
  const Communicator* owner_ = nullptr;
  std::unique_ptr<State> state_;
};

class Communicator {
 public:
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  virtual ~Communicator();

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* name() const = 0;  // "self", "mpi", "nccl"

  // Non-blocking point-to-point. `buf` ([bytes] bytes) must stay valid (and, for isend,
  // unchanged) until wait() returns. 0 <= peer < size(), 0 <= tag <= max_tag(). The
  // receive size must equal the send size. Sending to one's own rank is allowed.
  // isend reads buf; irecv writes buf.
  virtual CommRequest isend(const void* buf, size_t bytes, int peer, int tag) = 0;
  virtual CommRequest irecv(void* buf, size_t bytes, int peer, int tag) = 0;
  // Completes one request (blocking) and leaves it empty; throws Error(kCommunication) if
  // the transfer failed. Waiting on an empty request returns at once.
  virtual void wait(CommRequest& req) = 0;
  // Waits on each request in order. On an error the remaining requests stay in flight.
  void wait_all(std::span<CommRequest> reqs);
  // Lets transfers in flight advance without blocking (MPI implementations progress
  // rendezvous transfers only inside MPI calls). Ring code calls it between compute tasks,
  // from the thread that owns the communicator. The default does nothing.
  virtual void progress() {}
  // The largest tag this communicator accepts (at least 32766).
  virtual int max_tag() const = 0;

  // Blocking collectives on host arrays (n elements, n <= INT_MAX), called in the same order
  // with the same n on every rank. `data` is read and overwritten with the elementwise
  // result. The float sum is what weight-gradient reductions use.
  virtual void allreduce_sum(float* data, size_t n) = 0;
  virtual void allreduce_sum(int64_t* data, size_t n) = 0;
  virtual void allreduce_sum(double* data, size_t n) = 0;
  virtual void allreduce_max(int64_t* data, size_t n) = 0;
  virtual void allreduce_min(int64_t* data, size_t n) = 0;
  // send: [bytes_per_rank] read; recv: [size() * bytes_per_rank] written, rank r's bytes at
  // offset r * bytes_per_rank. `send` may point at this rank's slot of `recv`.
  virtual void allgather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  // buf: [bytes] read on `root`, written on every other rank.
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  virtual void barrier() = 0;

  // Payload bytes handed to isend since construction or the last reset_bytes_sent()
  // (sends to one's own rank included; collectives not counted).
  int64_t bytes_sent() const { return bytes_sent_; }
  void reset_bytes_sent() { bytes_sent_ = 0; }

  // The deadline of every blocking call, in seconds. The default is the environment
  // variable RINGATTN_TIMEOUT_S when the communicator is made (a positive number of seconds;
  // anything else is an Error(kInvalidArgument) there), else kDefaultTimeoutSeconds.
  static constexpr double kDefaultTimeoutSeconds = 300.0;
  double timeout_seconds() const { return timeout_s_; }
  // seconds > 0 and finite, else Error(kInvalidArgument).
  void set_timeout(double seconds);

  // Whether the communicator is broken (see the rules above), and why ("" if not).
  bool broken() const { return !broken_reason_.empty(); }
  const std::string& broken_reason() const { return broken_reason_; }
  // Breaks the communicator because this rank failed (`reason`), and tells the other ranks
  // where the implementation can. Never throws; calling it again does nothing.
  void abort(const std::string& reason) noexcept;

 protected:
  // Reads RINGATTN_TIMEOUT_S (throws Error(kInvalidArgument) on a bad value).
  Communicator();

  // For implementations: validates the arguments of isend / irecv (`call` names it in the
  // message) and throws Error(kInvalidArgument) naming the bad one.
  void check_transfer_args(const char* call, const void* buf, size_t bytes, int peer,
                           int tag) const;
  // The same for the collectives: allgather's buffers, broadcast's buffer and root.
  void check_allgather_args(const void* send, const void* recv, size_t bytes_per_rank) const;
  void check_broadcast_args(const void* buf, size_t bytes, int root) const;
  void count_sent(size_t bytes) { bytes_sent_ += static_cast<int64_t>(bytes); }
  // Throws Error(kCommunication) if the communicator is broken (first thing of every call).
  void check_usable(const char* call) const;
  // The start of wait(): false for a completed request (nothing to do); else checks that the
  // communicator is usable and made `req` (Error otherwise) and returns true.
  bool wait_needed(const CommRequest& req) const;
  // Breaks the communicator (keeps the first reason). Never throws.
  void mark_broken(const std::string& reason) noexcept;
  // Breaks it and throws Error(kCommunication): `what` (e.g. "wait: the irecv of 64 bytes
  // from peer 1, tag 3") has not completed within the deadline.
  [[noreturn]] void fail_timeout(const std::string& what);
  // What abort() tells the other ranks; the default tells no one.
  virtual void notify_abort(const std::string& reason) noexcept { (void)reason; }

 private:
  int64_t bytes_sent_ = 0;
  double timeout_s_ = kDefaultTimeoutSeconds;
  std::string broken_reason_;
};

// A deadline of a blocking call: started when made, `seconds` long. Waiting loops of
// Communicator implementations poll, and back off from spinning to short sleeps.
class Deadline {
 public:
  explicit Deadline(double seconds);
  bool passed() const;
  // Spins for the first polls, then sleeps up to a millisecond between them.
  void pause();

 private:
  int64_t end_ns_;
  int polls_ = 0;
};

// One process, no MPI: rank 0 of 1. isend / irecv to self (peer 0) are matched by tag
// through an internal mailbox: a send may precede or follow its receive, and the data is
// copied at isend (the send buffer may be reused as soon as isend returns). Waiting on a
// receive that no send has matched yet throws Error(kCommunication) (it could never
// complete). Any peer other than 0 is an Error(kInvalidArgument). Collectives are
// identities.
std::unique_ptr<Communicator> make_self_communicator();

// One named field of what ranks must agree on, e.g. {"segment_lengths", {2048, 4096}}.
struct AgreedField {
  std::string name;
  std::vector<int64_t> values;
};

// Checks that every rank passes the same fields (a configuration, shapes, ...), in the same
// order. Collective: every rank makes the same calls whether or not it throws, so it never
// hangs. If any rank differs, throws Error(kCommunication) on every rank, naming `what`,
// each field that differs, and the ranks with their values, e.g.
//   "ranks disagree on the configuration of RingDilatedAttention: segment_lengths: rank 0
//    has [2048,4096], rank 1 has [2048]; pass the same configuration on every rank".
// One allgather of a 64-bit hash per rank; only when they differ, a second one with each
// field's length, hash and first 16 values (longer lists are shown by their first values,
// length and hash).
void check_same_on_all_ranks(Communicator& comm, const std::string& what,
                             const std::vector<AgreedField>& fields);
// The same for one unnamed list of values ("ranks disagree on <what>: rank 0 has [...]").
void check_same_on_all_ranks(Communicator& comm, const std::string& what,
                             const std::vector<int64_t>& values);

}  // namespace ringattn
