// The MPI communicator on every rank of MPI_COMM_WORLD (run by ctest at 1, 2, 3 and 4
// ranks). Every rank runs every test and makes the same communication calls; checks use
// EXPECT (never ASSERT before communication other ranks wait on).

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "comm/mpi_communicator.h"
#include "ringattn/comm.h"
#include "ringattn/comm_mpi.h"
#include "ringattn/error.h"
#include "tests/support/mpi_main.h"
#include "tests/support/test_util.h"

namespace ringattn {
namespace {

using test::error_of;

using test::world;

// Non-zero bytes that depend on the sender, the receiver and the position.
uint8_t byte_at(int src, int dst, size_t i) {
  return static_cast<uint8_t>((src * 131 + dst * 17 + i * 7 + i / 251) % 251 + 1);
}
std::vector<uint8_t> message(int src, int dst, size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = byte_at(src, dst, i);
  return v;
}
// Number of bytes of `got` that differ from message(src, dst, got.size()).
size_t mismatches(const std::vector<uint8_t>& got, int src, int dst) {
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += got[i] != byte_at(src, dst, i);
  return bad;
}

TEST(MpiComm, Identity) {
  Communicator& comm = world();
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(comm.rank(), rank);
  EXPECT_EQ(comm.size(), size);
  EXPECT_STREQ(comm.name(), "mpi");
  EXPECT_GE(comm.max_tag(), 32766);
}

// Send to rank + 1, receive from rank - 1; sizes depend on the sender.
TEST(MpiComm, RingExchange) {
  Communicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  auto size_from = [](int src) { return size_t{100000} + 13 * static_cast<size_t>(src); };
  const auto out = message(r, next, size_from(r));
  std::vector<uint8_t> in(size_from(prev), 0);
  CommRequest reqs[2] = {comm.irecv(in.data(), in.size(), prev, 1),
                         comm.isend(out.data(), out.size(), next, 1)};
  comm.wait_all(reqs);
  EXPECT_TRUE(reqs[0].complete());
  EXPECT_TRUE(reqs[1].complete());
  EXPECT_EQ(mismatches(in, prev, r), 0u);
}

// The pattern of ring attention: pass blocks around the ring for p - 1 steps with double
// buffering (post the next transfer, then use the current block); every rank sees every
// block exactly once.
TEST(MpiComm, RingRotationDoubleBuffered) {
  Communicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  constexpr size_t kBytes = 1 << 18;
  std::vector<uint8_t> buf[2] = {message(r, 0, kBytes), std::vector<uint8_t>(kBytes)};
  std::vector<int> seen(static_cast<size_t>(p), 0);
  for (int step = 0; step < p; ++step) {
    const auto& cur = buf[step % 2];
    auto& nxt = buf[(step + 1) % 2];
    CommRequest reqs[2];
    if (step + 1 < p) {
      reqs[0] = comm.irecv(nxt.data(), kBytes, prev, 100 + step);
      reqs[1] = comm.isend(cur.data(), kBytes, next, 100 + step);
    }
    const int owner = (r - step + p) % p;  // the block held at this step
    EXPECT_EQ(mismatches(cur, owner, 0), 0u) << "step " << step;
    ++seen[static_cast<size_t>(owner)];
    comm.wait_all(reqs);
  }
  for (int o = 0; o < p; ++o) EXPECT_EQ(seen[static_cast<size_t>(o)], 1) << "block of " << o;
}

// Every rank sends two messages (same tag, so order matters) to every rank, itself
// included; even ranks post sends first, odd ranks receives first.
TEST(MpiComm, AllPairs) {
  Communicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  auto bytes = [](int src, int dst, int k) {
    return size_t{1000} + 37 * static_cast<size_t>(src) + 5 * static_cast<size_t>(dst) +
           static_cast<size_t>(k) * 70000;  // the second one is above eager limits
  };
  std::vector<std::vector<uint8_t>> out, in;
  for (int j = 0; j < p; ++j) {
    for (int k = 0; k < 2; ++k) {
      out.push_back(message(r, j + 10 * k, bytes(r, j, k)));
      in.emplace_back(bytes(j, r, k), 0);
    }
  }
  std::vector<CommRequest> reqs;
  auto post_sends = [&] {
    for (int j = 0; j < p; ++j)
      for (int k = 0; k < 2; ++k) {
        const auto& m = out[static_cast<size_t>(2 * j + k)];
        reqs.push_back(comm.isend(m.data(), m.size(), j, 42));
      }
  };
  auto post_recvs = [&] {
    for (int j = p - 1; j >= 0; --j)
      for (int k = 0; k < 2; ++k) {
        auto& m = in[static_cast<size_t>(2 * j + k)];
        reqs.push_back(comm.irecv(m.data(), m.size(), j, 42));
      }
  };
  if (r % 2 == 0) {
    post_sends();
    post_recvs();
  } else {
    post_recvs();
    post_sends();
  }
  comm.wait_all(reqs);
  for (int j = 0; j < p; ++j) {
    for (int k = 0; k < 2; ++k) {
      EXPECT_EQ(mismatches(in[static_cast<size_t>(2 * j + k)], j, r + 10 * k), 0u)
          << "from " << j << " message " << k;
    }
  }
}

// > 64 MiB in one message along the ring (about 130 MiB per rank).
TEST(MpiComm, BigMessage) {
  Communicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  const size_t n = (size_t{64} << 20) + 12345;
  const auto out = message(r, next, n);
  std::vector<uint8_t> in(n, 0);
  CommRequest recv = comm.irecv(in.data(), n, prev, 7);
  CommRequest send = comm.isend(out.data(), n, next, 7);
  comm.wait(send);
  comm.wait(recv);
  EXPECT_EQ(mismatches(in, prev, r), 0u);
}

// Messages split into many pieces (as those above INT_MAX bytes are), with an odd piece
// size, mixed with whole messages on the same tag.
TEST(MpiComm, MessagesInPieces) {
  auto comm = detail::make_mpi_communicator_with_pieces(MPI_COMM_WORLD, (1 << 20) + 3);
  const int p = comm->size(), r = comm->rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  const size_t sizes[] = {(size_t{9} << 20) + 17, 5, 0, (size_t{1} << 20) + 3, 1 << 20};
  std::vector<std::vector<uint8_t>> out, in;
  std::vector<CommRequest> reqs;
  for (size_t i = 0; i < std::size(sizes); ++i) {
    out.push_back(message(r, next + static_cast<int>(i), sizes[i]));
    in.emplace_back(sizes[i], 0);
  }
  for (size_t i = 0; i < std::size(sizes); ++i) {
    reqs.push_back(comm->irecv(in[i].data(), sizes[i], prev, 3));
  }
  for (size_t i = 0; i < std::size(sizes); ++i) {
    reqs.push_back(comm->isend(out[i].data(), sizes[i], next, 3));
  }
  comm->wait_all(reqs);
  for (size_t i = 0; i < std::size(sizes); ++i) {
    EXPECT_EQ(mismatches(in[i], prev, r + static_cast<int>(i)), 0u) << "message " << i;
  }
  int64_t total = 0;
  for (size_t s : sizes) total += static_cast<int64_t>(s);
  EXPECT_EQ(comm->bytes_sent(), total);
}

TEST(MpiComm, Collectives) {
  Communicator& comm = world();
  const int64_t p = comm.size(), r = comm.rank();
  const int64_t big = int64_t{1} << 40;

  std::vector<int64_t> sum = {r, 1, big + r};
  comm.allreduce_sum(sum.data(), sum.size());
  EXPECT_EQ(sum, (std::vector<int64_t>{p * (p - 1) / 2, p, p * big + p * (p - 1) / 2}));

  std::vector<double> fsum = {0.5 * static_cast<double>(r), 1.0};
  comm.allreduce_sum(fsum.data(), fsum.size());
  EXPECT_DOUBLE_EQ(fsum[0], 0.25 * static_cast<double>(p * (p - 1)));
  EXPECT_DOUBLE_EQ(fsum[1], static_cast<double>(p));

  std::vector<float> f32 = {0.25f * static_cast<float>(r + 1), -2.0f};
  comm.allreduce_sum(f32.data(), f32.size());
  EXPECT_FLOAT_EQ(f32[0], 0.125f * static_cast<float>(p * (p + 1)));
  EXPECT_FLOAT_EQ(f32[1], -2.0f * static_cast<float>(p));

  std::vector<int64_t> mx = {r, -r, big * r};
  comm.allreduce_max(mx.data(), mx.size());
  EXPECT_EQ(mx, (std::vector<int64_t>{p - 1, 0, big * (p - 1)}));

  std::vector<int64_t> mn = {r, -r, big * r};
  comm.allreduce_min(mn.data(), mn.size());
  EXPECT_EQ(mn, (std::vector<int64_t>{0, -(p - 1), 0}));

  comm.allreduce_sum(static_cast<int64_t*>(nullptr), 0);

  // allgather: separate buffers, then in place (send = this rank's slot).
  const int64_t mine[2] = {r, r * r + 7};
  std::vector<int64_t> all(static_cast<size_t>(2 * p), -1);
  comm.allgather(mine, all.data(), sizeof(mine));
  for (int64_t q = 0; q < p; ++q) {
    EXPECT_EQ(all[static_cast<size_t>(2 * q)], q);
    EXPECT_EQ(all[static_cast<size_t>(2 * q + 1)], q * q + 7);
  }
  std::vector<int64_t> inplace(static_cast<size_t>(p), -1);
  inplace[static_cast<size_t>(r)] = 100 + r;
  comm.allgather(&inplace[static_cast<size_t>(r)], inplace.data(), sizeof(int64_t));
  for (int64_t q = 0; q < p; ++q) EXPECT_EQ(inplace[static_cast<size_t>(q)], 100 + q);

  // broadcast from every root.
  for (int root = 0; root < p; ++root) {
    std::vector<uint8_t> buf = r == root ? message(root, 99, 4099) : std::vector<uint8_t>(4099);
    comm.broadcast(buf.data(), buf.size(), root);
    EXPECT_EQ(mismatches(buf, root, 99), 0u) << "root " << root;
  }
  comm.barrier();
}

TEST(MpiComm, CountsBytesSent) {
  Communicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  comm.reset_bytes_sent();
  EXPECT_EQ(comm.bytes_sent(), 0);
  const auto out = message(r, next, 1000 + static_cast<size_t>(r));
  std::vector<uint8_t> in(1000 + static_cast<size_t>(prev));
  const auto self_out = message(r, r, 7);
  std::vector<uint8_t> self_in(7);
  std::vector<CommRequest> reqs;
  reqs.push_back(comm.irecv(in.data(), in.size(), prev, 5));
  reqs.push_back(comm.irecv(self_in.data(), 7, r, 6));
  reqs.push_back(comm.isend(out.data(), out.size(), next, 5));
  reqs.push_back(comm.isend(self_out.data(), 7, r, 6));
  comm.wait_all(reqs);
  int64_t x = 1;
  comm.allreduce_sum(&x, 1);  // collectives are not counted
  comm.barrier();
  EXPECT_EQ(comm.bytes_sent(), 1007 + r);
  comm.reset_bytes_sent();
  EXPECT_EQ(comm.bytes_sent(), 0);
}

TEST(MpiComm, CheckSamePassesWhenEqual) {
  Communicator& comm = world();
  EXPECT_NO_THROW(check_same_on_all_ranks(comm, "segment_lengths", {2048, 4096}));
  EXPECT_NO_THROW(check_same_on_all_ranks(comm, "empty", std::vector<int64_t>{}));
  std::vector<int64_t> many(1000);
  std::iota(many.begin(), many.end(), 5);
  EXPECT_NO_THROW(check_same_on_all_ranks(comm, "many", many));
}

TEST(MpiComm, CheckSameThrowsOnEveryRank) {
  Communicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  if (p == 1) GTEST_SKIP() << "needs two ranks";  // every rank agrees on the size
  // The last rank has a shorter list.
  const std::vector<int64_t> values =
      r == p - 1 ? std::vector<int64_t>{2048} : std::vector<int64_t>{2048, 4096};
  std::string msg;
  try {
    check_same_on_all_ranks(comm, "segment_lengths", values);
    ADD_FAILURE() << "no error on rank " << r;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCommunication);
    msg = e.what();
  }
  const std::string expected_ranks =
      p == 2 ? "rank 0 has" : "ranks 0-" + std::to_string(p - 2) + " have";
  EXPECT_EQ(msg, "ringattn: communication: ranks disagree on segment_lengths: " + expected_ranks +
                     " [2048,4096], rank " + std::to_string(p - 1) +
                     " has [2048]; pass the same configuration on every rank");

  // A long list differing in its last value (compared by hash).
  std::vector<int64_t> many(500);
  std::iota(many.begin(), many.end(), 0);
  if (r == 0) many.back() = -1;
  const Error e = error_of([&] { check_same_on_all_ranks(comm, "shape", many); });
  EXPECT_EQ(e.code(), ErrorCode::kCommunication);
  EXPECT_NE(std::string(e.what()).find("(500 values, hash 0x"), std::string::npos) << e.what();

  // The communicator still works afterwards.
  EXPECT_NO_THROW(check_same_on_all_ranks(comm, "after", {1, 2, 3}));
}

// A one-rank MPI communicator (each rank alone in its own MPI_Comm).
TEST(MpiComm, WorldSizeOne) {
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm solo = MPI_COMM_NULL;
  ASSERT_EQ(MPI_Comm_split(MPI_COMM_WORLD, world_rank, 0, &solo), MPI_SUCCESS);  // collective
  {
    auto comm = make_mpi_communicator(solo);
    EXPECT_EQ(comm->rank(), 0);
    EXPECT_EQ(comm->size(), 1);
    const auto out = message(0, 0, 70000);
    std::vector<uint8_t> in(70000);
    CommRequest recv = comm->irecv(in.data(), in.size(), 0, 9);
    CommRequest send = comm->isend(out.data(), out.size(), 0, 9);
    comm->wait(recv);
    comm->wait(send);
    EXPECT_EQ(mismatches(in, 0, 0), 0u);
    int64_t v[2] = {3, -4};
    comm->allreduce_sum(v, 2);
    comm->allreduce_max(v, 2);
    comm->allreduce_min(v, 2);
    EXPECT_EQ(v[0], 3);
    EXPECT_EQ(v[1], -4);
    int64_t g = 0;
    comm->allgather(&v[0], &g, sizeof(g));
    EXPECT_EQ(g, 3);
    comm->broadcast(v, sizeof(v), 0);
    comm->barrier();
    EXPECT_NO_THROW(check_same_on_all_ranks(*comm, "solo", {1, 2}));
    EXPECT_EQ(comm->bytes_sent(), 70000);
  }
  MPI_Comm_free(&solo);
}

// Errors that involve only this rank (no other rank waits on them).
TEST(MpiComm, LocalErrors) {
  Communicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  uint8_t buf[256] = {};
  Error e = error_of([&] { comm.isend(buf, 4, p, 0); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("isend: peer = " + std::to_string(p) + " is outside [0, " +
                                       std::to_string(p) + "); pass a rank of this communicator"),
            std::string::npos)
      << e.what();
  e = error_of([&] { comm.irecv(buf, 4, 0, -1); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  if (comm.max_tag() < INT_MAX) {
    e = error_of([&] { comm.irecv(buf, 4, 0, comm.max_tag() + 1); });
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  e = error_of([&] { comm.broadcast(buf, 4, -1); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);

  // A failed transfer breaks the communicator (its message stream is out of step): each case
  // on a communicator of its own.
  const auto expect_broken = [](Communicator& c) {
    EXPECT_TRUE(c.broken());
    const Error later = error_of([&] { c.barrier(); });
    EXPECT_EQ(later.code(), ErrorCode::kCommunication);
    EXPECT_NE(std::string(later.what()).find("is broken"), std::string::npos) << later.what();
  };
  // The receive is larger than the message.
  {
    auto own = make_mpi_communicator(MPI_COMM_WORLD);
    CommRequest recv = own->irecv(buf, 200, r, 11);
    CommRequest send = own->isend(buf + 200, 50, r, 11);
    e = error_of([&] { own->wait(recv); });
    EXPECT_EQ(e.code(), ErrorCode::kCommunication);
    EXPECT_NE(std::string(e.what()).find("got a message of 50 bytes"), std::string::npos)
        << e.what();
    expect_broken(*own);
  }
  // The receive is smaller than the message: MPI reports a truncation. (Between ranks;
  // OpenMPI truncates a message a rank sends to itself without reporting it.)
  if (p > 1) {
    auto own = make_mpi_communicator(MPI_COMM_WORLD);
    const int next = (r + 1) % p, prev = (r + p - 1) % p;
    CommRequest recv = own->irecv(buf, 10, prev, 12);
    CommRequest send = own->isend(buf + 100, 50, next, 12);
    e = error_of([&] { own->wait(recv); });
    EXPECT_EQ(e.code(), ErrorCode::kCommunication);
    EXPECT_NE(std::string(e.what()).find("MPI_Wait failed at comm/mpi_communicator.cc:"),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("(irecv of 10 bytes from peer " + std::to_string(prev) +
                                         ", tag 12)"),
              std::string::npos)
        << e.what();
    expect_broken(*own);
  }
  // A receive dropped before any send is cancelled without blocking.
  { CommRequest lost = comm.irecv(buf, 8, r, 13); }
  // Another communicator's request.
  auto self = make_self_communicator();
  CommRequest foreign = self->irecv(buf, 4, 0, 0);
  e = error_of([&] { comm.wait(foreign); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);

  e = error_of([] { make_mpi_communicator(MPI_COMM_NULL); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  comm.barrier();
}

}  // namespace
}  // namespace ringattn
