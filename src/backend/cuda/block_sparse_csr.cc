// Host-side planning of the CUDA block-sparse kernels: the patterns as int32 CSR, by query
// block and transposed (by key block).

#include <limits>

#include "ringattn/block_sparse.h"
#include "src/backend/cuda/block_sparse_cuda.h"
#include "src/base/check.h"

namespace ringattn::cuda {

namespace {

// Row r of each layout lists the key blocks query block r lists (by_key = false), or the
// query blocks listing key block r (by_key = true); causal drops the pairs kb > qb. Query
// blocks are visited in ascending order, so every row comes out sorted.
BlockCsr build_csr(const std::vector<BlockLayout>& layouts, const std::vector<size_t>& head_layout,
                   bool causal, bool by_key) {
  BlockCsr csr;
  csr.blocks = layouts.front().blocks;
  const size_t rows = static_cast<size_t>(csr.blocks) + 1;
  csr.ptr.assign(layouts.size() * rows, 0);
  std::vector<std::vector<int>> lists(static_cast<size_t>(csr.blocks));
  for (size_t l = 0; l < layouts.size(); ++l) {
    const BlockLayout& x = layouts[l];
    for (std::vector<int>& list : lists) list.clear();
    for (int64_t qb = 0; qb < x.blocks; ++qb) {
      for (int64_t i = x.row_ptr[static_cast<size_t>(qb)];
           i < x.row_ptr[static_cast<size_t>(qb) + 1]; ++i) {
        const int64_t kb = x.cols[static_cast<size_t>(i)];
        if (causal && kb > qb) continue;
        lists[static_cast<size_t>(by_key ? kb : qb)].push_back(static_cast<int>(by_key ? qb : kb));
      }
    }
    for (size_t r = 0; r < lists.size(); ++r) {
      csr.ptr[l * rows + r] = static_cast<int>(csr.idx.size());
      require_supported(
          csr.idx.size() + lists[r].size() < static_cast<size_t>(std::numeric_limits<int>::max()),
          "the block patterns list more than 2^31 - 1 block pairs in all; use a larger "
          "block_size or fewer per-head patterns");
      csr.idx.insert(csr.idx.end(), lists[r].begin(), lists[r].end());
    }
    csr.ptr[l * rows + rows - 1] = static_cast<int>(csr.idx.size());
  }
  for (size_t l : head_layout) csr.head.push_back(static_cast<int>(l * rows));
  return csr;
}

}  // namespace

BlockCsr query_major_csr(const std::vector<BlockLayout>& layouts,
                         const std::vector<size_t>& head_layout, bool causal) {
  return build_csr(layouts, head_layout, causal, false);
}

BlockCsr key_major_csr(const std::vector<BlockLayout>& layouts,
                       const std::vector<size_t>& head_layout, bool causal) {
  return build_csr(layouts, head_layout, causal, true);
}

}  // namespace ringattn::cuda
