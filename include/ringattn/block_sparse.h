#pragma once
// Block-sparse attention: the sequence is cut into blocks of `block_size` rows, and a pattern
// lists, for each query block, the key blocks it attends to. Every query row attends to all
// keys of its listed blocks with one joint softmax (SPEC.md "Block-sparse attention"); with
// causal, keys after the query's position are removed. Blocks not listed are never read, and
// over a ring a rank fetches only the key/value blocks its own query blocks list.

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/dilated_attention.h"
#include "ringattn/ring_attention.h"
#include "ringattn/tensor.h"

namespace ringattn {

struct BlockSparsePlan;  // internal (src/plan/block_sparse_plan.h)

enum class BlockPatternKind {
  kLocalWindow,  // key blocks kb with |kb - qb| <= w
  kDilated,      // the query block and the blocks at distance +/- r for every rate r
  kGlobalLocal,  // the first g blocks see and are seen by every block, plus a local window
  kBlockList,    // a caller-supplied CSR list
};

const char* block_pattern_kind_name(BlockPatternKind kind);

// The key blocks of each query block, for a sequence of `blocks` blocks: query block qb lists
// cols[row_ptr[qb] .. row_ptr[qb + 1]), sorted, unique, in [0, blocks).
struct BlockLayout {
  int64_t block_size = 0;
  int64_t blocks = 0;
  std::vector<int64_t> row_ptr;  // [blocks + 1]
  std::vector<int64_t> cols;     // [row_ptr[blocks]]

  // (query block, key block) pairs listed; with `causal` only those with kb <= qb.
  int64_t pairs(bool causal) const;
};

// A pattern, independent of the sequence length until layout() turns it into a BlockLayout.
// Build one with the factories; they check the parameters that do not depend on N.
struct BlockPattern {
  BlockPatternKind kind = BlockPatternKind::kLocalWindow;
  int64_t block_size = 0;
  int64_t window = 0;                  // local_window, global_local: tokens on each side
  std::vector<int64_t> rates;          // dilated
  int64_t global_blocks = 0;           // global_local
  std::vector<int64_t> row_ptr, cols;  // block_list

  // Query block qb sees key blocks qb - w .. qb + w with w = ceil(window / block_size)
  // (window = 0: the diagonal block alone).
  static BlockPattern local_window(int64_t block_size, int64_t window);
  // Query block qb sees qb and qb +/- r for every r in rates (r >= 1).
  static BlockPattern dilated(int64_t block_size, std::vector<int64_t> rates);
  // Blocks 0 .. global_blocks - 1 are global: every query block sees them, and they see every
  // key block; besides, local_window(block_size, window).
  static BlockPattern global_local(int64_t block_size, int64_t global_blocks, int64_t window);
  // Query block qb sees cols[row_ptr[qb] .. row_ptr[qb + 1]) (sorted, unique key blocks);
  // row_ptr has N / block_size + 1 entries, from 0 to cols.size(). Checked by layout().
  static BlockPattern block_list(int64_t block_size, std::vector<int64_t> row_ptr,
                                 std::vector<int64_t> cols);

  // The pattern over a sequence of `seq` rows: seq % block_size == 0, the block list checked.
  // Throws Error(kInvalidArgument) naming the query block and the bad value.
  BlockLayout layout(int64_t seq) const;
};

struct BlockSparseConfig {
  // One pattern for every head, or one per query head (H entries). All share a block size.
  std::vector<BlockPattern> patterns;
  bool causal = false;
  std::optional<float> scale;  // softmax scale; defaults to 1/sqrt(head_dim)

  // Checks what does not depend on shapes (at least one pattern, one block size).
  void validate() const;
};

// The density of a configuration on a sequence of `seq` rows and `heads` query heads: the
// (query block, key block) pairs computed (after causal removal: with causal, pairs with
// kb > qb are not computed) divided by all heads x blocks^2 pairs. 1.0 = dense attention,
// 0.5 + 0.5 / blocks = causal dense. Throws like BlockPattern::layout.
double block_sparse_density(const BlockSparseConfig& config, int64_t seq, int64_t heads);

// Block-sparse attention over the ranks of a communicator (make_self_communicator() for one
// process). Rank p holds the contiguous rows [p * N_loc, (p + 1) * N_loc) of q, k and v and
// gets the same rows of the single-device result; N = size * N_loc, N_loc % block_size == 0.
class BlockSparseRingDilatedAttention {
 public:
  // Borrows `comm` (it must outlive this object). Validates the configuration. Backends: cpu
  // (host tensors, any number of ranks) and, in builds with CUDA, cuda (CUDA tensors, one
  // rank only; q's device decides).
  BlockSparseRingDilatedAttention(BlockSparseConfig config, Communicator& comm,
                                  ExecOptions options = {});

  // Collective over the communicator: every rank calls it with its shard.
  // q:   [B, N_loc, H, D]    read
  // k,v: [B, N_loc, Hkv, D]  read; H % Hkv == 0, query head h reads kv head h / (H / Hkv)
  // out: [B, N_loc, H, D]    written (q's dtype: fp32, fp16 or bf16; fp32 accumulation)
  // lse: [B, H, N_loc] fp32  written when given (-inf, and out = 0, for a row that sees no key)
  // Ranks check that they agree on the patterns, shapes and options, and every input is
  // validated, before any compute: a bad input on any rank throws Error on every rank.
  void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const std::optional<TensorView>& lse = std::nullopt);

  // The exact gradient of forward, collective like it; out and lse are this rank's forward
  // results. dout, dq: [B, N_loc, H, D]; dk, dv: [B, N_loc, Hkv, D] (written). K/V blocks are
  // fetched as in forward; the fp32 gradients of fetched blocks return to their owners and
  // are added there in a fixed order (deterministic).
  void backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                const TensorView& v, const TensorView& out, const TensorView& lse,
                const TensorView& dq, const TensorView& dk, const TensorView& dv);

  // Statistics of the last forward or backward on this rank (bytes_sent: K/V blocks, and in
  // backward their fp32 gradients).
  const RingStats& last_stats() const { return stats_; }
  const BlockSparseConfig& config() const { return config_; }

 private:
  BlockSparseConfig config_;
  Communicator& comm_;
  ExecOptions options_;
  RingStats stats_;
  std::shared_ptr<detail::PlanCache<BlockSparsePlan>> plans_;  // per shape
};

}  // namespace ringattn
