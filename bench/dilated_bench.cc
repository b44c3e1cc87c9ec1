#include "bench/dilated_bench.h"

#include <utility>

#include "bench/tensors.h"
#ifdef RINGATTN_HAVE_CUDA
#include "bench/cuda_bench.h"
#endif

#include "src/backend/cpu/attention_cpu.h"
#include "src/backend/cpu/bf16_kernels.h"
#include "src/backend/ref/reference.h"
#include "src/backend/ref/tensor_access.h"
#include "src/plan/problem.h"

namespace ringattn::bench {

DilatedConfig DilatedShape::config() const {
  DilatedConfig c;
  c.segment_lengths = segments;
  c.dilation_rates = dilations;
  c.mode = mode;
  c.causal = causal;
  return c;
}

namespace {

// The presets: DilatedShape's defaults (8 heads of 64, groups) with these fields.
const std::vector<DilatedShape>& presets() {
  const auto shape = [](const char* name, int64_t batch, int64_t seq, std::vector<int64_t> segments,
                        std::vector<int64_t> dilations, bool causal) {
    DilatedShape s;
    s.name = name;
    s.batch = batch;
    s.seq = seq;
    s.segments = std::move(segments);
    s.dilations = std::move(dilations);
    s.causal = causal;
    return s;
  };
  static const std::vector<DilatedShape> table = {
      shape("small", 1, 2048, {1024, 2048}, {1, 2}, true),
      shape("medium", 2, 4096, {1024, 2048, 4096}, {1, 2, 4}, true),
      shape("large", 4, 8192, {2048, 4096, 8192}, {1, 2, 4}, true),
      shape("dense", 1, 8192, {2048}, {1}, false),
      shape("dense-ring", 1, 16384, {16384}, {1}, true),
      shape("1m", 1, 1048576, {2048, 8192, 32768, 131072}, {1, 2, 4, 8}, true),
      shape("sparse", 1, 16384, {16384}, {1}, false)};
  return table;
}

}  // namespace

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const DilatedShape& p : presets()) v.push_back(p.name);
    return v;
  }();
  return names;
}

DilatedShape preset(const std::string& name) {
  if (name == "custom") return DilatedShape{};
  for (const DilatedShape& p : presets()) {
    if (name == p.name) return p;
  }
  throw Error(ErrorCode::kInvalidArgument, "unknown configuration \"" + name + "\"");
}

double forward_flops(const DilatedShape& s) {
  const double d = static_cast<double>(s.head_dim);
  // One head computing branch i with offset o, over all segments of the sequence.
  const auto branch_flops = [&](size_t i, int64_t o) {
    const int64_t segment = s.segments[i], rate = s.dilations[i];
    const double m = static_cast<double>((segment - o + rate - 1) / rate);  // kept rows
    const double per_segment = s.causal ? 2.0 * m * (m + 1.0) * d : 4.0 * m * m * d;
    return static_cast<double>(s.seq / segment) * per_segment;
  };
  const size_t g = s.segments.size();
  double per_batch = 0.0;
  if (s.mode == Mode::kLongNet) {
    for (int64_t h = 0; h < s.heads; ++h) {
      for (size_t i = 0; i < g; ++i) per_batch += branch_flops(i, h % s.dilations[i]);
    }
  } else {
    // Groups of H / G heads, the first H % G one larger; group i: branch i, offset i % r_i.
    const int64_t base = s.heads / static_cast<int64_t>(g);
    const int64_t extra = s.heads % static_cast<int64_t>(g);
    for (size_t i = 0; i < g; ++i) {
      const int64_t group = base + (static_cast<int64_t>(i) < extra ? 1 : 0);
      const int64_t offset = static_cast<int64_t>(i) % s.dilations[i];
      per_batch += static_cast<double>(group) * branch_flops(i, offset);
    }
  }
  return per_batch * static_cast<double>(s.batch);
}

// Only batch 0: the reference is single-threaded fp64 loops. A view of batch 0 is the same
// pointer and strides with shape[0] = 1.
int64_t count_wrong(const DilatedShape& s, const Views& views) {
  const auto batch0 = [](TensorView t) {
    t.shape[0] = 1;
    return t;
  };
  const Problem p = make_problem(s.config(), batch0(views.q), batch0(views.k), batch0(views.v),
                                 batch0(views.out), batch0(views.lse), s.head_dim, "reference");
  const ReferenceResult ref = reference_forward(p);
  const Tolerance out_tol = out_tolerance(s.dtype);
  int64_t wrong = 0;
  for (size_t i = 0; i < ref.out.size(); ++i) {
    const float x = load_f32(views.out.data, s.dtype, static_cast<int64_t>(i));
    wrong += within(x, ref.out[i], out_tol) ? 0 : 1;
  }
  const float* lse = static_cast<const float*>(views.lse.data);
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    wrong += within(lse[i], ref.lse[i], kLseTolerance) ? 0 : 1;
  }
  return wrong;
}

int64_t count_wrong_grads(const DilatedShape& s, const Views& views, const Gradients& g) {
  const auto batch0 = [](TensorView t) {
    t.shape[0] = 1;
    return t;
  };
  const BackwardProblem bp =
      make_backward_problem(s.config(), batch0(g.dout), batch0(views.q), batch0(views.k),
                            batch0(views.v), batch0(views.out), batch0(views.lse), batch0(g.dq),
                            batch0(g.dk), batch0(g.dv), s.head_dim, "reference");
  const ReferenceGrads ref = reference_backward(bp);
  const Tolerance tol = grad_tolerance(s.dtype);
  int64_t wrong = 0;
  const std::pair<const std::vector<double>&, const TensorView&> pairs[] = {
      {ref.dq, g.dq}, {ref.dk, g.dk}, {ref.dv, g.dv}};
  for (const auto& [values, view] : pairs) {
    for (size_t i = 0; i < values.size(); ++i) {
      const float x = load_f32(view.data, s.dtype, static_cast<int64_t>(i));
      wrong += within(x, values[i], tol) ? 0 : 1;
    }
  }
  return wrong;
}

void validate(const DilatedShape& s, Backend backend) {
  // make_problem reads shapes, strides, dtypes and addresses (outputs must not overlap the
  // inputs) but never the data: the views get disjoint address ranges that are never read,
  // each farther from the next than any row's tensor spans.
  constexpr uintptr_t kApart = uintptr_t{1} << 42;
  const auto at = [](uintptr_t i) { return reinterpret_cast<float*>(kApart * (i + 1)); };
  const Views v = make_views(s, s.seq, at(0), at(1), at(2), at(3), at(4));
  make_problem(s.config(), v.q, v.k, v.v, v.out, v.lse, cpu::kMaxHeadDim, backend_name(backend));
}

Record describe(const DilatedShape& s, const RunOptions& options, const char* impl) {
  Record r;
  r.impl = impl;
  r.config = s.name;
  r.backend = backend_name(options.backend);
  r.dtype = dtype_name(s.dtype);
  if (options.backend == Backend::kCuda) {
    r.products = "gpu";
  } else if (s.dtype == DType::kBF16 && options.backend == Backend::kCpu) {
    const CpuBf16 kernel = cpu::resolve_bf16(options.cpu_bf16);
    r.products = kernel == CpuBf16::kWiden ? "fp32" : cpu_bf16_name(kernel);
  }
  r.mode = mode_name(s.mode);
  r.causal = s.causal;
  r.batch = s.batch;
  r.seq = s.seq;
  r.heads = s.heads;
  r.kv_heads = s.kv_heads;
  r.head_dim = s.head_dim;
  r.segments = s.segments;
  r.dilations = s.dilations;
  r.threads = resolved_threads(options.threads);
  r.backward = options.backward;
  return r;
}

void set_rates(Record& r, const DilatedShape& s) {
  const double seconds = r.timing.mean_ms * 1e-3;
  r.tokens_per_s = static_cast<double>(s.batch * s.seq) / seconds;
  r.gflops = (r.backward ? 2.5 : 1.0) * forward_flops(s) / seconds * 1e-9;
}

Record run_dilated(const DilatedShape& s, const RunOptions& options) {
#ifdef RINGATTN_HAVE_CUDA
  if (options.backend == Backend::kCuda) return run_dilated_cuda(s, options);
#endif
  const DilatedAttention attention(s.config(), exec_options(options));
  const PeakMemory memory;
  const Tensors tensors(s, {0, s.seq}, options.threads);
  const Views& v = tensors.views();
  std::optional<Gradients> g;
  if (options.backward) g.emplace(s, RowRange{0, s.seq}, options.threads);

  Record r = describe(s, options, "dilated");
  if (g) {
    attention.forward(v.q, v.k, v.v, v.out, v.lse);
    r.timing = time_calls(
        [&] { attention.backward(g->dout, v.q, v.k, v.v, v.out, v.lse, g->dq, g->dk, g->dv); },
        options.warmup, options.iters);
  } else {
    r.timing = time_calls([&] { attention.forward(v.q, v.k, v.v, v.out, v.lse); }, options.warmup,
                          options.iters);
  }
  r.peak_mb = memory.peak_mb();
  r.io_mb = static_cast<double>(tensors.bytes() + (g ? g->bytes() : 0)) / kMiB;
  set_rates(r, s);
  if (options.check) r.wrong = g ? count_wrong_grads(s, v, *g) : count_wrong(s, v);
  return r;
}

}  // namespace ringattn::bench
