#include "bench/harness.h"

#include <malloc.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <numeric>
#include <sstream>

#include "ringattn/ringattn.h"

namespace ringattn::bench {

std::string format(const char* fmt, ...) {
  va_list args, sizing;
  va_start(args, fmt);
  va_copy(sizing, args);
  const int size = std::vsnprintf(nullptr, 0, fmt, sizing);
  va_end(sizing);
  std::string text(static_cast<size_t>(std::max(size, 0)), '\0');
  std::vsnprintf(text.data(), text.size() + 1, fmt, args);
  va_end(args);
  return text;
}

int resolved_threads(int threads) {
  return threads > 0 ? threads : omp_get_max_threads();
}

Timing time_calls(const std::function<void()>& fn, int warmup, int iters, Communicator* ranks) {
  for (int i = 0; i < warmup; ++i) {
    if (ranks) ranks->barrier();
    fn();
  }
  std::vector<int64_t> ns(static_cast<size_t>(iters));
  for (int64_t& t : ns) {
    if (ranks) ranks->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
            .count();
  }
  if (ranks) ranks->allreduce_max(ns.data(), ns.size());
  std::vector<double> ms(ns.size());
  std::transform(ns.begin(), ns.end(), ms.begin(),
                 [](int64_t t) { return 1e-6 * static_cast<double>(t); });
  const double n = static_cast<double>(ms.size());
  Timing t;
  t.mean_ms = std::accumulate(ms.begin(), ms.end(), 0.0) / n;
  double sq = 0.0;
  for (double x : ms) sq += (x - t.mean_ms) * (x - t.mean_ms);
  t.std_ms = ms.size() > 1 ? std::sqrt(sq / (n - 1.0)) : 0.0;
  std::sort(ms.begin(), ms.end());
  t.min_ms = ms.front();
  const size_t mid = ms.size() / 2;
  t.median_ms = ms.size() % 2 ? ms[mid] : 0.5 * (ms[mid - 1] + ms[mid]);
  return t;
}

namespace {

// A "Key:   123 kB" line of /proc/self/status in MB; 0 where it cannot be read.
double proc_status_mb(const std::string& key) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream fields(line.substr(key.size() + 1));
      double kb = 0.0;
      fields >> kb;
      return kb / 1024.0;
    }
  }
  return 0.0;
}

}  // namespace

PeakMemory::PeakMemory() {
  // Heap pages that earlier rows freed still count in RSS and would be reused unseen: hand
  // them back first, so that the baseline is the live memory.
  malloc_trim(0);
  std::ofstream("/proc/self/clear_refs") << "5";
  baseline_mb_ = proc_status_mb("VmRSS");
}

double PeakMemory::peak_mb() const {
  return proc_status_mb("VmHWM") - baseline_mb_;
}

void print_header(const RunInfo& run) {
  std::array<char, 256> host{};
  if (gethostname(host.data(), host.size() - 1) != 0) host[0] = '\0';
  std::array<char, 64> date{};
  const std::time_t now = std::time(nullptr);
  std::strftime(date.data(), date.size(), "%Y-%m-%dT%H:%M:%S%z", std::localtime(&now));
  std::printf("# ringattn_bench: ringattn %s, build %s\n", version(), RINGATTN_BENCH_BUILD_TYPE);
  std::printf("# backend %s, SIMD %s, threads %d, ranks %d\n", run.backend.c_str(),
              cpu_simd_target(), run.threads, run.ranks);
  std::printf("# host %s, date %s\n", host.data(), date.data());
}

void print_ceiling(const Ceiling& c, const RunInfo& run) {
  const std::string team = run.ranks > 1
                               ? format("%d ranks x %d threads, summed", run.ranks, run.threads)
                               : format("%d threads", run.threads);
  std::printf("# ceiling (a) sgemm %d^3, %s, %s: %.1f GFLOP/s\n", kSgemmSize, c.blas.c_str(),
              team.c_str(), c.sgemm_gflops);
  std::printf("# ceiling (b) peak FMA, %s (%d lanes x %d chains), %s: %.1f GFLOP/s\n",
              c.fma_isa.c_str(), c.fma_lanes, kFmaChains, team.c_str(), c.fma_gflops);
  std::printf(
      "# ceiling_gflops %.1f (the higher of the two; %%ceil of fp32 products is against it)\n",
      c.gflops());
  const auto bf16 = [](double gflops) {
    return gflops > 0 ? format("%.1f GFLOP/s", gflops) : std::string("not on this CPU");
  };
  std::printf(
      "# ceiling (c) peak vdpbf16ps (AVX512_BF16, %d chains), %s: %s (%%ceil of prod=dot)\n",
      kFmaChains, team.c_str(), bf16(c.dot_bf16_gflops).c_str());
  std::printf("# ceiling (d) peak TDPBF16PS (AMX-BF16, 4 tiles), %s: %s (%%ceil of prod=amx)\n#\n",
              team.c_str(), bf16(c.amx_bf16_gflops).c_str());
}

namespace {

struct Column {
  const char* name;
  int width;
};

constexpr std::array<Column, 24> kColumns = {{
    {"impl", 11},      {"pass", 4},    {"config", 10},  {"dtype", 5},  {"prod", 4},
    {"mode", 7},       {"causal", 6},  {"B", 3},        {"N", 7},      {"H", 4},
    {"D", 4},          {"P", 3},       {"mean_ms", 10}, {"std_ms", 9}, {"min_ms", 10},
    {"median_ms", 10}, {"peak_mb", 9}, {"io_mb", 9},    {"tok/s", 11}, {"GFLOP/s", 9},
    {"%ceil", 6},      {"sent_mb", 9}, {"wait_ms", 9},  {"wrong", 8},
}};

// One table line: `prefix`, then each cell right-aligned in its column.
void print_line(const char* prefix, const std::array<std::string, kColumns.size()>& cells) {
  std::string line = prefix;
  for (size_t i = 0; i < kColumns.size(); ++i) {
    line += format(" %*s", kColumns[i].width, cells[i].c_str());
  }
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

}  // namespace

void print_table_header() {
  std::array<std::string, kColumns.size()> names;
  for (size_t i = 0; i < kColumns.size(); ++i) names[i] = kColumns[i].name;
  print_line("#", names);
}

void print_table_row(const Record& r, const Ceiling& ceiling) {
  const Timing& t = r.timing;
  print_line(" ", {r.impl,
                   r.backward ? "bwd" : "fwd",
                   r.config,
                   r.dtype,
                   r.products,
                   r.mode,
                   r.causal ? "1" : "0",
                   std::to_string(r.batch),
                   std::to_string(r.seq),
                   std::to_string(r.heads),
                   std::to_string(r.head_dim),
                   std::to_string(r.ranks),
                   format("%.3f", t.mean_ms),
                   format("%.3f", t.std_ms),
                   format("%.3f", t.min_ms),
                   format("%.3f", t.median_ms),
                   format("%.1f", r.peak_mb),
                   format("%.1f", r.io_mb),
                   format("%.0f", r.tokens_per_s),
                   format("%.1f", r.gflops),
                   format("%.1f", 100.0 * r.gflops / ceiling.gflops_for(r.products)),
                   format("%.2f", static_cast<double>(r.bytes_sent) / kMiB),
                   format("%.3f", r.comm_wait_ms),
                   r.wrong ? std::to_string(*r.wrong) : "-"});
}

nlohmann::ordered_json to_json(const Record& r, const Ceiling& ceiling) {
  const Timing& t = r.timing;
  return {
      {"impl", r.impl},
      {"config", r.config},
      {"backend", r.backend},
      {"dtype", r.dtype},
      {"products", r.products},
      {"mode", r.mode},
      {"causal", r.causal},
      {"backward", r.backward},
      {"batch", r.batch},
      {"seq", r.seq},
      {"heads", r.heads},
      {"kv_heads", r.kv_heads},
      {"head_dim", r.head_dim},
      {"segments", r.segments},
      {"dilations", r.dilations},
      {"ranks", r.ranks},
      {"threads", r.threads},
      {"mean_ms", t.mean_ms},
      {"std_ms", t.std_ms},
      {"min_ms", t.min_ms},
      {"median_ms", t.median_ms},
      {"peak_mb", r.peak_mb},
      {"io_mb", r.io_mb},
      {"tokens_per_s", r.tokens_per_s},
      {"gflops", r.gflops},
      {"ceiling_gflops", ceiling.gflops_for(r.products)},
      {"sgemm_gflops", ceiling.sgemm_gflops},
      {"fma_peak_gflops", ceiling.fma_gflops},
      {"dot_bf16_peak_gflops", ceiling.dot_bf16_gflops},
      {"amx_bf16_peak_gflops", ceiling.amx_bf16_gflops},
      {"bytes_sent", r.bytes_sent},
      {"messages_sent", r.messages_sent},
      {"bytes_sent_total", r.bytes_sent_total},
      {"comm_wait_ms", r.comm_wait_ms},
      {"wrong", r.wrong ? nlohmann::ordered_json(*r.wrong) : nlohmann::ordered_json(nullptr)},
  };
}

}  // namespace ringattn::bench
