// A job in which one rank dies in the middle of a ring forward (killed by a signal, or
// exiting without MPI_Finalize). The job must end, with a non-zero exit code, instead of the
// other ranks waiting: tests/dist/expect_job_ends.sh runs it under a time limit.
//   ringattn_fault_test kill|exit

#include <mpi.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "ringattn/comm_mpi.h"
#include "ringattn/ringattn.h"
#include "src/base/fault.h"
#include "tests/support/test_util.h"

namespace {

std::string g_how;

void die_here(const char* site) {
  if (std::strcmp(site, "ring.step") != 0) return;
  if (g_how == "kill") std::raise(SIGKILL);
  std::_Exit(3);
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  g_how = argc > 1 ? argv[1] : "kill";
  int code = 0;
  try {
    auto comm = ringattn::make_mpi_communicator(MPI_COMM_WORLD);
    const int P = comm->size();
    ringattn::test::Tensor q(ringattn::DType::kF32, {1, 64, 2, 16}),
        out(ringattn::DType::kF32, {1, 64, 2, 16});
    std::mt19937 rng(static_cast<uint32_t>(comm->rank()));
    q.fill_normal(rng);
    ringattn::RingDilatedAttention ring(
        ringattn::DilatedConfig{{64 * P}, {1}, ringattn::Mode::kGroups, false, std::nullopt},
        *comm);
    if (comm->rank() == 1) ringattn::detail::set_fault_hook(&die_here);
    for (int i = 0; i < 100; ++i) ring.forward(q.view(), q.view(), q.view(), out.view());
  } catch (const ringattn::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    code = 1;
  }
  MPI_Finalize();
  return code;
}
