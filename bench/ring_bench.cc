#include "bench/ring_bench.h"

#include <array>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

#include "bench/tensors.h"
#ifdef RINGATTN_HAVE_CUDA
#include "bench/cuda_bench.h"
#endif

#include "src/backend/ref/tensor_access.h"

namespace ringattn::bench {
namespace {

// Elements of this rank's rows of out and lse outside tolerance of DilatedAttention (cpu)
// over the whole sequence, which this rank computes itself; summed over the ranks.
int64_t count_wrong(const DilatedShape& s, const RunOptions& options, const Tensors& shard,
                    Communicator& comm) {
  const Tensors full(s, {0, s.seq}, options.threads);
  const Views& f = full.views();
  ExecOptions single = exec_options(options);
  single.backend = Backend::kCpu;
  DilatedAttention(s.config(), single).forward(f.q, f.k, f.v, f.out, f.lse);

  const Views& x = shard.views();
  const RowRange rows = shard.rows();
  const Tolerance out_tol = out_tolerance(s.dtype);
  const int64_t row_elements = s.heads * s.head_dim;
  int64_t wrong = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t n = 0; n < rows.count; ++n) {
      const int64_t at = (b * rows.count + n) * row_elements;
      const int64_t ref_at = (b * s.seq + rows.begin + n) * row_elements;
      for (int64_t e = 0; e < row_elements; ++e) {
        wrong += within(load_f32(x.out.data, s.dtype, at + e),
                        load_f32(f.out.data, s.dtype, ref_at + e), out_tol)
                     ? 0
                     : 1;
      }
    }
  }
  const float* lse = static_cast<const float*>(x.lse.data);
  const float* ref_lse = static_cast<const float*>(f.lse.data);
  for (int64_t bh = 0; bh < s.batch * s.heads; ++bh) {
    for (int64_t n = 0; n < rows.count; ++n) {
      wrong += within(lse[bh * rows.count + n], ref_lse[bh * s.seq + rows.begin + n], kLseTolerance)
                   ? 0
                   : 1;
    }
  }
  comm.allreduce_sum(&wrong, 1);
  return wrong;
}

}  // namespace

void validate_ring(const DilatedShape& s, const RunOptions& options, int ranks) {
  if (s.seq % ranks != 0) {
    throw std::invalid_argument(
        format("--impl ring: the %s row's N = %lld does not split into "
               "%d equal shards; use a multiple of the rank count",
               s.name.c_str(), static_cast<long long>(s.seq), ranks));
  }
  if (options.backend == Backend::kReference) {
    throw std::invalid_argument("--impl ring runs on --backend cpu or cuda, not reference");
  }
}

Record time_sharded(const DilatedShape& s, const RunOptions& options, Communicator& comm,
                    const char* impl, const ShardedCalls& calls) {
  const int64_t rows = s.seq / comm.size();
  const PeakMemory memory;
  const Tensors tensors(s, {comm.rank() * rows, rows}, options.threads);
  const Views& v = tensors.views();

  std::optional<Gradients> g;
  if (options.backward) {
    g.emplace(s, RowRange{comm.rank() * rows, rows}, options.threads);
    calls.forward(v);
  }

  std::vector<RingStats> stats;  // one per call, warm-up calls first
  stats.reserve(static_cast<size_t>(options.warmup + options.iters));
  Record r = describe(s, options, impl);
  r.ranks = comm.size();
  r.timing = time_calls(
      [&] {
        if (g) {
          calls.backward(v, *g);
        } else {
          calls.forward(v);
        }
        stats.push_back(calls.stats());
      },
      options.warmup, options.iters, &comm);

  double wait_ms = 0.0;
  for (size_t i = static_cast<size_t>(options.warmup); i < stats.size(); ++i) {
    wait_ms += stats[i].comm_wait_ms;
  }
  wait_ms /= options.iters;
  // The largest over the ranks, in integers: peak kB, bytes, messages, wait ns.
  std::array<int64_t, 4> most = {std::llround(memory.peak_mb() * 1024.0), stats.back().bytes_sent,
                                 stats.back().messages_sent, std::llround(wait_ms * 1e6)};
  comm.allreduce_max(most.data(), most.size());
  int64_t bytes_total = stats.back().bytes_sent;
  comm.allreduce_sum(&bytes_total, 1);

  r.peak_mb = static_cast<double>(most[0]) / 1024.0;
  r.io_mb = static_cast<double>(tensors.bytes() + (g ? g->bytes() : 0)) / kMiB;
  r.bytes_sent = most[1];
  r.messages_sent = most[2];
  r.comm_wait_ms = static_cast<double>(most[3]) * 1e-6;
  r.bytes_sent_total = bytes_total;
  set_rates(r, s);
  if (options.check && calls.check) r.wrong = calls.check(tensors, g ? &*g : nullptr);
  return r;
}

Record run_ring(const DilatedShape& s, const RunOptions& options, Communicator& comm) {
  RingDilatedAttention attention(s.config(), comm, exec_options(options));
  // --backend cuda: the shard's tensors copied to the current GPU once, before the timing.
#ifdef RINGATTN_HAVE_CUDA
  std::unique_ptr<DeviceViews> device;
  const void* device_of = nullptr;  // the host q the device copies were made from
#endif
  const auto on_device = [&](const Views& v) -> const Views& {
#ifdef RINGATTN_HAVE_CUDA
    if (options.backend == Backend::kCuda) {
      if (v.q.data != device_of) {
        device = std::make_unique<DeviceViews>(v);
        device_of = v.q.data;
      }
      return device->views();
    }
#endif
    return v;
  };
  ShardedCalls calls;
  calls.forward = [&](const Views& v) {
    const Views& x = on_device(v);
    attention.forward(x.q, x.k, x.v, x.out, x.lse);
  };
  calls.backward = [&](const Views& v, const Gradients& g) {
    const Views& x = on_device(v);
#ifdef RINGATTN_HAVE_CUDA
    if (device) {
      const std::array<TensorView, 4>& d = device->gradients(g);
      attention.backward(d[0], x.q, x.k, x.v, x.out, x.lse, d[1], d[2], d[3]);
      return;
    }
#endif
    attention.backward(g.dout, x.q, x.k, x.v, x.out, x.lse, g.dq, g.dk, g.dv);
  };
  calls.stats = [&] { return attention.last_stats(); };
  calls.check = [&](const Tensors& tensors, const Gradients* g) -> std::optional<int64_t> {
    if (g) {
      if (comm.rank() == 0) {
        std::printf(
            "# ring %s: --check covers the forward; the ring backward is checked by the "
            "tests (tests/dist/test_ring.cc)\n",
            s.name.c_str());
      }
      return std::nullopt;
    }
    const size_t full = Tensors::full_bytes(s);
#ifdef RINGATTN_HAVE_CUDA
    if (device) device->download_outputs(tensors.views());
#endif
    if (full <= kRingCheckMaxBytes) return count_wrong(s, options, tensors, comm);
    if (comm.rank() == 0) {
      std::printf(
          "# ring %s: --check skipped: the whole-sequence tensors (%.0f MiB) exceed %zu "
          "MiB\n",
          s.name.c_str(), static_cast<double>(full) / kMiB, kRingCheckMaxBytes >> 20);
    }
    return std::nullopt;
  };
  return time_sharded(s, options, comm, "ring", calls);
}

}  // namespace ringattn::bench
