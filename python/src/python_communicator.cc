#include "python/src/python_communicator.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <string>
#include <utility>

#include "src/base/check.h"

namespace nb = nanobind;

namespace ringattn::python {

namespace {

// A torch tensor viewing `n` elements at `data` (no copy; the caller keeps the memory alive
// until the transfer completes).
template <typename T>
nb::object torch_view(const void* data, size_t n) {
  const size_t shape[1] = {n};
  return nb::cast(nb::ndarray<nb::pytorch, T, nb::ndim<1>>(const_cast<void*>(data), 1, shape),
                  nb::rv_policy::reference);
}

// "<type>: <message>" of a Python exception (its traceback left out); the GIL is held.
std::string exception_text(nb::python_error& e) {
  try {
    return nb::cast<std::string>(nb::str(e.type().attr("__name__"))) + ": " +
           nb::cast<std::string>(nb::str(e.value()));
  } catch (const std::exception&) {
    return e.what();
  }
}

class PythonCommunicator final : public Communicator {
 public:
  explicit PythonCommunicator(nb::object transport) : transport_(std::move(transport)) {
    rank_ = nb::cast<int>(transport_.attr("rank"));
    size_ = nb::cast<int>(transport_.attr("size"));
    max_tag_ = nb::cast<int>(transport_.attr("max_tag"));
    name_ = nb::cast<std::string>(transport_.attr("name"));
  }
  ~PythonCommunicator() override {
    nb::gil_scoped_acquire gil;
    transport_.reset();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return name_.c_str(); }
  int max_tag() const override { return max_tag_; }

  CommRequest isend(const void* buf, size_t bytes, int peer, int tag) override {
    check_usable("isend");
    check_transfer_args("isend", buf, bytes, peer, tag);
    CommRequest req = start("isend", buf, bytes, peer, tag);
    count_sent(bytes);
    return req;
  }
  CommRequest irecv(void* buf, size_t bytes, int peer, int tag) override {
    check_usable("irecv");
    check_transfer_args("irecv", buf, bytes, peer, tag);
    return start("irecv", buf, bytes, peer, tag);
  }
  void wait(CommRequest& req) override {
    if (req.complete()) return;
    check_usable("wait");
    require(req.owner() == this, "wait: the request belongs to another communicator");
    auto* state = static_cast<Pending*>(req.state());
    call("wait", [&] { transport_.attr("wait")(state->handle, timeout_seconds()); });
    state->done = true;
    req.reset();
  }

  void allreduce_sum(float* data, size_t n) override { reduce(data, n, "sum"); }
  void allreduce_sum(int64_t* data, size_t n) override { reduce(data, n, "sum"); }
  void allreduce_sum(double* data, size_t n) override { reduce(data, n, "sum"); }
  void allreduce_max(int64_t* data, size_t n) override { reduce(data, n, "max"); }
  void allreduce_min(int64_t* data, size_t n) override { reduce(data, n, "min"); }

  void allgather(const void* send, void* recv, size_t bytes_per_rank) override {
    check_usable("allgather");
    check_allgather_args(send, recv, bytes_per_rank);
    call("allgather", [&] {
      transport_.attr("allgather")(torch_view<uint8_t>(send, bytes_per_rank),
                                   torch_view<uint8_t>(recv, bytes_per_rank * size_t(size_)),
                                   timeout_seconds());
    });
  }
  void broadcast(void* buf, size_t bytes, int root) override {
    check_usable("broadcast");
    check_broadcast_args(buf, bytes, root);
    call("broadcast", [&] {
      transport_.attr("broadcast")(torch_view<uint8_t>(buf, bytes), root, timeout_seconds());
    });
  }
  void barrier() override {
    check_usable("barrier");
    call("barrier", [&] { transport_.attr("barrier")(timeout_seconds()); });
  }

 private:
  // A transfer in flight: the transport's handle. Dropped without wait (an exception
  // unwinding), it is handed to the transport's cancel.
  struct Pending final : CommRequest::State {
    Pending(nb::object t, nb::object h) : transport(std::move(t)), handle(std::move(h)) {}
    ~Pending() override {
      nb::gil_scoped_acquire gil;
      if (done) {
        handle.reset();
        transport.reset();
        return;
      }
      try {
        transport.attr("cancel")(handle);
      } catch (nb::python_error& e) {
        e.discard_as_unraisable("ringattn: cancelling a torch.distributed transfer");
      }
      handle.reset();
      transport.reset();
    }
    nb::object transport, handle;
    bool done = false;
  };

  // Runs f with the GIL held. A Python exception (a failed transfer, torch.distributed's
  // timeout, a failed conversion) breaks the communicator and becomes Error(kCommunication).
  template <typename F>
  void call(const char* what, F&& f) {
    std::string message;
    {
      nb::gil_scoped_acquire gil;
      try {
        f();
        return;
      } catch (nb::python_error& e) {
        message = exception_text(e);
      } catch (const std::exception& e) {
        message = e.what();
      }
    }
    const std::string reason = name_ + " " + what + " failed on rank " + std::to_string(rank_) +
                               " of " + std::to_string(size_) + ": " + message;
    mark_broken(reason);
    fail(ErrorCode::kCommunication, reason);
  }

  CommRequest start(const char* what, const void* buf, size_t bytes, int peer, int tag) {
    std::unique_ptr<Pending> pending;
    call(what, [&] {
      nb::object handle = transport_.attr(what)(torch_view<uint8_t>(buf, bytes), peer, tag);
      pending = std::make_unique<Pending>(transport_, std::move(handle));
    });
    return CommRequest(this, std::move(pending));
  }

  template <typename T>
  void reduce(T* data, size_t n, const char* op) {
    check_usable("allreduce");
    call("allreduce",
         [&] { transport_.attr("allreduce")(torch_view<T>(data, n), op, timeout_seconds()); });
  }

  nb::object transport_;
  int rank_ = 0, size_ = 1, max_tag_ = 32767;
  std::string name_;
};

}  // namespace

std::unique_ptr<Communicator> make_python_communicator(nb::object transport) {
  return std::make_unique<PythonCommunicator>(std::move(transport));
}

}  // namespace ringattn::python
