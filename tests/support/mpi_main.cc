// main() of MPI test binaries: MPI_Init_thread(FUNNELED), one communicator over
// MPI_COMM_WORLD for all tests, run all tests, agree on the result, MPI_Finalize.
// Rank 0 prints the usual GoogleTest output, plus a line for each test that failed on
// other ranks; other ranks print only their failures (prefixed "[rank r]", on stderr).
// The exit code is non-zero on every rank if any rank failed.

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "ringattn/comm_mpi.h"
#include "tests/support/mpi_main.h"

namespace ringattn::test {
namespace {

std::unique_ptr<Communicator> g_world;

// The ranks from `first` on that report `failed` ("1,3"; empty if none), gathered over
// MPI_COMM_WORLD: a collective, every rank calls it.
std::string failed_ranks(bool failed, int size, int first) {
  const int mine = failed ? 1 : 0;
  std::vector<int> all(static_cast<size_t>(size), 0);
  MPI_Allgather(&mine, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD);
  std::string ranks;
  for (int r = first; r < size; ++r) {
    if (!all[static_cast<size_t>(r)]) continue;
    if (!ranks.empty()) ranks += ',';
    ranks += std::to_string(r);
  }
  return ranks;
}

// Replaces the default printer on ranks other than 0: failures only, tagged with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  // (gtest holds a lock here: don't call UnitTest::current_test_info().)
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s: %s:%d: Failure\n%s\n", rank_, test_.c_str(),
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.message());
    std::fflush(stderr);
  }

 private:
  int rank_;
  std::string test_ = "(outside a test)";
};

// On every rank, after each test: rank 0 reports the other ranks on which it failed (their
// output goes to their stderr). Every rank runs every test, so the allgather always matches.
class RankAgreement : public ::testing::EmptyTestEventListener {
 public:
  RankAgreement(int rank, int size) : rank_(rank), size_(size) {}
  void OnTestEnd(const ::testing::TestInfo& info) override {
    const std::string ranks = failed_ranks(info.result()->Failed(), size_, 1);
    if (rank_ == 0 && !ranks.empty()) {
      std::printf("[  FAILED  ] %s.%s on rank(s) %s (messages on stderr, tagged [rank r])\n",
                  info.test_suite_name(), info.name(), ranks.c_str());
      std::fflush(stdout);
    }
  }

 private:
  int rank_;
  int size_;
};

}  // namespace

Communicator& world() {
  if (!g_world) {
    std::fprintf(stderr, "world(): no communicator (called outside the tests?)\n");
    std::abort();  // test code only
  }
  return *g_world;
}

}  // namespace ringattn::test

int main(int argc, char** argv) {
  int provided = MPI_THREAD_SINGLE;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    std::fprintf(stderr, "MPI_Init_thread failed\n");
    return 1;
  }
  int rank = 0;
  int size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  ::testing::InitGoogleTest(&argc, argv);
  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new ringattn::test::RankFailurePrinter(rank));
  }
  listeners.Append(new ringattn::test::RankAgreement(rank, size));
  if (rank == 0) {
    std::printf("# %s: %d rank(s), MPI thread level provided = %d\n", argv[0], size, provided);
    std::fflush(stdout);
  }

  int failed = 0;
  try {
    ringattn::test::g_world = ringattn::make_mpi_communicator(MPI_COMM_WORLD);
    failed = RUN_ALL_TESTS() != 0;
    ringattn::test::g_world.reset();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] error: %s\n", rank, e.what());
    failed = 1;
  }

  // Agree on the result: which ranks failed.
  const std::string ranks = ringattn::test::failed_ranks(failed != 0, size, 0);
  if (rank == 0) {
    if (ranks.empty()) {
      std::printf("# all %d rank(s) passed\n", size);
    } else {
      std::printf("# FAILED on rank(s) %s of %d\n", ranks.c_str(), size);
    }
    std::fflush(stdout);
  }
  MPI_Finalize();
  return ranks.empty() ? 0 : 1;
}
