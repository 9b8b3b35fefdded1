// The span recall keys (reattention.recall, span_tokens, max_recall_tokens, the span scope
// rule), model.rope_scaling, and the model configs in configs/ with their paper presets.
#include <gtest/gtest.h>

#include <string>

#include "common/config.h"

namespace reattn {
namespace {

const std::string kSpanTiny =
    "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, scope: 1024}\n"
    "reattention: {sink_tokens: 4, local_window: 32, chunk_tokens: 8, top_k: 2, recall: span, "
    "span_tokens: 5, max_recall_tokens: 10}\n";

std::string path_of(const std::string& name) { return std::string(REATTN_SOURCE_DIR) + "/configs/" + name; }

std::string span_tiny_with(const std::string& from, const std::string& to) {
  std::string text = kSpanTiny;
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

// The error of loading `yaml`, or "" when it loads.
std::string error_of(const std::string& yaml) {
  const Expected<Config> c = load_config_string(yaml, "test.yaml");
  return c.is_ok() ? std::string() : c.status().message();
}

TEST(SpanConfig, DefaultsToChunkRecall) {
  const Expected<Config> c = load_config_string("model: {layers: 1, q_heads: 8, kv_heads: 8, head_dim: 64, scope: 8192}\n");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->reattention.recall, RecallMode::kChunk);
  EXPECT_EQ(c->reattention.span_tokens, 32);
  EXPECT_EQ(c->reattention.max_recall_tokens, 127);
  EXPECT_EQ(c->model.rope_scaling.type, RopeScalingType::kNone);
}

TEST(SpanConfig, ReadsTheSpanKeys) {
  const Expected<Config> c = load_config_string(kSpanTiny);
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->reattention.recall, RecallMode::kSpan);
  EXPECT_EQ(c->reattention.span_tokens, 5);
  EXPECT_EQ(c->reattention.max_recall_tokens, 10);
}

TEST(SpanConfig, ScopeRuleUsesSpansInSpanMode) {
  // 4 + 10*5 + 32 + 8 = 94; max_recall_chunks (default 32) * 8 would be 300.
  EXPECT_EQ(error_of(span_tiny_with("scope: 1024", "scope: 94")), "");
  const std::string e = error_of(span_tiny_with("scope: 1024", "scope: 93"));
  EXPECT_NE(e.find("sink_tokens + max_recall_tokens*span_tokens + local_window + chunk_tokens = 4 + 10*5 + 32 + 8 = 94"),
            std::string::npos) << e;
  EXPECT_NE(e.find("model.scope 93"), std::string::npos) << e;
  // The chunk rule still applies in chunk mode, whatever the span keys say.
  EXPECT_NE(error_of(span_tiny_with("recall: span", "recall: chunk, max_recall_chunks: 200")).find("max_recall_chunks*chunk_tokens"),
            std::string::npos);
}

TEST(SpanConfig, BadValuesNameTheKey) {
  EXPECT_NE(error_of(span_tiny_with("recall: span", "recall: tokens")).find("unknown recall 'tokens' (expected chunk or span)"),
            std::string::npos);
  EXPECT_NE(error_of(span_tiny_with("span_tokens: 5", "span_tokens: 0")).find("reattention.span_tokens: must be >= 1, got 0"),
            std::string::npos);
  EXPECT_NE(error_of(span_tiny_with("max_recall_tokens: 10", "max_recall_tokens: -1"))
                .find("reattention.max_recall_tokens: must be >= 1, got -1"),
            std::string::npos);
  EXPECT_NE(error_of(span_tiny_with("span_tokens: 5", "span_tokens: 4611686018427387904")).find("overflows"),
            std::string::npos);
}

TEST(RopeScalingConfig, ReadsLlama3AndChecksIt) {
  const std::string llama3 =
      "model: {layers: 1, q_heads: 8, kv_heads: 8, head_dim: 64, scope: 8192, rope_scaling: {type: llama3, factor: 32, "
      "low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192}}\n";
  const Expected<Config> c = load_config_string(llama3);
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->model.rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(c->model.rope_scaling.factor, 32.0);
  EXPECT_EQ(c->model.rope_scaling.original_max_positions, 8192);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string text = llama3;
    text.replace(text.find(from), from.size(), to);
    return error_of(text);
  };
  EXPECT_NE(with("type: llama3", "type: yarn").find("unknown rope scaling type 'yarn'"), std::string::npos);
  EXPECT_NE(with("type: llama3, ", "").find("model.rope_scaling.type: required key is missing"), std::string::npos);
  EXPECT_NE(with("factor: 32", "factor: 0").find("model.rope_scaling.factor: must be finite and > 0, got 0"),
            std::string::npos);
  EXPECT_NE(with("high_freq_factor: 4", "high_freq_factor: 1").find("model.rope_scaling.high_freq_factor"),
            std::string::npos);
  EXPECT_NE(with("factor: 32", "factor: 32, beta: 2").find("unknown key 'model.rope_scaling.beta'"), std::string::npos);
  EXPECT_NE(with("{type: llama3", "{kind: llama3").find("unknown key 'model.rope_scaling.kind'"), std::string::npos);
  // Round trip through to_yaml.
  const Expected<Config> back = load_config_string(c->to_yaml());
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  EXPECT_EQ(back->model.rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(back->model.rope_scaling.factor, 32.0);
  const Expected<Config> span_back = load_config_string(load_config_string(kSpanTiny)->to_yaml());
  ASSERT_TRUE(span_back.is_ok()) << span_back.status().to_string();
  EXPECT_EQ(span_back->reattention.recall, RecallMode::kSpan);
  EXPECT_EQ(span_back->reattention.span_tokens, 5);
  EXPECT_EQ(span_back->reattention.max_recall_tokens, 10);
}

struct ModelFile {
  const char* name;
  int layers, q_heads, kv_heads;
  double theta;
  int64_t scope;
  bool llama3;
};

TEST(ModelConfigs, RealShapesAndPaperPresets) {
  const ModelFile files[] = {{"llama3-8b", 32, 32, 8, 500000.0, 8192, false},
                             {"llama3.1-8b", 32, 32, 8, 500000.0, 131072, true},
                             {"qwen2-1.5b", 28, 12, 2, 1000000.0, 32768, false},
                             {"mistral-7b-v0.3", 32, 32, 8, 1000000.0, 32768, false}};
  for (const ModelFile& f : files) {
    for (const std::string suffix : {"", "-paper"}) {
      const std::string name = f.name + suffix + ".yaml";
      SCOPED_TRACE(name);
      const Expected<Config> c = load_config_file(path_of(name));
      ASSERT_TRUE(c.is_ok()) << c.status().to_string();
      EXPECT_EQ(c->model.layers, f.layers);
      EXPECT_EQ(c->model.q_heads, f.q_heads);
      EXPECT_EQ(c->model.kv_heads, f.kv_heads);
      EXPECT_EQ(c->model.head_dim, 128);
      EXPECT_EQ(c->model.rope_theta, f.theta);
      EXPECT_EQ(c->model.scope, f.scope);
      EXPECT_EQ(c->model.rope_scaling.type, f.llama3 ? RopeScalingType::kLlama3 : RopeScalingType::kNone);
      if (f.llama3) {
        EXPECT_EQ(c->model.rope_scaling.factor, 8.0);
        EXPECT_EQ(c->model.rope_scaling.low_freq_factor, 1.0);
        EXPECT_EQ(c->model.rope_scaling.high_freq_factor, 4.0);
        EXPECT_EQ(c->model.rope_scaling.original_max_positions, 8192);
      }
      const ReattentionConfig& r = c->reattention;
      if (suffix.empty()) {
        EXPECT_EQ(r.recall, RecallMode::kChunk);
        continue;
      }
      // The paper: 32 sinks, span 32, top-4, up to 127 tokens, a 4096-token local region.
      EXPECT_EQ(r.recall, RecallMode::kSpan);
      EXPECT_EQ(r.sink_tokens, 32);
      EXPECT_EQ(r.span_tokens, 32);
      EXPECT_EQ(r.top_k, 4);
      EXPECT_EQ(r.max_recall_tokens, 127);
      EXPECT_EQ(r.chunk_tokens, 128);
      EXPECT_EQ(r.local_window, 3968);
      EXPECT_LE(r.sink_tokens + r.max_recall_tokens * r.span_tokens + r.local_window + r.chunk_tokens, 8192);
    }
  }
}

}  // namespace
}  // namespace reattn
