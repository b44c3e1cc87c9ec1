// DistributedDilatedAttention under mpirun: sequence parallel, head parallel and a 2 x 2 grid
// each equal the single-process MultiheadDilatedAttention on the gathered input (forward,
// dx and every weight gradient); bad or disagreeing input fails on every rank.

#include <gtest/gtest.h>

#include <cmath>

#include "ringattn/comm_mpi.h"
#include "ringattn/ringattn.h"
#include "tests/support/layer_util.h"
#include "tests/support/mpi_main.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

// Rows [begin, begin + count) of every batch of a [B, N, E] array.
std::vector<float> rows_of(const std::vector<float>& x, int64_t B, int64_t N, int64_t E,
                           int64_t begin, int64_t count) {
  std::vector<float> out;
  for (int64_t b = 0; b < B; ++b) {
    const auto first = x.begin() + (b * N + begin) * E;
    out.insert(out.end(), first, first + count * E);
  }
  return out;
}

// max |x - ref| <= tol (1 + max |ref|), and x not all zero.
void expect_close(const std::vector<float>& x, const std::vector<float>& ref,
                  const std::string& what, double tol = 5e-6) {
  ASSERT_EQ(x.size(), ref.size()) << what;
  double max_err = 0.0, max_ref = 0.0;
  int64_t nonzero = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    max_err = std::max(max_err, static_cast<double>(std::abs(x[i] - ref[i])));
    max_ref = std::max(max_ref, static_cast<double>(std::abs(ref[i])));
    nonzero += x[i] != 0.0f;
  }
  EXPECT_LE(max_err, tol * (1.0 + max_ref)) << what << ": max |ref| = " << max_ref;
  EXPECT_GT(nonzero, 0) << what;
}

struct Result {
  std::vector<float> y, dq, dk, dv;  // dk, dv empty for self-attention
  MultiheadWeights grads;
};

// Forward and backward of `layer` (MultiheadDilatedAttention or DistributedDilatedAttention)
// on [B, n, E] inputs.
template <typename Layer>
Result run(Layer& layer, bool self, int64_t B, int64_t n, int64_t E, const std::vector<float>& xq,
           const std::vector<float>& xk, const std::vector<float>& xv,
           const std::vector<float>& dy) {
  Result r;
  const size_t size = static_cast<size_t>(B * n * E);
  r.y.assign(size, 0.0f);
  r.dq.assign(size, 0.0f);
  MultiheadSaved saved;
  if (self) {
    layer.forward(bne(xq, B, n, E), bne(r.y, B, n, E), &saved);
    layer.backward(bne(xq, B, n, E), bne(dy, B, n, E), saved, bne(r.dq, B, n, E), r.grads);
    return r;
  }
  r.dk.assign(size, 0.0f);
  r.dv.assign(size, 0.0f);
  layer.forward(bne(xq, B, n, E), bne(xk, B, n, E), bne(xv, B, n, E), bne(r.y, B, n, E), &saved);
  layer.backward(bne(xq, B, n, E), bne(xk, B, n, E), bne(xv, B, n, E), bne(dy, B, n, E), saved,
                 bne(r.dq, B, n, E), bne(r.dk, B, n, E), bne(r.dv, B, n, E), r.grads);
  return r;
}

// Runs the distributed layer on this rank's rows and heads and compares with the
// single-process layer on the whole input (computed on every rank).
void check_distributed(const LayerCase& c, Communicator& seq, Communicator& head, bool self,
                       bool reduce = true) {
  const MultiheadConfig config = c.config();
  const MultiheadWeights whole = random_weights(config, 9);
  const size_t size = static_cast<size_t>(c.B * c.N * c.E);
  const std::vector<float> xq = normal_vector(size, 1), xk = normal_vector(size, 2),
                           xv = normal_vector(size, 3), dy = normal_vector(size, 4);
  MultiheadDilatedAttention single(config, whole);
  const Result ref = run(single, self, c.B, c.N, c.E, xq, xk, xv, dy);

  const int64_t n_loc = c.N / seq.size(), row0 = seq.rank() * n_loc;
  const auto mine = [&](const std::vector<float>& x) {
    return rows_of(x, c.B, c.N, c.E, row0, n_loc);
  };
  DistributedDilatedAttention layer(
      config, seq, head,
      DistributedDilatedAttention::shard_weights(config, whole, head.rank(), head.size()),
      {reduce});
  Result got = run(layer, self, c.B, n_loc, c.E, mine(xq), mine(xk), mine(xv), mine(dy));

  expect_close(got.y, mine(ref.y), "y");
  expect_close(got.dq, mine(ref.dq), self ? "dx" : "dquery");
  if (!self) {
    expect_close(got.dk, mine(ref.dk), "dkey");
    expect_close(got.dv, mine(ref.dv), "dvalue");
  }
  const MultiheadWeights want =
      DistributedDilatedAttention::shard_weights(config, ref.grads, head.rank(), head.size());
  for (const auto& [member, name] : kWeightParams) {
    if (member == &MultiheadWeights::k_norm_bias) continue;  // its exact gradient is 0
    std::vector<float>& g = got.grads.*member;
    if ((want.*member).empty()) {
      EXPECT_TRUE(g.empty()) << name;
      continue;
    }
    // Without the layer's reduction, the framework's sum over the sequence ranks.
    if (!reduce) seq.allreduce_sum(g.data(), g.size());
    expect_close(g, want.*member, name);
  }
}

LayerCase seq_case(int P, Mode mode, bool causal) {
  // Branch 0 inside each rank, branch 1 over all of them (causal rate 1: the balanced ring).
  return {2, 16 * P, 32, 4, 2, {8, 16 * P}, {2, 1}, mode, causal};
}

LayerCase head_case(int P, Mode mode) {
  // H = 12 heads in 3 branches: with 4 ranks, each rank's 3 heads straddle branch groups.
  return {1, 32, 48, 12, P == 4 ? 4 : 6, {8, 16, 32}, {1, 2, 3}, mode, true};
}

TEST(Distributed, SequenceParallelEqualsSingleProcess) {
  const std::unique_ptr<Communicator> self = make_self_communicator();
  const int P = world().size();
  for (const bool self_attention : {true, false}) {
    SCOPED_TRACE(self_attention ? "self-attention" : "cross-attention");
    check_distributed(seq_case(P, Mode::kGroups, true), world(), *self, self_attention);
    check_distributed(seq_case(P, Mode::kLongNet, false), world(), *self, self_attention);
  }
}

// bf16 tensors through the collective path with cpu_bf16 = widen: the layer computes in fp32
// on their values, so its outputs are the fp32 layer's rounded once and its gradients the
// fp32 ones, bit for bit. (With the CPU's bf16 products the attention core runs on bf16
// copies; Multihead.Bf16TensorsWithBf16Products tests that path.)
TEST(Distributed, Bf16TensorsComputeInFp32) {
  const std::unique_ptr<Communicator> self = make_self_communicator();
  const LayerCase c = seq_case(world().size(), Mode::kGroups, true);
  const int64_t n_loc = c.N / world().size();
  const size_t size = static_cast<size_t>(c.B * n_loc * c.E);
  ExecOptions widen;
  widen.cpu_bf16 = CpuBf16::kWiden;
  DistributedDilatedAttention layer(c.config(), world(), *self, random_weights(c.config(), 9), {},
                                    widen);
  const Rounded x =
      round_to(DType::kBF16, normal_vector(size, static_cast<uint32_t>(1 + world().rank())));
  const Rounded dy =
      round_to(DType::kBF16, normal_vector(size, static_cast<uint32_t>(5 + world().rank())));
  const auto view = [&](const void* data, DType t) {
    return TensorView::contiguous(const_cast<void*>(data), t, {c.B, n_loc, c.E});
  };
  std::vector<float> y32(size), dx32(size);
  std::vector<uint16_t> y(size), dx(size);
  MultiheadSaved saved32, saved;
  MultiheadWeights g32, g;
  layer.forward(view(x.values.data(), DType::kF32), view(y32.data(), DType::kF32), &saved32);
  layer.backward(view(x.values.data(), DType::kF32), view(dy.values.data(), DType::kF32), saved32,
                 view(dx32.data(), DType::kF32), g32);
  layer.forward(view(x.bits.data(), DType::kBF16), view(y.data(), DType::kBF16), &saved);
  layer.backward(view(x.bits.data(), DType::kBF16), view(dy.bits.data(), DType::kBF16), saved,
                 view(dx.data(), DType::kBF16), g);
  EXPECT_EQ(y, round_to(DType::kBF16, y32).bits);
  EXPECT_EQ(dx, round_to(DType::kBF16, dx32).bits);
  for (const auto& [member, name] : kWeightParams) EXPECT_EQ(g.*member, g32.*member) << name;
}

TEST(Distributed, FrameworkReducesWeightGradients) {
  const std::unique_ptr<Communicator> self = make_self_communicator();
  check_distributed(seq_case(world().size(), Mode::kGroups, true), world(), *self, true, false);
}

TEST(Distributed, HeadParallelEqualsSingleProcess) {
  const std::unique_ptr<Communicator> self = make_self_communicator();
  const int P = world().size();
  for (const Mode mode : {Mode::kGroups, Mode::kLongNet}) {
    SCOPED_TRACE(mode_name(mode));
    check_distributed(head_case(P, mode), *self, world(), true);
    check_distributed(head_case(P, mode), *self, world(), false);
  }
}

TEST(Distributed, GridEqualsSingleProcess) {
  if (world().size() != 4) GTEST_SKIP() << "a 2 x 2 grid needs 4 ranks";
  const MpiGrid grid = make_mpi_grid(MPI_COMM_WORLD, 2);
  EXPECT_EQ(grid.seq->size(), 2);
  EXPECT_EQ(grid.head->size(), 2);
  LayerCase c = seq_case(2, Mode::kGroups, true);
  check_distributed(c, *grid.seq, *grid.head, true);
  c.mode = Mode::kLongNet;
  c.Hkv = 4;
  check_distributed(c, *grid.seq, *grid.head, false);
}

// Every rank throws an Error of `code` from `fn` (a collective).
template <typename Fn>
void expect_error_everywhere(Fn&& fn, ErrorCode code, const std::string& text) {
  const Error e = error_of(fn);
  EXPECT_EQ(e.code(), code) << e.what();
  EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
}

TEST(Distributed, BadInputFailsOnEveryRank) {
  const std::unique_ptr<Communicator> self = make_self_communicator();
  const int P = world().size(), rank = world().rank();
  const LayerCase c = seq_case(P, Mode::kGroups, true);
  const MultiheadConfig config = c.config();
  DistributedDilatedAttention layer(config, world(), *self, 5);
  const int64_t n_loc = c.N / P;
  const std::vector<float> x = normal_vector(static_cast<size_t>(c.B * n_loc * c.E), 1);
  std::vector<float> y(x.size());
  // The last rank passes a wrong embed dim; every rank reports it.
  const int64_t e = rank == P - 1 ? c.E / 2 : c.E;
  expect_error_everywhere([&] { layer.forward(bne(x, c.B, n_loc, e), bne(y, c.B, n_loc, e)); },
                          ErrorCode::kInvalidArgument, "embed_dim");
  // Rank 0 holds half the rows of the others: its sequence (P x 8 rows) is not a multiple of
  // the longest segment (16 P); the attention's check, before any compute.
  if (P > 1) {
    const int64_t rows = rank == 0 ? n_loc / 2 : n_loc;
    expect_error_everywhere([&] { layer.forward(bne(x, c.B, rows, c.E), bne(y, c.B, rows, c.E)); },
                            ErrorCode::kInvalidArgument, "does not divide the sequence length");
  }

  // Ranks disagreeing on the configuration.
  if (P > 1) {
    MultiheadConfig differs = config;
    if (rank == 1) differs.layer_norm_eps = 1e-6f;
    expect_error_everywhere([&] { DistributedDilatedAttention d(differs, world(), *self, 5); },
                            ErrorCode::kCommunication, "ranks disagree");
  }
  // A head group that does not divide the heads (H = 5 on 2-4 ranks).
  if (P > 1) {
    MultiheadConfig five = config;
    five.embed_dim = 40;
    five.num_heads = 5;
    five.kv_heads = 5;
    expect_error_everywhere([&] { DistributedDilatedAttention d(five, *self, world(), 5); },
                            ErrorCode::kInvalidArgument, "must divide num_heads = 5");
  }
}

}  // namespace
}  // namespace ringattn::test
