#pragma once
// Failing together: multi-rank entry points validate locally, then agree, so that bad input
// on any rank is an error on every rank instead of a hang.

#include <functional>

#include "ringattn/comm.h"

namespace ringattn {

// Runs `check` on every rank. If it throws ringattn::Error on any rank, every rank throws:
// the failing rank its own error, the others an error of the same code naming the first
// failing rank and its message. Collective (one allgather), whatever the outcome.
void check_on_all_ranks(Communicator& comm, const std::function<void()>& check);

}  // namespace ringattn
