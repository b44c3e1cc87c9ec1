#include "bench/multihead_bench.h"

#include <cblas.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bench/ring_bench.h"
#include "ringattn/distributed.h"
#ifdef RINGATTN_HAVE_MPI
#include "ringattn/comm_mpi.h"
#endif
#include "bench/tensors.h"
#include "ringattn/multihead.h"

namespace ringattn::bench {
namespace {

constexpr uint64_t kWeightSeed = 1;
constexpr std::chrono::milliseconds kBlasIdle{250};
// y of the layer against the layer with the reference attention (or the single-process
// layer): fp32 differences in the attention, carried through the LayerNorm and projection.
constexpr Tolerance kLayerTolerance{1e-4, 1e-4};

MultiheadConfig layer_config(const DilatedShape& s) {
  MultiheadConfig c;
  c.embed_dim = s.heads * s.head_dim;
  c.num_heads = s.heads;
  c.kv_heads = s.kv_heads;
  c.attention = s.config();
  return c;
}

// A layer's [B, rows, E] tensors: x (and dy for backward) filled with the values the
// whole-sequence tensors hold in those rows; y (and dx) written by the layer.
struct LayerTensors {
  LayerTensors(const DilatedShape& s, RowRange rows, bool backward, int threads)
      : e(s.heads * s.head_dim), x(size(s, rows)), y(x.size()) {
    fill(s, rows, x, 10, threads);
    if (backward) {
      dy.resize(x.size());
      dx.resize(x.size());
      fill(s, rows, dy, 11, threads);
    }
    const int64_t b = s.batch, n = rows.count;
    const auto view = [&](std::vector<float>& v) {
      return TensorView::contiguous(v.data(), DType::kF32, {b, n, e});
    };
    xv = view(x);
    yv = view(y);
    dyv = view(dy);
    dxv = view(dx);
  }
  size_t bytes() const { return (x.size() + y.size() + dy.size() + dx.size()) * sizeof(float); }

  int64_t e;
  std::vector<float> x, y, dy, dx;
  TensorView xv, yv, dyv, dxv;

 private:
  static size_t size(const DilatedShape& s, RowRange rows) {
    return static_cast<size_t>(s.batch * rows.count * s.heads * s.head_dim);
  }
  static void fill(const DilatedShape& s, RowRange rows, std::vector<float>& v, int id,
                   int threads) {
    fill_normal(TensorView::contiguous(v.data(), DType::kF32,
                                       {s.batch, rows.count, 1, s.heads * s.head_dim}),
                id, s.seq, rows, threads);
  }
};

// The projections' FLOPs of a forward: q and out [E x E], k and v [E x Hkv*D], per token.
double projection_flops(const DilatedShape& s) {
  const double e = static_cast<double>(s.heads * s.head_dim);
  const double ekv = static_cast<double>(s.kv_heads * s.head_dim);
  return 2.0 * static_cast<double>(s.batch * s.seq) * e * (2.0 * e + 2.0 * ekv);
}

// Attention (SPEC.md's count, backward 2.5x) plus projections (backward: dW and dX, 2x).
void set_layer_rates(Record& r, const DilatedShape& s) {
  const double seconds = r.timing.mean_ms * 1e-3;
  const double flops =
      (r.backward ? 2.5 : 1.0) * forward_flops(s) + (r.backward ? 2.0 : 1.0) * projection_flops(s);
  r.tokens_per_s = static_cast<double>(s.batch * s.seq) / seconds;
  r.gflops = flops / seconds * 1e-9;
}

// C[m, n] = op(A) op(B), row-major: op(A) = A [m, k] or A^T (A [k, m]) with trans_a, op(B) =
// B [k, n] or B^T (B [n, k]) with trans_b.
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
           const float* b, float* c) {
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, i(m), i(n), i(k), 1.0f, a, i(trans_a ? m : k), b,
              i(trans_b ? k : n), 0.0f, c, i(n));
}

// The projection GEMMs of one forward (4) or backward (8) on the row's shapes, through the
// BLAS of the build, into scratch buffers.
class ProjectionGemms {
 public:
  ProjectionGemms(const DilatedShape& s, const LayerTensors& t, const MultiheadWeights& w)
      : rows_(s.batch * s.seq),
        e_(t.e),
        ekv_(s.kv_heads * s.head_dim),
        t_(t),
        w_(w),
        act_(static_cast<size_t>(rows_ * e_)),
        act2_(act_.size()),
        grad_(w.wq.size()) {}

  void forward() {
    sgemm(false, true, rows_, e_, e_, t_.x.data(), w_.wq.data(), act_.data());     // q
    sgemm(false, true, rows_, ekv_, e_, t_.x.data(), w_.wk.data(), act2_.data());  // k
    sgemm(false, true, rows_, ekv_, e_, t_.x.data(), w_.wv.data(), act2_.data());  // v
    sgemm(false, true, rows_, e_, e_, act_.data(), w_.wo.data(), act2_.data());    // y
  }
  void backward() {
    const float* dy = t_.dy.data();
    sgemm(true, false, e_, e_, rows_, dy, act_.data(), grad_.data());    // dWo = dy^T o
    sgemm(false, false, rows_, e_, e_, dy, w_.wo.data(), act2_.data());  // do = dy Wo
    const struct {
      const std::vector<float>& w;
      int64_t f;
    } inputs[] = {{w_.wq, e_}, {w_.wk, ekv_}, {w_.wv, ekv_}};
    for (const auto& p : inputs) {
      sgemm(true, false, p.f, e_, rows_, act2_.data(), t_.x.data(), grad_.data());  // dW
      sgemm(false, false, rows_, e_, p.f, act2_.data(), p.w.data(), act_.data());   // dX
    }
  }

 private:
  int64_t rows_, e_, ekv_;
  const LayerTensors& t_;
  const MultiheadWeights& w_;
  std::vector<float> act_, act2_, grad_;
};

// Elements of `got` (rows [row0, row0 + rows) of every batch, or all of batch 0 when
// `batches` = 1) outside kLayerTolerance of `ref` ([B, N, E]).
int64_t count_wrong_rows(const std::vector<float>& got, const std::vector<float>& ref,
                         const DilatedShape& s, int64_t batches, int64_t row0, int64_t rows) {
  const int64_t e = s.heads * s.head_dim;
  int64_t wrong = 0;
  for (int64_t b = 0; b < batches; ++b) {
    for (int64_t i = 0; i < rows * e; ++i) {
      wrong += within(got[static_cast<size_t>(b * rows * e + i)],
                      ref[static_cast<size_t>((b * s.seq + row0) * e + i)], kLayerTolerance)
                   ? 0
                   : 1;
    }
  }
  return wrong;
}

}  // namespace

void validate_layer(const DilatedShape& s, const RunOptions& options, const std::string& impl,
                    int ranks) {
  if (s.dtype != DType::kF32) {
    throw std::invalid_argument(format("--impl %s computes in fp32; use --dtype fp32, not %s",
                                       impl.c_str(), dtype_name(s.dtype)));
  }
  if (options.backend == Backend::kCuda) {
    throw std::invalid_argument(format(
        "--impl %s times host tensors; the layer on CUDA tensors is not benchmarked yet (its "
        "tests are MultiheadCuda.*): use --backend cpu, or --impl dilated for the GPU",
        impl.c_str()));
  }
  if (impl == "distributed") {
    const int t = options.head_ranks;
    if (ranks % t != 0 || s.heads % t != 0 || s.kv_heads % t != 0) {
      throw std::invalid_argument(
          format("--head-ranks %d must divide the rank count (%d), H (%lld) and Hkv (%lld)", t,
                 ranks, static_cast<long long>(s.heads), static_cast<long long>(s.kv_heads)));
    }
    validate_ring(s, options, ranks / t);
  }
  layer_config(s).validate();
}

Record run_multihead(const DilatedShape& s, const RunOptions& options,
                     nlohmann::ordered_json& extra) {
  const MultiheadConfig config = layer_config(s);
  const ExecOptions exec = exec_options(options);
  const MultiheadDilatedAttention layer(config, kWeightSeed, exec);
  const PeakMemory memory;
  LayerTensors t(s, {0, s.seq}, options.backward, options.threads);
  MultiheadSaved saved;
  MultiheadWeights grads;
  Record r = describe(s, options, "multihead");
  const auto run_layer = [&] {
    if (options.backward) {
      layer.backward(t.xv, t.dyv, saved, t.dxv, grads);
    } else {
      layer.forward(t.xv, t.yv, &saved);
    }
  };
  if (options.backward) layer.forward(t.xv, t.yv, &saved);
  r.timing = time_calls(run_layer, options.warmup, options.iters);
  r.peak_mb = memory.peak_mb();
  r.io_mb = static_cast<double>(t.bytes() + saved.bytes()) / kMiB;
  set_layer_rates(r, s);

  // The attention core alone, on the layer's own q, k, v (and, for backward, gradients).
  const DilatedAttention core(s.config(), exec);
  const int64_t b = s.batch, n = s.seq, h = s.heads, hkv = s.kv_heads, d = s.head_dim;
  const auto bnhd = [&](std::vector<float>& v, int64_t heads) {
    return TensorView::contiguous(v.data(), DType::kF32, {b, n, heads, d});
  };
  const TensorView q = bnhd(saved.q_n, h), k = bnhd(saved.k_n, hkv), v = bnhd(saved.v, hkv),
                   out = bnhd(saved.attn, h),
                   lse = TensorView::contiguous(saved.lse.data(), DType::kF32, {b, h, n});
  std::vector<float> dout, dq, dk, dv;  // the core's gradients (backward)
  if (options.backward) {
    dout.assign(saved.attn.size(), 1e-3f);
    dq.resize(dout.size());
    dk.resize(saved.k.size());
    dv.resize(dk.size());
  }
  const auto run_core = [&] {
    if (options.backward) {
      core.backward(bnhd(dout, h), q, k, v, out, lse, bnhd(dq, h), bnhd(dk, hkv), bnhd(dv, hkv));
    } else {
      core.forward(q, k, v, out, lse);
    }
  };
  ProjectionGemms gemms(s, t, layer.weights());
  const auto run_gemms = [&] { options.backward ? gemms.backward() : gemms.forward(); };
  // Rounds of (layer, core, GEMMs), one call each, so that the three see the same load on a
  // shared machine; the ratio is the median of the rounds'.
  time_calls(run_core, options.warmup, 1);
  time_calls(run_gemms, options.warmup, 1);
  double core_ms = 0.0, gemm_ms = 0.0;
  std::vector<double> ratios;
  for (int round = 0; round < options.iters; ++round) {
    const double layer_round = time_calls(run_layer, 0, 1).mean_ms;
    const double core_round = time_calls(run_core, 0, 1).mean_ms;
    const double gemm_round = time_calls(run_gemms, 0, 1).mean_ms;
    // OpenBLAS's worker threads spin for ~0.1 s after a call (THREAD_TIMEOUT): let them go
    // idle before the next round's layer call (the layer runs BLAS on its OpenMP threads).
    std::this_thread::sleep_for(kBlasIdle);
    core_ms += core_round / options.iters;
    gemm_ms += gemm_round / options.iters;
    ratios.push_back(layer_round / (core_round + 1.2 * gemm_round));
  }
  std::sort(ratios.begin(), ratios.end());
  const size_t mid = ratios.size() / 2;
  extra["rounds"] = options.iters;
  extra["core_ms"] = core_ms;
  extra["gemm_ms"] = gemm_ms;
  extra["overhead_ratio"] = ratios.size() % 2 ? ratios[mid] : 0.5 * (ratios[mid - 1] + ratios[mid]);

  if (options.check && options.backward) {
    std::printf(
        "# multihead %s: --check covers the forward; the layer's gradients are "
        "checked by the tests (tests/unit/test_multihead.cc)\n",
        s.name.c_str());
  } else if (options.check) {
    // Batch 0 against the same layer with the reference attention (fp64 loops).
    const MultiheadDilatedAttention ref(config, kWeightSeed, {Backend::kReference, 0});
    TensorView x0 = t.xv, y0 = t.yv;
    std::vector<float> ref_y(t.y.size());
    TensorView ref_y0 = TensorView::contiguous(ref_y.data(), DType::kF32, {1, s.seq, t.e});
    x0.shape[0] = y0.shape[0] = 1;
    ref.forward(x0, ref_y0);
    r.wrong = count_wrong_rows(t.y, ref_y, s, 1, 0, s.seq);
  }
  return r;
}

Record run_distributed(const DilatedShape& s, const RunOptions& options, Communicator& comm) {
  const MultiheadConfig config = layer_config(s);
  const ExecOptions exec = exec_options(options);
  // The sequence and head groups: the whole world and one rank, or a grid.
  std::unique_ptr<Communicator> seq_owned, head_owned;
  if (options.head_ranks == 1) {
    head_owned = make_self_communicator();
  } else {
#ifdef RINGATTN_HAVE_MPI
    MpiGrid grid = make_mpi_grid(MPI_COMM_WORLD, options.head_ranks);
    seq_owned = std::move(grid.seq);
    head_owned = std::move(grid.head);
#else
    throw std::invalid_argument("--head-ranks > 1 needs a build with MPI");
#endif
  }
  Communicator& seq = seq_owned ? *seq_owned : comm;
  DistributedDilatedAttention layer(config, seq, *head_owned, kWeightSeed, {}, exec);
  const int64_t rows = s.seq / seq.size(), row0 = seq.rank() * rows;
  const PeakMemory memory;
  LayerTensors t(s, {row0, rows}, options.backward, options.threads);
  MultiheadSaved saved;
  MultiheadWeights grads;
  Record r = describe(s, options, "distributed");
  r.ranks = comm.size();
  if (options.backward) layer.forward(t.xv, t.yv, &saved);
  double wait_ms = 0.0;
  int calls = 0;
  r.timing = time_calls(
      [&] {
        if (options.backward) {
          layer.backward(t.xv, t.dyv, saved, t.dxv, grads);
        } else {
          layer.forward(t.xv, t.yv, &saved);
        }
        if (++calls > options.warmup) wait_ms += layer.ring_stats().comm_wait_ms;
      },
      options.warmup, options.iters, &comm);
  // The largest over the ranks, in integers: peak kB, bytes, messages, wait ns.
  std::array<int64_t, 4> most = {std::llround(memory.peak_mb() * 1024.0),
                                 layer.ring_stats().bytes_sent, layer.ring_stats().messages_sent,
                                 std::llround(wait_ms / options.iters * 1e6)};
  comm.allreduce_max(most.data(), most.size());
  int64_t bytes_total = layer.ring_stats().bytes_sent;
  comm.allreduce_sum(&bytes_total, 1);
  r.peak_mb = static_cast<double>(most[0]) / 1024.0;
  r.io_mb = static_cast<double>(t.bytes() + saved.bytes()) / kMiB;
  r.bytes_sent = most[1];
  r.messages_sent = most[2];
  r.comm_wait_ms = static_cast<double>(most[3]) * 1e-6;
  r.bytes_sent_total = bytes_total;
  set_layer_rates(r, s);

  if (options.check && options.backward) {
    if (comm.rank() == 0) {
      std::printf(
          "# distributed %s: --check covers the forward; the layer's gradients are "
          "checked by the tests (tests/dist/test_distributed.cc)\n",
          s.name.c_str());
    }
  } else if (options.check) {
    // This rank's rows against the single-process layer over the whole sequence.
    const MultiheadDilatedAttention whole(config, kWeightSeed, exec);
    LayerTensors full(s, {0, s.seq}, false, options.threads);
    whole.forward(full.xv, full.yv);
    int64_t wrong = count_wrong_rows(t.y, full.y, s, s.batch, row0, rows);
    comm.allreduce_sum(&wrong, 1);
    r.wrong = wrong;
  }
  return r;
}

void print_layer_overhead(const Record& r, const nlohmann::ordered_json& extra) {
  std::printf(
      "# %s %s %s: %d rounds of (layer, core, %d projection GEMMs through the same BLAS): core "
      "%.3f ms, GEMMs %.3f ms (means); median of layer / (core + 1.2 x GEMMs) = %.3f (target "
      "<= 1)\n",
      r.impl.c_str(), r.config.c_str(), r.backward ? "bwd" : "fwd",
      static_cast<int>(extra["rounds"].get<int64_t>()), r.backward ? 8 : 4,
      extra["core_ms"].get<double>(), extra["gemm_ms"].get<double>(),
      extra["overhead_ratio"].get<double>());
}

}  // namespace ringattn::bench
