// Communicators with CUDA device buffers, in the MPI test binary ringattn_gpu_mpi_tests
// (launched at several rank counts, label gpu): the mpi communicator (host staging, so ranks
// may share one GPU) and the nccl communicator (one GPU per rank). Every rank takes the same
// skip decision (agreed over MPI), so a skip never leaves a rank waiting.

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "gpu_util.h"
#include "tests/mpi_main.h"
#ifdef RINGATTN_HAVE_NCCL
#include "ringattn/comm_nccl.h"
#endif

namespace ringattn::test {
namespace {

// Usable GPUs on the rank with the fewest (0 without a device), agreed by every rank.
int64_t fewest_gpus() {
  int count = 0;
  int64_t gpus = no_gpu_reason().empty() && cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
  world().allreduce_min(&gpus, 1);
  return gpus;
}

// Skips on every rank (all ranks agree) unless each has a GPU; fails with RINGATTN_REQUIRE_GPU.
#define RA_SKIP_UNLESS_GPUS(min_gpus, why)                                                    \
  do {                                                                                        \
    const int64_t gpus = fewest_gpus();                                                       \
    if (gpus < (min_gpus) && gpus == 0 && gpu_required()) {                                   \
      FAIL() << "RINGATTN_REQUIRE_GPU=1 but no CUDA device is usable";                        \
    }                                                                                         \
    if (gpus < (min_gpus)) GTEST_SKIP() << why << " (fewest GPUs on a rank: " << gpus << ")"; \
  } while (0)

// A device buffer of `n` int32 values.
class DeviceInts {
 public:
  explicit DeviceInts(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&ptr_, n * sizeof(int32_t)), cudaSuccess);
  }
  ~DeviceInts() { (void)cudaFree(ptr_); }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  int32_t* get() const { return static_cast<int32_t*>(ptr_); }
  size_t bytes() const { return n_ * sizeof(int32_t); }
  void upload(const std::vector<int32_t>& values) {
    EXPECT_EQ(cudaMemcpy(ptr_, values.data(), bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<int32_t> download() const {
    std::vector<int32_t> values(n_);
    EXPECT_EQ(cudaMemcpy(values.data(), ptr_, bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
    return values;
  }

 private:
  void* ptr_ = nullptr;
  size_t n_;
};

std::vector<int32_t> pattern(int rank, int step, size_t n) {
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int32_t>(rank * 1000003 + step * 7919 + i);
  return v;
}

// `steps` ring steps on `comm`, double-buffered like the K/V ring: each step sends the block
// received in the previous step to the next rank; after step s a rank holds the block of
// rank (rank - s - 1) mod P. Every transfer completes on every rank before the checks.
void ring_exchange(Communicator& comm, size_t n, int steps) {
  const int rank = comm.rank(), size = comm.size();
  const int next = (rank + 1) % size, prev = (rank + size - 1) % size;
  DeviceInts a(n), b(n);
  a.upload(pattern(rank, 0, n));
  DeviceInts* cur = &a;
  DeviceInts* other = &b;
  for (int s = 0; s < steps; ++s) {
    CommRequest reqs[2] = {comm.irecv(other->get(), other->bytes(), prev, 7),
                           comm.isend(cur->get(), cur->bytes(), next, 7)};
    comm.wait_all(reqs);
    const int from = ((rank - s - 1) % size + size) % size;
    EXPECT_EQ(other->download(), pattern(from, 0, n)) << "step " << s;
    std::swap(cur, other);
  }
}

void collectives(Communicator& comm) {
  const int rank = comm.rank(), size = comm.size();
  std::vector<float> f = {1.0f, static_cast<float>(rank)};
  comm.allreduce_sum(f.data(), f.size());
  EXPECT_EQ(f[0], static_cast<float>(size));
  EXPECT_EQ(f[1], static_cast<float>(size * (size - 1) / 2));
  int64_t i = rank + 1, mx = rank, mn = rank;
  comm.allreduce_sum(&i, 1);
  comm.allreduce_max(&mx, 1);
  comm.allreduce_min(&mn, 1);
  EXPECT_EQ(i, int64_t{size} * (size + 1) / 2);
  EXPECT_EQ(mx, size - 1);
  EXPECT_EQ(mn, 0);
  double d = 0.5;
  comm.allreduce_sum(&d, 1);
  EXPECT_EQ(d, 0.5 * size);
  std::vector<int32_t> all(static_cast<size_t>(size), -1);
  const int32_t mine = 100 + rank;
  comm.allgather(&mine, all.data(), sizeof(mine));
  for (int r = 0; r < size; ++r) EXPECT_EQ(all[static_cast<size_t>(r)], 100 + r);
  int32_t value = rank == size - 1 ? 4242 : 0;
  comm.broadcast(&value, sizeof(value), size - 1);
  EXPECT_EQ(value, 4242);
  comm.barrier();
}

// The mpi communicator moves device buffers through host memory: ranks may share one GPU.
TEST(GpuMpi, DeviceBuffersThroughHostStaging) {
  RA_SKIP_UNLESS_GPUS(1, "no CUDA device: the mpi communicator's device-buffer test skipped");
  ring_exchange(world(), 1000, world().size() + 1);
  ring_exchange(world(), 3 << 20, 2);  // 12 MiB blocks
}

#ifdef RINGATTN_HAVE_NCCL

// NCCL refuses two ranks on one GPU: one GPU per rank (select_local_gpu picks it).
TEST(Nccl, RingAndCollectives) {
  RA_SKIP_UNLESS_GPUS(world().size(), "NCCL needs one GPU per rank on every node");
  int64_t device = select_local_gpu(MPI_COMM_WORLD);
  EXPECT_GE(device, 0);
  const std::unique_ptr<Communicator> nccl = make_nccl_communicator(MPI_COMM_WORLD);
  EXPECT_STREQ(nccl->name(), "nccl");
  EXPECT_EQ(nccl->rank(), world().rank());
  EXPECT_EQ(nccl->size(), world().size());
  EXPECT_EQ(nccl->bytes_sent(), 0);  // the warm-up is not counted
  ring_exchange(*nccl, 4096, nccl->size() + 1);
  EXPECT_EQ(nccl->bytes_sent(), int64_t{4096} * 4 * (nccl->size() + 1));
  ring_exchange(*nccl, 3 << 20, 2);
  collectives(*nccl);
}

TEST(Nccl, BorrowsTheCallersComm) {
  RA_SKIP_UNLESS_GPUS(world().size(), "NCCL needs one GPU per rank on every node");
  select_local_gpu(MPI_COMM_WORLD);
  ncclUniqueId id{};
  if (world().rank() == 0) {
    EXPECT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  }
  world().broadcast(&id, sizeof(id), 0);
  ncclComm_t comm = nullptr;
  ASSERT_EQ(ncclCommInitRank(&comm, world().size(), id, world().rank()), ncclSuccess);
  {
    const std::unique_ptr<Communicator> nccl = make_nccl_communicator(comm);
    ring_exchange(*nccl, 777, 2);
  }
  // Still usable after the wrapper is gone: ringattn did not destroy it.
  const std::unique_ptr<Communicator> again = make_nccl_communicator(comm);
  collectives(*again);
  EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
}

TEST(Nccl, RejectsHostBuffers) {
  RA_SKIP_UNLESS_GPUS(world().size(), "NCCL needs one GPU per rank on every node");
  select_local_gpu(MPI_COMM_WORLD);
  const std::unique_ptr<Communicator> nccl = make_nccl_communicator(MPI_COMM_WORLD);
  std::vector<char> host(16);
  const Error e = error_of([&] { nccl->isend(host.data(), host.size(), 0, 0); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("device buffers only"), std::string::npos) << e.what();
}

#endif

}  // namespace
}  // namespace ringattn::test
