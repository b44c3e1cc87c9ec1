// BlockSparseRingDilatedAttention under mpirun: each rank's rows of out, lse, dq, dk and dv
// equal the same rows of the one-process result on the whole sequence; bytes sent equal the
// minimum computed here from the patterns' definitions; bad or disagreeing input fails on
// every rank.

#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <sstream>

#include "tests/support/block_sparse_oracle.h"
#include "tests/support/mpi_main.h"

namespace ringattn::test {
namespace {

struct RingSparseCase {
  int64_t B, n_loc, H, Hkv, D;
  BlockSparseConfig cfg;
  DType dtype = DType::kF32;
};

std::string describe(const RingSparseCase& c) {
  std::ostringstream os;
  os << "P=" << world().size() << " B=" << c.B << " N_loc=" << c.n_loc << " H=" << c.H
     << " Hkv=" << c.Hkv << " D=" << c.D << " " << dtype_name(c.dtype)
     << (c.cfg.causal ? " causal" : " full");
  for (const BlockPattern& x : c.cfg.patterns) {
    os << " " << block_pattern_kind_name(x.kind) << "(bs=" << x.block_size << ")";
  }
  return os.str();
}

// Distinct (kv head, key block) pairs owned by rank `src` that some query block of rank `dst`
// lists for some head of the kv head's group (with causal, only key blocks <= the query block).
int64_t needed_blocks(const RingSparseCase& c, int P, int dst, int src) {
  const int64_t bs = c.cfg.patterns[0].block_size, nbl = c.n_loc / bs, nb = P * nbl;
  std::set<std::pair<int64_t, int64_t>> needed;
  for (int64_t h = 0; h < c.H; ++h) {
    const BlockPattern& x = c.cfg.patterns[c.cfg.patterns.size() == 1 ? 0 : static_cast<size_t>(h)];
    for (int64_t qb = dst * nbl; qb < (dst + 1) * nbl; ++qb) {
      for (int64_t kb = src * nbl; kb < (src + 1) * nbl; ++kb) {
        if (pattern_lists(x, nb, qb, kb) && (!c.cfg.causal || kb <= qb)) {
          needed.insert({h / (c.H / c.Hkv), kb});
        }
      }
    }
  }
  return static_cast<int64_t>(needed.size());
}

// Forward: K and V of every block another rank needs from this one. Backward: the same, plus
// the fp32 gradients of every block this rank fetched, back to its owner.
int64_t expected_bytes(const RingSparseCase& c, int rank, int P, bool backward) {
  const int64_t block = c.B * 2 * c.cfg.patterns[0].block_size * c.D;
  const int64_t esize = static_cast<int64_t>(dtype_size(c.dtype));
  int64_t total = 0;
  for (int other = 0; other < P; ++other) {
    if (other == rank) continue;
    total += needed_blocks(c, P, other, rank) * block * esize;
    if (backward) total += needed_blocks(c, P, rank, other) * block * 4;
  }
  return total;
}

// Max |x - ref| over this rank's rows of a ring result x against rows of the one-process
// result; counts non-finite entries and exact zeros where the reference is clearly not.
struct RowsError {
  double err = 0.0, max_ref = 0.0;
  int64_t bad = 0, missing = 0, nonzero = 0;
};

RowsError rows_error(const Tensor& mine, const Tensor& single, int64_t row0) {
  RowsError e;
  const TensorView v = mine.view();
  for (int64_t b = 0; b < v.shape[0]; ++b)
    for (int64_t n = 0; n < v.shape[1]; ++n)
      for (int64_t h = 0; h < v.shape[2]; ++h)
        for (int64_t d = 0; d < v.shape[3]; ++d) {
          const double x = mine.get(b, n, h, d), y = single.get(b, row0 + n, h, d);
          if (!std::isfinite(x)) ++e.bad;
          e.err = std::max(e.err, std::abs(x - y));
          e.max_ref = std::max(e.max_ref, std::abs(y));
          e.missing += x == 0.0 && std::abs(y) > kClearlyNonZero;
          e.nonzero += x != 0.0;
        }
  return e;
}

void check_ring_case(const RingSparseCase& c, uint32_t seed) {
  SCOPED_TRACE(describe(c));
  Communicator& comm = world();
  const int P = comm.size(), rank = comm.rank();
  const int64_t N = P * c.n_loc, row0 = rank * c.n_loc;
  // The same whole-sequence inputs on every rank; the one-process result on them.
  SparseInputs full(c.dtype, c.B, N, c.H, c.Hkv, c.D, seed);
  auto self = make_self_communicator();
  BlockSparseRingDilatedAttention single(c.cfg, *self);
  full.forward(single);
  full.backward(single);

  Tensor out(c.dtype, {c.B, c.n_loc, c.H, c.D}), lse(DType::kF32, {c.B, c.H, c.n_loc}),
      dq(c.dtype, {c.B, c.n_loc, c.H, c.D}), dk(c.dtype, {c.B, c.n_loc, c.Hkv, c.D}),
      dv(c.dtype, {c.B, c.n_loc, c.Hkv, c.D});
  BlockSparseRingDilatedAttention ring(c.cfg, comm);
  const TensorView q = rows_of(full.q, row0, c.n_loc), k = rows_of(full.k, row0, c.n_loc),
                   v = rows_of(full.v, row0, c.n_loc);
  ring.forward(q, k, v, out.view(), lse.view());
  EXPECT_EQ(ring.last_stats().bytes_sent, expected_bytes(c, rank, P, false));
  ring.backward(rows_of(full.dout, row0, c.n_loc), q, k, v, out.view(), lse.view(), dq.view(),
                dk.view(), dv.view());
  EXPECT_EQ(ring.last_stats().bytes_sent, expected_bytes(c, rank, P, true));

  // fp32: merges in another order than one process (1e-5 of SPEC.md); fp16/bf16: the same
  // rounding of the output at most a unit or so apart.
  const double tol = c.dtype == DType::kF32 ? 1e-5 : c.dtype == DType::kF16 ? 2e-3 : 1.6e-2;
  const struct {
    const Tensor& mine;
    const Tensor& single;
    const char* name;
  } results[] = {
      {out, full.out, "out"}, {dq, full.dq, "dq"}, {dk, full.dk, "dk"}, {dv, full.dv, "dv"}};
  for (const auto& r : results) {
    const RowsError e = rows_error(r.mine, r.single, row0);
    EXPECT_EQ(e.bad, 0) << r.name;
    EXPECT_EQ(e.missing, 0) << r.name;
    EXPECT_GT(e.nonzero, 0) << r.name;
    EXPECT_LE(e.err, tol * std::max(1.0, e.max_ref)) << r.name << " max |ref| " << e.max_ref;
  }
  double lse_err = 0.0;
  int64_t lse_bad = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t n = 0; n < c.n_loc; ++n) {
        const double x = lse.get(b, h, n), y = full.lse.get(b, h, row0 + n);
        if (std::isinf(y) || std::isinf(x)) {
          lse_bad += x != y;
        } else {
          lse_err = std::max(lse_err, std::abs(x - y));
        }
      }
  EXPECT_EQ(lse_bad, 0);
  EXPECT_LE(lse_err, 2e-5);
}

BlockSparseConfig one(BlockPattern x, bool causal) {
  return {{std::move(x)}, causal, std::nullopt};
}

TEST(BlockSparseRing, EveryKindMatchesOneProcess) {
  const int P = world().size();
  const int64_t bs = 16, n_loc = 64, nb = P * n_loc / bs;
  // A block list that reaches over the ring: each query block lists itself, the block two
  // ranks away (mod N) and the first block.
  std::vector<int64_t> row_ptr = {0}, cols;
  for (int64_t qb = 0; qb < nb; ++qb) {
    std::set<int64_t> row = {0, qb, (qb + 2 * n_loc / bs) % nb};
    cols.insert(cols.end(), row.begin(), row.end());
    row_ptr.push_back(static_cast<int64_t>(cols.size()));
  }
  const std::vector<BlockPattern> kinds = {
      BlockPattern::local_window(bs, 40), BlockPattern::dilated(bs, {3, 5}),
      BlockPattern::global_local(bs, 2, bs), BlockPattern::block_list(bs, row_ptr, cols)};
  uint32_t seed = 1;
  for (const BlockPattern& x : kinds) {
    for (bool causal : {false, true}) check_ring_case({2, n_loc, 4, 2, 32, one(x, causal)}, seed++);
  }
}

TEST(BlockSparseRing, PerHeadPatternsDenseAndBf16) {
  const int P = world().size();
  const int64_t bs = 32, n_loc = 64;
  const BlockSparseConfig per_head{
      {BlockPattern::local_window(bs, 0), BlockPattern::dilated(bs, {2}),
       BlockPattern::global_local(bs, 1, 0), BlockPattern::local_window(bs, P * n_loc)},
      true,
      {}};
  check_ring_case({1, n_loc, 4, 2, 64, per_head}, 20);
  check_ring_case({1, n_loc, 2, 1, 64, one(BlockPattern::local_window(bs, P * n_loc), false)}, 21);
  check_ring_case({1, n_loc, 4, 4, 64, per_head, DType::kBF16}, 22);
}

TEST(BlockSparseRing, BitwiseDeterministicForAGivenRankCount) {
  Communicator& comm = world();
  const BlockSparseConfig cfg = one(BlockPattern::global_local(16, 1, 32), true);
  SparseInputs a(DType::kF32, 1, 64, 4, 2, 32, 30), b(DType::kF32, 1, 64, 4, 2, 32, 30);
  for (SparseInputs* in : {&a, &b}) {
    BlockSparseRingDilatedAttention ring(cfg, comm);
    in->forward(ring);
    in->backward(ring);
  }
  for (auto [x, y] : {std::pair{&a.out, &b.out}, {&a.dq, &b.dq}, {&a.dk, &b.dk}, {&a.dv, &b.dv}}) {
    EXPECT_EQ(x->bytes(), y->bytes());
  }
  EXPECT_EQ(a.lse.bytes(), b.lse.bytes());
}

void expect_error(const std::function<void()>& fn, const char* word) {
  const std::string msg = error_of(fn).what();
  EXPECT_NE(msg.find(word), std::string::npos) << msg;
}

TEST(BlockSparseRing, BadOrDisagreeingInputFailsOnEveryRank) {
  Communicator& comm = world();
  const int P = comm.size(), rank = comm.rank();
  SparseInputs in(DType::kF32, 1, 64, 2, 1, 16, 40);
  // Shards of 64 rows but 48-row blocks.
  BlockSparseRingDilatedAttention big(one(BlockPattern::local_window(48, 0), false), comm);
  expect_error([&] { in.forward(big); }, "block_size = 48");
  // A block list out of range on every rank (4 P blocks of 16 rows).
  std::vector<int64_t> row_ptr(static_cast<size_t>(4 * P + 1), 1), cols = {4 * P};
  row_ptr[0] = 0;
  BlockSparseRingDilatedAttention bad(one(BlockPattern::block_list(16, row_ptr, cols), false),
                                      comm);
  expect_error([&] { in.backward(bad); }, "outside [0, ");
  if (P > 1) {
    // Ranks pass different windows: a disagreement on every rank, never a hang.
    BlockSparseRingDilatedAttention differ(
        one(BlockPattern::local_window(16, rank == 0 ? 16 : 32), false), comm);
    expect_error([&] { in.forward(differ); }, "ranks disagree");
    // A bad shape on rank 1 only: every rank stops.
    Tensor small(DType::kF32, {1, 64, 2, 8});
    BlockSparseRingDilatedAttention ok(one(BlockPattern::local_window(16, 0), false), comm);
    expect_error(
        [&] {
          ok.forward(in.q.view(), rank == 1 ? small.view() : in.k.view(), in.v.view(),
                     in.out.view());
        },
        rank == 1 ? "k is" : "rank 1");
  }
}

// CUDA tensors over several ranks are not supported: the ranks passing them get kUnsupported
// and every other rank fails with them, before any transfer (also when rank 0 alone passes
// them). The views are host memory marked Device::kCUDA, never read.
TEST(BlockSparseRing, CudaTensorsOnSeveralRanksFailOnEveryRank) {
  Communicator& comm = world();
  if (comm.size() == 1) GTEST_SKIP() << "needs several ranks";
  SparseInputs in(DType::kF32, 1, 32, 2, 1, 16, 41);
  BlockSparseRingDilatedAttention attn(one(BlockPattern::local_window(16, 0), false), comm);
  TensorView q = in.q.view(), k = in.k.view(), v = in.v.view(), out = in.out.view();
  q.device = k.device = v.device = out.device = Device::kCUDA;
  for (bool every_rank : {true, false}) {
    const bool mine = every_rank || comm.rank() == 0;
    const Error e = error_of([&] {
      attn.forward(mine ? q : in.q.view(), mine ? k : in.k.view(), mine ? v : in.v.view(),
                   mine ? out : in.out.view());
    });
    if (!mine) continue;
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ringattn::test
