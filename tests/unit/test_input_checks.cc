// Inputs a careless or hostile caller can build: fields out of range, sizes whose arithmetic
// overflows, hand-built patterns, and outputs that share memory with inputs. Each is an
// Error naming the parameter (never a crash, a wrap-around or a silent wrong answer), and
// the exact overlap test agrees with a brute-force one.

#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <functional>
#include <random>
#include <set>

#include "ringattn/ringattn.h"
#include "src/base/tensor_checks.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

DilatedConfig config() {
  return {{8, 16}, {1, 2}, Mode::kGroups, false, std::nullopt};
}

TEST(InputChecks, ViewFieldsOutOfRange) {
  std::vector<float> buf(1024, 1.0f);
  const TensorView ok = TensorView::contiguous(buf.data(), DType::kF32, {1, 16, 2, 8});
  std::vector<float> obuf(256);
  const TensorView out = TensorView::contiguous(obuf.data(), DType::kF32, {1, 16, 2, 8});
  const DilatedAttention attn(config());
  for (int ndim : {1000000, 5, 0, -1}) {
    TensorView bad = ok;
    bad.ndim = ndim;
    expect_error([&] { attn.forward(bad, ok, ok, out); }, ErrorCode::kInvalidArgument,
                 {"q.ndim = ", "is outside [1, 4]"});
    if (ndim != 0) expect_error([&] { (void)bad.numel(); }, ErrorCode::kInvalidArgument, {"ndim"});
  }
  TensorView bad_dtype = ok;
  bad_dtype.dtype = static_cast<DType>(5);
  expect_error([&] { attn.forward(ok, bad_dtype, ok, out); }, ErrorCode::kInvalidArgument,
               {"k.dtype = 5", "not a DType"});
  TensorView bad_device = ok;
  bad_device.device = static_cast<Device>(3);
  expect_error([&] { attn.forward(ok, ok, bad_device, out); }, ErrorCode::kInvalidArgument,
               {"v.device = 3", "not a Device"});
  TensorView negative = ok;
  negative.strides[1] = -16;
  expect_error([&] { attn.forward(negative, ok, ok, out); }, ErrorCode::kInvalidArgument,
               {"q.strides[1] = -16", ">= 0"});
  // Extents times strides beyond int64 (or the address space) are errors, not wrap-arounds.
  const TensorView huge = TensorView::strided(buf.data(), DType::kF32, {1, int64_t{1} << 40, 2, 8},
                                              {0, int64_t{1} << 30, 8, 1});
  expect_error([&] { attn.forward(huge, ok, ok, out); }, ErrorCode::kInvalidArgument,
               {"q is [1, 1099511627776, 2, 8]", "more memory than an address space"});
  expect_error(
      [&] {
        TensorView::contiguous(buf.data(), DType::kF32, {int64_t{1} << 40, int64_t{1} << 40});
      },
      ErrorCode::kInvalidArgument, {"more than 2^63 elements"});
}

TEST(InputChecks, EnumsAndCountsOutOfRange) {
  expect_error(
      [] {
        DilatedAttention a({{8}, {1}, static_cast<Mode>(7), false, std::nullopt});
      },
      ErrorCode::kInvalidArgument, {"mode = 7", "not a Mode"});
  ExecOptions threads;
  threads.num_threads = -3;
  expect_error([&] { DilatedAttention a(config(), threads); }, ErrorCode::kInvalidArgument,
               {"num_threads = -3"});
  ExecOptions backend;
  backend.backend = static_cast<Backend>(9);
  expect_error([&] { DilatedAttention a(config(), backend); }, ErrorCode::kInvalidArgument,
               {"backend = 9", "not a Backend"});
  auto comm = make_self_communicator();
  expect_error([&] { RingDilatedAttention r(config(), *comm, threads); },
               ErrorCode::kInvalidArgument, {"num_threads = -3"});
  BlockSparseConfig sparse;
  sparse.patterns = {BlockPattern::local_window(8, 8)};
  expect_error([&] { BlockSparseRingDilatedAttention b(sparse, *comm, backend); },
               ErrorCode::kInvalidArgument, {"backend = 9"});
}

TEST(InputChecks, HandBuiltPatternsAreChecked) {
  BlockPattern kind = BlockPattern::local_window(8, 8);
  kind.kind = static_cast<BlockPatternKind>(9);
  expect_error([&] { (void)kind.layout(64); }, ErrorCode::kInvalidArgument,
               {"pattern kind = 9", "factories"});
  BlockPattern window = BlockPattern::local_window(8, 8);
  window.window = -5;
  expect_error([&] { (void)window.layout(64); }, ErrorCode::kInvalidArgument, {"window = -5"});
  BlockPattern global = BlockPattern::global_local(8, 1, 8);
  global.global_blocks = -1;
  expect_error([&] { (void)global.layout(64); }, ErrorCode::kInvalidArgument,
               {"global_blocks = -1"});
  BlockPattern rates = BlockPattern::dilated(8, {1, 2});
  rates.rates[1] = 0;
  expect_error([&] { (void)rates.layout(64); }, ErrorCode::kInvalidArgument, {"rates[1] = 0"});
  BlockPattern size = BlockPattern::local_window(8, 8);
  size.block_size = 0;
  expect_error([&] { (void)size.layout(64); }, ErrorCode::kInvalidArgument, {"block_size = 0"});
  // The configuration checks them too, at construction.
  BlockSparseConfig cfg;
  cfg.patterns = {window};
  auto comm = make_self_communicator();
  expect_error([&] { BlockSparseRingDilatedAttention b(cfg, *comm); }, ErrorCode::kInvalidArgument,
               {"window = -5"});
}

TEST(InputChecks, PatternArithmeticDoesNotOverflow) {
  // A window of INT64_MAX tokens covers every block; a rate of INT64_MAX blocks reaches none
  // but the diagonal.
  const BlockLayout all = BlockPattern::local_window(8, INT64_MAX).layout(64);
  EXPECT_EQ(all.cols.size(), 64u);
  const BlockLayout diagonal = BlockPattern::dilated(8, {INT64_MAX}).layout(64);
  ASSERT_EQ(diagonal.cols.size(), 8u);
  for (int64_t qb = 0; qb < 8; ++qb) EXPECT_EQ(diagonal.cols[static_cast<size_t>(qb)], qb);
  const BlockLayout wide = BlockPattern::global_local(8, INT64_MAX, INT64_MAX).layout(64);
  EXPECT_EQ(wide.cols.size(), 64u);
  expect_error([] { (void)BlockPattern::local_window(3, 4).layout(INT64_MAX); },
               ErrorCode::kInvalidArgument, {"not a multiple of block_size = 3"});
}

TEST(InputChecks, BlockListsAreReadOnlyWhereChecked) {
  // A valid list (its checks once read cols[-1]); a row_ptr entry past cols.size(); one that
  // decreases.
  EXPECT_NO_THROW((void)BlockPattern::block_list(8, {0, 1, 3}, {0, 0, 1}).layout(16));
  expect_error(
      [] {
        (void)BlockPattern::block_list(8, {0, 7, 2}, {0, 1}).layout(16);
      },
      ErrorCode::kInvalidArgument, {"row_ptr[1] = 7 is past the end of cols (2 entries)"});
  expect_error(
      [] {
        (void)BlockPattern::block_list(8, {0, 2, 1, 2}, {0, 1}).layout(24);
      },
      ErrorCode::kInvalidArgument, {"row_ptr[2] = 1 < row_ptr[1] = 2"});
}

// The bytes a view touches, by enumeration.
std::set<uintptr_t> bytes_of(const TensorView& t) {
  std::set<uintptr_t> bytes;
  const size_t es = dtype_size(t.dtype);
  for (int64_t a = 0; a < (t.ndim > 0 ? t.shape[0] : 1); ++a)
    for (int64_t b = 0; b < (t.ndim > 1 ? t.shape[1] : 1); ++b)
      for (int64_t c = 0; c < (t.ndim > 2 ? t.shape[2] : 1); ++c)
        for (int64_t d = 0; d < (t.ndim > 3 ? t.shape[3] : 1); ++d) {
          const int64_t off =
              a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + d * t.strides[3];
          for (size_t x = 0; x < es; ++x) {
            bytes.insert(reinterpret_cast<uintptr_t>(t.data) + static_cast<size_t>(off) * es + x);
          }
        }
  return bytes;
}

TEST(InputChecks, OverlapTestMatchesBruteForce) {
  std::mt19937 rng(11);
  std::vector<uint8_t> arena(1 << 16);
  int overlapping = 0, self = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    TensorView v[2];
    for (TensorView& t : v) {
      t.dtype = rng() % 2 ? DType::kF32 : DType::kBF16;
      t.ndim = 4;
      for (int d = 0; d < 4; ++d) {
        t.shape[d] = 1 + static_cast<int64_t>(rng() % 4);
        t.strides[d] = static_cast<int64_t>(rng() % 40);
      }
      t.data = arena.data() + rng() % 512;
    }
    const std::set<uintptr_t> a = bytes_of(v[0]), b = bytes_of(v[1]);
    bool expect = false;
    for (uintptr_t x : a) expect = expect || b.count(x) > 0;
    ASSERT_EQ(views_overlap(v[0], v[1]), expect) << "trial " << trial;
    overlapping += expect;
    // Self-overlap: fewer distinct elements than indices.
    const size_t es = dtype_size(v[0].dtype);
    const bool expect_self = a.size() != static_cast<size_t>(v[0].numel()) * es;
    ASSERT_EQ(overlaps_itself(v[0]), expect_self) << "trial " << trial;
    self += expect_self;
  }
  // Both answers occur often enough to mean something.
  EXPECT_GT(overlapping, 300);
  EXPECT_LT(overlapping, 2700);
  EXPECT_GT(self, 300);
  EXPECT_LT(self, 2700);
}

TEST(InputChecks, OutputsThatOverlapInputsOrEachOther) {
  const int64_t B = 1, N = 16, H = 2, D = 8;
  std::mt19937 rng(3);
  Tensor q(DType::kF32, {B, N, H, D}), k(DType::kF32, {B, N, H, D}), v(DType::kF32, {B, N, H, D}),
      dout(DType::kF32, {B, N, H, D}), out(DType::kF32, {B, N, H, D}), lse(DType::kF32, {B, H, N}),
      dq(DType::kF32, {B, N, H, D}), dk(DType::kF32, {B, N, H, D}), dv(DType::kF32, {B, N, H, D});
  for (Tensor* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
  const DilatedAttention attn(config());
  expect_error([&] { attn.forward(q.view(), k.view(), v.view(), q.view(), lse.view()); },
               ErrorCode::kInvalidArgument, {"the output out overlaps the input q"});
  attn.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
  expect_error(
      [&] {
        attn.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(),
                      dout.view(), dk.view(), dv.view());
      },
      ErrorCode::kInvalidArgument, {"the output dq overlaps the input dout"});
  expect_error(
      [&] {
        attn.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                      dk.view(), k.view());
      },
      ErrorCode::kInvalidArgument, {"the output dv overlaps the input k"});
  expect_error(
      [&] {
        attn.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                      dq.view(), dv.view());
      },
      ErrorCode::kInvalidArgument, {"the outputs dq and dk overlap"});
  // An output whose rows overlap each other (a stride of 0).
  TensorView broadcast = out.view();
  broadcast.strides[1] = 0;
  expect_error([&] { attn.forward(q.view(), k.view(), v.view(), broadcast); },
               ErrorCode::kInvalidArgument, {"out is [1, 16, 2, 8]", "overlap each other"});
  // Slices of one fused buffer [B, N, 3, H, D] (q, k and v; dq, dk and dv) interleave in
  // memory without sharing an element: allowed, and the same result.
  std::vector<float> fused(static_cast<size_t>(B * N * 3 * H * D)), dfused(fused.size());
  const auto slice = [&](std::vector<float>& buf, int which) {
    return TensorView::strided(buf.data() + which * H * D, DType::kF32, {B, N, H, D},
                               {N * 3 * H * D, 3 * H * D, D, 1});
  };
  const Tensor* parts[3] = {&q, &k, &v};
  for (int which = 0; which < 3; ++which)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          fused[static_cast<size_t>(((n * 3 + which) * H + h) * D + d)] =
              parts[which]->get(0, n, h, d);
  attn.backward(dout.view(), slice(fused, 0), slice(fused, 1), slice(fused, 2), out.view(),
                lse.view(), slice(dfused, 0), slice(dfused, 1), slice(dfused, 2));
  attn.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                dk.view(), dv.view());
  const Tensor* grads[3] = {&dq, &dk, &dv};
  int64_t mismatches = 0;
  for (int which = 0; which < 3; ++which)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          mismatches += dfused[static_cast<size_t>(((n * 3 + which) * H + h) * D + d)] !=
                        grads[which]->get(0, n, h, d);
  EXPECT_EQ(mismatches, 0);
  EXPECT_GT(compare_bnhd(dv, std::vector<double>(static_cast<size_t>(dv.view().numel()))).nonzero,
            0);
}

TEST(InputChecks, MultiheadOutputOverlappingItsInput) {
  MultiheadConfig mc;
  mc.embed_dim = 16;
  mc.num_heads = 2;
  mc.attention = DilatedConfig{{8}, {1}, Mode::kGroups, false, std::nullopt};
  const MultiheadDilatedAttention layer(mc, 1);
  std::vector<float> x(2 * 8 * 16, 0.5f), y(x.size());
  const TensorView xv = TensorView::contiguous(x.data(), DType::kF32, {2, 8, 16});
  expect_error([&] { layer.forward(xv, xv); }, ErrorCode::kInvalidArgument,
               {"the output y overlaps the input query"});
  MultiheadSaved saved;
  layer.forward(xv, TensorView::contiguous(y.data(), DType::kF32, {2, 8, 16}), &saved);
  MultiheadWeights grads;
  const TensorView yv = TensorView::contiguous(y.data(), DType::kF32, {2, 8, 16});
  expect_error([&] { layer.backward(xv, yv, saved, yv, grads); }, ErrorCode::kInvalidArgument,
               {"the output dquery overlaps the input"});
}

TEST(InputChecks, HugeHeadCountsThroughStrideZeroViews) {
  // H = 2^40 heads through stride-0 views: the output would have to overlap itself, which is
  // an error before anything is sized by H.
  std::vector<float> buf(64, 1.0f);
  const int64_t H = int64_t{1} << 40;
  const TensorView q = TensorView::strided(buf.data(), DType::kF32, {1, 8, H, 8}, {0, 8, 0, 1});
  std::vector<float> obuf(64);
  const TensorView out = TensorView::strided(obuf.data(), DType::kF32, {1, 8, H, 8}, {0, 8, 0, 1});
  const DilatedConfig cfg{{8}, {1}, Mode::kLongNet, false, std::nullopt};
  expect_error([&] { DilatedAttention(cfg).forward(q, q, q, out); }, ErrorCode::kInvalidArgument,
               {"overlap each other"});
  auto comm = make_self_communicator();
  RingDilatedAttention ring(cfg, *comm);
  expect_error([&] { ring.forward(q, q, q, out); }, ErrorCode::kInvalidArgument,
               {"overlap each other"});
}

}  // namespace
}  // namespace ringattn::test
