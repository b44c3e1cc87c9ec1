// The MPI communicator: MPI's C API, every return code checked; CUDA device buffers (in
// builds with CUDA) travel through host staging buffers.

#include "comm/mpi_communicator.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/comm_mpi.h"
#include "ringattn/error.h"
#include "src/base/check.h"
#include "src/base/host_staging.h"

namespace ringattn {
namespace {

// "MPI_Isend(buf, ...)" -> "MPI_Isend"; "/a/b/comm/x.cc" -> "comm/x.cc".
std::string_view call_name(std::string_view expr) {
  return expr.substr(0, expr.find('('));
}
std::string_view short_file(std::string_view file) {
  const size_t pos = file.rfind("comm/");
  return pos == std::string_view::npos ? file : file.substr(pos);
}

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) {
    return "MPI error code " + std::to_string(code);
  }
  return std::string(text, static_cast<size_t>(len));
}

// Throws Error(kCommunication) "<call> failed at file:line: <MPI_Error_string>[ (context)]".
void check_mpi(int rc, const char* expr, const char* file, int line,
               const std::string& context = {}) {
  if (rc == MPI_SUCCESS) return;
  fail(ErrorCode::kCommunication, call_name(expr), " failed at ", short_file(file), ":", line, ": ",
       mpi_error_string(rc), context.empty() ? "" : " (", context, context.empty() ? "" : ")");
}

#define RINGATTN_MPI_CHECK(call, ...) \
  check_mpi((call), #call, __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

const char* thread_level_name(int level) {
  if (level == MPI_THREAD_SINGLE) return "MPI_THREAD_SINGLE";
  if (level == MPI_THREAD_FUNNELED) return "MPI_THREAD_FUNNELED";
  if (level == MPI_THREAD_SERIALIZED) return "MPI_THREAD_SERIALIZED";
  if (level == MPI_THREAD_MULTIPLE) return "MPI_THREAD_MULTIPLE";
  return "an unknown thread level";
}

bool mpi_finalized() {
  int finalized = 0;
  return MPI_Finalized(&finalized) == MPI_SUCCESS && finalized;
}

// One isend or irecv in flight: one MPI request per piece.
struct MpiTransfer : CommRequest::State {
  ~MpiTransfer() override {
    // Never blocks on the peer: cancel unmatched receives, let sends finish on their own.
    if (mpi_finalized()) return;
    bool sending = false;
    for (size_t i = next; i < reqs.size(); ++i) {
      if (reqs[i] == MPI_REQUEST_NULL) continue;
      if (is_recv) {
        MPI_Cancel(&reqs[i]);
        MPI_Wait(&reqs[i], MPI_STATUS_IGNORE);
      } else {
        MPI_Request_free(&reqs[i]);
        sending = true;
      }
    }
    // A staged send still in flight reads `staging`: it must outlive this object, so it is
    // left allocated (this happens only when a request is dropped without wait()).
    if (sending && !staging.empty()) new std::vector<char>(std::move(staging));
  }

  std::string describe() const {
    return std::string(is_recv ? "irecv of " : "isend of ") + std::to_string(bytes) +
           (is_recv ? " bytes from peer " : " bytes to peer ") + std::to_string(peer) + ", tag " +
           std::to_string(tag);
  }

  bool is_recv = false;
  int peer = 0;
  int tag = 0;
  size_t bytes = 0;
  std::vector<MPI_Request> reqs;  // one per piece, in order
  std::vector<int> piece_bytes;   // the size of each piece
  size_t next = 0;                // the first piece not yet waited on
  // A CUDA device buffer travels through host memory: `staging` holds the bytes, and a
  // receive copies them to `device_dst` once complete.
  std::vector<char> staging;
  void* device_dst = nullptr;
};

// The host buffer MPI reads for a send of `buf` (a staged copy of a device buffer).
const void* stage_send(MpiTransfer& t, const void* buf, size_t bytes) {
  if (bytes > 0 && staging::is_device_pointer(buf)) {
    t.staging.resize(bytes);
    staging::copy_to_host(t.staging.data(), buf, bytes);
    return t.staging.data();
  }
  (void)t;
  (void)bytes;
  return buf;
}

// The host buffer MPI writes for a receive into `buf`.
void* stage_recv(MpiTransfer& t, void* buf, size_t bytes) {
  if (bytes > 0 && staging::is_device_pointer(buf)) {
    t.staging.resize(bytes);
    t.device_dst = buf;
    return t.staging.data();
  }
  (void)t;
  (void)bytes;
  return buf;
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, size_t max_piece_bytes) : max_piece_(max_piece_bytes) {
    require(max_piece_bytes >= 1 && max_piece_bytes <= static_cast<size_t>(INT_MAX),
            "make_mpi_communicator: max_piece_bytes = ", max_piece_bytes,
            " is outside [1, INT_MAX]; pass a positive int");
    int initialized = 0;
    RINGATTN_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized || mpi_finalized()) {
      fail(ErrorCode::kInvalidArgument, "make_mpi_communicator: MPI is ",
           initialized ? "already finalized" : "not initialized",
           "; call MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) before and "
           "MPI_Finalize after using ringattn");
    }
    int level = MPI_THREAD_SINGLE;
    RINGATTN_MPI_CHECK(MPI_Query_thread(&level));
    if (level < MPI_THREAD_FUNNELED) {
      fail(ErrorCode::kUnsupported, "make_mpi_communicator: MPI was initialized with ",
           thread_level_name(level),
           " but ringattn needs at least MPI_THREAD_FUNNELED (its CPU kernels run OpenMP "
           "threads); initialize MPI with MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, "
           "&provided) instead of MPI_Init");
    }
    require(comm != MPI_COMM_NULL,
            "make_mpi_communicator: comm is MPI_COMM_NULL; pass a valid communicator such as "
            "MPI_COMM_WORLD");
    // Collective over the caller's communicator (a non-blocking duplicate, so that it has a
    // deadline too); errors here follow the caller's handler.
    auto dup = std::make_unique<MPI_Comm>(MPI_COMM_NULL);
    MPI_Request req = MPI_REQUEST_NULL;
    RINGATTN_MPI_CHECK(MPI_Comm_idup(comm, dup.get(), &req));
    Deadline deadline(timeout_seconds());
    for (int done = 0; !done;) {
      RINGATTN_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
      if (!done && deadline.passed()) {
        dup.release();  // NOLINT: MPI writes it when the duplicate is made
        fail_timeout("make_mpi_communicator: MPI_Comm_idup (collective over every rank of comm)");
      }
      deadline.pause();
    }
    comm_ = *dup;
    try {
      RINGATTN_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
      RINGATTN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
      RINGATTN_MPI_CHECK(MPI_Comm_size(comm_, &size_));
      void* attr = nullptr;
      int flag = 0;
      RINGATTN_MPI_CHECK(MPI_Comm_get_attr(comm_, MPI_TAG_UB, &attr, &flag));
      if (flag && attr != nullptr) max_tag_ = *static_cast<int*>(attr) - 1;
      abort_tag_ = max_tag_ + 1;
    } catch (...) {
      MPI_Comm_free(&comm_);
      throw;
    }
  }

  ~MpiCommunicator() override {
    if (mpi_finalized()) return;
    for (MPI_Request& r : notices_) {
      int done = 0;
      if (r != MPI_REQUEST_NULL) MPI_Test(&r, &done, MPI_STATUS_IGNORE);
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);  // finishes on its own
    }
    // A notice still in flight reads notice_: it must outlive this object.
    if (!notices_.empty()) new std::string(std::move(notice_));
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "mpi"; }
  int max_tag() const override { return max_tag_; }

  CommRequest isend(const void* buf, size_t bytes, int peer, int tag) override {
    check_usable("isend");
    check_transfer_args("isend", buf, bytes, peer, tag);
    auto t = start(false, bytes, peer, tag);
    const auto* p = static_cast<const char*>(stage_send(*t, buf, bytes));
    for (size_t i = 0; i < t->reqs.size(); ++i) {
      RINGATTN_MPI_CHECK(MPI_Isend(p, t->piece_bytes[i], MPI_BYTE, peer, tag, comm_, &t->reqs[i]),
                         t->describe());
      p += t->piece_bytes[i];
    }
    count_sent(bytes);
    return CommRequest(this, std::move(t));
  }

  CommRequest irecv(void* buf, size_t bytes, int peer, int tag) override {
    check_usable("irecv");
    check_transfer_args("irecv", buf, bytes, peer, tag);
    auto t = start(true, bytes, peer, tag);
    auto* p = static_cast<char*>(stage_recv(*t, buf, bytes));
    for (size_t i = 0; i < t->reqs.size(); ++i) {
      RINGATTN_MPI_CHECK(MPI_Irecv(p, t->piece_bytes[i], MPI_BYTE, peer, tag, comm_, &t->reqs[i]),
                         t->describe());
      p += t->piece_bytes[i];
    }
    return CommRequest(this, std::move(t));
  }

  void progress() override {
    check_usable("progress");
    int flag = 0;
    RINGATTN_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, MPI_STATUS_IGNORE));
  }

  void wait(CommRequest& req) override {
    if (!wait_needed(req)) return;
    auto* t = static_cast<MpiTransfer*>(req.state());
    while (t->next < t->reqs.size()) {
      const size_t i = t->next;
      MPI_Status status;
      const int rc =
          test_until_done(&t->reqs[i], &status, [&] { return "wait: the " + t->describe(); });
      if (rc != MPI_SUCCESS) {
        t->reqs[i] = MPI_REQUEST_NULL;  // a request that failed is not waited on again
        t->next = i + 1;
        mark_broken("MPI_Wait failed: " + mpi_error_string(rc) + " (" + t->describe() + ")");
        check_mpi(rc, "MPI_Wait", __FILE__, __LINE__, t->describe());
      }
      t->next = i + 1;
      if (t->is_recv) {
        int count = 0;
        RINGATTN_MPI_CHECK(MPI_Get_count(&status, MPI_BYTE, &count), t->describe());
        if (count != t->piece_bytes[i]) {
          mark_broken("a receive got a message of another size (" + t->describe() + ")");
          fail(ErrorCode::kCommunication, "wait: ", t->describe(), " got a message of ", count,
               " bytes", t->reqs.size() > 1 ? " in one of its pieces" : "",
               "; post the receive with the exact size of the send");
        }
      }
    }
    if (t->device_dst != nullptr)
      staging::copy_to_device(t->device_dst, t->staging.data(), t->bytes);
    req.reset();
  }

  void allreduce_sum(float* data, size_t n) override {
    allreduce("allreduce_sum", data, n, MPI_FLOAT, MPI_SUM);
  }
  void allreduce_sum(int64_t* data, size_t n) override {
    allreduce("allreduce_sum", data, n, MPI_INT64_T, MPI_SUM);
  }
  void allreduce_sum(double* data, size_t n) override {
    allreduce("allreduce_sum", data, n, MPI_DOUBLE, MPI_SUM);
  }
  void allreduce_max(int64_t* data, size_t n) override {
    allreduce("allreduce_max", data, n, MPI_INT64_T, MPI_MAX);
  }
  void allreduce_min(int64_t* data, size_t n) override {
    allreduce("allreduce_min", data, n, MPI_INT64_T, MPI_MIN);
  }

  void allgather(const void* send, void* recv, size_t bytes_per_rank) override {
    check_usable("allgather");
    require(bytes_per_rank <= static_cast<size_t>(INT_MAX),
            "allgather: bytes_per_rank = ", bytes_per_rank,
            " is above INT_MAX; gather small arrays only");
    check_allgather_args(send, recv, bytes_per_rank);
    const size_t total = bytes_per_rank * static_cast<size_t>(size_);
    // MPI writes staged buffers, never the caller's: a collective that times out stays in
    // flight, and its buffers are left to MPI.
    auto staged = std::make_unique<std::vector<char>>(total + bytes_per_rank);
    char* in = staged->data() + total;
    if (bytes_per_rank > 0) std::memcpy(in, send, bytes_per_rank);
    const int count = static_cast<int>(bytes_per_rank);
    MPI_Request req = MPI_REQUEST_NULL;
    RINGATTN_MPI_CHECK(
        MPI_Iallgather(in, count, MPI_BYTE, staged->data(), count, MPI_BYTE, comm_, &req));
    complete_collective(req, std::move(staged),
                        "allgather of " + std::to_string(bytes_per_rank) + " bytes per rank");
    if (total > 0) std::memcpy(recv, last_staged_->data(), total);
    last_staged_.reset();
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    check_usable("broadcast");
    check_broadcast_args(buf, bytes, root);
    auto* p = static_cast<char*>(buf);
    for (size_t off = 0; off < bytes; off += max_piece_) {
      const size_t n = std::min(max_piece_, bytes - off);
      auto staged = std::make_unique<std::vector<char>>(p + off, p + off + n);
      MPI_Request req = MPI_REQUEST_NULL;
      RINGATTN_MPI_CHECK(
          MPI_Ibcast(staged->data(), static_cast<int>(n), MPI_BYTE, root, comm_, &req));
      complete_collective(
          req, std::move(staged),
          "broadcast of " + std::to_string(bytes) + " bytes from rank " + std::to_string(root));
      std::memcpy(p + off, last_staged_->data(), n);
      last_staged_.reset();
    }
  }

  void barrier() override {
    check_usable("barrier");
    MPI_Request req = MPI_REQUEST_NULL;
    RINGATTN_MPI_CHECK(MPI_Ibarrier(comm_, &req));
    complete_collective(req, nullptr, "barrier");
  }

 private:
  std::unique_ptr<MpiTransfer> start(bool is_recv, size_t bytes, int peer, int tag) const {
    auto t = std::make_unique<MpiTransfer>();
    t->is_recv = is_recv;
    t->peer = peer;
    t->tag = tag;
    t->bytes = bytes;
    // A zero-byte message is still one (empty) MPI message, so that it matches.
    const size_t pieces = std::max<size_t>(1, (bytes + max_piece_ - 1) / max_piece_);
    t->reqs.assign(pieces, MPI_REQUEST_NULL);
    t->piece_bytes.resize(pieces);
    for (size_t i = 0; i < pieces; ++i) {
      t->piece_bytes[i] = static_cast<int>(std::min(max_piece_, bytes - i * max_piece_));
    }
    return t;
  }

  template <typename T>
  void allreduce(const char* call, T* data, size_t n, MPI_Datatype type, MPI_Op op) {
    check_usable(call);
    require(n <= static_cast<size_t>(INT_MAX), call, ": n = ", n,
            " is above INT_MAX; reduce small arrays only");
    require(data != nullptr || n == 0, call, ": data is null but n = ", n,
            "; pass an array of n elements");
    const size_t bytes = n * sizeof(T);
    auto staged = std::make_unique<std::vector<char>>(bytes);
    if (bytes > 0) std::memcpy(staged->data(), data, bytes);
    MPI_Request req = MPI_REQUEST_NULL;
    RINGATTN_MPI_CHECK(
        MPI_Iallreduce(MPI_IN_PLACE, staged->data(), static_cast<int>(n), type, op, comm_, &req));
    complete_collective(req, std::move(staged),
                        std::string(call) + " of " + std::to_string(n) + " elements");
    if (bytes > 0) std::memcpy(data, last_staged_->data(), bytes);
    last_staged_.reset();
  }

  // Tests `req` until it completes, the deadline passes (fail_timeout(what())) or another
  // rank's abort notice arrives (Error naming that rank and its reason). Returns MPI_Test's
  // error code.
  template <typename What>
  int test_until_done(MPI_Request* req, MPI_Status* status, const What& what) {
    Deadline deadline(timeout_seconds());
    while (true) {
      int done = 0;
      const int rc = MPI_Test(req, &done, status);
      if (rc != MPI_SUCCESS || done) return rc;
      check_abort_notices();
      if (deadline.passed()) fail_timeout(what());
      deadline.pause();
    }
  }

  // Waits for a non-blocking collective whose buffers are `staged` (kept in last_staged_ when
  // it completes; left to MPI when it does not).
  void complete_collective(MPI_Request& req, std::unique_ptr<std::vector<char>> staged,
                           const std::string& what) {
    try {
      const int rc = test_until_done(&req, MPI_STATUS_IGNORE, [&] { return what; });
      if (rc != MPI_SUCCESS) {
        mark_broken("the " + what + " failed: " + mpi_error_string(rc));
        check_mpi(rc, "MPI collective", __FILE__, __LINE__, what);
      }
    } catch (...) {
      staged.release();  // NOLINT: MPI may still write it
      throw;
    }
    last_staged_ = std::move(staged);
  }

  // An abort notice from another rank breaks this communicator and throws.
  void check_abort_notices() {
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, abort_tag_, comm_, &flag, &status) != MPI_SUCCESS || !flag) {
      return;
    }
    int count = 0;
    MPI_Get_count(&status, MPI_CHAR, &count);
    std::string reason(static_cast<size_t>(std::max(count, 0)), '\0');
    MPI_Recv(reason.data(), count, MPI_CHAR, status.MPI_SOURCE, abort_tag_, comm_,
             MPI_STATUS_IGNORE);
    const std::string what =
        "rank " + std::to_string(status.MPI_SOURCE) + " of this communicator failed: " + reason;
    mark_broken(what);
    fail(ErrorCode::kCommunication, what, "; every rank stops");
  }

  void notify_abort(const std::string& reason) noexcept override {
    if (mpi_finalized() || comm_ == MPI_COMM_NULL) return;
    try {
      notice_ = reason.substr(0, 2000);
      for (int r = 0; r < size_; ++r) {
        if (r == rank_) continue;
        MPI_Request req = MPI_REQUEST_NULL;
        if (MPI_Isend(notice_.data(), static_cast<int>(notice_.size()), MPI_CHAR, r, abort_tag_,
                      comm_, &req) == MPI_SUCCESS) {
          notices_.push_back(req);
        }
      }
    } catch (...) {  // out of memory: the others find out at their deadline
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  int max_tag_ = 32766;  // the minimum MPI guarantees, less the abort notices' tag
  int abort_tag_ = 32767;
  size_t max_piece_;
  std::unique_ptr<std::vector<char>> last_staged_;  // buffers of the last collective
  std::string notice_;                              // the reason abort() sent
  std::vector<MPI_Request> notices_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm) {
  return std::make_unique<MpiCommunicator>(comm, detail::kMpiMaxPieceBytes);
}

MpiGrid make_mpi_grid(MPI_Comm comm, int head_ranks) {
  int rank = 0, size = 1;
  RINGATTN_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  RINGATTN_MPI_CHECK(MPI_Comm_size(comm, &size));
  require(head_ranks >= 1 && size % head_ranks == 0, "make_mpi_grid: head_ranks = ", head_ranks,
          " does not divide the ", size, " ranks of comm; use a divisor of ", size);
  MpiGrid grid;
  for (const bool seq : {true, false}) {
    MPI_Comm part = MPI_COMM_NULL;
    const int color = seq ? rank % head_ranks : rank / head_ranks;
    const int key = seq ? rank / head_ranks : rank % head_ranks;
    RINGATTN_MPI_CHECK(MPI_Comm_split(comm, color, key, &part));
    try {
      (seq ? grid.seq : grid.head) = make_mpi_communicator(part);
    } catch (...) {
      MPI_Comm_free(&part);
      throw;
    }
    RINGATTN_MPI_CHECK(MPI_Comm_free(&part));
  }
  return grid;
}

namespace detail {
std::unique_ptr<Communicator> make_mpi_communicator_with_pieces(MPI_Comm comm,
                                                                size_t max_piece_bytes) {
  return std::make_unique<MpiCommunicator>(comm, max_piece_bytes);
}
}  // namespace detail

}  // namespace ringattn
