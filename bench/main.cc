// ringattn_bench: measures the ringattn implementations on the seed's configurations
// (BENCHMARKS.md), nccl-tests style: a #-prefixed header, the machine's ceiling, one table
// row per measured configuration, optional JSON.
// Run directly, or under mpirun for --impl ring (builds with MPI initialise it in every
// run; one process is a world of one rank). Only rank 0 prints to stdout or writes JSON.
// Exit status, the same on every rank: 0 done, 1 a --check found wrong elements, 2 bad
// flags or a library error.

#include <CLI/CLI.hpp>
#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>

#include "bench/blocksparse_bench.h"
#include "bench/dilated_bench.h"
#ifdef RINGATTN_HAVE_CUDA
#include "bench/cuda_bench.h"
#endif
#include "bench/harness.h"
#include "bench/multihead_bench.h"
#include "bench/ring_bench.h"
#include "ringattn/ringattn.h"
#ifdef RINGATTN_HAVE_MPI
#include "ringattn/comm_mpi.h"
#endif

#include "src/base/agreement.h"

namespace ringattn::bench {
namespace {

constexpr int kExitWrong = 1;
constexpr int kExitError = 2;

// Integers >= `min` (CLI11's number checks print their range as doubles).
CLI::Validator at_least(int64_t min) {
  const std::string description = "integer >= " + std::to_string(min);
  return CLI::Validator(
      [min, description](std::string& text) -> std::string {
        int64_t value = 0;
        const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
        if (error != std::errc() || end != text.data() + text.size() || value < min) {
          return "value " + text + " is not an " + description;
        }
        return {};
      },
      description);
}

// Accepts the library's names of an enum's values and hands CLI11 the value's number.
template <typename E>
CLI::Validator one_of(std::initializer_list<E> values, const char* (*name)(E)) {
  std::string names;
  for (E v : values) names += (names.empty() ? "" : "|") + std::string(name(v));
  return CLI::Validator(
      [values = std::vector<E>(values), name, names](std::string& text) -> std::string {
        for (E v : values) {
          if (text == name(v)) {
            text = std::to_string(static_cast<int>(v));
            return {};
          }
        }
        return text + " is not one of " + names;
      },
      names);
}

// "--segments gives 1" or "the large preset has 3": where a row's list came from.
std::string list_source(const CLI::Option* flag, size_t size, const std::string& row) {
  if (flag->count() > 0) return format("%s gives %zu", flag->get_name().c_str(), size);
  return format("the %s preset has %zu", row.c_str(), size);
}

// The command line: the flags of BENCHMARKS.md and the rows they describe.
class CommandLine {
 public:
  CommandLine();

  // Parses argv; returns the exit status when the program should stop here (--help, a bad
  // flag). Only with `print` does it print help or the error.
  std::optional<int> parse(int argc, char** argv, bool print);

  // The implementations to measure on `ranks` ranks: dilated and multihead run in one
  // process, so --impl all on several ranks means ring and distributed (the layers: fp32
  // only). Throws on one that is not built.
  std::vector<std::string> impls(int ranks) const;

  // The rows to measure, each checked by the library before anything is measured (and for
  // `impls` on `ranks` ranks). Throws on a pass that is not built, or on an invalid row.
  std::vector<DilatedShape> rows(const std::vector<std::string>& impls, int ranks) const;

  const std::string& impl() const { return impl_; }
  const RunOptions& options() const { return options_; }
  const std::string& json_path() const { return json_path_; }
  const SparseOptions& sparse() const { return sparse_; }

 private:
  // A flag that sets a field of the rows: with --config it overrides the preset's field,
  // without --config it makes a "custom" row.
  template <typename T>
  CLI::Option* add_shape_flag(const std::string& name, T DilatedShape::*field,
                              const std::string& help) {
    CLI::Option* option = app_.add_option(name, given_.*field, help);
    shape_flags_.push_back(
        {option, [this, field](DilatedShape& row) { row.*field = given_.*field; }});
    return option;
  }
  DilatedShape row(const std::string& name) const;

  struct ShapeFlag {
    CLI::Option* option;
    std::function<void(DilatedShape&)> apply;
  };

  CLI::App app_{
      "ringattn_bench: times the ringattn implementations on the seed's "
      "configurations and compares them with the machine's FLOP/s ceiling measured "
      "in the same run (BENCHMARKS.md)."};
  std::string impl_ = "all", config_ = "all", json_path_;
  DType dtype_ = DType::kF32;
  RunOptions options_;
  SparseOptions sparse_;
  DilatedShape given_;
  std::vector<ShapeFlag> shape_flags_;
  CLI::Option *config_flag_, *kv_heads_flag_, *segments_flag_, *dilations_flag_;
  CLI::Option *warmup_flag_, *iters_flag_;
};

CommandLine::CommandLine() {
  app_.add_option("--impl", impl_, "implementation to measure")
      ->check(CLI::IsMember({"dilated", "multihead", "ring", "distributed", "blocksparse", "all"}))
      ->capture_default_str();
  config_flag_ =
      app_.add_option("--config", config_,
                      "small, medium, large: the seed's; dense: one dense segment; dense-ring: "
                      "one causal branch over N = 16384; 1m: 1,048,576 tokens (--warmup 0 "
                      "--iters 1 unless given); sparse: B=1, N=16384, not causal (the --impl "
                      "blocksparse default); all: small, medium and large (the default, "
                      "unless shape flags without --config ask for one \"custom\" row, which "
                      "starts from small's values)")
          ->check(CLI::IsMember(
              {"small", "medium", "large", "dense", "dense-ring", "1m", "sparse", "all"}));

  add_shape_flag("--batch", &DilatedShape::batch, "batch size B")->check(at_least(1));
  add_shape_flag("--seq", &DilatedShape::seq, "sequence length N")->check(at_least(1));
  add_shape_flag("--heads", &DilatedShape::heads, "query heads H (default 8)")->check(at_least(1));
  kv_heads_flag_ =
      add_shape_flag("--kv-heads", &DilatedShape::kv_heads, "key/value heads Hkv (default H)")
          ->check(at_least(1));
  add_shape_flag("--head-dim", &DilatedShape::head_dim, "head dimension D (default 64)")
      ->check(at_least(1));
  segments_flag_ =
      add_shape_flag("--segments", &DilatedShape::segments, "segment lengths, e.g. 2048,4096")
          ->delimiter(',')
          ->check(at_least(1));
  dilations_flag_ =
      add_shape_flag("--dilations", &DilatedShape::dilations, "dilation rates, e.g. 1,2")
          ->delimiter(',')
          ->check(at_least(1));
  add_shape_flag("--mode", &DilatedShape::mode, "head assignment (default groups)")
      ->transform(one_of({Mode::kGroups, Mode::kLongNet}, mode_name));
  add_shape_flag("--causal", &DilatedShape::causal, "causal masking (default: the preset's)")
      ->check(CLI::IsMember({"0", "1"}));

  app_.add_option("--dtype", dtype_, "type of q, k, v and out (default fp32)")
      ->transform(one_of({DType::kF32, DType::kBF16, DType::kF16}, dtype_name));
  app_.add_option("--cpu-bf16", options_.cpu_bf16,
                  "products of bf16 rows on the CPU: auto (AMX, else AVX512_BF16 dot products, "
                  "else widen), widen (to fp32), dot, amx (default auto)")
      ->transform(
          one_of({CpuBf16::kAuto, CpuBf16::kWiden, CpuBf16::kDot, CpuBf16::kAmx}, cpu_bf16_name));
  app_.add_option("--backward", options_.backward,
                  "1: time the backward (after one untimed forward) instead of the forward")
      ->check(CLI::IsMember({"0", "1"}));
  app_.add_option("--backend", options_.backend, "default cpu")
#ifdef RINGATTN_HAVE_CUDA
      ->transform(one_of({Backend::kCpu, Backend::kReference, Backend::kCuda}, backend_name));
#else
      ->transform(one_of({Backend::kCpu, Backend::kReference}, backend_name));
#endif
  app_.add_option("--head-ranks", options_.head_ranks,
                  "--impl distributed: ranks per head-parallel group (the others split the "
                  "sequence); must divide the rank count, H and Hkv")
      ->check(at_least(1))
      ->capture_default_str();
  app_.add_option("--threads", options_.threads, "CPU threads (per rank); 0 = OpenMP's default")
      ->check(at_least(0))
      ->capture_default_str();
  warmup_flag_ = app_.add_option("--warmup", options_.warmup, "untimed iterations per row")
                     ->check(at_least(0))
                     ->capture_default_str();
  iters_flag_ = app_.add_option("--iters", options_.iters, "timed iterations per row")
                    ->check(at_least(1))
                    ->capture_default_str();
  app_.add_flag("--check", options_.check,
                "outside the timed loop, compare batch 0 of each dilated row with the fp64 "
                "reference, and each rank's rows of a ring row with DilatedAttention over "
                "the whole sequence (when that fits 512 MiB); exit 1 if any element is "
                "outside tolerance");
  app_.add_option("--block-size", sparse_.block_size, "--impl blocksparse: rows per block")
      ->check(at_least(1))
      ->capture_default_str();
  app_.add_option("--densities", sparse_.densities,
                  "--impl blocksparse: target densities (local_window patterns), e.g. 0.1,0.5")
      ->delimiter(',');
  app_.add_option("--json", json_path_, "write one JSON record per row to this file");
}

std::optional<int> CommandLine::parse(int argc, char** argv, bool print) {
  try {
    app_.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return print ? app_.exit(e) : 0;  // --help
    if (print) std::fprintf(stderr, "error: %s\nRun with --help for the options.\n", e.what());
    return kExitError;
  }
  if (config_ == "1m") {  // one forward takes minutes
    if (warmup_flag_->count() == 0) options_.warmup = 0;
    if (iters_flag_->count() == 0) options_.iters = 1;
  }
  return std::nullopt;
}

DilatedShape CommandLine::row(const std::string& name) const {
  DilatedShape row = preset(name);
  for (const ShapeFlag& flag : shape_flags_) {
    if (flag.option->count() > 0) flag.apply(row);
  }
  if (kv_heads_flag_->count() == 0) row.kv_heads = row.heads;
  if (name == "sparse") {  // block-sparse rows: the dense comparison is one branch s = N
    row.segments = {row.seq};
    row.dilations = {1};
  }
  row.dtype = dtype_;
  if (row.segments.size() != row.dilations.size()) {
    throw std::invalid_argument(
        list_source(segments_flag_, row.segments.size(), name) + " segment lengths but " +
        list_source(dilations_flag_, row.dilations.size(), name) +
        " dilation rates; give --segments and --dilations with the same number of values");
  }
  validate(row, options_.backend);
  return row;
}

std::vector<std::string> CommandLine::impls(int ranks) const {
  if (impl_ == "all") {  // the layers compute in fp32 only
    std::vector<std::string> all =
        ranks > 1 ? std::vector<std::string>{"ring", "distributed"}
                  : std::vector<std::string>{"dilated", "multihead", "ring", "distributed"};
    if (dtype_ != DType::kF32)
      std::erase_if(all, [](const std::string& i) { return i != "dilated" && i != "ring"; });
    return all;
  }
  if ((impl_ == "dilated" || impl_ == "multihead") && ranks > 1) {
    throw std::invalid_argument(
        format("--impl %s runs in one process, not on %d ranks; run it without mpirun (or with "
               "-np 1), or measure --impl %s",
               impl_.c_str(), ranks, impl_ == "dilated" ? "ring" : "distributed"));
  }
  return {impl_};
}

std::vector<DilatedShape> CommandLine::rows(const std::vector<std::string>& impls,
                                            int ranks) const {
  std::vector<std::string> names = {"small", "medium", "large"};
  const bool any_shape_flag = std::any_of(shape_flags_.begin(), shape_flags_.end(),
                                          [](const ShapeFlag& f) { return f.option->count() > 0; });
  if (config_flag_->count() > 0 && config_ != "all") {
    names = {config_};
  } else if (impl_ == "blocksparse") {
    names = {"sparse"};
  } else if (config_flag_->count() == 0 && any_shape_flag) {
    names = {"custom"};
  }
  std::vector<DilatedShape> rows;
  for (const std::string& name : names) {
    rows.push_back(row(name));
    if (std::find(impls.begin(), impls.end(), "ring") != impls.end()) {
      validate_ring(rows.back(), options_, ranks);
    }
    if (impl_ == "blocksparse") validate_blocksparse(rows.back(), options_, sparse_, ranks);
    for (const char* layer : {"multihead", "distributed"}) {
      if (std::find(impls.begin(), impls.end(), layer) != impls.end()) {
        validate_layer(rows.back(), options_, layer, ranks);
      }
    }
  }
  return rows;
}

// The ceiling of the whole job: every rank measures its own threads at once, summed.
Ceiling measure_job_ceiling(Communicator& world, int threads) {
  Ceiling ceiling = measure_ceiling(threads);
  world.allreduce_sum(&ceiling.sgemm_gflops, 1);
  world.allreduce_sum(&ceiling.fma_gflops, 1);
  return ceiling;
}

int run(int argc, char** argv, Communicator& world) {
  const bool lead = world.rank() == 0;  // prints and writes the JSON
  CommandLine cli;
  if (const std::optional<int> status = cli.parse(argc, argv, lead)) return *status;
  const std::vector<std::string> impls = cli.impls(world.size());
  const std::vector<DilatedShape> rows = cli.rows(impls, world.size());
  const RunOptions& options = cli.options();
  std::ofstream json_file;
  check_on_all_ranks(world, [&] {
    if (!lead || cli.json_path().empty()) return;
    json_file.open(cli.json_path());
    if (!json_file) {
      throw Error(ErrorCode::kInvalidArgument, "cannot write --json file " + cli.json_path());
    }
  });

  const int threads = resolved_threads(options.threads);
  const RunInfo run_info{backend_name(options.backend), threads, world.size()};
  if (lead) {
    print_header(run_info);
    if (cli.impl() == "all" && world.size() > 1) {
      std::printf("# --impl all on %d ranks: ring rows only (dilated runs in one process)\n",
                  world.size());
    }
    std::fprintf(stderr, "# measuring the ceiling (%s)\n",
                 options.backend == Backend::kCuda
                     ? "cuBLAS bf16 GEMM"
                     : format("sgemm %d^3, peak FMA loop", kSgemmSize).c_str());
  }
#ifdef RINGATTN_HAVE_CUDA
  const bool gpu = options.backend == Backend::kCuda;
  const Ceiling ceiling = gpu ? measure_cuda_ceiling() : measure_job_ceiling(world, threads);
  if (lead && gpu) print_cuda_ceiling(ceiling);
  if (lead && !gpu) print_ceiling(ceiling, run_info);
#else
  const Ceiling ceiling = measure_job_ceiling(world, threads);
  if (lead) print_ceiling(ceiling, run_info);
#endif
  if (lead) print_table_header();

  nlohmann::ordered_json records = nlohmann::ordered_json::array();
  bool any_wrong = false;
  const size_t total = rows.size() * impls.size();
  size_t done = 0;
  for (const DilatedShape& row : rows) {
    for (const std::string& impl : impls) {
      if (lead) {
        std::fprintf(stderr, "# running %s %s %s on %d rank(s) (%zu of %zu)\n", impl.c_str(),
                     row.name.c_str(), dtype_name(row.dtype),
                     impl == "dilated" || impl == "multihead" ? 1 : world.size(), ++done, total);
      }
      std::vector<MeasuredRow> measured;
      if (impl == "blocksparse") {
        measured = run_blocksparse(row, options, cli.sparse(), world);
      } else {
        MeasuredRow m;
        m.record = impl == "ring"          ? run_ring(row, options, world)
                   : impl == "multihead"   ? run_multihead(row, options, m.extra)
                   : impl == "distributed" ? run_distributed(row, options, world)
                                           : run_dilated(row, options);
        measured.push_back(std::move(m));
      }
      for (const MeasuredRow& m : measured) {
        if (lead) print_table_row(m.record, ceiling);
        if (lead && !m.note.empty()) std::printf("%s\n", m.note.c_str());
        if (lead && impl == "multihead") print_layer_overhead(m.record, m.extra);
        records.push_back(to_json(m.record, ceiling));
        if (!m.extra.is_null()) records.back().update(m.extra);
        any_wrong = any_wrong || m.record.wrong.value_or(0) > 0;
      }
    }
  }
  if (json_file.is_open()) {
    json_file << records.dump(2) << "\n";
    if (!json_file) throw std::runtime_error("writing --json file " + cli.json_path() + " failed");
  }
  return any_wrong ? kExitWrong : 0;
}

std::unique_ptr<Communicator> make_world() {
#ifdef RINGATTN_HAVE_MPI
  return make_mpi_communicator(MPI_COMM_WORLD);
#else
  return make_self_communicator();
#endif
}

// Ends every rank of the job with `status` (an error on this rank alone: the others may be
// waiting for it in a collective).
[[noreturn]] void abort_job(int status) {
#ifdef RINGATTN_HAVE_MPI
  MPI_Abort(MPI_COMM_WORLD, status);
#endif
  std::exit(status);
}

// run() on the world communicator; an exception is exit status 2. Flag errors and the
// library's errors are raised on every rank alike: rank 0 reports them and every rank
// returns. Any other error may be this rank's alone: it is reported with the rank and ends
// the job.
int run_world(int argc, char** argv) {
  std::unique_ptr<Communicator> world;
  try {
    world = make_world();
    return run(argc, argv, *world);
  } catch (const std::exception& e) {
    const bool on_every_rank = dynamic_cast<const Error*>(&e) != nullptr ||
                               dynamic_cast<const std::invalid_argument*>(&e) != nullptr;
    if (!world || world->size() == 1 || on_every_rank) {
      if (!world || world->rank() == 0) std::fprintf(stderr, "error: %s\n", e.what());
      return kExitError;
    }
    std::fprintf(stderr, "error on rank %d: %s\n", world->rank(), e.what());
    abort_job(kExitError);
  }
}

}  // namespace
}  // namespace ringattn::bench

int main(int argc, char** argv) {
#ifdef RINGATTN_HAVE_MPI
  int provided = 0;  // make_mpi_communicator checks it
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
#endif
  const int status = ringattn::bench::run_world(argc, argv);
#ifdef RINGATTN_HAVE_MPI
  MPI_Finalize();
#endif
  return status;
}
