#pragma once
// The NCCL communicator: point-to-point transfers between GPUs (device buffers only) and the
// Communicator collectives. Only in builds with RINGATTN_HAVE_NCCL (CMake option
// RINGATTN_WITH_NCCL, needs CUDA); make_nccl_communicator(MPI_Comm) also needs MPI.
//
// Transfers: isend / irecv only queue the operation; the queued ones start together, as one
// ncclGroupStart / ncclSend / ncclRecv / ncclGroupEnd group on the communicator's own
// stream, at the next progress(), wait() or collective. That stream first waits (an event)
// for the work queued so far on the compute stream, so a send reads what the compute wrote;
// wait() makes the compute stream wait for the group, then blocks the host until it is done.
// NCCL matches the messages between two ranks in posting order, whatever their tags: post
// sends and receives in the same order on both sides, with equal sizes (NCCL cannot check
// that; a mismatch hangs or corrupts).
// Collectives take host arrays (as Communicator says); they are staged through the device.
// NCCL needs one GPU per rank: ranks sharing a GPU use the mpi communicator (host staging).
// Deadlines: every wait and collective polls its stream's event and ncclCommGetAsyncError;
// at the deadline (Communicator::timeout_seconds) or on an asynchronous NCCL error the NCCL
// communicator is aborted (ncclCommAbort, which ends its kernels, so the GPU is not left
// spinning) and this communicator is broken. That holds for a borrowed ncclComm_t too: after
// such an error, do not use or destroy it.

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>

#include "ringattn/comm.h"
#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif

namespace ringattn {

#ifdef RINGATTN_HAVE_MPI
// Collective over `comm`: rank 0 makes an ncclUniqueId, MPI_Bcast shares it, every rank
// joins with ncclCommInitRankConfig (a non-blocking communicator) on its current CUDA device
// (select one first, e.g. with select_local_gpu), then a warm-up exchange with both ring neighbours
// sets up the connections. The NCCL communicator is destroyed with the returned object.
// `compute_stream` (nullptr = the default stream) is the stream the caller's kernels use.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm,
                                                     cudaStream_t compute_stream = nullptr);

// This process's rank among the ranks of `comm` on its node (MPI_Comm_split_type
// MPI_COMM_TYPE_SHARED), and cudaSetDevice(local rank % device count). Returns the device.
// Throws Error(kDevice) when no CUDA device is usable. Collective over `comm`.
int select_local_gpu(MPI_Comm comm);
#endif

// Borrows the caller's `comm` (it must outlive the returned object and is not destroyed by
// it); the warm-up exchange runs here too (collective over the NCCL communicator).
std::unique_ptr<Communicator> make_nccl_communicator(ncclComm_t comm,
                                                     cudaStream_t compute_stream = nullptr);

}  // namespace ringattn
