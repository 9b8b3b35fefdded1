// The tiny model and service config the coordinator's unit tests run against.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "common/config.h"

namespace reattn::test {

inline Config tiny_service_config(int queue_depth) {
  Expected<Config> c = load_config_string(
      "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, rope_theta: 10000, scope: 1024}\n"
      "reattention: {sink_tokens: 4, local_window: 32, chunk_tokens: 8, top_k: 2, max_recall_chunks: 6}\n"
      "backend: {kind: cpu}\n"
      "capacity: {tokens_per_rank: 1000, max_contexts: 3}\n"
      "server: {queue_depth: " + std::to_string(queue_depth) + ", max_batch: 8}\n");
  EXPECT_TRUE(c.is_ok()) << c.status().to_string();
  return *c;
}

}  // namespace reattn::test
