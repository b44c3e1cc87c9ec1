#pragma once
// What dilated attention computes: the branches (segment length, dilation rate), how
// heads are assigned to them, causality and the softmax scale. See SPEC.md.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ringattn {

enum class Mode {
  kGroups,   // heads split into G groups, group i uses branch i only; output scaled by 1/G
  kLongNet,  // every head computes every branch; branches merged by softmax denominators
};

const char* mode_name(Mode mode);
// Parses "groups" or "longnet"; throws Error(kInvalidArgument) otherwise.
Mode parse_mode(const std::string& text);

struct DilatedConfig {
  std::vector<int64_t> segment_lengths;  // s_i, one per branch
  std::vector<int64_t> dilation_rates;   // r_i, one per branch, 1 <= r_i <= s_i
  Mode mode = Mode::kGroups;
  bool causal = false;
  std::optional<float> scale;  // softmax scale; defaults to 1/sqrt(head_dim)
  // Head parallelism: the q given to forward holds heads [head_offset, head_offset + H) of a
  // layer with total_heads heads (0: q holds all of them). Heads take their branch and offset
  // from their index in the whole layer, so slices computed apart equal slices of the whole.
  int64_t head_offset = 0;
  int64_t total_heads = 0;

  // Checks the rules that do not depend on shapes (G >= 1, equal lengths, values >= 1,
  // r_i <= s_i, finite scale, head_offset and total_heads >= 0). Throws Error(kInvalidArgument)
  // naming the field.
  void validate() const;
  int num_branches() const { return static_cast<int>(segment_lengths.size()); }
};

}  // namespace ringattn
