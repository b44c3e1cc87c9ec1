// The NCCL communicator (include/ringattn/comm_nccl.h): queued point-to-point transfers
// started as one NCCL group on a communication stream, collectives staged through the device.

#include <climits>
#include <memory>
#include <string>
#include <vector>

#include "ringattn/comm_nccl.h"
#include "ringattn/error.h"
#include "src/base/check.h"
#include "src/base/cuda_check.h"

namespace ringattn {
namespace {

void check_nccl(ncclResult_t rc, const char* call, const char* file, int line, ncclComm_t comm) {
  if (rc == ncclSuccess) return;
  const char* detail = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  fail(ErrorCode::kCommunication, call, " failed at ", file, ":", line, ": ",
       ncclGetErrorString(rc),
       detail != nullptr && *detail != '\0' ? std::string(" (") + detail + ")" : std::string());
}

#define RA_NCCL_CHECK(call, comm) check_nccl((call), #call, __FILE__, __LINE__, (comm))

bool is_device_memory(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error of an unknown pointer
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

// A device buffer for staging collectives (cudaMalloc / cudaFree).
class Scratch {
 public:
  explicit Scratch(size_t bytes) { RA_CUDA_CHECK(cudaMalloc(&ptr_, bytes > 0 ? bytes : 1)); }
  ~Scratch() { (void)cudaFree(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

// Transfers started together as one NCCL group; `done` completes with the group.
struct Batch {
  cudaEvent_t done = nullptr;
  bool launched = false;
  ~Batch() {
    if (done != nullptr) (void)cudaEventDestroy(done);
  }
};

struct Op {
  bool recv;
  void* buf;
  size_t bytes;
  int peer;
  std::shared_ptr<bool> cancelled;  // set when its request goes before the group starts
};

struct NcclTransfer : CommRequest::State {
  ~NcclTransfer() override {
    if (!batch->launched) *cancelled = true;  // never started: drop it from the queue
  }
  std::shared_ptr<Batch> batch;
  std::shared_ptr<bool> cancelled;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, bool owned, cudaStream_t compute)
      : comm_(comm), owned_(owned), compute_(compute) {
    require(comm != nullptr,
            "make_nccl_communicator: comm is null; pass an initialized ncclComm_t");
    try {
      settle("ncclCommInitRank");
      RA_NCCL_CHECK(ncclCommUserRank(comm_, &rank_), comm_);
      RA_NCCL_CHECK(ncclCommCount(comm_, &size_), comm_);
      RA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      RA_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
      warm_up();
    } catch (...) {
      release();
      throw;
    }
  }

  ~NcclCommunicator() override { release(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "nccl"; }
  int max_tag() const override { return INT_MAX; }  // tags are checked, not used by NCCL

  CommRequest isend(const void* buf, size_t bytes, int peer, int tag) override {
    check_usable("isend");
    check_transfer_args("isend", buf, bytes, peer, tag);
    check_device("isend", buf, bytes);
    count_sent(bytes);
    return enqueue(false, const_cast<void*>(buf), bytes, peer);
  }

  CommRequest irecv(void* buf, size_t bytes, int peer, int tag) override {
    check_usable("irecv");
    check_transfer_args("irecv", buf, bytes, peer, tag);
    check_device("irecv", buf, bytes);
    return enqueue(true, buf, bytes, peer);
  }

  void progress() override {
    check_usable("progress");
    flush();
  }

  void wait(CommRequest& req) override {
    if (!wait_needed(req)) return;
    const std::shared_ptr<Batch> batch = static_cast<NcclTransfer*>(req.state())->batch;
    if (!batch->launched) flush();
    RA_CUDA_CHECK(cudaStreamWaitEvent(compute_, batch->done, 0));
    wait_event(batch->done, "wait: a group of NCCL transfers");
    req.reset();
  }

  void allreduce_sum(float* data, size_t n) override { allreduce(data, n, ncclFloat32, ncclSum); }
  void allreduce_sum(int64_t* data, size_t n) override { allreduce(data, n, ncclInt64, ncclSum); }
  void allreduce_sum(double* data, size_t n) override { allreduce(data, n, ncclFloat64, ncclSum); }
  void allreduce_max(int64_t* data, size_t n) override { allreduce(data, n, ncclInt64, ncclMax); }
  void allreduce_min(int64_t* data, size_t n) override { allreduce(data, n, ncclInt64, ncclMin); }

  // Collectives stage host arrays through device scratch: copied in on the communication
  // stream (so NCCL reads them after the copy), the result copied out once the stream's
  // event says the collective is done (within the deadline).
  void allgather(const void* send, void* recv, size_t bytes_per_rank) override {
    check_usable("allgather");
    check_allgather_args(send, recv, bytes_per_rank);
    flush();
    const size_t total = bytes_per_rank * static_cast<size_t>(size_);
    const Scratch dsend(bytes_per_rank), drecv(total);
    copy_in(dsend.get(), send, bytes_per_rank);
    RA_NCCL_CHECK(
        ncclAllGather(dsend.get(), drecv.get(), bytes_per_rank, ncclUint8, comm_, stream_), comm_);
    finish_collective("allgather");
    copy_out(recv, drecv.get(), total);
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    check_usable("broadcast");
    check_broadcast_args(buf, bytes, root);
    flush();
    const Scratch d(bytes);
    if (rank_ == root) copy_in(d.get(), buf, bytes);
    RA_NCCL_CHECK(ncclBroadcast(d.get(), d.get(), bytes, ncclUint8, root, comm_, stream_), comm_);
    finish_collective("broadcast");
    copy_out(buf, d.get(), bytes);
  }

  void barrier() override {
    check_usable("barrier");
    int64_t token = 0;
    allreduce_sum(&token, 1);
  }

 private:
  void check_device(const char* call, const void* buf, size_t bytes) const {
    require(bytes == 0 || is_device_memory(buf), call,
            ": buf is not CUDA device memory; the nccl communicator moves device buffers only "
            "(use the mpi communicator for host buffers)");
  }

  CommRequest enqueue(bool recv, void* buf, size_t bytes, int peer) {
    if (!open_) open_ = std::make_shared<Batch>();
    auto t = std::make_unique<NcclTransfer>();
    t->batch = open_;
    t->cancelled = std::make_shared<bool>(false);
    queued_.push_back({recv, buf, bytes, peer, t->cancelled});
    return CommRequest(this, std::move(t));
  }

  // Starts the queued transfers as one group on stream_, after the compute stream's work.
  void flush() {
    if (queued_.empty()) return;
    std::vector<Op> ops;
    ops.swap(queued_);
    const std::shared_ptr<Batch> batch = std::move(open_);
    open_.reset();
    batch->launched = true;  // from here on its requests wait for `done`
    RA_CUDA_CHECK(cudaEventCreateWithFlags(&batch->done, cudaEventDisableTiming));
    RA_CUDA_CHECK(cudaEventRecord(ready_, compute_));
    RA_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    ncclResult_t first_error = ncclSuccess;
    const char* failed_call = nullptr;
    RA_NCCL_CHECK(ncclGroupStart(), comm_);
    for (const Op& op : ops) {
      if (*op.cancelled || first_error != ncclSuccess) continue;
      const ncclResult_t rc = op.recv
                                  ? ncclRecv(op.buf, op.bytes, ncclUint8, op.peer, comm_, stream_)
                                  : ncclSend(op.buf, op.bytes, ncclUint8, op.peer, comm_, stream_);
      if (rc != ncclSuccess) {
        first_error = rc;
        failed_call = op.recv ? "ncclRecv" : "ncclSend";
      }
    }
    const ncclResult_t end = ncclGroupEnd();  // always closes the group
    if (first_error != ncclSuccess) {
      mark_broken(std::string(failed_call) + " failed: " + ncclGetErrorString(first_error));
      check_nccl(first_error, failed_call, __FILE__, __LINE__, comm_);
    }
    if (end != ncclInProgress) RA_NCCL_CHECK(end, comm_);
    settle("ncclGroupEnd");  // a non-blocking communicator enqueues the group in the background
    RA_CUDA_CHECK(cudaEventRecord(batch->done, stream_));
  }

  template <typename T>
  void allreduce(T* data, size_t n, ncclDataType_t type, ncclRedOp_t op) {
    check_usable("allreduce");
    require(data != nullptr || n == 0, "allreduce: data is null but n = ", n,
            "; pass an array of n elements");
    flush();
    const Scratch d(n * sizeof(T));
    copy_in(d.get(), data, n * sizeof(T));
    RA_NCCL_CHECK(ncclAllReduce(d.get(), d.get(), n, type, op, comm_, stream_), comm_);
    finish_collective("allreduce");
    copy_out(data, d.get(), n * sizeof(T));
  }

  // Host bytes into device scratch, in order on the communication stream. (From pageable
  // memory the copy has read `host` when it returns.)
  void copy_in(void* device, const void* host, size_t bytes) {
    if (bytes > 0) {
      RA_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_));
    }
  }
  // Device scratch to host, after finish_collective.
  void copy_out(void* host, const void* device, size_t bytes) {
    if (bytes > 0) {
      RA_CUDA_CHECK(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_));
      RA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the copy alone: the collective is done
    }
  }

  void finish_collective(const char* what) {
    settle(what);
    RA_CUDA_CHECK(cudaEventRecord(ready_, stream_));
    wait_event(ready_, std::string(what) + " (an NCCL collective)");
  }

  // Until the communicator's asynchronous state leaves ncclInProgress (a non-blocking
  // communicator's calls return before they are done), within the deadline. An error or a
  // timeout breaks the communicator and aborts it.
  void settle(const char* what) {
    Deadline deadline(timeout_seconds());
    while (true) {
      ncclResult_t state = ncclSuccess;
      RA_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state), comm_);
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) fail_async(state);
      if (deadline.passed()) {
        abort_nccl();
        fail_timeout(what);
      }
      deadline.pause();
    }
  }

  // Until `done` (work on a stream) completes, polling NCCL's asynchronous error; at the
  // deadline the communicator is aborted (ncclCommAbort ends its kernels) and broken.
  void wait_event(cudaEvent_t done, const std::string& what) {
    Deadline deadline(timeout_seconds());
    while (true) {
      const cudaError_t q = cudaEventQuery(done);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) {
        mark_broken(std::string("a CUDA error while waiting: ") + cudaGetErrorString(q));
        RA_CUDA_CHECK(q);
      }
      ncclResult_t async = ncclSuccess;
      RA_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async), comm_);
      if (async != ncclSuccess && async != ncclInProgress) fail_async(async);
      if (deadline.passed()) {
        abort_nccl();
        fail_timeout(what);
      }
      deadline.pause();
    }
  }

  [[noreturn]] void fail_async(ncclResult_t state) {
    const std::string reason =
        std::string("NCCL reported an asynchronous error: ") + ncclGetErrorString(state);
    abort_nccl();
    mark_broken(reason);
    fail(ErrorCode::kCommunication, reason, "; the communicator was aborted");
  }

  // Ends the NCCL communicator's work (its kernels stop); it cannot be used again.
  void abort_nccl() noexcept {
    queued_.clear();
    if (comm_ != nullptr) (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  // Both ring neighbours, both directions: NCCL connects peers lazily at their first
  // transfer, so doing it here keeps that out of the first ring step.
  void warm_up() {
    const Scratch send(2 * sizeof(int)), recv(2 * sizeof(int));
    const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
    const int values[2] = {rank_, rank_};
    RA_CUDA_CHECK(cudaMemcpy(send.get(), values, sizeof(values), cudaMemcpyHostToDevice));
    int* s = static_cast<int*>(send.get());
    int* r = static_cast<int*>(recv.get());
    CommRequest reqs[4] = {isend(s, sizeof(int), next, 0), isend(s + 1, sizeof(int), prev, 0),
                           irecv(r, sizeof(int), prev, 0), irecv(r + 1, sizeof(int), next, 0)};
    wait_all(reqs);
    int got[2] = {-1, -1};
    RA_CUDA_CHECK(cudaMemcpy(got, recv.get(), sizeof(got), cudaMemcpyDeviceToHost));
    if (got[0] != prev || got[1] != next) {
      fail(ErrorCode::kCommunication, "the NCCL warm-up exchange on rank ", rank_, " got ", got[0],
           " and ", got[1], " from ranks ", prev, " and ", next, "; check the NCCL setup");
    }
    reset_bytes_sent();
    barrier();
  }

  void release() {
    queued_.clear();
    if (broken()) abort_nccl();  // work in flight may never end: do not wait for it
    if (stream_ != nullptr && comm_ != nullptr) (void)cudaStreamSynchronize(stream_);
    if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    if (owned_ && comm_ != nullptr) (void)ncclCommDestroy(comm_);
    ready_ = nullptr;
    stream_ = nullptr;
    comm_ = nullptr;
  }

  ncclComm_t comm_;
  bool owned_;
  cudaStream_t compute_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  int rank_ = 0, size_ = 1;
  std::vector<Op> queued_;
  std::shared_ptr<Batch> open_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(ncclComm_t comm, cudaStream_t compute_stream) {
  return std::make_unique<NcclCommunicator>(comm, false, compute_stream);
}

#ifdef RINGATTN_HAVE_MPI

namespace {

void check_mpi(int rc, const char* call) {
  if (rc != MPI_SUCCESS) fail(ErrorCode::kCommunication, call, " failed with MPI error ", rc);
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, cudaStream_t compute_stream) {
  int rank = 0, size = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  // Rank 0's id and whether it got one, so that a failure there fails every rank.
  struct {
    int ok;
    ncclUniqueId id;
  } shared{};
  if (rank == 0) shared.ok = ncclGetUniqueId(&shared.id) == ncclSuccess ? 1 : 0;
  check_mpi(MPI_Bcast(&shared, sizeof(shared), MPI_BYTE, 0, comm), "MPI_Bcast");
  if (!shared.ok) {
    fail(ErrorCode::kCommunication, "ncclGetUniqueId failed on rank 0; check the NCCL install");
  }
  // Non-blocking, so that every wait can have a deadline (and end in ncclCommAbort).
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t nccl = nullptr;
  const ncclResult_t rc = ncclCommInitRankConfig(&nccl, size, shared.id, rank, &config);
  if (rc != ncclInProgress) RA_NCCL_CHECK(rc, nullptr);
  return std::make_unique<NcclCommunicator>(nccl, true, compute_stream);
}

int select_local_gpu(MPI_Comm comm) {
  MPI_Comm local = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local),
            "MPI_Comm_split_type");
  int local_rank = 0;
  const int rc = MPI_Comm_rank(local, &local_rank);
  MPI_Comm_free(&local);
  check_mpi(rc, "MPI_Comm_rank");
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    fail(ErrorCode::kDevice, "select_local_gpu: no CUDA device is usable (",
         cudaGetErrorString(status), ")");
  }
  const int device = local_rank % count;
  RA_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

#endif

}  // namespace ringattn
