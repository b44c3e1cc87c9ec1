// The multihead layers' device rules, runnable without a GPU: one device per call (mixing
// host and CUDA tensors is an error naming both), CUDA tensors without the CUDA backend are
// Error(kUnsupported), and DistributedDilatedAttention refuses CUDA tensors (kUnsupported).

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "tests/support/layer_util.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

const LayerCase kCase{1, 16, 32, 4, 2, {8, 16}, {1, 2}, Mode::kGroups, true};

// A [B, N, E] view of host memory marked as living on a CUDA device (never dereferenced: the
// checks run before any compute).
TensorView marked_cuda(const std::vector<float>& data) {
  TensorView t = bne(data, kCase.B, kCase.N, kCase.E);
  t.device = Device::kCUDA;
  return t;
}

bool contains(const Error& e, const std::string& text) {
  return std::string(e.what()).find(text) != std::string::npos;
}

TEST(MultiheadDevices, MixingDevicesIsAnError) {
  const MultiheadDilatedAttention layer(kCase.config(), 3);
  const std::vector<float> x = normal_vector(16 * 32, 1);
  std::vector<float> y(x.size(), 42.0f);
  const TensorView host = bne(x, kCase.B, kCase.N, kCase.E);
  const Error e = error_of([&] { layer.forward(host, marked_cuda(x), host, bne(y, 1, 16, 32)); });
#if defined(RINGATTN_HAVE_CUDA)
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
  EXPECT_TRUE(contains(e, "key lives on a CUDA device but query on the CPU")) << e.what();
#else
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
  EXPECT_TRUE(contains(e, "no CUDA backend")) << e.what();
#endif
  for (float v : y) ASSERT_EQ(v, 42.0f);  // nothing written

  // Backward: a host dx for CUDA inputs.
  MultiheadSaved saved;
  MultiheadWeights grads;
  const Error b = error_of(
      [&] { layer.backward(marked_cuda(x), marked_cuda(x), saved, bne(y, 1, 16, 32), grads); });
#if defined(RINGATTN_HAVE_CUDA)
  EXPECT_EQ(b.code(), ErrorCode::kInvalidArgument) << b.what();
  EXPECT_TRUE(contains(b, "dquery lives on the CPU but query on a CUDA device")) << b.what();
#else
  EXPECT_EQ(b.code(), ErrorCode::kUnsupported) << b.what();
#endif
}

TEST(MultiheadDevices, CudaTensorsNeedTheCudaBackend) {
  const MultiheadDilatedAttention layer(kCase.config(), 3);
  const std::vector<float> x = normal_vector(16 * 32, 1);
  const std::vector<float> y(x.size(), 42.0f);
  const Error e = error_of([&] { layer.forward(marked_cuda(x), marked_cuda(y)); });
#if defined(RINGATTN_HAVE_CUDA)
  // Host memory marked CUDA: no usable device (kDevice), or not device memory.
  EXPECT_TRUE(e.code() == ErrorCode::kDevice || e.code() == ErrorCode::kInvalidArgument)
      << e.what();
  EXPECT_TRUE(contains(e, "CUDA")) << e.what();
#else
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
  EXPECT_TRUE(contains(e,
                       "query lives on a CUDA device but this build of ringattn has no CUDA "
                       "backend"))
      << e.what();
#endif
  for (float v : y) ASSERT_EQ(v, 42.0f);
}

TEST(MultiheadDevices, DistributedRefusesCudaTensors) {
  const std::unique_ptr<Communicator> seq = make_self_communicator();
  const std::unique_ptr<Communicator> head = make_self_communicator();
  DistributedDilatedAttention layer(kCase.config(), *seq, *head, 5);
  const std::vector<float> x = normal_vector(16 * 32, 1);
  std::vector<float> y(x.size(), 42.0f);
  const Error e = error_of([&] { layer.forward(marked_cuda(x), marked_cuda(y)); });
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
  EXPECT_TRUE(contains(e, "DistributedDilatedAttention runs on host tensors only")) << e.what();
  MultiheadSaved saved;
  MultiheadWeights grads;
  const Error b = error_of(
      [&] { layer.backward(bne(x, 1, 16, 32), bne(x, 1, 16, 32), saved, marked_cuda(y), grads); });
  EXPECT_EQ(b.code(), ErrorCode::kUnsupported) << b.what();
  EXPECT_TRUE(contains(b, "not enabled on CUDA tensors")) << b.what();
  for (float v : y) ASSERT_EQ(v, 42.0f);
}

}  // namespace
}  // namespace ringattn::test
