// MultiheadDilatedAttention on CUDA tensors (cuBLAS projections, the layer kernels, the CUDA
// attention core) against the same layer on host tensors: y, the inputs' gradients and every
// weight and bias gradient, for self- and cross-attention, GQA, both modes, with and without
// bias and LayerNorms, head dims 16 (generic kernel), 64 and 128; bitwise repeatable. Skips
// without a GPU.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tests/gpu/gpu_util.h"
#include "tests/support/layer_util.h"

namespace ringattn::test {
namespace {

// A device copy of a host vector, viewed as [B, N, E] fp32 on the current CUDA device.
class DeviceVector {
 public:
  explicit DeviceVector(const std::vector<float>& host) : n_(host.size()) {
    EXPECT_EQ(cudaMalloc(&ptr_, n_ * sizeof(float)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), n_ * sizeof(float), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~DeviceVector() { (void)cudaFree(ptr_); }
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;

  TensorView view(const LayerCase& c) const {
    return TensorView::contiguous(ptr_, DType::kF32, {c.B, c.N, c.E}, Device::kCUDA);
  }
  std::vector<float> host() const {
    std::vector<float> out(n_);
    EXPECT_EQ(cudaMemcpy(out.data(), ptr_, n_ * sizeof(float), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return out;
  }

 private:
  void* ptr_ = nullptr;
  size_t n_;
};

double max_abs(const std::vector<float>& x) {
  double m = 0.0;
  for (float v : x) m = std::max(m, std::fabs(static_cast<double>(v)));
  return m;
}

// max |gpu - cpu| <= 5e-4 max |cpu| (fp32 with other summation orders; a wrong term is O(1)).
// `zero_scale` > 0: the exact value is 0 (cpu holds rounding noise); then the bound is 5e-4
// zero_scale, the size of a related non-zero gradient.
void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, const char* what,
                  double zero_scale = 0.0) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double max_err = 0.0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    ASSERT_TRUE(std::isfinite(gpu[i])) << what << "[" << i << "]";
    max_err = std::max(max_err, std::fabs(static_cast<double>(gpu[i]) - cpu[i]));
  }
  const double scale = zero_scale > 0.0 ? zero_scale : max_abs(cpu);
  EXPECT_GT(scale, 1e-3) << what;
  EXPECT_LE(max_err, 5e-4 * scale) << what << ": scale " << scale;
}

struct Results {
  std::vector<float> y, dq, dk, dv;
  MultiheadWeights grads;
};

using W = MultiheadWeights;

// Forward and backward of `layer` on host tensors, or on device copies of them.
Results run(const MultiheadDilatedAttention& layer, const LayerCase& c, bool self_attention,
            bool on_gpu) {
  const size_t n = static_cast<size_t>(c.B * c.N * c.E);
  const std::vector<float> q = normal_vector(n, 1), dy = normal_vector(n, 4);
  const std::vector<float> k = self_attention ? q : normal_vector(n, 2);
  const std::vector<float> v = self_attention ? q : normal_vector(n, 3);
  const std::vector<float> poison(n, NAN);
  Results r;
  MultiheadSaved saved;
  if (!on_gpu) {
    r.y = r.dq = r.dk = r.dv = poison;
    const auto h = [&](const std::vector<float>& x) { return bne(x, c.B, c.N, c.E); };
    if (self_attention) {
      layer.forward(h(q), h(r.y), &saved);
      layer.backward(h(q), h(dy), saved, h(r.dq), r.grads);
    } else {
      layer.forward(h(q), h(k), h(v), h(r.y), &saved);
      layer.backward(h(q), h(k), h(v), h(dy), saved, h(r.dq), h(r.dk), h(r.dv), r.grads);
    }
    return r;
  }
  const DeviceVector gq(q), gk(k), gv(v), gdy(dy), gy(poison), gdq(poison), gdk(poison),
      gdv(poison);
  if (self_attention) {
    layer.forward(gq.view(c), gy.view(c), &saved);
    EXPECT_EQ(saved.device, Device::kCUDA);
    EXPECT_TRUE(saved.q.empty());
    layer.backward(gq.view(c), gdy.view(c), saved, gdq.view(c), r.grads);
  } else {
    layer.forward(gq.view(c), gk.view(c), gv.view(c), gy.view(c), &saved);
    layer.backward(gq.view(c), gk.view(c), gv.view(c), gdy.view(c), saved, gdq.view(c), gdk.view(c),
                   gdv.view(c), r.grads);
    r.dk = gdk.host();
    r.dv = gdv.host();
  }
  r.y = gy.host();
  r.dq = gdq.host();
  return r;
}

void check_layer(const LayerCase& c, bool self_attention) {
  const MultiheadConfig config = c.config();
  const MultiheadDilatedAttention layer(config, random_weights(config, 7));
  const Results cpu = run(layer, c, self_attention, false);
  const Results gpu = run(layer, c, self_attention, true);
  expect_close(gpu.y, cpu.y, "y");
  expect_close(gpu.dq, cpu.dq, self_attention ? "dx" : "dquery");
  if (!self_attention) {
    expect_close(gpu.dk, cpu.dk, "dkey");
    expect_close(gpu.dv, cpu.dv, "dvalue");
  }
  for (const auto& p : kWeightParams) {
    const std::vector<float>& g = gpu.grads.*p.member;
    const std::vector<float>& h = cpu.grads.*p.member;
    ASSERT_EQ(g.size(), h.size()) << p.name;
    // A bias added to every key (bk without LayerNorms, the k-norm bias) shifts all scores of
    // a query alike: its exact gradient is 0.
    const bool zero = p.member == &W::k_norm_bias || (p.member == &W::bk && !c.layer_norm);
    if (!h.empty()) expect_close(g, h, p.name, zero ? max_abs(cpu.grads.wk) : 0.0);
  }
  // Deterministic: a second run gives the same bits.
  const Results again = run(layer, c, self_attention, true);
  EXPECT_EQ(again.y, gpu.y);
  EXPECT_EQ(again.dq, gpu.dq);
  for (const auto& p : kWeightParams)
    EXPECT_EQ(again.grads.*p.member, gpu.grads.*p.member) << p.name;
}

TEST(MultiheadCuda, SelfAttentionMatchesCpu) {
  RA_SKIP_WITHOUT_GPU();
  // D = 16 (the generic kernel), GQA, causal, both modes; 512 rows (column sums over more
  // than one chunk of rows); biases without LayerNorms.
  check_layer({2, 256, 64, 4, 2, {64, 128, 256}, {1, 2, 4}, Mode::kGroups, true}, true);
  LayerCase no_norms{1, 64, 64, 4, 4, {32, 64}, {1, 2}, Mode::kLongNet, false};
  no_norms.layer_norm = false;
  check_layer(no_norms, true);
}

TEST(MultiheadCuda, CrossAttentionMatchesCpu) {
  RA_SKIP_WITHOUT_GPU();
  // D = 64 with GQA, D = 128 without bias and LayerNorms.
  check_layer({2, 32, 256, 4, 2, {16, 32}, {1, 2}, Mode::kGroups, true}, false);
  LayerCase plain{1, 64, 256, 2, 1, {32, 64}, {1, 2}, Mode::kLongNet, false};
  plain.bias = plain.layer_norm = false;
  check_layer(plain, false);
}

}  // namespace
}  // namespace ringattn::test
