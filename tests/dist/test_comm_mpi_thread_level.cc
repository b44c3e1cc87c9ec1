// make_mpi_communicator refuses MPI initialized below MPI_THREAD_FUNNELED (here: plain
// MPI_Init, which gives MPI_THREAD_SINGLE) with Error(kUnsupported) naming the level and
// the fix. Its own main: the thread level is fixed once per process. Exit code 0 = pass.

#include <mpi.h>

#include <cstdio>
#include <string>

#include "ringattn/comm_mpi.h"
#include "ringattn/error.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int provided = MPI_THREAD_SINGLE;
  MPI_Query_thread(&provided);
  int failed = 0;
  if (provided >= MPI_THREAD_FUNNELED) {
    std::printf("# skipped: MPI_Init provided thread level %d (this MPI gives more)\n", provided);
  } else {
    try {
      auto comm = ringattn::make_mpi_communicator(MPI_COMM_WORLD);
      std::fprintf(stderr, "FAILED: no error at thread level %d\n", provided);
      failed = 1;
    } catch (const ringattn::Error& e) {
      const std::string msg = e.what();
      if (e.code() != ringattn::ErrorCode::kUnsupported ||
          msg.find("MPI_THREAD_SINGLE") == std::string::npos ||
          msg.find("MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED") == std::string::npos) {
        std::fprintf(stderr, "FAILED: unexpected error: %s\n", msg.c_str());
        failed = 1;
      } else {
        std::printf("# ok: %s\n", msg.c_str());
      }
    }
  }
  MPI_Finalize();
  return failed;
}
