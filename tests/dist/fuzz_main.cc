// ringattn_fuzz: a seeded random driver over the public API, one process or under mpirun.
//
// Every case is drawn from (seed, case number), the same on every rank, and judged as one of
//   error   an input made invalid on purpose (on one rank or all): every rank must throw
//           ringattn::Error, of the expected code;
//   match   a valid input: the result must match the fp64 reference (outputs are filled with
//           NaN first, so rows nobody wrote show), on every rank;
//   unspec  fields set to odd values (extents, strides, ndim, enums): any outcome but a
//           crash or a hang, as long as the ranks agree (all throw or none) and the CPU
//           backend behaves like the reference backend (both throw, with the same code but
//           where a backend's own device rules differ, or neither).
// A hang ends at the communicators' deadline (RINGATTN_TIMEOUT_S, 30 s here unless set) and
// counts as a failure. Prints the counts per class and API; exits non-zero on any failure.
//
//   ringattn_fuzz [--seconds S] [--cases N] [--seed X] [--verbose]

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "ringattn/ringattn.h"
#include "src/backend/ref/reference.h"
#include "src/plan/problem.h"
#include "tests/support/block_sparse_oracle.h"
#include "tests/support/test_util.h"
#if defined(RINGATTN_HAVE_MPI)
#include <mpi.h>

#include "ringattn/comm_mpi.h"
#endif

namespace ringattn::test {
namespace {

using Clock = std::chrono::steady_clock;

enum class Api { kDilated, kRing, kBlockSparse, kMultihead };
enum class Judge { kError, kMatch, kUnspec };

const char* api_name(Api a) {
  static const char* const kNames[] = {"dilated", "ring", "blocksparse", "multihead"};  // by Api
  return kNames[static_cast<size_t>(a)];
}
const char* judge_name(Judge j) {
  return j == Judge::kError ? "error" : j == Judge::kMatch ? "match" : "unspec";
}

struct Rng {
  std::mt19937_64 g;
  int64_t range(int64_t lo, int64_t hi) {  // [lo, hi]
    return lo + static_cast<int64_t>(g() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool coin(double p) { return std::uniform_real_distribution<double>(0, 1)(g) < p; }
  template <typename T>
  const T& pick(const std::vector<T>& v) {
    return v[static_cast<size_t>(range(0, static_cast<int64_t>(v.size()) - 1))];
  }
};

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

// The invalid inputs a case can carry, each with the error code every rank must throw.
enum class Mutation {
  kNone,
  kKvShape,        // v's D differs from k's
  kDtypeMix,       // k in another dtype
  kRateAboveSeg,   // r > s (constructor)
  kSegNoDivide,    // a segment that does not divide N
  kHeadDimBig,     // D beyond the backend's limit (kUnsupported)
  kNdim,           // q.ndim wrong
  kNullData,       // out.data = nullptr
  kOutIsQ,         // out aliases q
  kOutStride0,     // out overlaps itself
  kLseShape,       // lse with the wrong N
  kBadMode,        // Mode(5)
  kBadThreads,     // num_threads < 0
  kGradAliasDout,  // dq aliases dout (backward)
  kDisagree,       // one rank has another causal flag (kCommunication)
  kOneRankShape,   // one rank's out has another head count
  kBlockSize,      // block size not dividing N_loc (block-sparse)
  kBadBlockList,   // an unsorted block list (block-sparse)
};

struct FuzzCase {
  Api api = Api::kDilated;
  Judge judge = Judge::kMatch;
  Mutation mutation = Mutation::kNone;
  int bad_rank = -1;  // the rank a mutation applies to (-1: all)
  ErrorCode expect = ErrorCode::kInvalidArgument;
  bool backward = false;
  DType dtype = DType::kF32;
  int64_t B = 1, n_loc = 16, H = 2, Hkv = 1, D = 8;
  DilatedConfig cfg;
  BlockSparseConfig sparse;
  bool heads_outer = false;
  int64_t pad = 0;
  uint64_t garble = 0;  // seed of the odd fields (unspec)
};

// A valid configuration for P ranks of n_loc rows: segments inside a rank or covering whole
// ranks, rates up to the segment (some above N_loc: ranks with no kept row).
DilatedConfig dilated_config(Rng& rng, int P, int64_t n_loc, int64_t H, bool ring) {
  DilatedConfig c;
  const int64_t G = rng.range(1, std::min<int64_t>(3, H));
  for (int64_t i = 0; i < G; ++i) {
    int64_t s = rng.pick(divisors(n_loc));
    if (ring && rng.coin(0.5)) s = n_loc * rng.pick(divisors(P));
    c.segment_lengths.push_back(s);
    c.dilation_rates.push_back(rng.coin(0.8) ? rng.range(1, std::min<int64_t>(s, 4))
                                             : rng.range(1, s));
  }
  c.mode = rng.coin(0.5) ? Mode::kGroups : Mode::kLongNet;
  c.causal = rng.coin(0.5);
  if (rng.coin(0.2)) c.scale = static_cast<float>(rng.range(1, 40)) / 40.0f;
  return c;
}

BlockSparseConfig sparse_config(Rng& rng, int64_t n_loc, int64_t P, int64_t H) {
  BlockSparseConfig c;
  const int64_t bs = rng.pick(divisors(n_loc));
  const int64_t nb = P * n_loc / bs;
  const int per_head = rng.coin(0.3) ? static_cast<int>(H) : 1;
  for (int h = 0; h < per_head; ++h) {
    switch (rng.range(0, 3)) {
      case 0:
        c.patterns.push_back(BlockPattern::local_window(bs, rng.range(0, 3 * bs)));
        break;
      case 1:
        c.patterns.push_back(BlockPattern::dilated(bs, {rng.range(1, 3), rng.range(1, 5)}));
        break;
      case 2:
        c.patterns.push_back(BlockPattern::global_local(bs, rng.range(0, 2), rng.range(0, 2 * bs)));
        break;
      default: {
        std::vector<int64_t> row_ptr{0}, cols;
        for (int64_t qb = 0; qb < nb; ++qb) {
          for (int64_t kb = 0; kb < nb; ++kb)
            if (rng.coin(0.3)) cols.push_back(kb);
          row_ptr.push_back(static_cast<int64_t>(cols.size()));
        }
        c.patterns.push_back(BlockPattern::block_list(bs, row_ptr, cols));
      }
    }
  }
  c.causal = rng.coin(0.5);
  return c;
}

FuzzCase make_case(uint64_t seed, int64_t index, int P) {
  Rng rng{std::mt19937_64(seed * 1000003 + static_cast<uint64_t>(index))};
  FuzzCase c;
  const std::vector<Api> apis =
      P > 1 ? std::vector<Api>{Api::kDilated, Api::kRing, Api::kRing, Api::kBlockSparse}
            : std::vector<Api>{Api::kDilated, Api::kDilated, Api::kRing, Api::kBlockSparse,
                               Api::kMultihead};
  c.api = rng.pick(apis);
  c.dtype = rng.pick(std::vector<DType>{DType::kF32, DType::kF32, DType::kBF16, DType::kF16});
  c.B = rng.range(1, 2);
  c.Hkv = rng.range(1, 3);
  c.H = c.Hkv * rng.range(1, 3);
  c.D = rng.coin(0.7) ? rng.pick(std::vector<int64_t>{8, 16, 32, 64}) : rng.range(1, 80);
  c.n_loc = rng.pick(std::vector<int64_t>{4, 6, 8, 12, 16, 24, 32, 48, 64});
  if (c.api == Api::kMultihead) {
    c.dtype = DType::kF32;
    c.Hkv = c.H;
    c.D = rng.pick(std::vector<int64_t>{4, 8, 16});
  }
  const bool ring = c.api == Api::kRing;
  c.cfg = dilated_config(rng, P, c.n_loc, c.H, ring);
  if (c.api == Api::kBlockSparse) c.sparse = sparse_config(rng, c.n_loc, P, c.H);
  c.backward = c.api != Api::kMultihead && rng.coin(0.5);
  c.heads_outer = rng.coin(0.3);
  c.pad = rng.coin(0.3) ? rng.range(1, 3) : 0;
  const double u = std::uniform_real_distribution<double>(0, 1)(rng.g);
  if (u < 0.55) return c;  // match
  if (u < 0.8 && c.api == Api::kDilated) {
    c.judge = Judge::kUnspec;
    c.garble = rng.g();
    return c;
  }
  c.judge = Judge::kError;
  if (c.api == Api::kMultihead) {
    c.mutation =
        rng.pick(std::vector<Mutation>{Mutation::kOutIsQ, Mutation::kNdim, Mutation::kNullData});
    return c;
  }
  std::vector<Mutation> m = {Mutation::kKvShape,  Mutation::kDtypeMix,   Mutation::kNdim,
                             Mutation::kNullData, Mutation::kOutIsQ,     Mutation::kOutStride0,
                             Mutation::kLseShape, Mutation::kBadThreads, Mutation::kHeadDimBig};
  if (c.api != Api::kBlockSparse) {
    m.insert(m.end(), {Mutation::kRateAboveSeg, Mutation::kSegNoDivide, Mutation::kBadMode});
  } else {
    m.insert(m.end(), {Mutation::kBlockSize, Mutation::kBadBlockList});
  }
  if (c.backward) m.push_back(Mutation::kGradAliasDout);
  if (P > 1 && (c.api == Api::kRing || c.api == Api::kBlockSparse)) {
    m.insert(m.end(), {Mutation::kDisagree, Mutation::kOneRankShape});
  }
  c.mutation = rng.pick(m);
  const bool one_rank = (c.mutation == Mutation::kDisagree ||
                         c.mutation == Mutation::kOneRankShape || rng.coin(0.5)) &&
                        c.api != Api::kMultihead && c.api != Api::kDilated;
  c.bad_rank = one_rank ? static_cast<int>(rng.range(0, P - 1)) : -1;
  if (c.mutation == Mutation::kHeadDimBig) c.expect = ErrorCode::kUnsupported;
  // A configuration that differs between ranks (also a pattern made bad on one rank only,
  // which the ranks compare before they lay it out) is a disagreement.
  const bool pattern = c.mutation == Mutation::kBlockSize || c.mutation == Mutation::kBadBlockList;
  if (c.mutation == Mutation::kDisagree || (pattern && c.bad_rank >= 0 && P > 1)) {
    c.expect = ErrorCode::kCommunication;
  }
  return c;
}

std::string describe(const FuzzCase& c) {
  std::string s = std::string(api_name(c.api)) + " " + judge_name(c.judge) +
                  " m=" + std::to_string(static_cast<int>(c.mutation)) +
                  " rank=" + std::to_string(c.bad_rank) + " " + dtype_name(c.dtype) +
                  (c.backward ? " bwd" : " fwd") + " B=" + std::to_string(c.B) +
                  " N_loc=" + std::to_string(c.n_loc) + " H=" + std::to_string(c.H) +
                  " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D) + " s=[";
  for (int64_t x : c.cfg.segment_lengths) s += std::to_string(x) + ",";
  s += "] r=[";
  for (int64_t x : c.cfg.dilation_rates) s += std::to_string(x) + ",";
  return s + "] " + mode_name(c.cfg.mode) + (c.cfg.causal ? " causal" : "");
}

// Odd values in a few fields of a view, kept within the memory the view's buffer holds (so
// that a call the library accepts reads nothing outside it).
void garble_view(Rng& rng, TensorView& t, size_t buffer_bytes) {
  const TensorView orig = t;
  for (int tries = 0; tries < 20; ++tries) {
    t = orig;
    const int field = static_cast<int>(rng.range(0, 5));
    const int d = static_cast<int>(rng.range(0, 3));
    if (field == 0) t.ndim = static_cast<int>(rng.range(-2, 7));
    if (field == 1)
      t.shape[d] = rng.pick(std::vector<int64_t>{0, 1, 2, t.shape[d] + 1, int64_t{1} << 40});
    if (field == 2)
      t.strides[d] = rng.pick(std::vector<int64_t>{0, 1, -1, t.strides[d] * 2, INT64_MAX / 2});
    if (field == 3) t.dtype = static_cast<DType>(rng.range(0, 4));
    if (field == 4) t.device = static_cast<Device>(rng.range(0, 2));
    if (field == 5) t.data = nullptr;
    // Within the buffer, when the fields are in range at all.
    if (t.ndim < 1 || t.ndim > 4 || static_cast<int>(t.dtype) > 2) return;
    long double span = 0;  // (exact enough: the values are small or far beyond the buffer)
    bool negative = false;
    for (int i = 0; i < t.ndim; ++i) {
      if (t.shape[i] < 1) return;  // rejected anyway
      negative = negative || t.strides[i] < 0;
      span += static_cast<long double>(t.shape[i] - 1) * static_cast<long double>(t.strides[i]);
    }
    if (negative) return;
    if ((span + 1) * static_cast<long double>(dtype_size(t.dtype)) <=
        static_cast<long double>(buffer_bytes))
      return;
  }
  t = orig;
}

class Runner {
 public:
  explicit Runner(Communicator& comm) : comm_(comm) {}

  // Runs one case on this rank; returns "" or what went wrong.
  std::string run(const FuzzCase& c, std::string& outcome) {
    const int P = comm_.size(), rank = comm_.rank();
    const bool mine = c.bad_rank < 0 || c.bad_rank == rank;
    const Mutation m = mine ? c.mutation : Mutation::kNone;
    const int64_t N = (c.api == Api::kRing || c.api == Api::kBlockSparse) ? P * c.n_loc : c.n_loc;
    const int64_t rows = (c.api == Api::kRing || c.api == Api::kBlockSparse) ? c.n_loc : N;
    const int64_t row0 = rows == N ? 0 : rank * c.n_loc;
    const int64_t D = m == Mutation::kHeadDimBig ? 300 : c.D;
    std::mt19937 data_rng(static_cast<uint32_t>(c.D * 7919 + c.H * 31 + c.n_loc));
    // Whole-sequence inputs (the same on every rank), and this rank's outputs.
    Tensor q(c.dtype, {c.B, N, c.H, D}, !c.heads_outer, c.pad),
        k(m == Mutation::kDtypeMix ? (c.dtype == DType::kF32 ? DType::kBF16 : DType::kF32)
                                   : c.dtype,
          {c.B, N, c.Hkv, D}, !c.heads_outer, c.pad),
        v(c.dtype, {c.B, N, c.Hkv, m == Mutation::kKvShape ? D + 1 : D}, !c.heads_outer, c.pad),
        dout(c.dtype, {c.B, N, c.H, D});
    for (Tensor* t : {&q, &k, &v, &dout}) t->fill_normal(data_rng);
    const int64_t out_heads = m == Mutation::kOneRankShape ? c.H + 1 : c.H;
    Tensor out(c.dtype, {c.B, rows, out_heads, D}),
        lse(DType::kF32, {c.B, c.H, rows + (m == Mutation::kLseShape ? 1 : 0)}),
        dq(c.dtype, {c.B, rows, c.H, D}), dk(c.dtype, {c.B, rows, c.Hkv, D}),
        dv(c.dtype, {c.B, rows, c.Hkv, D});
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (Tensor* t : {&out, &lse, &dq, &dk, &dv}) t->fill(nan);
    const auto shard = [&](const Tensor& t) { return rows_of(t, row0, rows); };
    TensorView qv = shard(q), kv = shard(k), vv = shard(v), dov = shard(dout);
    TensorView ov = out.view(), lv = lse.view(), dqv = dq.view();
    if (m == Mutation::kNdim) qv.ndim = 3;
    if (m == Mutation::kNullData) ov.data = nullptr;
    if (m == Mutation::kOutIsQ) ov = qv;
    if (m == Mutation::kOutStride0) ov.strides[1] = 0;
    if (m == Mutation::kGradAliasDout) dqv = dov;
    DilatedConfig cfg = c.cfg;
    if (m == Mutation::kRateAboveSeg) cfg.dilation_rates[0] = cfg.segment_lengths[0] + 1;
    if (m == Mutation::kSegNoDivide) cfg.segment_lengths[0] = N + 1, cfg.dilation_rates[0] = 1;
    if (m == Mutation::kBadMode) cfg.mode = static_cast<Mode>(5);
    if (m == Mutation::kDisagree) cfg.causal = !cfg.causal;
    BlockSparseConfig sparse = c.sparse;
    if (m == Mutation::kDisagree) sparse.causal = !sparse.causal;
    if (m == Mutation::kBlockSize && !sparse.patterns.empty()) {
      for (BlockPattern& x : sparse.patterns) x.block_size = c.n_loc + 1;
    }
    if (m == Mutation::kBadBlockList && !sparse.patterns.empty()) {
      sparse.patterns[0] = BlockPattern::block_list(sparse.patterns[0].block_size, {}, {1, 0});
    }
    ExecOptions opt;
    opt.num_threads = m == Mutation::kBadThreads ? -2 : static_cast<int>(1 + c.n_loc % 2);
    if (c.judge == Judge::kUnspec) {
      Rng g{std::mt19937_64(c.garble)};
      TensorView* views[] = {&qv, &kv, &vv, &ov, &lv};
      const Tensor* owners[] = {&q, &k, &v, &out, &lse};
      const int n = static_cast<int>(g.range(1, 3));
      for (int i = 0; i < n; ++i) {
        const int which = static_cast<int>(g.range(0, 4));
        garble_view(g, *views[which], owners[which]->bytes().size());
      }
      if (g.coin(0.2)) opt.num_threads = static_cast<int>(g.range(-3, 3));
      if (g.coin(0.2)) opt.backend = static_cast<Backend>(g.range(0, 4));
      return run_unspec(cfg, opt, qv, kv, vv, ov, lv, outcome);
    }

    // Run it; every rank agrees on whether it threw.
    std::optional<Error> error;
    try {
      switch (c.api) {
        case Api::kDilated: {
          const DilatedAttention a(cfg, opt);
          a.forward(qv, kv, vv, ov, lv);
          if (c.backward) a.backward(dov, qv, kv, vv, ov, lv, dqv, dk.view(), dv.view());
          break;
        }
        case Api::kRing: {
          RingDilatedAttention a(cfg, comm_, opt);
          a.forward(qv, kv, vv, ov, lv);
          if (c.backward) a.backward(dov, qv, kv, vv, ov, lv, dqv, dk.view(), dv.view());
          break;
        }
        case Api::kBlockSparse: {
          BlockSparseRingDilatedAttention a(sparse, comm_, opt);
          a.forward(qv, kv, vv, ov, lv);
          if (c.backward) a.backward(dov, qv, kv, vv, ov, lv, dqv, dk.view(), dv.view());
          break;
        }
        case Api::kMultihead:
          return run_multihead(c, m, cfg, opt, outcome);
      }
    } catch (const Error& e) {
      error = e;
    }
    if (c.judge == Judge::kError) {
      outcome = error ? "error" : "no error";
      if (!error) return "expected an Error, got none";
      if (error->code() != c.expect) {
        return std::string("expected code ") + error_code_name(c.expect) +
               ", got: " + error->what();
      }
      return "";
    }
    outcome = error ? "error" : "ok";
    if (error) return std::string("a valid input failed: ") + error->what();
    // Compare with the fp64 reference on the whole sequence (rows of this rank).
    std::vector<double> ref_out, ref_lse, ref_dq, ref_dk, ref_dv;
    if (c.api == Api::kBlockSparse) {
      const SparseOracle o = sparse_oracle(c.sparse, q, k, v, c.backward ? &dout : nullptr);
      ref_out = o.out;
      ref_lse = o.lse;
      ref_dq = o.dq;
      ref_dk = o.dk;
      ref_dv = o.dv;
    } else {
      Tensor fo(c.dtype, {c.B, N, c.H, c.D}), fl(DType::kF32, {c.B, c.H, N});
      const Problem p = make_problem(cfg, q.view(), k.view(), v.view(), fo.view(), fl.view(),
                                     1 << 20, "reference");
      const ReferenceResult r = reference_forward(p);
      ref_out = r.out;
      ref_lse = r.lse;
      if (c.backward) {
        reference_forward_into(p);
        Tensor a(c.dtype, {c.B, N, c.H, c.D}), b2(c.dtype, {c.B, N, c.Hkv, c.D}),
            c2(c.dtype, {c.B, N, c.Hkv, c.D});
        const ReferenceGrads g = reference_backward(
            make_backward_problem(cfg, dout.view(), q.view(), k.view(), v.view(), fo.view(),
                                  fl.view(), a.view(), b2.view(), c2.view(), 1 << 20, "reference"));
        ref_dq = g.dq;
        ref_dk = g.dk;
        ref_dv = g.dv;
      }
    }
    const double tol = c.dtype == DType::kF32 ? 3e-5 : c.dtype == DType::kF16 ? 8e-3 : 6e-2;
    std::string bad = compare(out, ref_out, row0, N, c.H, tol, "out");
    if (bad.empty()) bad = compare_l(lse, ref_lse, row0, N, "lse");
    if (bad.empty() && c.backward) {
      // Gradients: a looser bound for low precision (sums of rounded products).
      const double gtol = c.dtype == DType::kF32 ? 1e-4 : c.dtype == DType::kF16 ? 2e-2 : 1.5e-1;
      bad = compare(dq, ref_dq, row0, N, c.H, gtol, "dq");
      if (bad.empty()) bad = compare(dk, ref_dk, row0, N, c.Hkv, gtol, "dk");
      if (bad.empty()) bad = compare(dv, ref_dv, row0, N, c.Hkv, gtol, "dv");
    }
    return bad;
  }

 private:
  // The CPU backend against the reference backend on the same (odd) views.
  std::string run_unspec(const DilatedConfig& cfg, const ExecOptions& opt, const TensorView& q,
                         const TensorView& k, const TensorView& v, const TensorView& out,
                         const TensorView& lse, std::string& outcome) {
    std::optional<Error> cpu_error, ref_error;
    try {
      DilatedAttention(cfg, opt).forward(q, k, v, out, lse);
    } catch (const Error& e) {
      cpu_error = e;
    }
    outcome = cpu_error ? "error" : "ok";
    ExecOptions ref_opt = opt;
    if (opt.backend == Backend::kCpu) ref_opt.backend = Backend::kReference;
    try {
      DilatedAttention(cfg, ref_opt).forward(q, k, v, out, lse);
    } catch (const Error& e) {
      ref_error = e;
    }
    if (opt.backend != Backend::kCpu) return "";  // the same call twice: no oracle
    if (cpu_error.has_value() != ref_error.has_value()) {
      return std::string("cpu and reference backends disagree: ") +
             (cpu_error ? cpu_error->what() : "cpu ok") + " / " +
             (ref_error ? ref_error->what() : "reference ok");
    }
    // The same code, unless one side met a limit of its own backend (devices it runs on).
    const auto own_limit = [](const Error& e) {
      return e.code() == ErrorCode::kUnsupported || e.code() == ErrorCode::kDevice ||
             std::string(e.what()).find("CUDA") != std::string::npos;
    };
    if (cpu_error && cpu_error->code() != ref_error->code() && !own_limit(*cpu_error) &&
        !own_limit(*ref_error)) {
      return std::string("different codes: ") + cpu_error->what() + " / " + ref_error->what();
    }
    return "";
  }

  std::string run_multihead(const FuzzCase& c, Mutation m, const DilatedConfig& cfg,
                            const ExecOptions& opt, std::string& outcome) {
    MultiheadConfig mc;
    mc.num_heads = c.H;
    mc.embed_dim = c.H * c.D;
    mc.attention = cfg;
    std::vector<float> x(static_cast<size_t>(c.B * c.n_loc * mc.embed_dim));
    std::mt19937 rng(5);
    std::normal_distribution<float> dist;
    for (float& e : x) e = dist(rng);
    std::vector<float> y(x.size(), std::numeric_limits<float>::quiet_NaN()), y_ref(x.size());
    const TensorView xv =
        TensorView::contiguous(x.data(), DType::kF32, {c.B, c.n_loc, mc.embed_dim});
    TensorView yv = TensorView::contiguous(y.data(), DType::kF32, {c.B, c.n_loc, mc.embed_dim});
    if (m == Mutation::kOutIsQ) yv = xv;
    if (m == Mutation::kNdim) yv.ndim = 2;
    if (m == Mutation::kNullData) yv.data = nullptr;
    std::optional<Error> error;
    try {
      const MultiheadDilatedAttention layer(mc, 3, opt);
      layer.forward(xv, yv);
      ExecOptions ref = opt;
      ref.backend = Backend::kReference;
      const MultiheadDilatedAttention oracle(mc, 3, ref);
      oracle.forward(
          xv, TensorView::contiguous(y_ref.data(), DType::kF32, {c.B, c.n_loc, mc.embed_dim}));
    } catch (const Error& e) {
      error = e;
    }
    if (c.judge == Judge::kError) {
      outcome = error ? "error" : "no error";
      if (!error) return "expected an Error, got none";
      return "";  // (codes vary with the mutation: any Error is right here)
    }
    outcome = error ? "error" : "ok";
    if (error) return std::string("a valid input failed: ") + error->what();
    double worst = 0.0, max_ref = 0.0;
    for (size_t i = 0; i < y.size(); ++i) {
      if (!std::isfinite(y[i])) return "y has a non-finite (unwritten?) value";
      worst = std::max(worst, static_cast<double>(std::abs(y[i] - y_ref[i])));
      max_ref = std::max(max_ref, static_cast<double>(std::abs(y_ref[i])));
    }
    if (worst > 1e-4 * std::max(1.0, max_ref))
      return "y differs from the reference layer by " + std::to_string(worst);
    return "";
  }

  // This rank's rows [row0, row0 + rows) of a [B, N, heads, D] result against ref (whole).
  static std::string compare(const Tensor& x, const std::vector<double>& ref, int64_t row0,
                             int64_t N, int64_t heads, double tol, const char* name) {
    const TensorView v = x.view();
    double worst = 0.0, max_ref = 0.0;
    for (int64_t b = 0; b < v.shape[0]; ++b)
      for (int64_t n = 0; n < v.shape[1]; ++n)
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t d = 0; d < v.shape[3]; ++d) {
            const double a = x.get(b, n, h, d);
            const double r =
                ref[static_cast<size_t>(((b * N + row0 + n) * heads + h) * v.shape[3] + d)];
            if (!std::isfinite(a))
              return std::string(name) + " has a non-finite (unwritten?) value";
            worst = std::max(worst, std::abs(a - r));
            max_ref = std::max(max_ref, std::abs(r));
          }
    if (worst > tol * std::max(1.0, max_ref)) {
      return std::string(name) + " differs from the reference by " + std::to_string(worst) +
             " (max |ref| " + std::to_string(max_ref) + ")";
    }
    return "";
  }
  static std::string compare_l(const Tensor& x, const std::vector<double>& ref, int64_t row0,
                               int64_t N, const char* name) {
    const TensorView v = x.view();
    for (int64_t b = 0; b < v.shape[0]; ++b)
      for (int64_t h = 0; h < v.shape[1]; ++h)
        for (int64_t n = 0; n < v.shape[2]; ++n) {
          const double a = x.get(b, h, n),
                       r = ref[static_cast<size_t>((b * v.shape[1] + h) * N + row0 + n)];
          if (std::isinf(r) ? a != r : !(std::abs(a - r) <= 1e-3 * std::max(1.0, std::abs(r)))) {
            return std::string(name) + " differs from the reference: " + std::to_string(a) +
                   " vs " + std::to_string(r);
          }
        }
    return "";
  }

  Communicator& comm_;
};

}  // namespace
}  // namespace ringattn::test

int main(int argc, char** argv) {
  using namespace ringattn;
  using namespace ringattn::test;
  double seconds = 60;
  int64_t max_cases = -1;
  uint64_t seed = 1;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    if (a == "--cases" && i + 1 < argc) max_cases = std::atoll(argv[++i]);
    if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    if (a == "--verbose") verbose = true;
  }
  if (std::getenv("RINGATTN_TIMEOUT_S") == nullptr) setenv("RINGATTN_TIMEOUT_S", "30", 1);
#if defined(RINGATTN_HAVE_MPI)
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD);
#else
  std::unique_ptr<Communicator> comm = make_self_communicator();
#endif
  const int rank = comm->rank(), P = comm->size();
  Runner runner(*comm);
  std::map<std::string, int64_t> counts;
  int64_t failures = 0, cases = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0;; ++i) {
    // Every rank runs the same cases: rank 0's clock decides when to stop.
    int64_t go =
        (max_cases < 0 || i < max_cases) &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds;
    comm->broadcast(&go, sizeof(go), 0);
    if (!go) break;
    const FuzzCase c = make_case(seed, i, P);
    std::string outcome;
    std::string bad;
    try {
      bad = runner.run(c, outcome);
    } catch (const std::exception& e) {
      bad = std::string("escaped: ") + e.what();
    }
    // All ranks threw, or none: an "error" on some ranks only is a failure.
    int64_t threw = outcome == "error" ? 1 : 0, all = threw;
    comm->allreduce_sum(&all, 1);
    if (all != 0 && all != P && bad.empty()) bad = "some ranks threw and others did not";
    ++counts[std::string(api_name(c.api)) + " " + judge_name(c.judge) + " " + outcome];
    if (!bad.empty()) {
      ++failures;
      std::fprintf(stderr, "[rank %d] FAIL case %lld (%s): %s\n", rank, static_cast<long long>(i),
                   describe(c).c_str(), bad.c_str());
    } else if (verbose && rank == 0) {
      std::fprintf(stderr, "case %lld %s: %s\n", static_cast<long long>(i), describe(c).c_str(),
                   outcome.c_str());
    }
    ++cases;
  }
  int64_t total_failures = failures;
  comm->allreduce_sum(&total_failures, 1);
  if (rank == 0) {
    std::printf("# ringattn_fuzz: %lld cases on %d rank(s), seed %llu, %.0f s\n",
                static_cast<long long>(cases), P, static_cast<unsigned long long>(seed),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    for (const auto& [k, n] : counts)
      std::printf("  %-34s %8lld\n", k.c_str(), static_cast<long long>(n));
    std::printf("# failures: %lld\n", static_cast<long long>(total_failures));
  }
  comm.reset();
#if defined(RINGATTN_HAVE_MPI)
  MPI_Finalize();
#endif
  return total_failures == 0 ? 0 : 1;
}
