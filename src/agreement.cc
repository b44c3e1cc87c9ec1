#include "agreement.h"

#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "check.h"

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
    check();
  } catch (const Error& e) {
    error = std::current_exception();
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
