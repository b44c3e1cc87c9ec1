#pragma once
// Shared by the test files of an MPI test binary (main in tests/support/mpi_main.cc).
//
// Rules for multi-rank tests (a rank that leaves early hangs the others):
//   - never ASSERT_* or return before a collective or a transfer other ranks wait on; use
//     EXPECT_*, finish the communication, then check;
//   - every rank runs every test and makes the same collective calls in the same order;
//   - GTEST_SKIP only on conditions every rank agrees on (such as the world size).

#include "ringattn/comm.h"

namespace ringattn::test {

// The communicator over MPI_COMM_WORLD used by all tests; valid while tests run.
Communicator& world();

}  // namespace ringattn::test
