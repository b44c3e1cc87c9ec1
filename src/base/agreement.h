#pragma once
// Failing together: multi-rank entry points validate locally, then agree, so that bad input
// on any rank is an error on every rank instead of a hang.

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/comm.h"
#include "src/base/check.h"

namespace ringattn {

// Runs `check` on every rank. If it throws on any rank (anything: a std::bad_alloc counts as
// Error(kOutOfMemory)), every rank throws: the failing rank its own error as ringattn::Error,
// the others an error of the same code naming the first failing rank and its message.
// Collective (one allgather), whatever the outcome. Allocate what the call needs inside
// `check`, so that running out of memory on one rank fails every rank here.
void check_on_all_ranks(Communicator& comm, const std::function<void()>& check);

// Runs the communicating part of a collective call (after the agreement): any failure on
// this rank breaks `comm` and tells the other ranks (Communicator::abort), so that they stop
// too, and leaves as a ringattn::Error (as_error(..., context)).
template <typename Fn>
void run_or_abort(Communicator& comm, const char* context, Fn&& fn) {
  try {
    fn();
  } catch (...) {
    const Error e = as_error(std::current_exception(), context);
    comm.abort(e.message());
    throw e;
  }
}

// The same over a grid of ranks (a rank is in one `seq` and one `head` communicator):
// check_on_all_ranks failing on every rank of the grid (the seq agreement spreads an error
// along the sequence, the head one across the heads); check_same_on_all_ranks over both;
// run_or_abort breaking both communicators.
void check_on_grid(Communicator& seq, Communicator& head, const std::function<void()>& check);
void agree_on_grid(Communicator& seq, Communicator& head, const std::string& what,
                   const std::vector<AgreedField>& fields);
template <typename Fn>
void run_on_grid(Communicator& seq, Communicator& head, const char* context, Fn&& fn) {
  run_or_abort(head, context, [&] { run_or_abort(seq, context, std::forward<Fn>(fn)); });
}

namespace detail {
// What a rank holding `fields` contributes to round `round` (0, then 1 only when the ranks
// disagree) of check_same_on_all_ranks: the allgather's bytes, for tests that fake ranks.
std::vector<char> agreement_payload(int round, const std::vector<AgreedField>& fields);
}  // namespace detail

}  // namespace ringattn
