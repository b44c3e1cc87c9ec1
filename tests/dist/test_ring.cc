// RingDilatedAttention under mpirun: each rank's rows equal the same rows of the
// single-device result; bytes sent equal the minimum computed here independently; bad or
// disagreeing input fails on every rank.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "ringattn/ringattn.h"
#include "src/backend/cpu/bf16_kernels.h"
#include "src/backend/ref/reference.h"
#include "tests/support/expect.h"
#include "tests/support/mpi_main.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

struct RingCase {
  int64_t B, n_loc, H, Hkv, D;
  std::vector<int64_t> s, r;
  Mode mode;
  bool causal;
  DType dtype = DType::kF32;
  CpuBf16 cpu_bf16 = CpuBf16::kAuto;  // the ring's and the single-device run's bf16 products

  ExecOptions options() const {
    ExecOptions o;
    o.cpu_bf16 = cpu_bf16;
    return o;
  }
};

std::string describe(const RingCase& c) {
  std::ostringstream os;
  os << "P=" << world().size() << " B=" << c.B << " N_loc=" << c.n_loc << " H=" << c.H
     << " Hkv=" << c.Hkv << " D=" << c.D << " s=[";
  for (size_t i = 0; i < c.s.size(); ++i) os << (i ? "," : "") << c.s[i];
  os << "] r=[";
  for (size_t i = 0; i < c.r.size(); ++i) os << (i ? "," : "") << c.r[i];
  os << "] " << mode_name(c.mode) << (c.causal ? " causal " : " full ") << dtype_name(c.dtype);
  return os.str();
}

// Rows of the shard of `rank` that branch i keeps, summed over the distinct (kv head,
// offset) of the heads computing the branch (SPEC.md's assignment, written out directly).
int64_t kept_stream_rows(const RingCase& c, int64_t i, int rank) {
  const int64_t G = static_cast<int64_t>(c.s.size()), n0 = rank * c.n_loc;
  std::set<std::pair<int64_t, int64_t>> streams;  // (kv head, offset)
  int64_t first = 0;
  for (int64_t j = 0; j < i; ++j) first += c.H / G + (j < c.H % G ? 1 : 0);
  for (int64_t h = 0; h < c.H; ++h) {
    const bool computes =
        c.mode == Mode::kLongNet || (h >= first && h < first + c.H / G + (i < c.H % G ? 1 : 0));
    const int64_t o = c.mode == Mode::kLongNet ? h % c.r[i] : i % c.r[i];
    if (computes) streams.insert({h / (c.H / c.Hkv), o});
  }
  int64_t rows = 0;
  for (auto [hk, o] : streams) {
    for (int64_t n = n0; n < n0 + c.n_loc; ++n) rows += (n % c.s[i]) % c.r[i] == o;
  }
  return rows;
}

// Bytes this rank must send: for each branch whose segment covers several ranks, its kept
// K and V rows to every other rank of the segment that needs them (with causal, only later
// ranks); in backward also the fp32 gradients of every block it received, back to its owner.
// Causal rate-1 branches are balanced: the later rank of each pair sends the queries of its
// second half (the heads computing the branch; in backward also dout, out and fp32 lse) to
// the earlier one, which answers with fp32 (O, lse) (in backward: dq) for them.
int64_t expected_bytes(const RingCase& c, int rank, int world_size, bool backward) {
  const int64_t esize = static_cast<int64_t>(dtype_size(c.dtype)), kv = c.B * 2 * c.D;
  const int64_t G = static_cast<int64_t>(c.s.size()), half = c.n_loc - c.n_loc / 2;
  int64_t total = 0;
  for (int64_t i = 0; i < G; ++i) {
    if (c.s[i] <= c.n_loc) continue;
    const bool balanced = c.causal && c.r[i] == 1;
    const int64_t heads =
        c.mode == Mode::kLongNet ? c.H : c.H / G + (i < c.H % G ? 1 : 0);  // computing i
    for (int q = 0; q < world_size; ++q) {
      const bool same_segment = q * c.n_loc / c.s[i] == rank * c.n_loc / c.s[i];
      if (q == rank || !same_segment) continue;
      // A block moves when it holds keys and its receiver holds queries (kept rows).
      const int64_t mine = kept_stream_rows(c, i, rank), theirs = kept_stream_rows(c, i, q);
      if (mine == 0 || theirs == 0) continue;
      if (!c.causal || q > rank) total += mine * kv * esize;
      if (backward && (!c.causal || q < rank)) total += theirs * kv * 4;
      const int64_t rows = c.B * half * heads;  // balanced (row, head) pairs
      if (balanced && q < rank)
        total += backward ? rows * (3 * c.D * esize + 8) : rows * c.D * esize;  // lse: double
      // (the lse of a partial result: two floats, hi + lo of its double)
      if (balanced && q > rank) total += backward ? rows * c.D * 4 : rows * (c.D + 2) * 4;
    }
  }
  return total;
}

// Ring backward: each rank's rows of dq, dk, dv equal the single-device gradients' rows
// (and the fp64 reference's).
void check_ring_backward(const RingCase& c, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& full_out, const Tensor& full_lse, const Tensor& out,
                         const Tensor& lse, RingDilatedAttention& ring, uint32_t seed) {
  Communicator& comm = world();
  const int P = comm.size(), rank = comm.rank();
  const int64_t N = P * c.n_loc, row0 = rank * c.n_loc;
  std::mt19937 rng(seed + 1000);
  Tensor dout(c.dtype, {c.B, N, c.H, c.D}), dq(c.dtype, {c.B, N, c.H, c.D}),
      dk(c.dtype, {c.B, N, c.Hkv, c.D}), dv(c.dtype, {c.B, N, c.Hkv, c.D}),
      ring_dq(c.dtype, {c.B, c.n_loc, c.H, c.D}), ring_dk(c.dtype, {c.B, c.n_loc, c.Hkv, c.D}),
      ring_dv(c.dtype, {c.B, c.n_loc, c.Hkv, c.D});
  dout.fill_normal(rng);
  const DilatedConfig& cfg = ring.config();
  DilatedAttention(cfg, c.options())
      .backward(dout.view(), q.view(), k.view(), v.view(), full_out.view(), full_lse.view(),
                dq.view(), dk.view(), dv.view());
  const ReferenceGrads ref = reference_backward(make_backward_problem(
      cfg, dout.view(), q.view(), k.view(), v.view(), full_out.view(), full_lse.view(), dq.view(),
      dk.view(), dv.view(), 1 << 20, "reference"));
  ring.backward(rows_of(dout, row0, c.n_loc, 1), rows_of(q, row0, c.n_loc, 1),
                rows_of(k, row0, c.n_loc, 1), rows_of(v, row0, c.n_loc, 1), out.view(), lse.view(),
                ring_dq.view(), ring_dk.view(), ring_dv.view());
  EXPECT_EQ(ring.last_stats().bytes_sent, expected_bytes(c, rank, P, true));
  const struct {
    const Tensor& mine;
    const Tensor& single;
    const std::vector<double>& ref;
    int64_t heads;
    const char* name;
  } grads[] = {{ring_dq, dq, ref.dq, c.H, "dq"},
               {ring_dk, dk, ref.dk, c.Hkv, "dk"},
               {ring_dv, dv, ref.dv, c.Hkv, "dv"}};
  for (const auto& g : grads) {
    double err = 0.0, single_err = 0.0, max_ref = 0.0;
    int64_t nonzero = 0, ref_nonzero = 0, bad = 0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t n = 0; n < c.n_loc; ++n)
        for (int64_t h = 0; h < g.heads; ++h)
          for (int64_t d = 0; d < c.D; ++d) {
            const double x = g.mine.get(b, n, h, d), y = g.single.get(b, row0 + n, h, d);
            const double r =
                g.ref[static_cast<size_t>(((b * N + row0 + n) * g.heads + h) * c.D + d)];
            if (!std::isfinite(x)) ++bad;
            nonzero += x != 0.0;
            ref_nonzero += r != 0.0;
            err = std::max(err, std::abs(x - r));
            single_err = std::max(single_err, std::abs(y - r));
            max_ref = std::max(max_ref, std::abs(r));
          }
    EXPECT_EQ(bad, 0) << g.name;
    // (A rank may hold no kept row of any branch: then its reference gradients are zero, and
    // the error bound below checks its own.)
    if (ref_nonzero > 0) {
      EXPECT_GT(nonzero, 0) << g.name;
    }
    if (c.dtype == DType::kF32) {
      EXPECT_LE(err, 2e-5 * std::max(1.0, max_ref)) << g.name;
    } else {
      EXPECT_LE(err, 1.5 * single_err + 1e-6) << g.name << " single-device error " << single_err;
    }
  }
}

void check_ring_case(const RingCase& c, uint32_t seed) {
  SCOPED_TRACE(describe(c));
  Communicator& comm = world();
  const int P = comm.size(), rank = comm.rank();
  const int64_t N = P * c.n_loc;
  std::mt19937 rng(seed);  // the same inputs on every rank
  Tensor q(c.dtype, {c.B, N, c.H, c.D}), k(c.dtype, {c.B, N, c.Hkv, c.D}),
      v(c.dtype, {c.B, N, c.Hkv, c.D}), full_out(c.dtype, {c.B, N, c.H, c.D}),
      full_lse(DType::kF32, {c.B, c.H, N}), out(c.dtype, {c.B, c.n_loc, c.H, c.D}),
      lse(DType::kF32, {c.B, c.H, c.n_loc});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  const DilatedConfig cfg{c.s, c.r, c.mode, c.causal, std::nullopt};
  // Single device on the whole sequence, and the fp64 reference.
  DilatedAttention(cfg, c.options())
      .forward(q.view(), k.view(), v.view(), full_out.view(), full_lse.view());
  const ReferenceResult ref = reference_forward(make_problem(
      cfg, q.view(), k.view(), v.view(), full_out.view(), std::nullopt, 1 << 20, "reference"));

  RingDilatedAttention ring(cfg, comm, c.options());
  const int64_t row0 = rank * c.n_loc;
  ring.forward(rows_of(q, row0, c.n_loc, 1), rows_of(k, row0, c.n_loc, 1),
               rows_of(v, row0, c.n_loc, 1), out.view(), lse.view());

  const ShardStats st = compare_shard(out, lse, row0, full_out, ref);
  EXPECT_EQ(st.bad, 0);
  EXPECT_GT(std::count_if(ref.out.begin(), ref.out.end(), [](double x) { return x != 0.0; }), 0);
  EXPECT_EQ(st.missing, 0) << "zeros where the reference is not (" << st.ref_nonzero
                           << " non-zero)";
  if (c.dtype == DType::kF32) {
    EXPECT_LE(st.err, 1e-5);
  } else {
    EXPECT_LE(st.err, 1.5 * st.single_err + 1e-6) << "single-device error " << st.single_err;
  }
  EXPECT_LE(st.lse_err, 2e-5);
  EXPECT_EQ(ring.last_stats().bytes_sent, expected_bytes(c, rank, P, false));
  check_ring_backward(c, q, k, v, full_out, full_lse, out, lse, ring, seed);
}

// Segment lengths that fit P ranks of n_loc rows: inside a rank, across two, across all.
std::vector<std::vector<int64_t>> segment_sets(int P, int64_t n_loc) {
  std::vector<std::vector<int64_t>> sets = {{n_loc / 2, n_loc}};
  if (P % 2 == 0) sets.push_back({n_loc, 2 * n_loc});
  if (P > 1) sets.push_back({n_loc / 2, P * n_loc});
  return sets;
}

TEST(Ring, MatchesSingleDeviceRows) {
  const int P = world().size();
  uint32_t seed = 1;
  for (const auto& s : segment_sets(P, 64)) {
    for (Mode mode : {Mode::kGroups, Mode::kLongNet}) {
      for (bool causal : {false, true}) {
        check_ring_case({2, 64, 4, 2, 64, s, {1, 2}, mode, causal}, seed++);
      }
    }
  }
}

TEST(Ring, DilationNotDividingSegmentAndHeadDim128) {
  const int P = world().size();
  const int64_t n_loc = 48;
  check_ring_case({1, n_loc, 3, 3, 128, {n_loc, P * n_loc}, {1, 5}, Mode::kLongNet, true}, 20);
  check_ring_case({1, n_loc, 3, 1, 128, {n_loc, P * n_loc}, {3, 5}, Mode::kGroups, false}, 21);
}

// Every bf16 product kernel this CPU has (widening, AVX512_BF16 dot products, AMX tiles).
TEST(Ring, Bf16) {
  const int P = world().size();
  for (const CpuBf16 kernel : {CpuBf16::kWiden, CpuBf16::kDot, CpuBf16::kAmx}) {
    try {
      cpu::resolve_bf16(kernel);
    } catch (const Error&) {
      continue;  // not on this CPU (the same on every rank of one machine)
    }
    SCOPED_TRACE(cpu_bf16_name(kernel));
    check_ring_case(
        {1, 64, 4, 2, 64, {32, P * 64}, {1, 2}, Mode::kLongNet, true, DType::kBF16, kernel}, 30);
    check_ring_case(
        {1, 64, 2, 2, 128, {64, P * 64}, {1, 4}, Mode::kGroups, false, DType::kBF16, kernel}, 31);
  }
}

TEST(Ring, BalancedCausalBranchOfSomeHeads) {
  // Groups mode: only heads 2-3 compute the rate-1 branch that spans every rank.
  const int P = world().size();
  check_ring_case({2, 64, 4, 2, 64, {64, P * 64}, {2, 1}, Mode::kGroups, true}, 45);
  check_ring_case({1, 63, 3, 3, 16, {63, P * 63}, {1, 1}, Mode::kLongNet, true}, 46);
}

TEST(Ring, BranchesWithRanksThatHoldNoKeptRow) {
  // A dilation rate above N_loc: some ranks hold no kept row of a spanning branch. The
  // backward used to wait forever for the gradients of a 0-row block.
  const int P = world().size();
  if (P == 4) {
    check_ring_case({1, 1024, 1, 1, 8, {4096}, {2048}, Mode::kGroups, false}, 60);
    check_ring_case({1, 1024, 2, 1, 8, {1024, 4096}, {1, 2048}, Mode::kLongNet, true}, 61);
  }
  if (P == 2) check_ring_case({1, 2, 2, 2, 8, {4}, {4}, Mode::kLongNet, false}, 62);
  check_ring_case({1, 8, 2, 1, 8, {8, 8 * P}, {1, 4 * P + 1}, Mode::kLongNet, false}, 63);
}

TEST(Ring, DenseRingAttention) {
  const int P = world().size();
  for (bool causal : {true, false}) {
    check_ring_case({1, 96, 2, 1, 64, {P * 96}, {1}, Mode::kGroups, causal}, 40 + causal);
  }
}

TEST(Ring, BitwiseDeterministicForAGivenRankCount) {
  Communicator& comm = world();
  const int P = comm.size();
  const int64_t n_loc = 64;
  const DilatedConfig cfg{{32, P * n_loc}, {1, 2}, Mode::kLongNet, true, std::nullopt};
  std::mt19937 rng(50 + static_cast<uint32_t>(comm.rank()));
  Tensor q(DType::kF32, {1, n_loc, 4, 32}), k(DType::kF32, {1, n_loc, 2, 32}),
      v(DType::kF32, {1, n_loc, 2, 32}), dout(DType::kF32, {1, n_loc, 4, 32});
  for (Tensor* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
  std::vector<std::vector<uint8_t>> runs[2];
  for (auto& run : runs) {
    Tensor out(DType::kF32, {1, n_loc, 4, 32}), lse(DType::kF32, {1, 4, n_loc}),
        dq(DType::kF32, {1, n_loc, 4, 32}), dk(DType::kF32, {1, n_loc, 2, 32}),
        dv(DType::kF32, {1, n_loc, 2, 32});
    RingDilatedAttention ring(cfg, comm);
    ring.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
    ring.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                  dk.view(), dv.view());
    for (const Tensor* t : {&out, &lse, &dq, &dk, &dv}) run.push_back(t->bytes());
    EXPECT_GT(compare_bnhd(dk, std::vector<double>(static_cast<size_t>(dk.view().numel()))).nonzero,
              0);
  }
  EXPECT_EQ(runs[0], runs[1]);
}

void expect_error_everywhere(const std::function<void()>& fn, ErrorCode code, const char* word) {
  bool thrown = false;
  try {
    fn();
  } catch (const Error& e) {
    thrown = true;
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
  }
  EXPECT_TRUE(thrown);
}

// An fp32 q [1, rows, 2, 8] drawn from `seed` (the same on every rank), and an out of its shape.
struct QAndOut {
  Tensor q, out;
  QAndOut(int64_t rows, uint32_t seed)
      : q(DType::kF32, {1, rows, 2, 8}), out(DType::kF32, {1, rows, 2, 8}) {
    std::mt19937 rng(seed);
    q.fill_normal(rng);
  }
};

TEST(Ring, RanksThatDisagreeFailTogether) {
  Communicator& comm = world();
  const int rank = comm.rank();
  const QAndOut in(32, 5);
  if (comm.size() > 1) {
    // The last rank uses another dilation rate: every rank throws a communication error.
    DilatedConfig cfg{{32}, {rank == comm.size() - 1 ? 2 : 1}, Mode::kGroups, false, std::nullopt};
    RingDilatedAttention ring(cfg, comm);
    expect_error_everywhere(
        [&] { ring.forward(in.q.view(), in.q.view(), in.q.view(), in.out.view()); },
        ErrorCode::kCommunication, "disagree");
  }
  // One rank passes a bad shape (out has the wrong head count): every rank throws.
  Tensor bad_out(DType::kF32, {1, 32, rank == 0 ? 3 : 2, 8});
  RingDilatedAttention ring(DilatedConfig{{32}, {1}, Mode::kGroups, false, std::nullopt}, comm);
  expect_error_everywhere(
      [&] { ring.forward(in.q.view(), in.q.view(), in.q.view(), bad_out.view()); },
      ErrorCode::kInvalidArgument, "out");
  // Rank 0 marks its tensors as CUDA tensors (host memory, never read): its device check
  // fails (no CUDA backend in this build, no device, or not device memory; the code depends
  // on which), so every rank throws, before any transfer.
  TensorView q_gpu = in.q.view(), out_gpu = in.out.view();
  q_gpu.device = out_gpu.device = Device::kCUDA;
  const bool gpu_here = rank == 0;
  bool thrown = false;
  try {
    ring.forward(gpu_here ? q_gpu : in.q.view(), gpu_here ? q_gpu : in.q.view(),
                 gpu_here ? q_gpu : in.q.view(), gpu_here ? out_gpu : in.out.view());
  } catch (const Error& e) {
    thrown = true;
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(thrown);
  // A bad configuration on one rank fails every rank's constructor.
  expect_error_everywhere(
      [&] {
        RingDilatedAttention r(
            DilatedConfig{{32}, {rank == 0 ? 64 : 1}, Mode::kGroups, false, std::nullopt}, comm);
      },
      ErrorCode::kInvalidArgument, "dilation_rates[0] = 64");
}

TEST(Ring, SegmentsThatDoNotFitTheShardsAreErrors) {
  Communicator& comm = world();
  const int P = comm.size();
  const QAndOut in(48, 6);
  if (P > 1) {
    // A segment length that divides N = 48 P but neither divides the 48-row shards nor is
    // a multiple of them, so its segments straddle ranks.
    int64_t straddling = 2;
    while (48 * P % straddling != 0 || 48 % straddling == 0 || straddling % 48 == 0) ++straddling;
    RingDilatedAttention ring(DilatedConfig{{straddling}, {1}, Mode::kGroups, false, std::nullopt},
                              comm);
    expect_error_everywhere(
        [&] { ring.forward(in.q.view(), in.q.view(), in.q.view(), in.out.view()); },
        ErrorCode::kInvalidArgument, "rows each of the");
  }
  // A segment that does not divide N = 48 P: names the ranks and rows.
  RingDilatedAttention ring(DilatedConfig{{96 * P + 32}, {1}, Mode::kGroups, false, std::nullopt},
                            comm);
  expect_error_everywhere(
      [&] { ring.forward(in.q.view(), in.q.view(), in.q.view(), in.out.view()); },
      ErrorCode::kInvalidArgument, "does not divide the sequence length");
}

}  // namespace
}  // namespace ringattn::test
