#pragma once
// The part of ringattn_bench every implementation shares: timing and statistics, peak
// memory, and the output (the #-prefixed header, the aligned table and the JSON records).

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/ceiling.h"
#include "ringattn/comm.h"

namespace ringattn::bench {

inline constexpr double kMiB = 1024.0 * 1024.0;

// printf into a std::string.
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// The thread count a --threads value means: itself, or OpenMP's default for 0.
int resolved_threads(int threads);

struct Timing {
  double mean_ms = 0, std_ms = 0, min_ms = 0, median_ms = 0;
};

// Calls `fn` `warmup` times untimed, then `iters` (>= 1) times with std::chrono::steady_clock
// around each call; std is the sample standard deviation (0 for one iteration).
// With `ranks` (a collective `fn`, called on every rank): a barrier before each call, and
// an iteration's time is the longest over the ranks (the statistics agree on every rank).
Timing time_calls(const std::function<void()>& fn, int warmup, int iters,
                  Communicator* ranks = nullptr);

// Peak resident memory of the process since construction, above the resident size at
// construction. Construct it just before allocating a row's tensors.
class PeakMemory {
 public:
  // Resets the kernel's high-water mark (VmHWM) to the current RSS (writes "5" to
  // /proc/self/clear_refs; ignored where that is not allowed) and records the RSS.
  PeakMemory();
  // VmHWM - RSS at construction, in MB (1 MB = 2^20 bytes).
  double peak_mb() const;

 private:
  double baseline_mb_;
};

// One measured row: the table's columns and the JSON record's keys.
struct Record {
  std::string impl, config, backend, dtype, mode;
  // How the products ran: "fp32" (fp32 tensors, or bf16/fp16 widened while packing), "dot"
  // or "amx" (the CPU's bf16 instructions), "gpu" on the CUDA backend.
  std::string products = "fp32";
  bool causal = false, backward = false;
  int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<int64_t> segments, dilations;
  int ranks = 1, threads = 0;           // threads per rank
  Timing timing;                        // of the whole job: per iteration the slowest rank
  double peak_mb = 0, io_mb = 0;        // per rank: the largest over the ranks
  double tokens_per_s = 0, gflops = 0;  // of the whole problem
  // Per forward (all 0 for a single process): payload bytes and messages one rank sent (the
  // most over the ranks), bytes all ranks sent, and the time a rank waited for transfers
  // (not hidden behind compute; mean over the timed iterations, the most over the ranks).
  int64_t bytes_sent = 0, messages_sent = 0, bytes_sent_total = 0;
  double comm_wait_ms = 0;
  std::optional<int64_t> wrong;  // elements outside tolerance; empty without --check
};

// One measured row, what to print under it and what to add to its JSON record.
struct MeasuredRow {
  Record record;
  std::string note;  // a "# ..." line, or empty
  // Keys beyond Record's: a block-sparse row's density and ratio to the dense time, a
  // multihead row's core and GEMM times.
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();
};

// What the header reports about the run as a whole.
struct RunInfo {
  std::string backend;
  int threads = 0;  // resolved (never 0)
  int ranks = 1;
};

void print_header(const RunInfo& run);
// The ceiling of the whole job (`run.ranks` ranks of `run.threads` threads).
void print_ceiling(const Ceiling& ceiling, const RunInfo& run);
void print_table_header();
void print_table_row(const Record& r, const Ceiling& ceiling);
nlohmann::ordered_json to_json(const Record& r, const Ceiling& ceiling);

}  // namespace ringattn::bench
