// Communicators with CUDA device buffers, in the MPI test binary ringattn_gpu_mpi_tests
// (launched at several rank counts, label gpu): the mpi communicator (host staging, so ranks
// may share one GPU) and the nccl communicator (one GPU per rank), and RingDilatedAttention
// on CUDA tensors over both. Every rank takes the same skip decision (agreed over MPI), so a
// skip never leaves a rank waiting.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "src/backend/ref/reference.h"
#include "tests/gpu/gpu_util.h"
#include "tests/support/expect.h"
#include "tests/support/mpi_main.h"
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

// One GPU ring case: every rank's rows of the GPU ring forward (this rank's shard on the
// device) against the fp64 reference of the whole sequence, within SPEC.md's tolerances
// (fp32: 1e-5; bf16/fp16: twice the error of the naive computation in that precision), and
// against the CPU single-device result within the same bound.
struct GpuRingCase {
  int64_t B, n_loc, H, Hkv, D;
  std::vector<int64_t> s, r;
  Mode mode;
  bool causal;
  DType dtype;
};

// Rows [row0, row0 + rows) of a [B, N, heads, D] host tensor, as a new host tensor.
Tensor shard_of(const Tensor& full, int64_t row0, int64_t rows) {
  const auto& sh = full.view().shape;
  Tensor t(full.dtype(), {sh[0], rows, sh[2], sh[3]});
  for (int64_t b = 0; b < sh[0]; ++b)
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t h = 0; h < sh[2]; ++h)
        for (int64_t d = 0; d < sh[3]; ++d) t.set(b, n, h, d, full.get(b, row0 + n, h, d));
  return t;
}

void check_gpu_ring(Communicator& comm, const GpuRingCase& c, uint32_t seed) {
  const int P = comm.size(), rank = comm.rank();
  const int64_t N = P * c.n_loc, row0 = rank * c.n_loc;
  SCOPED_TRACE(::testing::Message() << "P=" << P << " D=" << c.D << " s.back()=" << c.s.back()
                                    << " " << mode_name(c.mode) << " causal=" << c.causal << " "
                                    << dtype_name(c.dtype) << " " << comm.name());
  std::mt19937 rng(seed);  // the same inputs on every rank
  Tensor q(c.dtype, {c.B, N, c.H, c.D}), k(c.dtype, {c.B, N, c.Hkv, c.D}),
      v(c.dtype, {c.B, N, c.Hkv, c.D}), full_out(c.dtype, {c.B, N, c.H, c.D}),
      out(c.dtype, {c.B, c.n_loc, c.H, c.D}), lse(DType::kF32, {c.B, c.H, c.n_loc});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  const DilatedConfig cfg{c.s, c.r, c.mode, c.causal, std::nullopt};
  DilatedAttention(cfg).forward(q.view(), k.view(), v.view(), full_out.view(), std::nullopt);
  const ReferenceResult ref = reference_forward(make_problem(
      cfg, q.view(), k.view(), v.view(), full_out.view(), std::nullopt, 1 << 20, "reference"));
  const double bound = forward_error_bound(cfg, q, k, v, ref);

  const DeviceCopy dq(shard_of(q, row0, c.n_loc)), dk(shard_of(k, row0, c.n_loc)),
      dv(shard_of(v, row0, c.n_loc)), dout(out), dlse(lse);
  RingDilatedAttention ring(cfg, comm, ExecOptions{Backend::kCuda, 0});
  ring.forward(dq.view(), dk.view(), dv.view(), dout.view(), dlse.view());
  dout.download(out);
  dlse.download(lse);

  const ShardStats st = compare_shard(out, lse, row0, full_out, ref);
  EXPECT_EQ(st.bad, 0);
  EXPECT_EQ(st.missing, 0) << "zeros where the reference is not";
  EXPECT_GT(st.max_ref, 0.05);
  EXPECT_LE(st.err, bound) << "against the fp64 reference";
  EXPECT_LE(st.vs_single, 2.0 * bound) << "against the CPU single-device result";
  EXPECT_LE(st.lse_err, 2e-5 * std::max(1.0, st.max_lse));
  if (P > 1) {
    EXPECT_GT(ring.last_stats().bytes_sent, 0);  // the spanning branch's blocks moved
  }
}

// Rows [row0, row0 + rows) of a [B, N, heads, D] fp64 array (reference gradients).
std::vector<double> shard_of(const std::vector<double>& full, const std::vector<int64_t>& shape,
                             int64_t row0, int64_t rows) {
  const int64_t inner = shape[2] * shape[3];
  std::vector<double> part;
  for (int64_t b = 0; b < shape[0]; ++b) {
    const auto first = full.begin() + (b * shape[1] + row0) * inner;
    part.insert(part.end(), first, first + rows * inner);
  }
  return part;
}

// The shard of rank-local rows of gradients (dq, dk, dv) as fp64 arrays.
ReferenceGrads shard_of(const ReferenceGrads& full, const GpuRingCase& c, int64_t N, int64_t row0) {
  return {shard_of(full.dq, {c.B, N, c.H, c.D}, row0, c.n_loc),
          shard_of(full.dk, {c.B, N, c.Hkv, c.D}, row0, c.n_loc),
          shard_of(full.dv, {c.B, N, c.Hkv, c.D}, row0, c.n_loc)};
}

// A host tensor's values as an fp64 array.
std::vector<double> values_of(const Tensor& t) {
  const auto& sh = t.view().shape;
  std::vector<double> x;
  for (int64_t b = 0; b < sh[0]; ++b)
    for (int64_t n = 0; n < sh[1]; ++n)
      for (int64_t h = 0; h < sh[2]; ++h)
        for (int64_t d = 0; d < sh[3]; ++d) x.push_back(t.get(b, n, h, d));
  return x;
}

// One GPU ring backward case: from the saved forward state of the CPU single-device forward
// (out, lse), every rank's dq, dk, dv of the GPU ring backward (this rank's shard on the
// device) against the fp64 reference gradients of the whole sequence and against the CPU
// single-device backward, within SPEC.md's gradient tolerances.
void check_gpu_ring_backward(Communicator& comm, const GpuRingCase& c, uint32_t seed) {
  const int P = comm.size(), rank = comm.rank();
  const int64_t N = P * c.n_loc, row0 = rank * c.n_loc;
  SCOPED_TRACE(::testing::Message()
               << "backward P=" << P << " D=" << c.D << " s.back()=" << c.s.back() << " "
               << mode_name(c.mode) << " causal=" << c.causal << " " << dtype_name(c.dtype) << " "
               << comm.name());
  std::mt19937 rng(seed);  // the same inputs on every rank
  Tensor q(c.dtype, {c.B, N, c.H, c.D}), k(c.dtype, {c.B, N, c.Hkv, c.D}),
      v(c.dtype, {c.B, N, c.Hkv, c.D}), dout(c.dtype, {c.B, N, c.H, c.D}),
      out(c.dtype, {c.B, N, c.H, c.D}), lse(DType::kF32, {c.B, c.H, N}),
      dq(c.dtype, {c.B, N, c.H, c.D}), dk(c.dtype, {c.B, N, c.Hkv, c.D}),
      dv(c.dtype, {c.B, N, c.Hkv, c.D});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  dout.fill_normal(rng);
  const DilatedConfig cfg{c.s, c.r, c.mode, c.causal, std::nullopt};
  const DilatedAttention cpu(cfg);
  cpu.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
  cpu.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
               dk.view(), dv.view());
  const ReferenceGrads ref = reference_backward(
      make_backward_problem(cfg, dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(),
                            dq.view(), dk.view(), dv.view(), 1 << 20, "reference"));

  Tensor lse_shard(DType::kF32, {c.B, c.H, c.n_loc}), dq_shard(c.dtype, {c.B, c.n_loc, c.H, c.D}),
      dk_shard(c.dtype, {c.B, c.n_loc, c.Hkv, c.D}), dv_shard(c.dtype, {c.B, c.n_loc, c.Hkv, c.D});
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t n = 0; n < c.n_loc; ++n) lse_shard.set(b, h, n, 0, lse.get(b, h, row0 + n));
  const DeviceCopy d_q(shard_of(q, row0, c.n_loc)), d_k(shard_of(k, row0, c.n_loc)),
      d_v(shard_of(v, row0, c.n_loc)), d_dout(shard_of(dout, row0, c.n_loc)),
      d_out(shard_of(out, row0, c.n_loc)), d_lse(lse_shard), d_dq(dq_shard), d_dk(dk_shard),
      d_dv(dv_shard);
  RingDilatedAttention ring(cfg, comm, ExecOptions{Backend::kCuda, 0});
  ring.backward(d_dout.view(), d_q.view(), d_k.view(), d_v.view(), d_out.view(), d_lse.view(),
                d_dq.view(), d_dk.view(), d_dv.view());
  d_dq.download(dq_shard);
  d_dk.download(dk_shard);
  d_dv.download(dv_shard);

  {
    SCOPED_TRACE("against the fp64 reference");
    expect_grads_close(c.dtype, dq_shard, dk_shard, dv_shard, shard_of(ref, c, N, row0));
  }
  {
    SCOPED_TRACE("against the CPU single-device backward");
    const ReferenceGrads single{values_of(shard_of(dq, row0, c.n_loc)),
                                values_of(shard_of(dk, row0, c.n_loc)),
                                values_of(shard_of(dv, row0, c.n_loc))};
    expect_grads_close(c.dtype, dq_shard, dk_shard, dv_shard, single);
  }
  if (P > 1) {
    EXPECT_GT(ring.last_stats().bytes_sent, 0);  // blocks and their gradients moved
  }
}

using RingCheck = void (*)(Communicator&, const GpuRingCase&, uint32_t);

// Both modes, causal on and off, fp32 and bf16; a segment spanning all ranks (and one
// inside a rank), D = 64; then D = 80 (generic kernel) with rates that leave uneven rows.
void check_gpu_ring_cases(Communicator& comm, RingCheck check) {
  const int64_t n_loc = 32;
  const int P = comm.size();
  uint32_t seed = 50;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (Mode mode : {Mode::kGroups, Mode::kLongNet}) {
      for (bool causal : {false, true}) {
        check(comm, {2, n_loc, 4, 2, 64, {n_loc / 2, P * n_loc}, {1, 2}, mode, causal, dtype},
              seed++);
      }
    }
  }
  check(comm, {1, n_loc, 3, 1, 80, {n_loc, P * n_loc}, {2, 3}, Mode::kLongNet, true, DType::kF32},
        seed++);
}

// Ranks sharing one GPU: the mpi communicator stages the device blocks through host memory.
TEST(GpuRing, MatchesTheReferenceOverMpi) {
  RA_SKIP_UNLESS_GPUS(1, "no CUDA device: the GPU ring over the mpi communicator skipped");
  check_gpu_ring_cases(world(), check_gpu_ring);
}

TEST(GpuRing, BackwardMatchesTheReferenceOverMpi) {
  RA_SKIP_UNLESS_GPUS(1, "no CUDA device: the GPU ring backward over the mpi communicator skipped");
  check_gpu_ring_cases(world(), check_gpu_ring_backward);
}

// q on the GPU on rank 0 only, or k (or, in the backward, dq) on the host while q is on the
// GPU: an Error on every rank, before any transfer.
TEST(GpuRing, DeviceMismatchFailsOnEveryRank) {
  RA_SKIP_UNLESS_GPUS(1, "no CUDA device: the GPU ring's device checks skipped");
  const int64_t n_loc = 16;
  const DilatedConfig cfg{
      {n_loc, world().size() * n_loc}, {1, 2}, Mode::kGroups, false, std::nullopt};
  std::mt19937 rng(3);
  Tensor q(DType::kF32, {1, n_loc, 2, 32}), out(DType::kF32, {1, n_loc, 2, 32}),
      lse(DType::kF32, {1, 2, n_loc});
  q.fill_normal(rng);
  const DeviceCopy dq(q), dout(out), dlse(lse);
  RingDilatedAttention ring(cfg, world());
  if (world().size() > 1) {
    const bool gpu_here = world().rank() == 0;
    const TensorView x = gpu_here ? dq.view() : q.view(), o = gpu_here ? dout.view() : out.view();
    const Error mixed_ranks = error_of([&] { ring.forward(x, x, x, o, std::nullopt); });
    EXPECT_NE(std::string(mixed_ranks.what()).find("device"), std::string::npos)
        << mixed_ranks.what();
  }
  const Error mixed_tensors =
      error_of([&] { ring.forward(dq.view(), q.view(), dq.view(), dout.view(), std::nullopt); });
  EXPECT_EQ(mixed_tensors.code(), ErrorCode::kInvalidArgument) << mixed_tensors.what();
  const Error backward = error_of([&] {
    ring.backward(dout.view(), dq.view(), dq.view(), dq.view(), dout.view(), dlse.view(), q.view(),
                  dq.view(), dq.view());
  });
  EXPECT_EQ(backward.code(), ErrorCode::kInvalidArgument) << backward.what();
  EXPECT_NE(std::string(backward.what()).find("dq lives on the CPU"), std::string::npos)
      << backward.what();
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

// One GPU per rank: the same cases over NCCL (device buffers moved directly).
TEST(Nccl, GpuRingMatchesTheReference) {
  RA_SKIP_UNLESS_GPUS(world().size(), "NCCL needs one GPU per rank on every node");
  select_local_gpu(MPI_COMM_WORLD);
  const std::unique_ptr<Communicator> nccl = make_nccl_communicator(MPI_COMM_WORLD);
  check_gpu_ring_cases(*nccl, check_gpu_ring);
  check_gpu_ring_cases(*nccl, check_gpu_ring_backward);
}

#endif

}  // namespace
}  // namespace ringattn::test
