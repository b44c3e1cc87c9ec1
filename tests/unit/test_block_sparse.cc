// Block-sparse attention on one process (self communicator): layouts against the patterns'
// definitions, forward and backward against the fp64 oracle with the materialised token mask,
// determinism, density, and clear errors for bad patterns.

#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "tests/support/block_sparse_oracle.h"
#include "tests/support/expect.h"

namespace ringattn::test {
namespace {

// Forward (and with `grads` backward) of one case against the oracle.
void check_case(const SparseCase& c, uint32_t seed, bool grads) {
  SCOPED_TRACE(describe(c));
  auto comm = make_self_communicator();
  BlockSparseRingDilatedAttention attn(c.cfg, *comm);
  SparseInputs in(c.dtype, c.B, c.N, c.H, c.Hkv, c.D, seed);
  in.forward(attn);
  const SparseOracle ref = sparse_oracle(c.cfg, in.q, in.k, in.v, grads ? &in.dout : nullptr);
  expect_close(compare_bnhd(in.out, ref.out), out_tol(c.dtype), "out");
  const Stats l = compare_lse(in.lse, ref.lse);
  EXPECT_EQ(l.nonfinite, 0);
  EXPECT_LE(l.max_abs_err, 1e-4 * std::max(1.0, l.max_ref)) << "lse";
  if (!grads) return;
  in.backward(attn);
  const double tol = grad_tol(c.dtype);
  expect_close(compare_bnhd(in.dq, ref.dq), tol, "dq");
  expect_close(compare_bnhd(in.dk, ref.dk), tol, "dk");
  expect_close(compare_bnhd(in.dv, ref.dv), tol, "dv");
}

BlockSparseConfig one(BlockPattern x, bool causal) {
  return {{std::move(x)}, causal, std::nullopt};
}

// A block list with a few random key blocks per query block (some rows empty).
BlockPattern random_list(int64_t bs, int64_t nb, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> row_ptr = {0}, cols;
  for (int64_t qb = 0; qb < nb; ++qb) {
    for (int64_t kb = 0; kb < nb; ++kb) {
      if (rng() % 3 == 0) cols.push_back(kb);
    }
    row_ptr.push_back(static_cast<int64_t>(cols.size()));
  }
  return BlockPattern::block_list(bs, row_ptr, cols);
}

std::vector<BlockPattern> every_kind(int64_t bs, int64_t nb) {
  return {BlockPattern::local_window(bs, bs + 1), BlockPattern::dilated(bs, {2, 3}),
          BlockPattern::global_local(bs, 1, bs / 2), random_list(bs, nb, 5)};
}

TEST(BlockSparse, LayoutsFollowThePatternDefinitions) {
  for (int64_t bs : {8, 16}) {
    const int64_t N = 12 * bs;
    for (const BlockPattern& x : every_kind(bs, 12)) {
      SCOPED_TRACE(block_pattern_kind_name(x.kind));
      const BlockLayout l = x.layout(N);
      ASSERT_EQ(l.blocks, 12);
      for (int64_t qb = 0; qb < l.blocks; ++qb) {
        std::vector<int64_t> expected;
        for (int64_t kb = 0; kb < l.blocks; ++kb) {
          if (pattern_lists(x, l.blocks, qb, kb)) expected.push_back(kb);
        }
        const std::vector<int64_t> got(l.cols.begin() + l.row_ptr[qb],
                                       l.cols.begin() + l.row_ptr[qb + 1]);
        EXPECT_EQ(got, expected) << "query block " << qb;
      }
    }
  }
  // local_window rounds the window up to whole blocks: 17 tokens at bs 16 is 2 blocks.
  const BlockLayout l = BlockPattern::local_window(16, 17).layout(16 * 8);
  EXPECT_EQ(l.row_ptr[5] - l.row_ptr[4], 5);
}

TEST(BlockSparse, DensityCountsComputedBlockPairs) {
  const BlockSparseConfig dense = one(BlockPattern::local_window(16, 1 << 20), false);
  EXPECT_DOUBLE_EQ(block_sparse_density(dense, 256, 2), 1.0);
  BlockSparseConfig causal = dense;
  causal.causal = true;
  EXPECT_DOUBLE_EQ(block_sparse_density(causal, 256, 2), (16.0 * 17.0 / 2.0) / 256.0);
  // Window of one block each side over 16 blocks: 16 + 2 * 15 pairs.
  EXPECT_DOUBLE_EQ(block_sparse_density(one(BlockPattern::local_window(16, 16), false), 256, 1),
                   46.0 / 256.0);
  // Per-head patterns average over the heads.
  const BlockSparseConfig mixed{
      {BlockPattern::local_window(16, 0), BlockPattern::local_window(16, 1 << 20)}, false, {}};
  EXPECT_DOUBLE_EQ(block_sparse_density(mixed, 256, 2), (16.0 + 256.0) / 512.0);
}

TEST(BlockSparse, EveryKindMatchesMaskedDenseAttention) {
  uint32_t seed = 1;
  for (int64_t bs : {16, 32, 64}) {
    const int64_t N = 256, nb = N / bs;
    for (const BlockPattern& x : every_kind(bs, nb)) {
      for (bool causal : {false, true}) {
        check_case({2, N, 4, 2, 32, one(x, causal)}, seed++, bs == 32);
      }
    }
  }
}

TEST(BlockSparse, LongRunsHeadDimsAndOneBlock) {
  // Runs longer than one kernel call (1024 rows), several query tiles per block, D not a
  // multiple of the SIMD width, a single block.
  check_case({1, 2048, 1, 1, 16, one(BlockPattern::local_window(256, 1024), true)}, 30, true);
  check_case({1, 192, 2, 1, 80, one(BlockPattern::dilated(64, {1}), false)}, 31, true);
  check_case({1, 64, 2, 2, 8, one(BlockPattern::local_window(64, 0), true)}, 32, true);
}

TEST(BlockSparse, DtypesAndPerHeadPatterns) {
  const int64_t bs = 32, N = 256;
  const BlockSparseConfig per_head{every_kind(bs, N / bs), true, {}};
  uint32_t seed = 40;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    check_case({1, N, 4, 2, 64, per_head, dt}, seed++, true);
    check_case({2, N, 4, 1, 32, one(BlockPattern::global_local(bs, 2, bs), false), dt}, seed++,
               dt == DType::kF32);
  }
}

TEST(BlockSparse, RowsThatSeeNothing) {
  auto comm = make_self_communicator();
  BlockSparseRingDilatedAttention attn(rows_that_see_nothing(), *comm);
  SparseInputs in(DType::kF32, 1, 64, 2, 1, 16, 50);
  in.forward(attn);
  in.backward(attn);
  expect_rows_that_see_nothing(in);
}

TEST(BlockSparse, BitwiseDeterministicAcrossRunsAndThreadCounts) {
  const BlockSparseConfig cfg = one(BlockPattern::global_local(32, 1, 64), true);
  SparseInputs a(DType::kF32, 2, 512, 4, 2, 64, 60), b(DType::kF32, 2, 512, 4, 2, 64, 60);
  auto comm = make_self_communicator();
  for (auto [in, threads] : {std::pair<SparseInputs*, int>{&a, 1}, {&b, 2}}) {
    BlockSparseRingDilatedAttention attn(cfg, *comm, ExecOptions{Backend::kCpu, threads});
    in->forward(attn);
    in->backward(attn);
  }
  EXPECT_EQ(a.out.bytes(), b.out.bytes());
  EXPECT_EQ(a.dq.bytes(), b.dq.bytes());
  EXPECT_EQ(a.dk.bytes(), b.dk.bytes());
  EXPECT_EQ(a.dv.bytes(), b.dv.bytes());
  EXPECT_GT(compare_bnhd(a.dk, std::vector<double>(a.dk.view().numel(), 0.0)).nonzero, 0);
}

// The message of the Error `fn` throws.
template <typename Fn>
std::string message_of(Fn&& fn) {
  return error_of(std::forward<Fn>(fn)).what();
}

void expect_mentions(const std::string& msg, std::initializer_list<const char*> parts) {
  for (const char* part : parts) {
    EXPECT_NE(msg.find(part), std::string::npos) << "\"" << part << "\" not in: " << msg;
  }
}

TEST(BlockSparse, BadPatternsGiveClearErrors) {
  const auto list = [](std::vector<int64_t> row_ptr, std::vector<int64_t> cols) {
    return BlockPattern::block_list(16, std::move(row_ptr), std::move(cols));
  };
  // 64 rows = 4 blocks.
  expect_mentions(message_of([&] {
                    list({0, 2, 2, 2, 2}, {1, 0}).layout(64);
                  }),
                  {"query block 0", "key block 0", "out of order", "sorted"});
  expect_mentions(message_of([&] {
                    list({0, 1, 3, 3, 3}, {0, 2, 2}).layout(64);
                  }),
                  {"query block 1", "key block 2", "duplicate"});
  expect_mentions(message_of([&] {
                    list({0, 1, 1, 1, 2}, {0, 4}).layout(64);
                  }),
                  {"query block 3", "key block 4", "outside [0, 4)"});
  expect_mentions(message_of([&] {
                    list({0, 1, 2}, {0, 1}).layout(64);
                  }),
                  {"row_ptr has 3 entries", "5 are needed"});
  expect_mentions(message_of([&] {
                    list({0, 1, 1, 1, 3}, {0, 1}).layout(64);
                  }),
                  {"row_ptr[4] = 3", "cols has 2"});
  expect_mentions(message_of([&] { BlockPattern::local_window(16, 0).layout(72); }),
                  {"N = 72", "block_size = 16", "N = 80"});
  expect_mentions(message_of([&] { BlockPattern::local_window(0, 0); }), {"block_size = 0"});
  expect_mentions(message_of([&] { BlockPattern::local_window(16, -1); }), {"window = -1"});
  expect_mentions(message_of([&] { BlockPattern::dilated(16, {2, 0}); }), {"rates[1] = 0"});
  expect_mentions(message_of([&] { BlockPattern::global_local(16, -2, 0); }),
                  {"global_blocks = -2"});

  auto comm = make_self_communicator();
  expect_mentions(
      message_of([&] {
        BlockSparseRingDilatedAttention(
            {{BlockPattern::local_window(16, 0), BlockPattern::local_window(32, 0)}, false, {}},
            *comm);
      }),
      {"patterns[1].block_size = 32", "same block size"});
  expect_mentions(message_of([&] {
                    BlockSparseRingDilatedAttention({{}, false, {}}, *comm);
                  }),
                  {"patterns is empty"});
  // Errors that need the shapes come from forward and backward, before any compute.
  SparseInputs in(DType::kF32, 1, 64, 3, 1, 8, 70);
  BlockSparseRingDilatedAttention two(
      {{BlockPattern::local_window(16, 0), BlockPattern::local_window(16, 16)}, false, {}}, *comm);
  expect_mentions(message_of([&] { in.forward(two); }), {"2 patterns", "H = 3"});
  BlockSparseRingDilatedAttention bad_list(one(list({0, 1, 1, 1, 2}, {0, 4}), false), *comm);
  expect_mentions(message_of([&] { in.backward(bad_list); }), {"query block 3", "key block 4"});
  BlockSparseRingDilatedAttention big(one(BlockPattern::local_window(48, 0), false), *comm);
  expect_mentions(message_of([&] { in.forward(big); }), {"N_loc = 64", "block_size = 48"});
}

}  // namespace
}  // namespace ringattn::test
