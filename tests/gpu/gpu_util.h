#pragma once
// Helpers of the GPU tests: skipping without a device, device copies of test tensors.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <string>

#include "tests/support/test_util.h"

namespace ringattn::test {

// Empty when a CUDA device is usable, else why not (for GTEST_SKIP).
std::string no_gpu_reason();

// Skips the test, with a clear message, on a machine without a usable CUDA device; fails it
// instead when RINGATTN_REQUIRE_GPU=1 (launch/gpu_check.sh: there a skip would hide a fault).
bool gpu_required();
#define RA_SKIP_WITHOUT_GPU()                                                      \
  do {                                                                             \
    const std::string reason = ::ringattn::test::no_gpu_reason();                  \
    if (!reason.empty() && ::ringattn::test::gpu_required()) {                     \
      FAIL() << "RINGATTN_REQUIRE_GPU=1 but no CUDA device is usable: " << reason; \
    }                                                                              \
    if (!reason.empty()) {                                                         \
      GTEST_SKIP() << "no CUDA device, CUDA test skipped: " << reason;             \
    }                                                                              \
  } while (0)

// A device copy of a host test tensor (same layout and strides), Device::kCUDA.
class DeviceCopy {
 public:
  explicit DeviceCopy(const Tensor& host);
  ~DeviceCopy();
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;

  TensorView view() const { return view_; }
  // Copies the device contents back into `host` (the tensor this was made from, or one of
  // the same shape, dtype and layout).
  void download(Tensor& host) const;

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  TensorView view_;
};

// Device copies of the nine tensors of a forward + backward case (a host struct with members
// q, k, v, dout, out, lse, dq, dk, dv: CaseTensors, SparseInputs).
struct DeviceTensors {
  DeviceCopy q, k, v, dout, out, lse, dq, dk, dv;
  template <typename Host>
  explicit DeviceTensors(const Host& h)
      : q(h.q),
        k(h.k),
        v(h.v),
        dout(h.dout),
        out(h.out),
        lse(h.lse),
        dq(h.dq),
        dk(h.dk),
        dv(h.dv) {}

  // Runs attn's forward on the device and downloads out and lse into `h`; with `backward`
  // then its backward, downloading dq, dk and dv.
  template <typename Attention, typename Host>
  void run(Attention& attn, Host& h, bool backward = true) {
    attn.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
    out.download(h.out);
    lse.download(h.lse);
    if (!backward) return;
    attn.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                  dk.view(), dv.view());
    dq.download(h.dq);
    dk.download(h.dk);
    dv.download(h.dv);
  }
};

}  // namespace ringattn::test
