#include "agreement.h"

#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "check.h"
#include "fault.h"

namespace ringattn {

namespace {

// What one rank reports: whether it failed, the error code and the start of the message.
struct Verdict {
  int32_t failed = 0;
  int32_t code = 0;
  char message[504] = {};
};

}  // namespace

void check_on_all_ranks(Communicator& comm, const std::function<void()>& check) {
  Verdict mine;
  std::exception_ptr error;
  try {
    detail::fault_point("agree");
    check();
  } catch (...) {
    // Every exception, not only ringattn's: a rank that threw anything else (bad_alloc) and
    // skipped the allgather would leave the others waiting in it.
    const Error e = as_error(std::current_exception(), "checking the input");
    error = std::make_exception_ptr(e);
    mine.failed = 1;
    mine.code = static_cast<int32_t>(e.code());
    std::strncpy(mine.message, e.what(), sizeof(mine.message) - 1);
  }
  std::vector<Verdict> all(static_cast<size_t>(comm.size()));
  comm.allgather(&mine, all.data(), sizeof(Verdict));
  if (error) std::rethrow_exception(error);
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].failed) {
      fail(static_cast<ErrorCode>(all[r].code), "rank ", r, " of ", all.size(),
           " rejected its input, so every rank stops: ", all[r].message);
    }
  }
}

}  // namespace ringattn
