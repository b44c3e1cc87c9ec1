// Block-sparse patterns: the factories, their layouts over a sequence, and the density.

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "ringattn/block_sparse.h"
#include "src/base/check.h"
#include "src/base/enum_names.h"
#include "src/base/index_math.h"

namespace ringattn {

const char* block_pattern_kind_name(BlockPatternKind kind) {
  static const char* const names[] = {"local_window", "dilated", "global_local", "block_list"};
  return enum_name(kind, names);
}

int64_t BlockLayout::pairs(bool causal) const {
  if (!causal) return static_cast<int64_t>(cols.size());
  int64_t n = 0;
  for (int64_t qb = 0; qb < blocks; ++qb) {
    for (int64_t i = row_ptr[qb]; i < row_ptr[qb + 1]; ++i) n += cols[i] <= qb;
  }
  return n;
}

namespace {

void check_block_size(int64_t block_size) {
  require(block_size >= 1, "block_size = ", block_size,
          "; the block size must be >= 1 rows (e.g. 64 or 128)");
}

void check_window(int64_t window) {
  require(window >= 0, "window = ", window,
          "; the local window (tokens on each side of the query block) must be >= 0");
}

}  // namespace

BlockPattern BlockPattern::local_window(int64_t block_size, int64_t window) {
  check_block_size(block_size);
  check_window(window);
  BlockPattern p;
  p.kind = BlockPatternKind::kLocalWindow;
  p.block_size = block_size;
  p.window = window;
  return p;
}

BlockPattern BlockPattern::dilated(int64_t block_size, std::vector<int64_t> rates) {
  check_block_size(block_size);
  require(!rates.empty(), "dilated pattern without rates; give at least one rate, e.g. {1, 2, 4}");
  for (size_t i = 0; i < rates.size(); ++i) {
    require(rates[i] >= 1, "rates[", i, "] = ", rates[i],
            "; a dilated pattern's rates are block distances >= 1");
  }
  BlockPattern p;
  p.kind = BlockPatternKind::kDilated;
  p.block_size = block_size;
  p.rates = std::move(rates);
  return p;
}

BlockPattern BlockPattern::global_local(int64_t block_size, int64_t global_blocks, int64_t window) {
  check_block_size(block_size);
  check_window(window);
  require(global_blocks >= 0, "global_blocks = ", global_blocks,
          "; the number of global blocks must be >= 0");
  BlockPattern p;
  p.kind = BlockPatternKind::kGlobalLocal;
  p.block_size = block_size;
  p.global_blocks = global_blocks;
  p.window = window;
  return p;
}

BlockPattern BlockPattern::block_list(int64_t block_size, std::vector<int64_t> row_ptr,
                                      std::vector<int64_t> cols) {
  check_block_size(block_size);
  BlockPattern p;
  p.kind = BlockPatternKind::kBlockList;
  p.block_size = block_size;
  p.row_ptr = std::move(row_ptr);
  p.cols = std::move(cols);
  return p;
}

namespace {

// The fields a factory checks, checked again for patterns built by hand.
void check_fields(const BlockPattern& p) {
  const int kind = static_cast<int>(p.kind);
  require(kind >= 0 && kind <= static_cast<int>(BlockPatternKind::kBlockList),
          "pattern kind = ", kind,
          " is not a BlockPatternKind; build patterns with the BlockPattern factories");
  check_block_size(p.block_size);
  if (p.kind == BlockPatternKind::kLocalWindow || p.kind == BlockPatternKind::kGlobalLocal) {
    check_window(p.window);
  }
  if (p.kind == BlockPatternKind::kGlobalLocal) {
    require(p.global_blocks >= 0, "global_blocks = ", p.global_blocks,
            "; the number of global blocks must be >= 0");
  }
  if (p.kind == BlockPatternKind::kDilated) {
    require(!p.rates.empty(),
            "dilated pattern without rates; give at least one rate, e.g. {1, 2, 4}");
    for (size_t i = 0; i < p.rates.size(); ++i) {
      require(p.rates[i] >= 1, "rates[", i, "] = ", p.rates[i],
              "; a dilated pattern's rates are block distances >= 1");
    }
  }
}

// A caller's CSR over nb query blocks: row_ptr from 0 to cols.size(), non-decreasing; each
// row's key blocks sorted, unique, in [0, nb). Reads only entries it has checked exist.
void check_block_list(const std::vector<int64_t>& row_ptr, const std::vector<int64_t>& cols,
                      int64_t seq, int64_t block_size, int64_t nb) {
  const auto ncols = static_cast<int64_t>(cols.size());
  require(static_cast<int64_t>(row_ptr.size()) == nb + 1, "block_list row_ptr has ", row_ptr.size(),
          " entries, but N / block_size + 1 = ", seq, " / ", block_size, " + 1 = ", nb + 1,
          " are needed (one per query block, plus the end)");
  require(row_ptr[0] == 0, "block_list row_ptr[0] = ", row_ptr[0], "; it must be 0");
  require(row_ptr[nb] == ncols, "block_list row_ptr[", nb, "] = ", row_ptr[nb], " but cols has ",
          ncols, " entries; the last row_ptr entry must equal the length of cols");
  for (int64_t qb = 0; qb < nb; ++qb) {
    const int64_t begin = row_ptr[qb], end = row_ptr[qb + 1];
    require(end >= begin, "block_list row_ptr[", qb + 1, "] = ", end, " < row_ptr[", qb,
            "] = ", begin, " (query block ", qb, "); row_ptr must be non-decreasing");
    require(end <= ncols, "block_list row_ptr[", qb + 1, "] = ", end, " is past the end of cols (",
            ncols, " entries); row_ptr's entries index into cols");
    for (int64_t i = begin; i < end; ++i) {
      const int64_t kb = cols[i];
      require(kb >= 0 && kb < nb, "block_list query block ", qb, " lists key block ", kb, " (cols[",
              i, "]), outside [0, ", nb, "); key blocks are 0 .. N / block_size - 1");
      if (i == begin || kb > cols[i - 1]) continue;
      fail(ErrorCode::kInvalidArgument, "block_list query block ", qb, " lists key block ", kb,
           " (cols[", i, "]) after ", cols[i - 1],
           kb == cols[i - 1] ? " (a duplicate)" : " (out of order)",
           "; each query block's key blocks must be sorted and unique");
    }
  }
}

}  // namespace

BlockLayout BlockPattern::layout(int64_t seq) const {
  check_fields(*this);
  require(seq >= 1, "the sequence length N = ", seq, "; it must be >= 1");
  if (seq % block_size != 0) {
    const int64_t whole = seq / block_size * block_size;
    fail(ErrorCode::kInvalidArgument, "the sequence length N = ", seq,
         " is not a multiple of block_size = ", block_size, "; pad the sequence to ",
         whole <= INT64_MAX - block_size ? "N = " + std::to_string(whole + block_size)
                                         : std::string("a multiple of it"),
         " or choose a block size that divides N");
  }
  BlockLayout l;
  l.block_size = block_size;
  l.blocks = seq / block_size;
  const int64_t nb = l.blocks;
  if (kind == BlockPatternKind::kBlockList) {
    check_block_list(row_ptr, cols, seq, block_size, nb);
    l.row_ptr = row_ptr;
    l.cols = cols;
    return l;
  }
  const int64_t w = std::min(ceil_div(window, block_size), nb);  // nb: every block
  const int64_t g = std::min(global_blocks, nb);
  l.row_ptr.assign(1, 0);
  std::vector<int64_t> row;
  for (int64_t qb = 0; qb < nb; ++qb) {
    row.clear();
    switch (kind) {
      case BlockPatternKind::kDilated:
        row.push_back(qb);
        for (int64_t r : rates) {  // r >= 1 may be near INT64_MAX: no qb + r
          if (r <= qb) row.push_back(qb - r);
          if (r < nb - qb) row.push_back(qb + r);
        }
        break;
      case BlockPatternKind::kGlobalLocal:
        if (qb < g) {
          for (int64_t kb = 0; kb < nb; ++kb) row.push_back(kb);
          break;
        }
        for (int64_t kb = 0; kb < g; ++kb) row.push_back(kb);
        [[fallthrough]];
      default:  // the local window
        for (int64_t kb = std::max<int64_t>(0, qb - w); kb <= std::min(nb - 1, qb + w); ++kb) {
          row.push_back(kb);
        }
    }
    std::sort(row.begin(), row.end());
    row.erase(std::unique(row.begin(), row.end()), row.end());
    l.cols.insert(l.cols.end(), row.begin(), row.end());
    l.row_ptr.push_back(static_cast<int64_t>(l.cols.size()));
  }
  return l;
}

void BlockSparseConfig::validate() const {
  require(!patterns.empty(),
          "BlockSparseConfig.patterns is empty; give one pattern for every head, or one per head");
  for (size_t i = 0; i < patterns.size(); ++i) {
    check_fields(patterns[i]);
    require(patterns[i].block_size == patterns[0].block_size, "patterns[", i,
            "].block_size = ", patterns[i].block_size,
            " but patterns[0].block_size = ", patterns[0].block_size,
            "; every head's pattern must use the same block size");
  }
  if (scale) {
    require(std::isfinite(*scale), "scale = ", *scale, "; the softmax scale must be finite");
  }
}

double block_sparse_density(const BlockSparseConfig& config, int64_t seq, int64_t heads) {
  config.validate();
  require(heads >= 1, "heads = ", heads, "; the number of query heads must be >= 1");
  require(config.patterns.size() == 1 || static_cast<int64_t>(config.patterns.size()) == heads,
          "BlockSparseConfig has ", config.patterns.size(), " patterns for H = ", heads,
          " heads; give one pattern (shared) or one per head");
  double pairs = 0.0, blocks = 0.0;
  for (int64_t h = 0; h < heads; ++h) {
    const BlockLayout l = config.patterns[config.patterns.size() == 1 ? 0 : h].layout(seq);
    pairs += static_cast<double>(l.pairs(config.causal));
    blocks = static_cast<double>(l.blocks);
  }
  return pairs / (static_cast<double>(heads) * blocks * blocks);
}

}  // namespace ringattn
