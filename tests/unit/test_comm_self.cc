// The one-process communicator, and check_same_on_all_ranks's message (with a fake
// multi-rank communicator).

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "src/base/agreement.h"
#include "tests/support/test_util.h"

namespace ringattn {
namespace {

using test::error_of;

std::vector<uint8_t> pattern(size_t n, int seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>((seed * 31 + i * 7) % 251 + 1);
  return v;
}

TEST(SelfComm, Identity) {
  auto comm = make_self_communicator();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  EXPECT_STREQ(comm->name(), "self");
  EXPECT_GE(comm->max_tag(), 32767);
}

TEST(SelfComm, ReceiveBeforeSend) {
  auto comm = make_self_communicator();
  const auto data = pattern(1000, 1);
  std::vector<uint8_t> got(1000, 0);
  CommRequest recv = comm->irecv(got.data(), got.size(), 0, 5);
  EXPECT_FALSE(recv.complete());
  CommRequest send = comm->isend(data.data(), data.size(), 0, 5);
  comm->wait(send);
  comm->wait(recv);
  EXPECT_TRUE(recv.complete());
  EXPECT_TRUE(send.complete());
  EXPECT_EQ(got, data);
}

TEST(SelfComm, SendBeforeReceiveCopiesTheData) {
  auto comm = make_self_communicator();
  auto data = pattern(333, 2);
  const auto expected = data;
  CommRequest send = comm->isend(data.data(), data.size(), 0, 0);
  std::fill(data.begin(), data.end(), uint8_t{0});  // copy semantics: the buffer is free
  std::vector<uint8_t> got(333, 0);
  CommRequest recv = comm->irecv(got.data(), got.size(), 0, 0);
  comm->wait(recv);
  comm->wait(send);
  EXPECT_EQ(got, expected);
}

TEST(SelfComm, MatchesByTagInPostingOrder) {
  auto comm = make_self_communicator();
  const auto a = pattern(64, 1), b = pattern(64, 2), c = pattern(64, 3), d = pattern(64, 4);
  std::vector<uint8_t> ra(64), rb(64), rc(64), rd(64);
  std::vector<CommRequest> reqs;
  // Two receives with tag 7 posted first, then sends with tags 9, 7, 7, then a tag 9 receive.
  reqs.push_back(comm->irecv(ra.data(), 64, 0, 7));
  reqs.push_back(comm->irecv(rb.data(), 64, 0, 7));
  reqs.push_back(comm->isend(c.data(), 64, 0, 9));
  reqs.push_back(comm->isend(a.data(), 64, 0, 7));
  reqs.push_back(comm->isend(b.data(), 64, 0, 7));
  reqs.push_back(comm->irecv(rc.data(), 64, 0, 9));
  // Sends first for tag 11.
  reqs.push_back(comm->isend(d.data(), 64, 0, 11));
  reqs.push_back(comm->irecv(rd.data(), 64, 0, 11));
  comm->wait_all(reqs);
  for (const CommRequest& r : reqs) EXPECT_TRUE(r.complete());
  EXPECT_EQ(ra, a);
  EXPECT_EQ(rb, b);
  EXPECT_EQ(rc, c);
  EXPECT_EQ(rd, d);
}

TEST(SelfComm, ZeroBytesAndEmptyRequests) {
  auto comm = make_self_communicator();
  CommRequest recv = comm->irecv(nullptr, 0, 0, 1);
  CommRequest send = comm->isend(nullptr, 0, 0, 1);
  comm->wait(recv);
  comm->wait(send);
  CommRequest empty;
  EXPECT_TRUE(empty.complete());
  comm->wait(empty);
  comm->wait(empty);  // waiting twice is fine
  EXPECT_EQ(comm->bytes_sent(), 0);
}

TEST(SelfComm, MovedRequestsStayValid) {
  auto comm = make_self_communicator();
  const auto data = pattern(10, 5);
  std::vector<uint8_t> got(10);
  CommRequest a = comm->irecv(got.data(), 10, 0, 2);
  CommRequest b = std::move(a);
  EXPECT_FALSE(b.complete());
  comm->isend(data.data(), 10, 0, 2);
  comm->wait(b);
  EXPECT_EQ(got, data);
}

TEST(SelfComm, WaitOnUnmatchedReceiveThrows) {
  auto comm = make_self_communicator();
  std::vector<uint8_t> got(8);
  CommRequest recv = comm->irecv(got.data(), 8, 0, 3);
  const Error e = error_of([&] { comm->wait(recv); });
  EXPECT_EQ(e.code(), ErrorCode::kCommunication);
  EXPECT_NE(std::string(e.what()).find("no matching isend"), std::string::npos) << e.what();
}

TEST(SelfComm, DroppedReceiveIsCancelled) {
  auto comm = make_self_communicator();
  std::vector<uint8_t> lost(8, 0);
  { CommRequest recv = comm->irecv(lost.data(), 8, 0, 3); }  // destroyed unmatched
  const auto data = pattern(8, 9);
  comm->isend(data.data(), 8, 0, 3);
  EXPECT_EQ(lost, std::vector<uint8_t>(8, 0));  // the dropped receive got nothing
  std::vector<uint8_t> got(8);
  CommRequest recv = comm->irecv(got.data(), 8, 0, 3);
  comm->wait(recv);
  EXPECT_EQ(got, data);
}

TEST(SelfComm, SizeMismatchThrows) {
  auto comm = make_self_communicator();
  const auto data = pattern(100, 1);
  std::vector<uint8_t> got(200);
  CommRequest recv = comm->irecv(got.data(), 200, 0, 4);
  const Error e = error_of([&] { comm->isend(data.data(), 100, 0, 4); });
  EXPECT_EQ(e.code(), ErrorCode::kCommunication);
  EXPECT_NE(std::string(e.what()).find("100 bytes"), std::string::npos) << e.what();
}

TEST(SelfComm, BadArgumentsThrow) {
  auto comm = make_self_communicator();
  uint8_t buf[4] = {};
  Error e = error_of([&] { comm->isend(buf, 4, 1, 0); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("isend: peer = 1 is outside [0, 1)"), std::string::npos)
      << e.what();
  e = error_of([&] { comm->irecv(buf, 4, -1, 0); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("irecv: peer = -1"), std::string::npos) << e.what();
  e = error_of([&] { comm->isend(buf, 4, 0, -3); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("tag = -3"), std::string::npos) << e.what();
  e = error_of([&] { comm->irecv(nullptr, 4, 0, 0); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  e = error_of([&] { comm->broadcast(buf, 4, 1); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  // A request from another communicator.
  auto other = make_self_communicator();
  CommRequest foreign = other->irecv(buf, 4, 0, 0);
  e = error_of([&] { comm->wait(foreign); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(comm->bytes_sent(), 0);
}

TEST(SelfComm, CollectivesAreIdentities) {
  auto comm = make_self_communicator();
  std::vector<int64_t> i64 = {1, -2, int64_t{1} << 40};
  const auto i64_copy = i64;
  comm->allreduce_sum(i64.data(), i64.size());
  comm->allreduce_max(i64.data(), i64.size());
  comm->allreduce_min(i64.data(), i64.size());
  EXPECT_EQ(i64, i64_copy);
  std::vector<double> f64 = {0.5, -1.25};
  comm->allreduce_sum(f64.data(), f64.size());
  EXPECT_EQ(f64, (std::vector<double>{0.5, -1.25}));
  std::vector<float> f32 = {0.5f, -1.25f};
  comm->allreduce_sum(f32.data(), f32.size());
  EXPECT_EQ(f32, (std::vector<float>{0.5f, -1.25f}));
  comm->allreduce_sum(static_cast<int64_t*>(nullptr), 0);

  const int64_t mine[2] = {7, 8};
  int64_t all[2] = {};
  comm->allgather(mine, all, sizeof(mine));
  EXPECT_EQ(all[0], 7);
  EXPECT_EQ(all[1], 8);
  comm->allgather(all, all, sizeof(all));  // in place
  EXPECT_EQ(all[1], 8);

  auto data = pattern(50, 3);
  const auto before = data;
  comm->broadcast(data.data(), data.size(), 0);
  EXPECT_EQ(data, before);
  comm->barrier();
}

TEST(SelfComm, CountsBytesSent) {
  auto comm = make_self_communicator();
  const auto data = pattern(1000, 1);
  std::vector<uint8_t> got(1000);
  EXPECT_EQ(comm->bytes_sent(), 0);
  std::vector<CommRequest> reqs;
  reqs.push_back(comm->isend(data.data(), 1000, 0, 0));
  reqs.push_back(comm->isend(data.data(), 24, 0, 1));
  reqs.push_back(comm->irecv(got.data(), 1000, 0, 0));
  reqs.push_back(comm->irecv(got.data(), 24, 0, 1));
  comm->wait_all(reqs);
  int64_t x = 1;
  comm->allreduce_sum(&x, 1);  // collectives are not counted
  EXPECT_EQ(comm->bytes_sent(), 1024);
  comm->reset_bytes_sent();
  EXPECT_EQ(comm->bytes_sent(), 0);
}

TEST(SelfComm, CheckSameOnOneRankPasses) {
  auto comm = make_self_communicator();
  EXPECT_NO_THROW(check_same_on_all_ranks(*comm, "segment_lengths", {2048, 4096}));
  EXPECT_NO_THROW(check_same_on_all_ranks(*comm, "nothing", std::vector<int64_t>{}));
  std::vector<int64_t> many(1000);
  std::iota(many.begin(), many.end(), 0);
  EXPECT_NO_THROW(check_same_on_all_ranks(*comm, "many", many));
}

// A fake `size`-rank communicator for check_same_on_all_ranks: allgather puts this rank's
// bytes in every slot except those listed in `others`, which get the bytes that another
// rank holding those fields would contribute to the same round of the check.
class FakeComm final : public Communicator {
 public:
  explicit FakeComm(int size) : size_(size) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  const char* name() const override { return "fake"; }
  int max_tag() const override { return 100; }
  CommRequest isend(const void*, size_t, int, int) override { return {}; }
  CommRequest irecv(void*, size_t, int, int) override { return {}; }
  void wait(CommRequest&) override {}
  void allreduce_sum(float*, size_t) override {}
  void allreduce_sum(int64_t*, size_t) override {}
  void allreduce_sum(double*, size_t) override {}
  void allreduce_max(int64_t*, size_t) override {}
  void allreduce_min(int64_t*, size_t) override {}
  void allgather(const void* send, void* recv, size_t bytes_per_rank) override {
    for (int r = 0; r < size_; ++r) {
      const auto it = others.find(r);
      std::vector<char> theirs;
      if (it != others.end()) theirs = detail::agreement_payload(round_, it->second);
      const char* src = it != others.end() ? theirs.data() : static_cast<const char*>(send);
      ASSERT_TRUE(it == others.end() || theirs.size() == bytes_per_rank);
      std::memcpy(static_cast<char*>(recv) + r * bytes_per_rank, src, bytes_per_rank);
    }
    ++round_;
  }
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}

  std::map<int, std::vector<AgreedField>> others;

 private:
  int size_;
  int round_ = 0;
};

std::vector<AgreedField> unnamed(std::vector<int64_t> values) {
  return {{std::string(), std::move(values)}};
}

TEST(SelfComm, CheckSameNamesTheRanksThatDiffer) {
  FakeComm comm(4);
  comm.others[1] = unnamed({2048});
  comm.others[3] = unnamed({2048});
  const Error e = error_of([&] { check_same_on_all_ranks(comm, "segment_lengths", {2048, 4096}); });
  EXPECT_EQ(e.code(), ErrorCode::kCommunication);
  EXPECT_EQ(std::string(e.what()),
            "ringattn: communication: ranks disagree on segment_lengths: ranks 0,2 have "
            "[2048,4096], ranks 1,3 have [2048]; pass the same configuration on every rank");

  FakeComm comm2(5);
  comm2.others[4] = unnamed({1, 2, 4});
  const Error e2 = error_of([&] { check_same_on_all_ranks(comm2, "dilation_rates", {1, 2}); });
  EXPECT_EQ(std::string(e2.what()),
            "ringattn: communication: ranks disagree on dilation_rates: ranks 0-3 have [1,2], "
            "rank 4 has [1,2,4]; pass the same configuration on every rank");
}

TEST(SelfComm, CheckSameNamesTheFieldsThatDiffer) {
  const std::vector<AgreedField> mine = {{"N_loc (q.shape[1])", {1024}},
                                         {"segment_lengths", {2048, 4096}},
                                         {"dilation_rates", {1, 2}}};
  FakeComm comm(3);
  comm.others[2] = mine;
  comm.others[2][0].values = {512};
  comm.others[2][2].values = {1, 4};
  const Error e = error_of([&] { check_same_on_all_ranks(comm, "the configuration", mine); });
  EXPECT_EQ(e.code(), ErrorCode::kCommunication);
  EXPECT_EQ(std::string(e.what()),
            "ringattn: communication: ranks disagree on the configuration: N_loc (q.shape[1]): "
            "ranks 0-1 have [1024], rank 2 has [512]; dilation_rates: ranks 0-1 have [1,2], rank "
            "2 has [1,4]; pass the same configuration on every rank");
  // Ranks that check different lists of fields made different calls.
  FakeComm other(2);
  other.others[1] = {{"a", {1}}};
  const Error e2 = error_of([&] { check_same_on_all_ranks(other, "the call", mine); });
  EXPECT_NE(std::string(e2.what()).find("rank 0 has 3 fields, rank 1 has 1 fields (they made "
                                        "different calls)"),
            std::string::npos)
      << e2.what();
}

TEST(SelfComm, CheckSameComparesLongListsByHash) {
  std::vector<int64_t> a(100);
  std::iota(a.begin(), a.end(), 0);
  auto b = a;
  b.back() = -1;  // differs after the values that are exchanged inline
  FakeComm comm(2);
  comm.others[1] = unnamed(b);
  const Error e = error_of([&] { check_same_on_all_ranks(comm, "shape", a); });
  EXPECT_EQ(e.code(), ErrorCode::kCommunication);
  const std::string msg = e.what();
  EXPECT_NE(msg.find("ranks disagree on shape: rank 0 has [0,1,2,"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(100 values, hash 0x"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank 1 has"), std::string::npos) << msg;
}

}  // namespace
}  // namespace ringattn
