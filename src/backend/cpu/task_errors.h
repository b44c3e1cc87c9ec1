#pragma once
// Exceptions inside OpenMP regions: one that leaves a parallel region terminates the
// process, so each task runs inside TaskErrors::run, which keeps the first exception (later
// tasks are skipped once one failed), and the thread that opened the region rethrows it
// after the region with rethrow().

#include <atomic>
#include <exception>
#include <mutex>

namespace ringattn::cpu {

class TaskErrors {
 public:
  template <typename Fn>
  void run(Fn&& fn) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      fn();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};

}  // namespace ringattn::cpu
