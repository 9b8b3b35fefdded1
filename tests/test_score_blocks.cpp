// plan_score_blocks: queries of one (context, layer) share a block; host-selected blocks come
// first in the send block; offsets are dense; queries outside [1, W] are in no block.
#include <gtest/gtest.h>

#include "worker/score_blocks.h"

namespace reattn {
namespace {

TEST(ScoreBlocks, GroupsByContextAndLayerWithHostBlocksFirst) {
  // H 4, D 16, top_k 2, W 32; device selection from 64 (row, head) rows = qlen 16.
  const std::vector<BlockQuery> queries = {{7, 0, 3}, {8, 1, 17}, {7, 1, 1}, {7, 0, 32},
                                           {8, 1, 1}, {7, 0, 33}, {9, 0, 0}, {7, 0, 2}};
  const ScoreLayout l = plan_score_blocks(queries, 32, 4, 16, 2, 64);
  ASSERT_EQ(l.blocks.size(), 3u);
  // (7, 1) is the only host block; then (7, 0) and (8, 1) in order of their first query.
  EXPECT_FALSE(l.blocks[0].device_select);
  EXPECT_EQ(l.blocks[0].queries, (std::vector<size_t>{2}));
  EXPECT_TRUE(l.blocks[1].device_select);
  EXPECT_EQ(l.blocks[1].queries, (std::vector<size_t>{0, 3, 7}));
  EXPECT_EQ(l.blocks[1].qlen, 37);
  EXPECT_TRUE(l.blocks[2].device_select);
  EXPECT_EQ(l.blocks[2].queries, (std::vector<size_t>{1, 4}));
  EXPECT_EQ(l.host_candidates, 1 * 4 * 2);
  // Dense offsets in block order.
  EXPECT_EQ(l.cand_offset[2], 0);
  EXPECT_EQ(l.cand_offset[0], 8);
  EXPECT_EQ(l.cand_offset[3], 8 + 3 * 8);
  EXPECT_EQ(l.cand_offset[7], 8 + 35 * 8);
  EXPECT_EQ(l.cand_offset[1], 8 + 37 * 8);
  EXPECT_EQ(l.cand_offset[4], 8 + 54 * 8);
  EXPECT_EQ(l.total_candidates, 8 * 56);
  EXPECT_EQ(l.q_offset[3], (1 + 3) * 64);
  EXPECT_EQ(l.blocks[1].q_offset, 64);
  EXPECT_EQ(l.blocks[1].cand_offset, 8);
  EXPECT_EQ(l.q_floats, 56 * 64);
  EXPECT_EQ(l.cand_offset[5], -1);  // above the window
  EXPECT_EQ(l.cand_offset[6], -1);  // no rows
}

TEST(ScoreBlocks, ThresholdsPickThePath) {
  const std::vector<BlockQuery> queries = {{1, 0, 1}, {2, 0, 4}};
  for (int64_t rows : {int64_t{1}, int64_t{16}, int64_t{17}}) {
    const ScoreLayout l = plan_score_blocks(queries, 8, 4, 8, 1, rows);
    ASSERT_EQ(l.blocks.size(), 2u);
    int device = 0;
    for (const ScoreBlock& b : l.blocks) device += b.device_select;
    EXPECT_EQ(device, rows == 1 ? 2 : rows == 16 ? 1 : 0) << rows;
    EXPECT_EQ(l.host_candidates, rows == 1 ? 0 : rows == 16 ? 4 : 20) << rows;
  }
}

}  // namespace
}  // namespace reattn
