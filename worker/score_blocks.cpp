#include "worker/score_blocks.h"

#include <utility>

namespace reattn {

ScoreLayout plan_score_blocks(const std::vector<BlockQuery>& queries, int64_t max_qlen, int q_heads, int head_dim,
                              int top_k, int64_t device_select_rows) {
  ScoreLayout layout;
  layout.q_offset.assign(queries.size(), -1);
  layout.cand_offset.assign(queries.size(), -1);
  // Blocks in order of their first query.
  std::vector<ScoreBlock> blocks;
  for (size_t i = 0; i < queries.size(); ++i) {
    const BlockQuery& q = queries[i];
    if (q.qlen < 1 || q.qlen > max_qlen) continue;
    size_t b = 0;
    while (b < blocks.size() && !(queries[blocks[b].queries[0]].context_id == q.context_id &&
                                  queries[blocks[b].queries[0]].layer == q.layer)) {
      ++b;
    }
    if (b == blocks.size()) blocks.emplace_back();
    blocks[b].queries.push_back(i);
    blocks[b].qlen += q.qlen;
    if (q.qlen * q_heads >= device_select_rows) blocks[b].device_select = true;
  }
  for (bool device : {false, true}) {
    for (ScoreBlock& block : blocks) {
      if (block.device_select != device) continue;
      block.q_offset = layout.q_floats;
      block.cand_offset = layout.total_candidates;
      for (size_t i : block.queries) {
        layout.q_offset[i] = layout.q_floats;
        layout.cand_offset[i] = layout.total_candidates;
        layout.q_floats += queries[i].qlen * q_heads * head_dim;
        layout.total_candidates += queries[i].qlen * q_heads * top_k;
      }
      if (!device) layout.host_candidates = layout.total_candidates;
      layout.blocks.push_back(std::move(block));
    }
  }
  return layout;
}

}  // namespace reattn
