#pragma once
// A Communicator whose transfers and collectives are calls into a Python object (the
// torch.distributed transport of ringattn/distributed.py), made on the calling thread with
// the GIL held for each call. The object provides:
//   rank, size, max_tag, name                      attributes (read once)
//   isend(buf, peer, tag) / irecv(buf, peer, tag)  -> a handle; buf: a uint8 torch tensor
//                                                     viewing the C++ buffer
//   wait(handle, timeout_s), cancel(handle)        complete / abandon a transfer
//   allreduce(buf, op, timeout_s)                  op "sum", "max" or "min", in place
//   allgather(send, recv, timeout_s), broadcast(buf, root, timeout_s), barrier(timeout_s)
// timeout_s is the communicator's deadline (Communicator::timeout_seconds); a call that does
// not complete within it raises. A Python exception raised by any of them breaks the
// communicator (Communicator::broken) and becomes Error(kCommunication) naming the call.

#include <nanobind/nanobind.h>

#include <memory>
#include <string>

#include "ringattn/comm.h"

namespace ringattn::python {

// Reads the attributes of `transport` (the GIL must be held).
std::unique_ptr<Communicator> make_python_communicator(nanobind::object transport);

}  // namespace ringattn::python
