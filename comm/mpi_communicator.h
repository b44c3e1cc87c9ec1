#pragma once
// Internals of the MPI communicator that tests reach into (not installed).

#include <cstddef>
#include <memory>

#include <mpi.h>

#include "ringattn/comm.h"

namespace ringattn::detail {

// Largest piece one MPI call moves; longer messages are split into pieces of this size.
inline constexpr size_t kMpiMaxPieceBytes = size_t{1} << 30;

// make_mpi_communicator with a smaller piece size, so tests can exercise the splitting of
// messages above INT_MAX bytes with small buffers. 1 <= max_piece_bytes <= INT_MAX.
std::unique_ptr<Communicator> make_mpi_communicator_with_pieces(MPI_Comm comm,
                                                                size_t max_piece_bytes);

}  // namespace ringattn::detail
