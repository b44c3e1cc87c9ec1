// The CUDA backend of BlockSparseRingDilatedAttention: its host-side planning (the CSR by
// query block and the transposed one) and the errors that need no device run anywhere; on a
// GPU, forward and backward against the fp64 oracle with the materialised token mask (every
// pattern kind, causal on and off, every dtype, GQA, per-head patterns, rows that see nothing).

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <sstream>

#include "src/backend/cuda/block_sparse_cuda.h"
#include "tests/gpu/gpu_util.h"
#include "tests/support/block_sparse_oracle.h"
#include "tests/support/expect.h"

namespace ringattn::test {
namespace {

// A fixed block list over 8 blocks: an empty row, rows before and after the diagonal, a full row.
BlockPattern fixed_list(int64_t bs) {
  return BlockPattern::block_list(bs, {0, 2, 2, 5, 6, 8, 9, 17, 18},
                                  {0, 5, 1, 3, 7, 4, 2, 6, 4, 0, 1, 2, 3, 4, 5, 6, 7, 3});
}

std::vector<BlockPattern> every_kind(int64_t bs) {
  return {BlockPattern::local_window(bs, bs + 1), BlockPattern::dilated(bs, {2, 3}),
          BlockPattern::global_local(bs, 1, bs / 2), fixed_list(bs)};
}

// Whether row `row` of head h of `csr` lists `entry`; checks the row is strictly ascending.
bool csr_lists(const cuda::BlockCsr& csr, int64_t h, int64_t row, int64_t entry) {
  const int at = csr.head[static_cast<size_t>(h)] + static_cast<int>(row);
  const auto begin = csr.idx.begin() + csr.ptr[static_cast<size_t>(at)];
  const auto end = csr.idx.begin() + csr.ptr[static_cast<size_t>(at) + 1];
  EXPECT_TRUE(std::adjacent_find(begin, end, std::greater_equal<int>()) == end) << "row " << row;
  return std::find(begin, end, static_cast<int>(entry)) != end;
}

TEST(BlockSparseCudaPlan, BothCsrsListExactlyThePatternsPairs) {
  const int64_t bs = 16, nb = 8;
  const std::vector<BlockPattern> kinds = every_kind(bs);
  std::vector<BlockLayout> layouts;
  for (const BlockPattern& x : kinds) layouts.push_back(x.layout(nb * bs));
  const std::vector<size_t> head_layout = {0, 1, 2, 3, 3};
  for (bool causal : {false, true}) {
    const cuda::BlockCsr by_query = cuda::query_major_csr(layouts, head_layout, causal);
    const cuda::BlockCsr by_key = cuda::key_major_csr(layouts, head_layout, causal);
    ASSERT_EQ(by_query.head.size(), head_layout.size());
    ASSERT_EQ(by_key.ptr.size(), layouts.size() * (nb + 1));
    EXPECT_EQ(by_query.head[4], by_query.head[3]);  // heads sharing a layout share rows
    EXPECT_EQ(by_query.idx.size(), by_key.idx.size());
    for (size_t h = 0; h < head_layout.size(); ++h) {
      for (int64_t qb = 0; qb < nb; ++qb) {
        for (int64_t kb = 0; kb < nb; ++kb) {
          const bool listed =
              pattern_lists(kinds[head_layout[h]], nb, qb, kb) && (!causal || kb <= qb);
          EXPECT_EQ(csr_lists(by_query, static_cast<int64_t>(h), qb, kb), listed)
              << "causal " << causal << " head " << h << " qb " << qb << " kb " << kb;
          EXPECT_EQ(csr_lists(by_key, static_cast<int64_t>(h), kb, qb), listed)
              << "causal " << causal << " head " << h << " qb " << qb << " kb " << kb;
        }
      }
    }
  }
  // The fixed list with causal: key block 4 is listed by query blocks 5 and 6 (3 lists it too,
  // but it lies after 3); key block 7 by none.
  const cuda::BlockCsr by_key = cuda::key_major_csr(layouts, {3}, true);
  const auto row = [&](int64_t kb) {
    const size_t at = static_cast<size_t>(by_key.head[0] + kb);
    return std::vector<int>(by_key.idx.begin() + by_key.ptr[at],
                            by_key.idx.begin() + by_key.ptr[at + 1]);
  };
  EXPECT_EQ(row(4), std::vector<int>({5, 6}));
  EXPECT_TRUE(row(7).empty());
}

// Host memory marked Device::kCUDA (never read): the views a call without a device sees.
TensorView on_cuda(const Tensor& t) {
  TensorView v = t.view();
  v.device = Device::kCUDA;
  return v;
}

TEST(BlockSparseCudaPlan, DeviceErrorsNameTheTensorOrTheMissingDevice) {
  auto comm = make_self_communicator();
  const BlockSparseConfig cfg{{BlockPattern::local_window(16, 0)}, false, {}};
  SparseInputs in(DType::kF32, 1, 64, 2, 1, 16, 3);
  BlockSparseRingDilatedAttention attn(cfg, *comm);
  // Mixed devices: q on the GPU, k on the host.
  const Error mixed = error_of([&] {
    attn.forward(on_cuda(in.q), in.k.view(), on_cuda(in.v), on_cuda(in.out), on_cuda(in.lse));
  });
  EXPECT_EQ(mixed.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(mixed.what()).find("k lives on the CPU"), std::string::npos)
      << mixed.what();
  // backend = cuda with host tensors.
  BlockSparseRingDilatedAttention cuda_attn(cfg, *comm, ExecOptions{Backend::kCuda, 0});
  const Error host = error_of([&] { in.forward(cuda_attn); });
  EXPECT_EQ(host.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(host.what()).find("backend = cuda"), std::string::npos) << host.what();
  // Every tensor marked CUDA: no device here (kDevice), or host memory (names q).
  const Error marked = error_of([&] {
    attn.backward(on_cuda(in.dout), on_cuda(in.q), on_cuda(in.k), on_cuda(in.v), on_cuda(in.out),
                  on_cuda(in.lse), on_cuda(in.dq), on_cuda(in.dk), on_cuda(in.dv));
  });
  if (no_gpu_reason().empty()) {
    EXPECT_EQ(marked.code(), ErrorCode::kInvalidArgument) << marked.what();
  } else {
    EXPECT_EQ(marked.code(), ErrorCode::kDevice) << marked.what();
  }
}

// Forward and backward of one case on the GPU against the fp64 oracle.
void check_gpu_case(const SparseCase& c, uint32_t seed) {
  SCOPED_TRACE(describe(c));
  auto comm = make_self_communicator();
  BlockSparseRingDilatedAttention attn(c.cfg, *comm, ExecOptions{Backend::kCuda, 0});
  SparseInputs in(c.dtype, c.B, c.N, c.H, c.Hkv, c.D, seed);
  DeviceTensors dev(in);
  dev.run(attn, in);
  const SparseOracle ref = sparse_oracle(c.cfg, in.q, in.k, in.v, &in.dout);
  expect_close(compare_bnhd(in.out, ref.out), out_tol(c.dtype), "out");
  const Stats l = compare_lse(in.lse, ref.lse);
  EXPECT_EQ(l.nonfinite, 0);
  EXPECT_LE(l.max_abs_err, 1e-4 * std::max(1.0, l.max_ref)) << "lse";
  const double tol = grad_tol(c.dtype);
  expect_close(compare_bnhd(in.dq, ref.dq), tol, "dq");
  expect_close(compare_bnhd(in.dk, ref.dk), tol, "dk");
  expect_close(compare_bnhd(in.dv, ref.dv), tol, "dv");
}

const DType kDtypes[] = {DType::kF32, DType::kF16, DType::kBF16};

// Every kind alone and all four as per-head patterns, causal on and off, every dtype, GQA;
// head dims 64 (own kernel) and 48 (generic).
TEST(BlockSparseCuda, EveryKindCausalDtypesGqa) {
  RA_SKIP_WITHOUT_GPU();
  uint32_t seed = 1;
  const int64_t bs = 32, N = 8 * bs;
  for (DType dt : kDtypes) {
    for (bool causal : {false, true}) {
      for (const BlockPattern& x : every_kind(bs)) {
        check_gpu_case({1, N, 4, 2, 64, {{x}, causal, {}}, dt}, seed++);
      }
      check_gpu_case({2, N, 4, 1, 48, {every_kind(bs), causal, {}}, dt}, seed++);
    }
  }
}

// Block sizes that are not multiples of the tiles (partial tiles) or span several tiles,
// head dim 128, a given scale.
TEST(BlockSparseCuda, BlockSizesAndHeadDims) {
  RA_SKIP_WITHOUT_GPU();
  uint32_t seed = 20;
  for (DType dt : kDtypes) {
    check_gpu_case({1, 8 * 24, 2, 2, 128, {every_kind(24), true, 0.3f}, dt}, seed++);
    check_gpu_case({1, 8 * 96, 2, 1, 64, {{fixed_list(96)}, false, {}}, dt}, seed++);
    check_gpu_case({1, 8 * 16, 3, 3, 80, {{BlockPattern::dilated(16, {1, 4})}, true, {}}, dt},
                   seed++);
  }
}

// Rows that see nothing: out 0, lse -inf, dq 0; bitwise deterministic across runs.
TEST(BlockSparseCuda, RowsThatSeeNothingAndDeterminism) {
  RA_SKIP_WITHOUT_GPU();
  auto comm = make_self_communicator();
  BlockSparseRingDilatedAttention attn(rows_that_see_nothing(), *comm,
                                       ExecOptions{Backend::kCuda, 0});
  SparseInputs a(DType::kF32, 1, 64, 2, 1, 16, 50), b(DType::kF32, 1, 64, 2, 1, 16, 50);
  DeviceTensors da(a), db(b);
  da.run(attn, a);
  db.run(attn, b);
  expect_rows_that_see_nothing(a);
  EXPECT_EQ(a.out.bytes(), b.out.bytes());
  EXPECT_EQ(a.dq.bytes(), b.dq.bytes());
  EXPECT_EQ(a.dk.bytes(), b.dk.bytes());
  EXPECT_EQ(a.dv.bytes(), b.dv.bytes());
}

}  // namespace
}  // namespace ringattn::test
