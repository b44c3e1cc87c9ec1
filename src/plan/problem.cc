// Validation of a forward call and the head -> branch assignment.

#include "src/plan/problem.h"

#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>

#include "ringattn/comm.h"
#include "src/base/check.h"
#include "src/base/index_math.h"
#include "src/base/tensor_checks.h"

namespace ringattn {

void assign_heads(Mode mode, const std::vector<Branch>& branches, int64_t heads,
                  std::vector<int>& head_begin, std::vector<HeadBranch>& head_branches) {
  const int g = static_cast<int>(branches.size());
  head_begin.assign(static_cast<size_t>(heads) + 1, 0);
  head_branches.clear();
  if (mode == Mode::kLongNet) {
    for (int64_t h = 0; h < heads; ++h) {
      head_begin[h] = static_cast<int>(head_branches.size());
      for (int i = 0; i < g; ++i) head_branches.push_back({i, h % branches[i].rate});
    }
  } else {
    // G contiguous groups of H / G heads; the first H % G groups get one more.
    const int64_t base = heads / g, extra = heads % g;
    int64_t h = 0;
    for (int i = 0; i < g; ++i) {
      const int64_t size = base + (i < extra ? 1 : 0);
      for (int64_t j = 0; j < size; ++j, ++h) {
        head_begin[h] = static_cast<int>(head_branches.size());
        head_branches.push_back({i, i % branches[i].rate});
      }
    }
  }
  head_begin[heads] = static_cast<int>(head_branches.size());
}

namespace {

const char* device_name(Device device) {
  return device == Device::kCPU ? "the CPU (host memory)" : "a CUDA device";
}

void check_view(const TensorView& t, const char* name, int ndim, const char* layout, Device device,
                const char* backend) {
  check_view_fields(t, name);
  require(t.ndim == ndim, name, " has ", t.ndim, " dimensions ", shape_str(t), "; it must be ",
          layout);
  require(t.data != nullptr, name, ".data is null; pass a buffer holding ", layout);
  require(t.device == device, name, " lives on ", device_name(t.device), " but this call runs on ",
          device_name(device), " (", backend, " backend); put every tensor of the call there");
}

Strides3 bnhd_strides(const TensorView& t, const char* name) {
  require(t.strides[3] == 1, name, ".strides[3] = ", t.strides[3],
          "; the head dimension D must be contiguous (stride 1): make the tensor contiguous in D");
  return {t.strides[0], t.strides[1], t.strides[2]};
}

// The least common multiple of the values (>= 1), or 0 when it overflows int64.
int64_t lcm_of(const std::vector<int64_t>& values) {
  int64_t l = 1;
  for (int64_t v : values) {
    if (__builtin_mul_overflow(l / std::gcd(l, v), v, &l)) return 0;
  }
  return l;
}

}  // namespace

namespace {

// The shapes and dtypes of q, k, v and out against each other.
void check_qkvo(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                const TensorView& out) {
  for (int d = 0; d < 4; ++d) {
    require(k.shape[d] == v.shape[d], "k is ", shape_str(k), " but v is ", shape_str(v),
            "; k and v must have the same shape [B, N, Hkv, D]");
    require(out.shape[d] == q.shape[d], "out is ", shape_str(out), " but q is ", shape_str(q),
            "; out must have the shape of q");
  }
  require(k.shape[0] == p.batch, "k.shape[0] = ", k.shape[0], " but q.shape[0] = ", p.batch,
          "; q, k and v must have the same batch size B");
  require(k.shape[1] == p.shard_rows, "k.shape[1] = ", k.shape[1],
          " but q.shape[1] = ", p.shard_rows, "; q, k and v must have the same sequence length N");
  require(k.shape[3] == p.head_dim, "k.shape[3] = ", k.shape[3], " but q.shape[3] = ", p.head_dim,
          "; q, k and v must have the same head dim D");
  require(p.heads % p.kv_heads == 0, "q has H = ", p.heads,
          " heads and k/v have Hkv = ", p.kv_heads,
          " heads; H must be a multiple of Hkv (grouped-query attention)");
  require(k.dtype == q.dtype && v.dtype == q.dtype && out.dtype == q.dtype, "dtypes differ: q is ",
          dtype_name(q.dtype), ", k is ", dtype_name(k.dtype), ", v is ", dtype_name(v.dtype),
          ", out is ", dtype_name(out.dtype), "; q, k, v and out must share one dtype");
}

// The branches of `config` over p's sequence (each segment length divides it), and the
// head-branch entries of p's heads.
void assign_branches(const DilatedConfig& config, Shard shard, Problem& p) {
  const int g = config.num_branches();
  for (int i = 0; i < g; ++i) {
    const int64_t s = config.segment_lengths[i];
    if (p.seq % s != 0) {
      const int64_t l = lcm_of(config.segment_lengths);
      const int64_t padded = l > 0 && p.seq / l < INT64_MAX / l - 1 ? ceil_div(p.seq, l) * l : 0;
      fail(ErrorCode::kInvalidArgument, "segment_lengths[", i, "] = ", s,
           " does not divide the sequence length N = ", p.seq,
           shard.world > 1 ? " (" + std::to_string(shard.world) + " ranks x " +
                                 std::to_string(p.shard_rows) + " rows)"
                           : std::string(),
           "; pad the sequence to a multiple of ",
           l > 0 ? std::to_string(l) : std::string("every segment length"),
           " (the least common multiple of segment_lengths)",
           padded > 0 ? ", e.g. N = " + std::to_string(padded) : std::string());
    }
    p.branches.push_back({s, config.dilation_rates[i]});
  }
  // The layer's heads: all of q's, or (head parallelism) a slice of total_heads.
  const int64_t total_heads = config.total_heads > 0 ? config.total_heads : p.heads;
  require(config.head_offset <= total_heads - p.heads, "head_offset = ", config.head_offset,
          " plus the H = ", p.heads, " heads of q exceeds total_heads = ", total_heads,
          "; q must hold heads [head_offset, head_offset + H) of the layer's total_heads");
  if (config.mode == Mode::kGroups) {
    require(total_heads >= g,
            "groups mode needs at least one head per branch, but H = ", total_heads, " < G = ", g,
            " branches; use more heads, fewer branches, or mode = longnet");
  }
  if (total_heads > INT_MAX / g) {
    fail(ErrorCode::kUnsupported, "total_heads = ", total_heads, " heads x ", g,
         " branches is more head-branch entries than this version indexes (2^31 - 1); use fewer "
         "heads per call");
  }
  p.out_factor = config.mode == Mode::kGroups ? 1.0f / static_cast<float>(g) : 1.0f;
  assign_heads(config.mode, p.branches, total_heads, p.head_begin, p.head_branches);
  if (total_heads != p.heads) {  // keep the slice's heads, numbered from 0
    const int first = p.head_begin[config.head_offset];
    p.head_branches = std::vector<HeadBranch>(
        p.head_branches.begin() + first,
        p.head_branches.begin() + p.head_begin[config.head_offset + p.heads]);
    p.head_begin = std::vector<int>(p.head_begin.begin() + config.head_offset,
                                    p.head_begin.begin() + config.head_offset + p.heads + 1);
    for (int& x : p.head_begin) x -= first;
  }
}

}  // namespace

Problem make_problem(const DilatedConfig& config, const TensorView& q, const TensorView& k,
                     const TensorView& v, const TensorView& out,
                     const std::optional<TensorView>& lse, int64_t max_head_dim,
                     const char* backend, Shard shard, Device device) {
  config.validate();
  check_view(q, "q", 4, "[B, N, H, D]", device, backend);
  check_view(k, "k", 4, "[B, N, Hkv, D]", device, backend);
  check_view(v, "v", 4, "[B, N, Hkv, D]", device, backend);
  check_view(out, "out", 4, "[B, N, H, D] (the shape of q)", device, backend);

  Problem p;
  p.batch = q.shape[0];
  p.shard_rows = q.shape[1];
  require(p.shard_rows <= std::numeric_limits<int64_t>::max() / shard.world,
          "q.shape[1] = ", p.shard_rows, " rows on each of ", shard.world,
          " ranks make a sequence longer than 2^63 rows; pass the rows of this rank's shard");
  p.shard_begin = shard.rank * p.shard_rows;
  p.seq = shard.world * p.shard_rows;
  p.heads = q.shape[2];
  p.head_dim = q.shape[3];
  p.kv_heads = k.shape[2];
  p.dtype = q.dtype;
  p.mode = config.mode;
  p.causal = config.causal;
  check_qkvo(p, q, k, v, out);
  if (p.head_dim > max_head_dim) {
    fail(ErrorCode::kUnsupported, "head dim D = ", p.head_dim, " is not supported by the ", backend,
         " backend (at most ", max_head_dim, "); split heads or use a smaller D");
  }
  p.q_st = bnhd_strides(q, "q");
  p.k_st = bnhd_strides(k, "k");
  p.v_st = bnhd_strides(v, "v");
  p.out_st = bnhd_strides(out, "out");

  if (lse) {
    const TensorView& l = *lse;
    check_view(l, "lse", 3, "[B, H, N]", device, backend);
    require(l.dtype == DType::kF32, "lse is ", dtype_name(l.dtype),
            "; lse is always fp32 [B, H, N]");
    require(l.shape[0] == p.batch && l.shape[1] == p.heads && l.shape[2] == p.shard_rows, "lse is ",
            shape_str(l), " but q is ", shape_str(q), "; lse must be [B, H, N] = [", p.batch, ", ",
            p.heads, ", ", p.shard_rows, "]");
    p.lse = static_cast<float*>(l.data);
    p.lse_st = {l.strides[0], l.strides[2], l.strides[1]};
  }

  check_outputs_disjoint({{"out", &out}, {"lse", lse ? &*lse : nullptr}},
                         {{"q", &q}, {"k", &k}, {"v", &v}});
  assign_branches(config, shard, p);
  p.scale = config.scale ? *config.scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  return p;
}

BackwardProblem make_backward_problem(const DilatedConfig& config, const TensorView& dout,
                                      const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& out, const TensorView& lse,
                                      const TensorView& dq, const TensorView& dk,
                                      const TensorView& dv, int64_t max_head_dim,
                                      const char* backend, Shard shard, Device device) {
  BackwardProblem bp;
  bp.fwd = make_problem(config, q, k, v, out, lse, max_head_dim, backend, shard, device);
  const struct {
    const TensorView& t;
    const char* name;
    const TensorView& like;
    const char* like_name;
    Strides3* st;
  } grads[] = {{dout, "dout", q, "q", &bp.dout_st},
               {dq, "dq", q, "q", &bp.dq_st},
               {dk, "dk", k, "k", &bp.dk_st},
               {dv, "dv", k, "k", &bp.dv_st}};
  for (const auto& g : grads) {
    check_view(g.t, g.name, 4, g.like_name[0] == 'q' ? "[B, N, H, D]" : "[B, N, Hkv, D]", device,
               backend);
    for (int d = 0; d < 4; ++d) {
      require(g.t.shape[d] == g.like.shape[d], g.name, " is ", shape_str(g.t), " but ", g.like_name,
              " is ", shape_str(g.like), "; ", g.name, " must have the shape of ", g.like_name);
    }
    require(g.t.dtype == q.dtype, g.name, " is ", dtype_name(g.t.dtype), " but q is ",
            dtype_name(q.dtype), "; gradients share the dtype of q");
    *g.st = bnhd_strides(g.t, g.name);
  }
  check_outputs_disjoint(
      {{"dq", &dq}, {"dk", &dk}, {"dv", &dv}},
      {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
  bp.dout = dout.data;
  bp.dq = dq.data;
  bp.dk = dk.data;
  bp.dv = dv.data;
  return bp;
}

std::vector<AgreedField> shape_fields(const Problem& p) {
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &p.scale, sizeof(scale_bits));
  return {{"B (q.shape[0])", {p.batch}},
          {"N_loc (q.shape[1])", {p.shard_rows}},
          {"H (q.shape[2])", {p.heads}},
          {"Hkv (k.shape[2])", {p.kv_heads}},
          {"D (q.shape[3])", {p.head_dim}},
          {"dtype (0 = fp32, 1 = fp16, 2 = bf16)", {static_cast<int64_t>(p.dtype)}},
          {"scale (fp32 bits)", {scale_bits}}};
}

}  // namespace ringattn
