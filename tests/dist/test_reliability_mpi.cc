// Failing together over MPI ranks: a call made on one rank only ends at the deadline; a rank
// that fails in the middle of a ring (an injected error or allocation failure) stops the
// others at once; an allocation failure while the ranks agree is an Error on every rank,
// and the communicator stays usable. Each case runs on a communicator of its own (a failure
// breaks it), made and dropped by every rank.

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <random>

#include "ringattn/comm_mpi.h"
#include "ringattn/ringattn.h"
#include "tests/support/fault_injection.h"
#include "tests/support/mpi_main.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The result of one rank's call.
struct Outcome {
  bool ok = true;
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
  double seconds = 0.0;
};

template <typename Fn>
Outcome outcome_of(Fn&& fn) {
  Outcome o;
  const Clock::time_point t0 = Clock::now();
  try {
    fn();
  } catch (const Error& e) {
    o.ok = false;
    o.code = e.code();
    o.message = e.what();
  }
  o.seconds = seconds_since(t0);
  return o;
}

struct Shard {
  Tensor q{DType::kF32, {1, 16, 2, 8}}, out{DType::kF32, {1, 16, 2, 8}},
      lse{DType::kF32, {1, 2, 16}}, dq{DType::kF32, {1, 16, 2, 8}}, dk{DType::kF32, {1, 16, 2, 8}},
      dv{DType::kF32, {1, 16, 2, 8}};
  explicit Shard(uint32_t seed) {
    std::mt19937 rng(seed);
    q.fill_normal(rng);
  }
};

DilatedConfig spanning_config(int P) {
  return {{16, 16 * P}, {1, 2}, Mode::kLongNet, false, std::nullopt};
}

TEST(Reliability, ACallOnOneRankOnlyEndsAtTheDeadline) {
  Communicator& world_comm = world();
  if (world_comm.size() == 1) GTEST_SKIP() << "needs two ranks";
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  comm->set_timeout(1.0);
  Outcome o;
  if (comm->rank() == 0) {
    Shard s(1);
    o = outcome_of([&] {
      RingDilatedAttention ring(spanning_config(comm->size()), *comm);  // its agreement waits
      ring.forward(s.q.view(), s.q.view(), s.q.view(), s.out.view());
    });
    EXPECT_FALSE(o.ok);
    EXPECT_EQ(o.code, ErrorCode::kCommunication) << o.message;
    EXPECT_NE(o.message.find("did not complete within the deadline of 1 s"), std::string::npos)
        << o.message;
    EXPECT_LT(o.seconds, 10.0);
    EXPECT_TRUE(comm->broken());
  }
  world_comm.barrier();
}

// A 2+ rank ring forward and backward in which rank 1 fails at its n-th visit of `site`.
Outcome ring_with_fault(Communicator& comm, const char* site, int n, bool bad_alloc) {
  Shard s(static_cast<uint32_t>(comm.rank()));
  RingDilatedAttention ring(spanning_config(comm.size()), comm);
  const FaultHookScope hook;
  if (comm.rank() == 1) arm_fault(site, n, bad_alloc);
  const Outcome o = outcome_of([&] {
    ring.forward(s.q.view(), s.q.view(), s.q.view(), s.out.view(), s.lse.view());
    ring.backward(s.q.view(), s.q.view(), s.q.view(), s.q.view(), s.out.view(), s.lse.view(),
                  s.dq.view(), s.dk.view(), s.dv.view());
  });
  disarm_fault();
  return o;
}

TEST(Reliability, ARankThatFailsMidRingStopsEveryRankAtOnce) {
  Communicator& world_comm = world();
  if (world_comm.size() == 1) GTEST_SKIP() << "needs two ranks";
  for (bool bad_alloc : {false, true}) {
    SCOPED_TRACE(bad_alloc ? "std::bad_alloc" : "ringattn::Error");
    auto comm = make_mpi_communicator(MPI_COMM_WORLD);
    const Outcome o = ring_with_fault(*comm, "ring.step", 1, bad_alloc);
    EXPECT_FALSE(o.ok);
    if (comm->rank() == 1) {
      EXPECT_EQ(o.code, bad_alloc ? ErrorCode::kOutOfMemory : ErrorCode::kDevice) << o.message;
    } else {
      EXPECT_EQ(o.code, ErrorCode::kCommunication) << o.message;
      EXPECT_NE(o.message.find("rank 1 of this communicator failed"), std::string::npos)
          << o.message;
      EXPECT_LT(o.seconds, 60.0) << "waited for the deadline instead of the notice";
    }
    EXPECT_TRUE(comm->broken());
    world_comm.barrier();
  }
}

TEST(Reliability, AnAllocationFailureWhileAgreeingFailsEveryRankAndKeepsTheCommunicator) {
  Communicator& world_comm = world();
  if (world_comm.size() == 1) GTEST_SKIP() << "needs two ranks";
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const Outcome o = ring_with_fault(*comm, "alloc", 2, true);
  EXPECT_FALSE(o.ok);
  EXPECT_EQ(o.code, ErrorCode::kOutOfMemory) << o.message;
  EXPECT_FALSE(comm->broken());
  // Nothing had moved: the same communicator runs the next call.
  const Outcome again = ring_with_fault(*comm, "none", 1, false);
  EXPECT_TRUE(again.ok) << again.message;
  world_comm.barrier();
}

}  // namespace
}  // namespace ringattn::test
