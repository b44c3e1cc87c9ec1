#pragma once
// The MPI communicator. Only available in builds with RINGATTN_HAVE_MPI (CMake option
// RINGATTN_WITH_MPI); linking ringattn then brings in MPI. In builds with CUDA, isend / irecv
// also take CUDA device buffers: they are staged through host memory (a synchronous copy at
// isend and at the receive's wait), so several ranks can share one GPU.

#include <memory>

#include <mpi.h>

#include "ringattn/comm.h"

namespace ringattn {

// Borrows `comm`: the caller owns MPI_Init / MPI_Finalize and `comm`. Collective over
// `comm` (it is duplicated with MPI_Comm_dup, so ringattn's traffic and its error handler,
// MPI_ERRORS_RETURN, never touch the caller's communicator; the duplicate is freed by the
// destructor, which must run before MPI_Finalize).
//
// Requires MPI to be initialized with at least MPI_THREAD_FUNNELED (MPI_Init_thread);
// otherwise throws Error(kUnsupported). Every failing MPI call throws
// Error(kCommunication) naming the call, file:line and MPI's error string.
// Messages of any size are supported (those above INT_MAX bytes are sent in pieces).
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);

// A grid of seq_ranks x head_ranks over `comm` (DistributedDilatedAttention): rank r of comm is
// rank r % head_ranks of its head group (the ranks r / head_ranks * head_ranks + [0, head_ranks))
// and rank r / head_ranks of its sequence group (the ranks with the same r % head_ranks).
// Collective over `comm` (every rank passes the same head_ranks); head_ranks must divide its
// size, else Error(kInvalidArgument) on every rank.
struct MpiGrid {
  std::unique_ptr<Communicator> seq, head;
};
MpiGrid make_mpi_grid(MPI_Comm comm, int head_ranks);

}  // namespace ringattn
