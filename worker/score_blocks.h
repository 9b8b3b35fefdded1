// How a step's queries are scored and selected: the queries of one (context, layer) form one
// block of rows, scored by one kernel call so the keys are read once for the whole batch; every
// (row, head) keeps its own top-k list and every query its own recall set. Blocks whose queries
// are big are merged and selected in backend memory (Backend::merge_select); the others on the
// host, and their candidates come first in a rank's send block so one download per rank fetches
// them. A pure function of the step plan's values, so every rank computes the same layout.
#pragma once

#include <cstdint>
#include <vector>

#include "common/protocol.h"

namespace reattn {

// A query as the step plan states it (the same on every rank).
struct BlockQuery {
  ContextId context_id = 0;
  int layer = 0;
  int64_t qlen = 0;  // rows; a query outside [1, max_qlen] is left out of every block
};

struct ScoreBlock {
  std::vector<size_t> queries;  // step order
  int64_t qlen = 0;             // rows of the block: the queries' qlen summed
  int64_t q_offset = 0;         // floats into the step's q workspace [rows, H, D]
  int64_t cand_offset = 0;      // candidates into a rank's send block [rows, H, top_k]
  bool device_select = false;
};

struct ScoreLayout {
  std::vector<ScoreBlock> blocks;    // host-selected blocks first, then device-selected ones
  std::vector<int64_t> q_offset;     // per query (-1: in no block)
  std::vector<int64_t> cand_offset;  // per query (-1: in no block)
  int64_t q_floats = 0;
  int64_t total_candidates = 0;
  int64_t host_candidates = 0;       // candidates of the host-selected blocks: a prefix
};

// A block is selected on the device when one of its queries has at least
// `device_select_rows` (row, head) rows (qlen * q_heads).
ScoreLayout plan_score_blocks(const std::vector<BlockQuery>& queries, int64_t max_qlen, int q_heads, int head_dim,
                              int top_k, int64_t device_select_rows);

}  // namespace reattn
