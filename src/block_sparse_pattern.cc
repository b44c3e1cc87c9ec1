// Block-sparse patterns: the factories, their layouts over a sequence, and the density.

#include <algorithm>
#include <cmath>

#include "check.h"
#include "index_math.h"
#include "ringattn/block_sparse.h"

namespace ringattn {

const char* block_pattern_kind_name(BlockPatternKind kind) {
  switch (kind) {
    case BlockPatternKind::kLocalWindow:
      return "local_window";
    case BlockPatternKind::kDilated:
      return "dilated";
    case BlockPatternKind::kGlobalLocal:
      return "global_local";
    case BlockPatternKind::kBlockList:
      return "block_list";
  }
  return "unknown";
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

BlockLayout BlockPattern::layout(int64_t seq) const {
  check_block_size(block_size);
  require(seq >= 1, "the sequence length N = ", seq, "; it must be >= 1");
  require(seq % block_size == 0, "the sequence length N = ", seq,
          " is not a multiple of block_size = ", block_size,
          "; pad the sequence to N = ", round_up(seq, block_size),
          " or choose a block size that divides N");
  BlockLayout l;
  l.block_size = block_size;
  l.blocks = seq / block_size;
  const int64_t nb = l.blocks;
  if (kind == BlockPatternKind::kBlockList) {
    require(static_cast<int64_t>(row_ptr.size()) == nb + 1, "block_list row_ptr has ",
            row_ptr.size(), " entries, but N / block_size + 1 = ", seq, " / ", block_size,
            " + 1 = ", nb + 1, " are needed (one per query block, plus the end)");
    require(row_ptr[0] == 0, "block_list row_ptr[0] = ", row_ptr[0], "; it must be 0");
    require(row_ptr[nb] == static_cast<int64_t>(cols.size()), "block_list row_ptr[", nb,
            "] = ", row_ptr[nb], " but cols has ", cols.size(),
            " entries; the last row_ptr entry must equal the length of cols");
    for (int64_t qb = 0; qb < nb; ++qb) {
      require(row_ptr[qb + 1] >= row_ptr[qb], "block_list row_ptr[", qb + 1,
              "] = ", row_ptr[qb + 1], " < row_ptr[", qb, "] = ", row_ptr[qb], " (query block ", qb,
              "); row_ptr must be non-decreasing");
      for (int64_t i = row_ptr[qb]; i < row_ptr[qb + 1]; ++i) {
        require(cols[i] >= 0 && cols[i] < nb, "block_list query block ", qb, " lists key block ",
                cols[i], " (cols[", i, "]), outside [0, ", nb, "); key blocks are 0 .. N / ",
                "block_size - 1");
        require(i == row_ptr[qb] || cols[i] > cols[i - 1], "block_list query block ", qb,
                " lists key block ", cols[i], " (cols[", i, "]) after ", cols[i - 1],
                cols[i] == cols[i - 1] ? " (a duplicate)" : " (out of order)",
                "; each query block's key blocks must be sorted and unique");
      }
    }
    l.row_ptr = row_ptr;
    l.cols = cols;
    return l;
  }
  const int64_t w = ceil_div(window, block_size);
  const int64_t g = std::min(global_blocks, nb);
  l.row_ptr.assign(1, 0);
  std::vector<int64_t> row;
  for (int64_t qb = 0; qb < nb; ++qb) {
    row.clear();
    switch (kind) {
      case BlockPatternKind::kDilated:
        row.push_back(qb);
        for (int64_t r : rates) {
          if (qb - r >= 0) row.push_back(qb - r);
          if (qb + r < nb) row.push_back(qb + r);
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
    check_block_size(patterns[i].block_size);
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
