#pragma once
// The fused CPU kernel: flash-style (O, lse) partials over strided (dilated) rows, merged
// per row block; OpenMP threads over (batch, head, row block); SIMD through Highway with
// runtime dispatch.

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "src/base/dtype.h"
#include "src/plan/problem.h"

namespace ringattn::cpu {

constexpr int64_t kMaxHeadDim = 256;

// Computes p.out (and p.lse when set) from the keys in the local views, on
// options.num_threads threads (0: OpenMP's default) with the products options.cpu_bf16 picks.
void forward(const Problem& p, const ExecOptions& options);

// Whether some row of the shard has a finite |lse| >= kPreciseLse (problem.h): then a
// backward runs the forward again for the lse in double (PreciseLse).
bool needs_precise_lse(const Problem& p);

// The lse of a shard in double ([B][H][shard_rows]), for a backward (Problem::lse_precise):
// recompute() runs the forward (its output not written) on `p`'s queries and keys.
class PreciseLse {
 public:
  explicit PreciseLse(const Problem& p);
  // The forward problem that writes only this lse (for a ring's forward, or cpu::forward).
  const Problem& forward_problem() const { return forward_; }
  // Points p.lse_precise here.
  void attach(Problem& p) const;

 private:
  std::vector<double> lse_;
  Problem forward_;
};

// Computes bp.dq, bp.dk, bp.dv (SPEC.md backward) from the saved out and lse (recomputing
// the lse in double first where needs_precise_lse).
void backward(const BackwardProblem& bp, const ExecOptions& options);

namespace detail {
struct KeySource;
struct BackwardWork;
using KeySourceFn =
    std::function<bool(int64_t b, int64_t h, int hb, int64_t segment, KeySource& source)>;
}  // namespace detail

// The backward of one shard built from passes (a ring): dq, dk, dv are summed in fp32
// between passes, in the caller's tensors themselves when they are fp32, else in fp32
// accumulators ([B, shard_rows, heads, D]) cast at the end.
class ShardBackward {
 public:
  // Fills `works` with the units of task `task`; each task's units run in order on one
  // thread, and tasks of one pass must not share dq / dk / dv rows.
  using WorkFn = std::function<void(int64_t task, std::vector<detail::BackwardWork>& works)>;

  // `max_key_rows` > 0 bounds the keys of one unit (scratch size) when the branches' own
  // bound (their kept rows per segment) is larger than any unit the caller forms. fp32
  // bp.dq / dk / dv are zeroed here and summed into directly; null ones get accumulators.
  ShardBackward(const BackwardProblem& bp, const ExecOptions& options, int64_t max_key_rows = 0);
  ~ShardBackward();
  // Zeroes the sums again, for a problem whose pointers or rows (not its shape) changed
  // since: one shard serves the passes of several ring steps without allocating.
  void restart();
  // Every branch's local queries against its local keys (one pass per branch).
  void local_passes(const std::function<void()>& poll = nullptr);
  // One pass of `tasks` tasks; `poll` runs on the calling thread between tasks.
  void pass(int64_t tasks, const WorkFn& works, const std::function<void()>& poll = nullptr);
  // Fills the key side of `w` for head h's entry hb in segment `segment`: this shard's keys
  // of that segment, their gradients added to this shard's accumulators. False if the
  // shard holds none of them. The caller sets the queries (w.tq_begin, w.tq_end).
  bool local_key_work(int64_t b, int64_t h, int hb, int64_t segment, detail::BackwardWork& w) const;
  // The fp32 gradient rows of kv head `kv_head` at local row `local_row` of batch b.
  float* dk_row(int64_t b, int64_t local_row, int64_t kv_head);
  float* dv_row(int64_t b, int64_t local_row, int64_t kv_head);
  // Points w.dk / w.dv at those rows, consecutive keys `rate` rows apart.
  void key_grads(detail::BackwardWork& w, int64_t b, int64_t local_row, int64_t kv_head,
                 int64_t rate) const;
  // dq of heads [h0, h1) for all the shard's rows as [B][h1 - h0][rows][D] (fp32): a partial
  // result for another rank; add_dq adds one for `rows` rows from global row `row0`.
  void export_dq(int64_t h0, int64_t h1, float* dst) const;
  void add_dq(int64_t h0, int64_t h1, int64_t row0, int64_t rows, const float* src);
  // Casts the accumulators into bp.dq, bp.dk, bp.dv (fp32 tensors already hold the result).
  // Only for a shard whose bp.dq, dk, dv are set.
  void write_output() const;

 private:
  struct State;
  const BackwardProblem& bp_;
  detail::KeySourceFn local_;  // this shard's own keys
  std::unique_ptr<State> s_;
};

// The forward of one shard built from several passes (a ring): the shard's (O, lse) stay
// in fp32 accumulators ([B, H, shard_rows, D], O(N / P) memory) between passes.
class ShardForward {
 public:
  // Row blocks never straddle the global row `split` (so a pass can stop there).
  ShardForward(const Problem& p, const ExecOptions& options, int64_t split = -1);
  ~ShardForward();
  // Plans the tasks again and clears the accumulators, for a problem whose pointers or rows
  // (not its shape) changed since: one shard serves several ring steps without reallocating.
  void restart();
  // Every local query piece of the rows before `row_end` (global) attends to the keys
  // `sources` names; results are merged into the accumulators in a fixed order. `poll`
  // runs on the calling thread between tasks (to progress communication meanwhile).
  void pass(const detail::KeySourceFn& sources, const std::function<void()>& poll = nullptr,
            int64_t row_end = INT64_MAX);
  // The (O, lse) of heads [h0, h1) for all the shard's rows, as [B][h1 - h0][rows][D] O
  // followed by [B][h1 - h0][rows][2] lse (fp32 pairs: split_double of the double lse): a
  // partial result for another rank, of partial_floats(...) floats.
  void export_rows(int64_t h0, int64_t h1, float* dst) const;
  // Merges such a partial, for `rows` rows from global row `row0`, into the accumulators.
  void merge_rows(int64_t h0, int64_t h1, int64_t row0, int64_t rows, const float* src);
  // Casts the accumulators into p.out (times the output factor) and p.lse.
  void write_output() const;

  // Global rows [n0, n1) of the shard, head h, batch b, attend with one online softmax to
  // every key of sources[0 .. num_sources) (key index = global row, rate 1); the result is
  // merged into the accumulators.
  using Attend = std::function<void(int64_t b, int64_t h, int64_t n0, int64_t n1,
                                    const detail::KeySource* sources, int64_t num_sources)>;
  // One pass of the caller's tasks (block-sparse attention): task(t, attend) for t in
  // [0, tasks), on OpenMP threads; tasks of one pass must not share rows. `poll` runs on the
  // calling thread between tasks.
  void pass_rows(int64_t tasks, const std::function<void(int64_t task, const Attend& attend)>& task,
                 const std::function<void()>& poll = nullptr);

 private:
  struct State;
  int64_t row_index(int64_t b, int64_t h, int64_t n) const;
  const Problem& p_;
  std::unique_ptr<State> s_;
};

// The SIMD target chosen at run time for this CPU (e.g. "AVX2", "AVX3").
const char* simd_target();

namespace detail {

// Tile geometry of one forward call, shared by the driver and the per-target kernels.
//
// Everything is vectorised across queries: a register micro-tile is kMicroRows rows (keys
// for scores, head-dim entries for the output) by kMicroVecs vectors of queries, and a
// query panel is kMicroVecs vectors wide (16 queries on AVX2, 32 on AVX-512).
struct Tiles {
  static constexpr int64_t kMicroRows = 6;
  static constexpr int64_t kMicroVecs = 2;
  static constexpr int64_t kMaxPanel = kMicroVecs * 16;  // widest panel (AVX-512)
  static constexpr int64_t kKeyTile = 21 * kMicroRows;   // key rows per tile (126: no padding)
  static constexpr int64_t kKeyRows = (kKeyTile + kMicroRows - 1) / kMicroRows * kMicroRows;
  static constexpr int64_t kMaxRowBlock = 8192;  // most rows of one task
  int64_t padded_dim;                // D rounded up to kMicroRows (kWiden) or to 32 (kDot, kAmx)
  int64_t row_block;                 // sequence rows per task
  CpuBf16 kernel = CpuBf16::kWiden;  // the products (resolved)
  int64_t ld_rows() const { return row_block + kMaxPanel; }  // room for a padded panel
};

// One bit per query panel of a task: the panels whose O^T columns hold a sum (the first
// product of a panel writes them, so O^T needs no zeroing, and a panel never started is not
// read). Not std::bitset: its members could be compiled out of line for a SIMD target.
struct PanelBits {
  uint64_t words[Tiles::kMaxRowBlock / 64] = {};
  bool test(int64_t i) const { return ((words[i / 64] >> (i % 64)) & 1u) != 0; }
  void set(int64_t i) { words[i / 64] |= uint64_t{1} << (i % 64); }
};

// Per-thread scratch: every buffer is O(tile) or O(row block), none depends on N.
struct Scratch {
  float* qt;      // [padded_dim][ld_rows], Q^T of the current piece, times scale*log2(e)
  float* ot;      // [padded_dim][ld_rows], unnormalised O^T of the current piece
  float* m;       // [ld_rows], running max per query (log2 units)
  float* l;       // [ld_rows], running sum per query
  float* k;       // [kKeyRows][padded_dim], the current key tile (zero rows past its end)
  float* v;       // [kKeyTile][padded_dim], the current value tile
  float* s;       // [kKeyRows][kMaxPanel], S^T then P^T of one query panel
  float* acc_o;   // [row_block][padded_dim], merged normalised output of the block
  double* acc_l;  // [row_block], merged lse (natural log, in double: see merge_queries)
  void* bf16;     // kDot, kAmx: bf16_forward_scratch_bytes (then qt, k, v and s are unused)
};

// Keys and values one piece attends to: kept indices [t_begin, t_end) of a branch segment,
// the row of kept index t at k + (t - t_begin) * k_stride elements (batch and kv head
// already applied). A local strided view and a packed buffer received from another rank
// look the same.
struct KeySource {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_stride = 0, v_stride = 0;
  int64_t t_begin = 0, t_end = 0;
};

// The keys of piece (batch b, head h, head branch hb, segment) in this pass; false = none.
// (KeySourceFn is declared above.)

// The keys of each piece that lie in the local views (p.shard_begin, p.shard_rows).
KeySourceFn local_keys(const Problem& p);

// One task: global rows [n0, n1) of head h in batch b (all inside the local shard), every
// branch of that head, attending to the keys `sources` names. Each piece's (O, lse) is
// merged (SPEC.md merge) into scratch.acc_o / acc_l. The caller sets acc_l to -inf; an acc_o
// row is only read once its acc_l is finite (a row's first merge writes it).
void forward_block(const Problem& p, const Tiles& tiles, int64_t b, int64_t h, int64_t n0,
                   int64_t n1, const KeySourceFn& sources, const Scratch& scratch);

// Query rows t in [t_begin, t_end) (kept indices) of one head, the row of index t at
// q + (t - t_begin) * q_stride elements (batch and head applied); their results merge into
// acc_o + (t - t_begin) * acc_step * padded_dim and acc_l + (t - t_begin) * acc_step.
struct QueryRows {
  const void* q;
  int64_t q_stride;
  int64_t t_begin, t_end;  // t_end - t_begin <= Tiles::row_block
  float* acc_o;
  double* acc_l;
  int64_t acc_step;
};

// The query rows attend with one online softmax to every key of sources[0 .. num_sources),
// whose kept indices count in the same numbering as the queries' (causal: key t_k is
// visible to query t iff t_k <= t); the normalised (O, lse) is merged (SPEC.md merge) into
// the rows' accumulators. Rows that see no key are left as they were.
void forward_rows(const Problem& p, const Tiles& tiles, const QueryRows& rows,
                  const KeySource* sources, int64_t num_sources, const Scratch& scratch);

// The end of forward_rows: query i < rows.t_end - rows.t_begin has the unnormalised output
// ot[c * tiles.ld_rows() + i] (c < D), running max m[i] (in units that m_scale turns into
// log2 units) and sum l[i] of 2^((s - m) m_scale); each query that saw a key is normalised
// and merged (SPEC.md merge) into its accumulator row, its lse computed in double.
void merge_queries(const Problem& p, const Tiles& tiles, const QueryRows& rows, const float* ot,
                   const float* m, const float* l, double m_scale);

// The lse of query (batch b, local row n, head h) in log2 units as hi + lo, for backward's
// P = exp2((s - hi) - lo): from p.lse_precise when set, else from the fp32 lse (converted in
// double, so the conversion adds no error). A row that saw no key (lse = -inf) gets
// hi = +inf, lo = 0: P = 0.
inline void lse2_of(const Problem& p, int64_t b, int64_t n, int64_t h, float& hi, float& lo) {
  const double lse =
      p.lse_precise != nullptr
          ? p.lse_precise[b * p.lse_precise_st.b + n * p.lse_precise_st.n + h * p.lse_precise_st.h]
          : static_cast<double>(p.lse[b * p.lse_st.b + n * p.lse_st.n + h * p.lse_st.h]);
  if (!(lse > -kInfD)) {
    hi = static_cast<float>(kInfD);
    lo = 0.0f;
    return;
  }
  const double l2 = lse * 1.4426950408889634;
  hi = static_cast<float>(l2);
  lo = static_cast<float>(l2 - hi);
}

// A backward query block's lse rows: for rows i < nq (local row first_row + i * stride of
// batch b, head h) the lse in log2 units (lse2_of); rows nq..rows-1 are padding: P = 0
// (lse2 = +inf) and dr = 0 (the caller computes dr, dO . O, of the rows below nq).
inline void backward_row_lse(const Problem& p, int64_t b, int64_t h, int64_t first_row,
                             int64_t stride, int64_t nq, int64_t rows, float* lse2, float* lse2_lo,
                             float* dr) {
  for (int64_t i = 0; i < nq; ++i) lse2_of(p, b, first_row + i * stride, h, lse2[i], lse2_lo[i]);
  for (int64_t i = nq; i < rows; ++i) {
    lse2[i] = static_cast<float>(kInfD);
    lse2_lo[i] = 0.0f;
    dr[i] = 0.0f;
  }
}

// Backward tiles: a key block of kKeyBlock rows (dk, dv accumulate in scratch) meets query
// blocks of kQueryBlock rows; the five products run on the forward's micro-tile.
struct BackwardTiles {
  static constexpr int64_t kKeyBlock = 66;    // multiple of the micro-tile's 6 rows
  static constexpr int64_t kQueryBlock = 64;  // multiple of every target's panel
  static constexpr int64_t kQueryRows = 66;   // row stride of the S^T / dS^T tiles (>= 64, % 6)
  int64_t padded_dim;  // D rounded up to 2 vectors of the widest target (row-major tiles)
  int64_t head_dim;    // D
  int64_t max_kept;    // most kept rows of any branch segment
  CpuBf16 kernel = CpuBf16::kWiden;  // the products (resolved)
};

struct BackwardScratch {
  float* k;        // [max_kept + kKeyBlock][padded_dim], K of the segment
  float* v;        // [max_kept + kKeyBlock][padded_dim], V of the segment
  float* dk;       // [max_kept + kKeyBlock][padded_dim], dK of the segment (unscaled)
  float* dv;       // [max_kept + kKeyBlock][padded_dim], dV of the segment
  float* qt;       // [D][kQueryBlock], Q^T times scale*log2(e)
  float* q;        // [kQueryRows][padded_dim], Q
  float* dot;      // [D][kQueryBlock], dO^T times the output factor
  float* dout;     // [kQueryRows][padded_dim], dO times the output factor
  float* p;        // [kKeyBlock][kQueryRows], S^T then P^T
  float* ds;       // [kKeyBlock][kQueryRows], dP^T then dS^T
  float* lse2;     // [kQueryBlock], lse in log2 units, hi part (lse2_of)
  float* lse2_lo;  // [kQueryBlock], its lo part
  float* dr;       // [kQueryBlock], rowsum(dout * out)
  float* dq;       // [kQueryRows][padded_dim], dQ of the query block (unscaled)
  void* bf16;      // kDot, kAmx: bf16_backward_scratch_bytes (then the buffers above are unused)
};

// One unit of backward work: the local queries [tq_begin, tq_end) (kept indices) of batch b,
// head h, in one segment of one branch, against the keys of `keys` (kept indices
// [keys.t_begin, keys.t_end), local or received). The gradients of those keys are added,
// scaled, to fp32 rows dk + (t - keys.t_begin) * dk_stride (dv alike).
struct BackwardWork {
  int64_t b, h;
  int branch;
  int64_t offset, segment;
  int64_t tq_begin, tq_end;
  KeySource keys;
  float* dk;
  float* dv;
  int64_t dk_stride, dv_stride;
};

// fp32 gradient rows [B][shard rows][heads][D] at element strides: an accumulator of
// ShardBackward's, or the caller's fp32 tensor itself.
struct GradRows {
  float* base;
  Strides3 st;
  float* row(int64_t b, int64_t local_row, int64_t head) const {
    return base + b * st.b + local_row * st.n + head * st.h;
  }
};

// Runs one unit; adds dQ to dq.
void backward_piece(const BackwardProblem& bp, const BackwardTiles& tiles, const BackwardWork& w,
                    const BackwardScratch& scratch, const GradRows& dq);

}  // namespace detail
}  // namespace ringattn::cpu
