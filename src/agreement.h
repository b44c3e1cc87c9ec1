#pragma once
// Failing together: multi-rank entry points validate locally, then agree, so that bad input
// on any rank is an error on every rank instead of a hang.

#include <functional>

#include "ringattn/comm.h"

namespace ringattn {

// Runs `check` on every rank. If it throws on any rank (anything: a std::bad_alloc counts as
// Error(kOutOfMemory)), every rank throws: the failing rank its own error as ringattn::Error,
// the others an error of the same code naming the first failing rank and its message.
// Collective (one allgather), whatever the outcome. Allocate what the call needs inside
// `check`, so that running out of memory on one rank fails every rank here.
void check_on_all_ranks(Communicator& comm, const std::function<void()>& check);

}  // namespace ringattn
