// The one-process communicator: rank 0 of 1, sends to itself matched through a mailbox.

#include <algorithm>
#include <climits>
#include <cstring>
#include <deque>
#include <memory>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "src/base/check.h"

namespace ringattn {
namespace {

struct PendingRecv;

// Sends not yet received (data copied at isend) and receives not yet matched, both in
// posting order so that messages with one tag are matched first-in, first-out.
struct Mailbox {
  struct Message {
    int tag;
    std::vector<std::byte> data;
  };
  std::deque<Message> unmatched_sends;
  std::deque<PendingRecv*> unmatched_recvs;
};

// The state of an irecv posted before its send.
struct PendingRecv : CommRequest::State {
  PendingRecv(std::shared_ptr<Mailbox> box_in, void* buf_in, size_t bytes_in, int tag_in)
      : box(std::move(box_in)), buf(buf_in), bytes(bytes_in), tag(tag_in) {}
  ~PendingRecv() override {
    if (!matched) std::erase(box->unmatched_recvs, this);
  }
  std::shared_ptr<Mailbox> box;
  void* buf;
  size_t bytes;
  int tag;
  bool matched = false;
};

void copy_message(void* dst, size_t dst_bytes, const void* src, size_t src_bytes, int tag) {
  if (dst_bytes != src_bytes) {
    fail(ErrorCode::kCommunication, "self communicator: a message of ", src_bytes,
         " bytes with tag ", tag, " was matched by a receive of ", dst_bytes,
         " bytes; post the receive with the exact size of the send");
  }
  if (src_bytes > 0) std::memcpy(dst, src, src_bytes);
}

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* name() const override { return "self"; }
  int max_tag() const override { return INT_MAX; }

  CommRequest isend(const void* buf, size_t bytes, int peer, int tag) override {
    check_usable("isend");
    check_transfer_args("isend", buf, bytes, peer, tag);
    auto& recvs = box_->unmatched_recvs;
    auto it = std::find_if(recvs.begin(), recvs.end(),
                           [&](const PendingRecv* r) { return r->tag == tag; });
    if (it != recvs.end()) {
      PendingRecv* recv = *it;
      copy_message(recv->buf, recv->bytes, buf, bytes, tag);
      recv->matched = true;
      recvs.erase(it);
    } else {
      const auto* p = static_cast<const std::byte*>(buf);
      box_->unmatched_sends.push_back({tag, std::vector<std::byte>(p, p + bytes)});
    }
    count_sent(bytes);
    return CommRequest();  // the data is copied: nothing left to wait for
  }

  CommRequest irecv(void* buf, size_t bytes, int peer, int tag) override {
    check_usable("irecv");
    check_transfer_args("irecv", buf, bytes, peer, tag);
    auto& sends = box_->unmatched_sends;
    auto it = std::find_if(sends.begin(), sends.end(),
                           [&](const Mailbox::Message& m) { return m.tag == tag; });
    if (it != sends.end()) {
      copy_message(buf, bytes, it->data.data(), it->data.size(), tag);
      sends.erase(it);
      return CommRequest();
    }
    auto state = std::make_unique<PendingRecv>(box_, buf, bytes, tag);
    box_->unmatched_recvs.push_back(state.get());
    return CommRequest(this, std::move(state));
  }

  void wait(CommRequest& req) override {
    if (!wait_needed(req)) return;
    auto* recv = static_cast<PendingRecv*>(req.state());
    if (!recv->matched) {
      mark_broken("a receive had no matching send");
      fail(ErrorCode::kCommunication, "wait: the irecv of ", recv->bytes, " bytes with tag ",
           recv->tag,
           " has no matching isend, so it could never complete in a one-process "
           "communicator; post the isend to rank 0 with this tag before waiting");
    }
    req.reset();
  }

  void allreduce_sum(float* data, size_t n) override { check_array("allreduce_sum", data, n); }
  void allreduce_sum(int64_t* data, size_t n) override { check_array("allreduce_sum", data, n); }
  void allreduce_sum(double* data, size_t n) override { check_array("allreduce_sum", data, n); }
  void allreduce_max(int64_t* data, size_t n) override { check_array("allreduce_max", data, n); }
  void allreduce_min(int64_t* data, size_t n) override { check_array("allreduce_min", data, n); }

  void allgather(const void* send, void* recv, size_t bytes_per_rank) override {
    check_usable("allgather");
    check_allgather_args(send, recv, bytes_per_rank);
    if (bytes_per_rank > 0 && send != recv) std::memmove(recv, send, bytes_per_rank);
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    check_usable("broadcast");
    check_broadcast_args(buf, bytes, root);
  }

  void barrier() override { check_usable("barrier"); }

 private:
  void check_array(const char* call, const void* data, size_t n) const {
    check_usable(call);
    require(data != nullptr || n == 0, call, ": data is null but n = ", n,
            "; pass an array of n elements");
  }

  std::shared_ptr<Mailbox> box_ = std::make_shared<Mailbox>();
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() {
  return std::make_unique<SelfCommunicator>();
}

}  // namespace ringattn
