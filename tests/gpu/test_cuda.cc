// The CUDA backend against the fp64 reference: forward and backward, both modes, causal or
// not, fp32 / fp16 / bf16, head dims 64, 128 and generic ones, GQA, strided layouts.
// Every test needing a GPU skips (with the reason) when no CUDA device is usable.

#include <gtest/gtest.h>

#include <cmath>

#include "src/backend/ref/reference.h"
#include "src/plan/problem.h"
#include "tests/gpu/gpu_util.h"
#include "tests/support/expect.h"

namespace ringattn::test {
namespace {

// Runs the case's forward (and backward) on the GPU, on device copies of `h`, and downloads
// the results into `h`.
void run_on_gpu(CaseTensors& h, bool backward) {
  DeviceTensors d(h);
  const DilatedAttention attn(h.c.config(), ExecOptions{Backend::kCuda, 0});
  d.run(attn, h, backward);
}

// Forward: fp32 within 1e-5 of the fp64 reference; fp16/bf16 within twice the error of the
// naive computation in the same precision (SPEC.md); lse close; non-zero and finite.
void check_forward(const CaseTensors& h) {
  expect_forward_close(h.c.config(), h.q, h.k, h.v, h.out, h.lse,
                       reference_forward(h.problem().fwd));
}

// Backward: dq, dk, dv against the fp64 reference gradients (the CPU backend's bounds).
void check_backward(const CaseTensors& h) {
  expect_grads_close(h.c.dtype, h.dq, h.dk, h.dv, reference_backward(h.problem()));
}

void check_case(const Case& c, uint32_t seed, bool backward) {
  SCOPED_TRACE(describe(c));
  CaseTensors h(c, seed);
  run_on_gpu(h, backward);
  check_forward(h);
  if (backward) check_backward(h);
}

const DType kDtypes[] = {DType::kF32, DType::kF16, DType::kBF16};

// Both modes, causal on and off, every dtype, D = 64 and 128 (own kernels) and 80 (generic):
// each of `cases` (a groups and a LongNet one, whose D, causal, dtype and strided the sweep
// sets) with every D, causal flag and dtype, seeds from `seed`; strided layouts for groups at
// D = 80 and for LongNet at the others.
void sweep_modes_causal_dtypes_head_dims(const std::vector<Case>& cases, uint32_t seed,
                                         bool backward) {
  for (DType dt : kDtypes) {
    for (int64_t d : {64, 128, 80}) {
      for (bool causal : {false, true}) {
        for (Case c : cases) {
          c.D = d;
          c.causal = causal;
          c.dtype = dt;
          c.strided = (c.mode == Mode::kGroups) == (d == 80);
          check_case(c, seed++, backward);
        }
      }
    }
  }
}

// `trials` random configurations (D 16, 64, 80 or 128) drawn from `rng_seed`, cycling through
// the dtypes, the inputs of trial t from seed0 + t.
void sweep_random(uint32_t rng_seed, int trials, uint32_t seed0, bool backward) {
  std::mt19937 rng(rng_seed);
  for (int trial = 0; trial < trials; ++trial) {
    Case c = random_case(rng, {16, 64, 80, 128});
    c.dtype = kDtypes[trial % 3];
    check_case(c, seed0 + static_cast<uint32_t>(trial), backward);
  }
}

TEST(CudaForward, ModesCausalDtypesHeadDims) {
  RA_SKIP_WITHOUT_GPU();
  sweep_modes_causal_dtypes_head_dims({{1, 256, 4, 2, 0, {64, 256}, {1, 2}, Mode::kGroups, false},
                                       {2, 256, 4, 1, 0, {64, 256}, {1, 4}, Mode::kLongNet, false}},
                                      1, false);
}

TEST(CudaBackward, ModesCausalDtypesHeadDims) {
  RA_SKIP_WITHOUT_GPU();
  sweep_modes_causal_dtypes_head_dims({{1, 128, 4, 2, 0, {32, 128}, {1, 2}, Mode::kGroups, false},
                                       {1, 192, 2, 1, 0, {96, 192}, {1, 3}, Mode::kLongNet, false}},
                                      40, true);
}

// Many tiles per segment, partial tiles, the smallest and largest generic head dims.
TEST(CudaForward, TilesAndEdgeHeadDims) {
  RA_SKIP_WITHOUT_GPU();
  check_case({1, 1024, 2, 1, 64, {1024}, {1}, Mode::kGroups, true, DType::kBF16}, 20, false);
  check_case({1, 1024, 2, 2, 128, {512, 1024}, {1, 3}, Mode::kLongNet, false, DType::kF16}, 21,
             false);
  check_case({1, 200, 2, 2, 80, {200}, {1}, Mode::kGroups, true, DType::kF32}, 22, false);
  for (DType dt : kDtypes) {
    check_case({1, 96, 2, 1, 1, {48, 96}, {1, 5}, Mode::kLongNet, true, dt}, 23, false);
    check_case({1, 96, 2, 1, 256, {48, 96}, {1, 5}, Mode::kLongNet, true, dt}, 24, false);
  }
}

TEST(CudaBackward, TilesAndEdgeHeadDims) {
  RA_SKIP_WITHOUT_GPU();
  check_case({1, 512, 1, 1, 64, {512}, {1}, Mode::kGroups, true, DType::kF16}, 60, true);
  check_case({1, 200, 2, 2, 80, {200}, {1}, Mode::kGroups, true, DType::kF32}, 61, true);
  check_case({1, 96, 2, 1, 256, {48, 96}, {1, 5}, Mode::kLongNet, true, DType::kBF16}, 62, true);
  check_case({1, 96, 2, 1, 1, {48, 96}, {1, 5}, Mode::kLongNet, false, DType::kF32}, 63, true);
}

TEST(CudaForward, RandomisedConfigurations) {
  RA_SKIP_WITHOUT_GPU();
  sweep_random(30, 12, 100, false);
}

TEST(CudaBackward, RandomisedConfigurations) {
  RA_SKIP_WITHOUT_GPU();
  sweep_random(70, 8, 200, true);
}

TEST(CudaBackward, BitwiseDeterministic) {
  RA_SKIP_WITHOUT_GPU();
  const Case c{2, 256, 4, 2, 64, {64, 256}, {1, 2}, Mode::kLongNet, true, DType::kBF16};
  CaseTensors a(c, 80), b(c, 80);
  run_on_gpu(a, true);
  run_on_gpu(b, true);
  EXPECT_EQ(a.out.bytes(), b.out.bytes());
  EXPECT_EQ(a.lse.bytes(), b.lse.bytes());
  EXPECT_EQ(a.dq.bytes(), b.dq.bytes());
  EXPECT_EQ(a.dk.bytes(), b.dk.bytes());
  EXPECT_EQ(a.dv.bytes(), b.dv.bytes());
  EXPECT_GT(compare_bnhd(a.dk, std::vector<double>(a.dk.view().numel(), 0.0)).nonzero, 0);
}

// The user's stream: results are written when forward returns.
TEST(CudaForward, RunsOnTheGivenStream) {
  RA_SKIP_WITHOUT_GPU();
  const Case c{1, 128, 2, 2, 64, {128}, {1}, Mode::kGroups, true, DType::kF16};
  CaseTensors h(c, 90);
  DeviceTensors d(h);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const DilatedAttention attn(c.config(), ExecOptions{Backend::kCuda, 0, stream});
  attn.forward(d.q.view(), d.k.view(), d.v.view(), d.out.view(), d.lse.view());
  d.out.download(h.out);
  d.lse.download(h.lse);
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  check_forward(h);
}

// cuda_async: forward and backward only queue their work on the user's stream; once the
// stream is synchronized the results are those of the blocking calls, bit for bit. The
// stream first runs a long copy so that the queued kernels cannot have finished at return
// unless the call waited.
TEST(CudaForward, AsyncModeQueuesOnTheStream) {
  RA_SKIP_WITHOUT_GPU();
  const Case c{2, 512, 4, 2, 64, {128, 512}, {1, 2}, Mode::kGroups, true, DType::kBF16};
  CaseTensors blocking(c, 95), queued(c, 95);
  run_on_gpu(blocking, true);
  DeviceTensors d(queued);

  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const size_t busy_bytes = size_t{1} << 30;
  void *busy_a = nullptr, *busy_b = nullptr;
  ASSERT_EQ(cudaMalloc(&busy_a, busy_bytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&busy_b, busy_bytes), cudaSuccess);
  for (int i = 0; i < 8; ++i) {
    ASSERT_EQ(cudaMemcpyAsync(busy_b, busy_a, busy_bytes, cudaMemcpyDeviceToDevice, stream),
              cudaSuccess);
  }
  ExecOptions options{Backend::kCuda, 0, stream};
  options.cuda_async = true;
  const DilatedAttention attn(c.config(), options);
  attn.forward(d.q.view(), d.k.view(), d.v.view(), d.out.view(), d.lse.view());
  attn.backward(d.dout.view(), d.q.view(), d.k.view(), d.v.view(), d.out.view(), d.lse.view(),
                d.dq.view(), d.dk.view(), d.dv.view());
  EXPECT_EQ(cudaStreamQuery(stream), cudaErrorNotReady) << "the calls waited for the stream";
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  d.out.download(queued.out);
  d.lse.download(queued.lse);
  d.dq.download(queued.dq);
  d.dk.download(queued.dk);
  d.dv.download(queued.dv);
  EXPECT_EQ(cudaFree(busy_a), cudaSuccess);
  EXPECT_EQ(cudaFree(busy_b), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  EXPECT_EQ(queued.out.bytes(), blocking.out.bytes());
  EXPECT_EQ(queued.lse.bytes(), blocking.lse.bytes());
  EXPECT_EQ(queued.dq.bytes(), blocking.dq.bytes());
  EXPECT_EQ(queued.dk.bytes(), blocking.dk.bytes());
  EXPECT_EQ(queued.dv.bytes(), blocking.dv.bytes());
  check_forward(queued);
}

// Errors that need no GPU: mixing devices, the reference backend on CUDA tensors, the cuda
// backend on host tensors, the ring mixing devices (forward and backward); and without a
// GPU, CUDA tensors are a device error (the ring's forward and backward too).
TEST(CudaApi, DeviceErrors) {
  const Case c{1, 16, 2, 2, 8, {16}, {1}, Mode::kGroups, false};
  CaseTensors h(c, 100);
  TensorView on_gpu = h.k.view();
  on_gpu.device = Device::kCUDA;
  TensorView q_gpu = h.q.view();
  q_gpu.device = Device::kCUDA;
  const DilatedAttention cpu(c.config());
  expect_error([&] { cpu.forward(q_gpu, h.k.view(), h.v.view(), h.out.view()); },
               ErrorCode::kInvalidArgument,
               {"k lives on the CPU (host memory) but this call runs on a CUDA device"});
  const DilatedAttention ref(c.config(), ExecOptions{Backend::kReference, 0});
  Error e = error_of([&] { ref.forward(q_gpu, on_gpu, on_gpu, q_gpu); });
  EXPECT_NE(std::string(e.what()).find("reference runs on the CPU"), std::string::npos) << e.what();
  const DilatedAttention cuda(c.config(), ExecOptions{Backend::kCuda, 0});
  e = error_of([&] { cuda.forward(h.q.view(), h.k.view(), h.v.view(), h.out.view()); });
  EXPECT_NE(std::string(e.what()).find("backend = cuda needs tensors on a CUDA device"),
            std::string::npos)
      << e.what();
  const std::unique_ptr<Communicator> self = make_self_communicator();
  RingDilatedAttention ring(c.config(), *self);
  expect_error([&] { ring.forward(q_gpu, h.k.view(), h.v.view(), h.out.view()); },
               ErrorCode::kInvalidArgument,
               {"k lives on the CPU (host memory) but this call runs on a CUDA device"});
  expect_error(
      [&] {
        ring.backward(h.dout.view(), q_gpu, h.k.view(), h.v.view(), h.out.view(), h.lse.view(),
                      h.dq.view(), h.dk.view(), h.dv.view());
      },
      ErrorCode::kInvalidArgument,
      {"lives on the CPU (host memory) but this call runs on a CUDA device"});
  e = error_of([&] {
    RingDilatedAttention(c.config(), *self, ExecOptions{Backend::kReference, 0});
  });
  EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
  TensorView k_gpu = h.k.view(), v_gpu = h.v.view(), out_gpu = h.out.view();
  TensorView dout_gpu = h.dout.view(), lse_gpu = h.lse.view(), dq_gpu = h.dq.view(),
             dk_gpu = h.dk.view(), dv_gpu = h.dv.view();
  for (TensorView* x : {&k_gpu, &v_gpu, &out_gpu, &dout_gpu, &lse_gpu, &dq_gpu, &dk_gpu, &dv_gpu}) {
    x->device = Device::kCUDA;
  }
  for (const int call : {0, 1, 2}) {  // DilatedAttention, the ring's forward, its backward
    e = error_of([&] {
      if (call == 0) {
        cuda.forward(q_gpu, k_gpu, v_gpu, out_gpu);
      } else if (call == 1) {
        ring.forward(q_gpu, k_gpu, v_gpu, out_gpu);
      } else {
        ring.backward(dout_gpu, q_gpu, k_gpu, v_gpu, out_gpu, lse_gpu, dq_gpu, dk_gpu, dv_gpu);
      }
    });
    if (no_gpu_reason().empty()) {
      // Host memory marked kCUDA is caught before any kernel runs.
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find(call == 2 ? "dout.data is not CUDA device memory"
                                                     : "q.data is not CUDA device memory"),
                std::string::npos)
          << e.what();
    } else {
      EXPECT_EQ(e.code(), ErrorCode::kDevice) << e.what();
      EXPECT_NE(std::string(e.what()).find("no CUDA device is usable"), std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace ringattn::test
