#include "bench/blocksparse_bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>

#include "bench/ring_bench.h"
#include "bench/tensors.h"

#include "src/backend/ref/tensor_access.h"

namespace ringattn::bench {
namespace {

BlockSparseConfig local_window(const DilatedShape& s, int64_t bs, int64_t window_blocks) {
  return {{BlockPattern::local_window(bs, window_blocks * bs)}, s.causal, std::nullopt};
}

// The local window (in blocks each side) whose density is closest to `target`.
int64_t window_for(const DilatedShape& s, int64_t bs, double target) {
  int64_t best = 0;
  double best_gap = std::numeric_limits<double>::infinity();
  for (int64_t w = 0; w < s.seq / bs; ++w) {
    const double gap =
        std::abs(block_sparse_density(local_window(s, bs, w), s.seq, s.heads) - target);
    if (gap < best_gap) {
      best_gap = gap;
      best = w;
    }
  }
  return best;
}

// Forward FLOPs: 4 * D per computed (query, key) pair, over heads and batch.
double sparse_flops(const DilatedShape& s, const BlockSparseConfig& cfg) {
  const BlockLayout l = cfg.patterns[0].layout(s.seq);
  const double bs = static_cast<double>(l.block_size);
  double pairs = 0.0;
  for (int64_t qb = 0; qb < l.blocks; ++qb) {
    for (int64_t i = l.row_ptr[qb]; i < l.row_ptr[qb + 1]; ++i) {
      const int64_t kb = l.cols[static_cast<size_t>(i)];
      if (!s.causal || kb < qb) pairs += bs * bs;
      if (s.causal && kb == qb) pairs += bs * (bs + 1.0) / 2.0;
    }
  }
  return 4.0 * static_cast<double>(s.head_dim * s.heads * s.batch) * pairs;
}

// Elements of out and lse outside tolerance at 32 query rows spread over the sequence (batch
// 0, every head), against fp64 masked attention over the keys the layout lists. One rank.
int64_t count_wrong_sampled(const DilatedShape& s, const BlockSparseConfig& cfg, const Views& v) {
  const BlockLayout l = cfg.patterns[0].layout(s.seq);
  const int64_t N = s.seq, H = s.heads, Hkv = s.kv_heads, D = s.head_dim, bs = l.block_size;
  const double scale = 1.0 / std::sqrt(static_cast<double>(static_cast<float>(D)));
  const Tolerance tol = out_tolerance(s.dtype);
  std::vector<double> score(static_cast<size_t>(N)), acc(static_cast<size_t>(D));
  int64_t wrong = 0;
  for (int64_t i = 0; i < 32; ++i) {
    const int64_t n = (i * (N / 32) + i * 37) % N, qb = n / bs;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hkv);
      std::vector<int64_t> keys;
      for (int64_t x = l.row_ptr[qb]; x < l.row_ptr[qb + 1]; ++x) {
        const int64_t kb = l.cols[static_cast<size_t>(x)];
        for (int64_t key = kb * bs; key < (kb + 1) * bs; ++key) {
          if (!s.causal || key <= n) keys.push_back(key);
        }
      }
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t key : keys) {
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          dot += double{load_f32(v.q.data, s.dtype, (n * H + h) * D + d)} *
                 load_f32(v.k.data, s.dtype, (key * Hkv + hk) * D + d);
        }
        score[static_cast<size_t>(key)] = dot * static_cast<float>(scale);
        mx = std::max(mx, score[static_cast<size_t>(key)]);
      }
      double sum = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t key : keys) {
        const double p = std::exp(score[static_cast<size_t>(key)] - mx);
        sum += p;
        for (int64_t d = 0; d < D; ++d) {
          acc[static_cast<size_t>(d)] += p * load_f32(v.v.data, s.dtype, (key * Hkv + hk) * D + d);
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        const double ref = keys.empty() ? 0.0 : acc[static_cast<size_t>(d)] / sum;
        wrong += within(load_f32(v.out.data, s.dtype, (n * H + h) * D + d), ref, tol) ? 0 : 1;
      }
      const double lse =
          keys.empty() ? -std::numeric_limits<double>::infinity() : mx + std::log(sum);
      wrong += within(static_cast<const float*>(v.lse.data)[h * N + n], lse, kLseTolerance) ? 0 : 1;
    }
  }
  return wrong;
}

}  // namespace

void validate_blocksparse(const DilatedShape& s, const RunOptions& options,
                          const SparseOptions& sparse, int ranks) {
  if (options.backend != Backend::kCpu) {
    throw std::invalid_argument(format("--impl blocksparse runs on --backend cpu only, not %s",
                                       backend_name(options.backend)));
  }
  if (sparse.block_size < 1 || s.seq % ranks != 0 || (s.seq / ranks) % sparse.block_size != 0) {
    throw std::invalid_argument(
        format("--impl blocksparse: N = %lld must split into %d equal shards of whole "
               "--block-size %lld blocks; use N a multiple of %lld",
               static_cast<long long>(s.seq), ranks, static_cast<long long>(sparse.block_size),
               static_cast<long long>(ranks * sparse.block_size)));
  }
  for (double d : sparse.densities) {
    if (!(d > 0.0 && d <= 1.0)) {
      throw std::invalid_argument(format("--densities: %g is not in (0, 1]", d));
    }
  }
}

std::vector<MeasuredRow> run_blocksparse(const DilatedShape& shape, const RunOptions& options,
                                         const SparseOptions& sparse, Communicator& comm) {
  DilatedShape dense = shape;
  dense.segments = {shape.seq};
  dense.dilations = {1};
  std::vector<MeasuredRow> rows;
  rows.push_back(
      {comm.size() == 1 ? run_dilated(dense, options) : run_ring(dense, options, comm), "", {}});
  rows.back().record.config = "dense";
  const Timing dense_time = rows.back().record.timing;

  const int64_t bs = sparse.block_size;
  for (double target : sparse.densities) {
    const int64_t w = window_for(shape, bs, target);
    const BlockSparseConfig cfg = local_window(shape, bs, w);
    const double density = block_sparse_density(cfg, shape.seq, shape.heads);
    BlockSparseRingDilatedAttention attention(cfg, comm, exec_options(options));
    ShardedCalls calls;
    calls.forward = [&](const Views& v) { attention.forward(v.q, v.k, v.v, v.out, v.lse); };
    calls.backward = [&](const Views& v, const Gradients& g) {
      attention.backward(g.dout, v.q, v.k, v.v, v.out, v.lse, g.dq, g.dk, g.dv);
    };
    calls.stats = [&] { return attention.last_stats(); };
    std::string check_note;
    calls.check = [&](const Tensors& tensors, const Gradients* g) -> std::optional<int64_t> {
      if (g || comm.size() > 1) {
        check_note = "; --check covers one-rank forward rows (tests check the rest)";
        return std::nullopt;
      }
      return count_wrong_sampled(shape, cfg, tensors.views());
    };
    Record r = time_sharded(shape, options, comm, "blocksparse", calls);
    r.config = format("d=%.3f", density);
    r.mode = "sparse";
    r.segments.clear();
    r.dilations.clear();
    r.gflops =
        (r.backward ? 2.5 : 1.0) * sparse_flops(shape, cfg) / (r.timing.mean_ms * 1e-3) * 1e-9;
    const double ratio = r.timing.mean_ms / dense_time.mean_ms;
    const double min_ratio = r.timing.min_ms / dense_time.min_ms;
    std::string note = format(
        "# blocksparse %s: local_window %lld block(s) each side of bs %lld, density "
        "%.4f: %.3fx the dense time (mean; min %.3fx)%s",
        r.config.c_str(), static_cast<long long>(w), static_cast<long long>(bs), density, ratio,
        min_ratio, check_note.c_str());
    nlohmann::ordered_json extra = {{"density", density},
                                    {"block_size", bs},
                                    {"window_blocks", w},
                                    {"dense_ratio", ratio},
                                    {"dense_ratio_min", min_ratio}};
    rows.push_back({std::move(r), std::move(note), std::move(extra)});
  }
  return rows;
}

}  // namespace ringattn::bench
