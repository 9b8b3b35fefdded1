#include "common/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <string>

#ifndef REATTN_SOURCE_DIR
#define REATTN_SOURCE_DIR "."
#endif

namespace reattn {
namespace {

const std::string kTiny =
    "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, rope_theta: 10000, scope: 1024}\n"
    "reattention: {sink_tokens: 4, local_window: 32, chunk_tokens: 8, top_k: 2, "
    "max_recall_chunks: 6, final_attention: gather}\n";

std::string config_path(const std::string& name) {
  return std::string(REATTN_SOURCE_DIR) + "/configs/" + name;
}

// kTiny with the first `from` replaced by `to`.
std::string tiny_with(const std::string& from, const std::string& to) {
  std::string text = kTiny;
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

// Loading `yaml` fails with invalid_argument and a message that contains every needle.
void expect_error(const std::string& yaml, std::initializer_list<std::string> needles) {
  const Expected<Config> config = load_config_string(yaml, "test.yaml");
  ASSERT_FALSE(config.is_ok()) << yaml;
  EXPECT_EQ(config.status().code(), ErrorCode::kInvalidArgument);
  const std::string& message = config.status().message();
  for (const std::string& needle : needles) {
    EXPECT_NE(message.find(needle), std::string::npos) << "'" << needle << "' not in: " << message;
  }
}

void expect_same(const Config& a, const Config& b) {
  EXPECT_EQ(a.model.layers, b.model.layers);
  EXPECT_EQ(a.model.q_heads, b.model.q_heads);
  EXPECT_EQ(a.model.kv_heads, b.model.kv_heads);
  EXPECT_EQ(a.model.head_dim, b.model.head_dim);
  EXPECT_EQ(a.model.rope_theta, b.model.rope_theta);
  EXPECT_EQ(a.model.scope, b.model.scope);
  EXPECT_EQ(a.reattention.sink_tokens, b.reattention.sink_tokens);
  EXPECT_EQ(a.reattention.local_window, b.reattention.local_window);
  EXPECT_EQ(a.reattention.chunk_tokens, b.reattention.chunk_tokens);
  EXPECT_EQ(a.reattention.top_k, b.reattention.top_k);
  EXPECT_EQ(a.reattention.max_recall_chunks, b.reattention.max_recall_chunks);
  EXPECT_EQ(a.reattention.final_attention, b.reattention.final_attention);
  EXPECT_EQ(a.backend.kind, b.backend.kind);
  EXPECT_EQ(a.backend.storage_dtype, b.backend.storage_dtype);
  EXPECT_EQ(a.backend.threads, b.backend.threads);
  EXPECT_EQ(a.capacity.tokens_per_rank, b.capacity.tokens_per_rank);
  EXPECT_EQ(a.capacity.max_contexts, b.capacity.max_contexts);
  EXPECT_EQ(a.server.listen, b.server.listen);
  EXPECT_EQ(a.server.max_body_bytes, b.server.max_body_bytes);
  EXPECT_EQ(a.server.api_key_file, b.server.api_key_file);
  EXPECT_EQ(a.server.queue_depth, b.server.queue_depth);
  EXPECT_EQ(a.server.max_batch, b.server.max_batch);
  EXPECT_EQ(a.server.http_threads, b.server.http_threads);
  EXPECT_EQ(a.server.request_timeout_s, b.server.request_timeout_s);
  EXPECT_EQ(a.server.load_root, b.server.load_root);
  EXPECT_EQ(a.server.load_slice_bytes, b.server.load_slice_bytes);
}

void expect_default_reattention(const ReattentionConfig& r) {
  EXPECT_EQ(r.sink_tokens, 32);
  EXPECT_EQ(r.local_window, 4096);
  EXPECT_EQ(r.chunk_tokens, 64);
  EXPECT_EQ(r.top_k, 4);
  EXPECT_EQ(r.max_recall_chunks, 32);
  EXPECT_EQ(r.final_attention, FinalAttention::kGather);
}

TEST(ConfigFile, Tiny) {
  const Expected<Config> c = load_config_file(config_path("tiny.yaml"));
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->model.layers, 2);
  EXPECT_EQ(c->model.q_heads, 4);
  EXPECT_EQ(c->model.kv_heads, 2);
  EXPECT_EQ(c->model.group_size(), 2);
  EXPECT_EQ(c->model.head_dim, 16);
  EXPECT_EQ(c->model.rope_theta, 10000.0);
  EXPECT_EQ(c->model.scope, 1024);
  EXPECT_EQ(c->reattention.sink_tokens, 4);
  EXPECT_EQ(c->reattention.local_window, 32);
  EXPECT_EQ(c->reattention.chunk_tokens, 8);
  EXPECT_EQ(c->reattention.top_k, 2);
  EXPECT_EQ(c->reattention.max_recall_chunks, 6);
  EXPECT_EQ(c->reattention.final_attention, FinalAttention::kGather);
  EXPECT_EQ(c->backend.kind, BackendKind::kAuto);
  EXPECT_EQ(c->capacity.tokens_per_rank, 1048576);
}

TEST(ConfigFile, Llama3_8b) {
  const Expected<Config> c = load_config_file(config_path("llama3-8b.yaml"));
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->model.layers, 32);
  EXPECT_EQ(c->model.q_heads, 32);
  EXPECT_EQ(c->model.kv_heads, 8);
  EXPECT_EQ(c->model.head_dim, 128);
  EXPECT_EQ(c->model.rope_theta, 500000.0);
  EXPECT_EQ(c->model.scope, 8192);
  expect_default_reattention(c->reattention);
  EXPECT_EQ(c->backend.storage_dtype, DType::kBF16);
  EXPECT_EQ(c->capacity.tokens_per_rank, 8388608);
}

TEST(ConfigFile, Qwen2_1_5b) {
  const Expected<Config> c = load_config_file(config_path("qwen2-1.5b.yaml"));
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->model.layers, 28);
  EXPECT_EQ(c->model.q_heads, 12);
  EXPECT_EQ(c->model.kv_heads, 2);
  EXPECT_EQ(c->model.group_size(), 6);
  EXPECT_EQ(c->model.head_dim, 128);
  EXPECT_EQ(c->model.rope_theta, 1000000.0);
  EXPECT_EQ(c->model.scope, 32768);
  expect_default_reattention(c->reattention);
  EXPECT_EQ(c->backend.storage_dtype, DType::kBF16);
  EXPECT_EQ(c->capacity.tokens_per_rank, 8388608);
}

TEST(Config, OmittedSectionsAndRopeThetaTakeDefaults) {
  const Expected<Config> c =
      load_config_string("model: {layers: 1, q_heads: 8, kv_heads: 8, head_dim: 64, scope: 8192}\n");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  Config expected;
  expected.model = {1, 8, 8, 64, 10000.0, 8192, {}};
  expect_same(*c, expected);
  expect_default_reattention(c->reattention);
  EXPECT_EQ(c->backend.kind, BackendKind::kAuto);
  EXPECT_EQ(c->backend.storage_dtype, DType::kBF16);
  EXPECT_EQ(c->backend.threads, 0);
  EXPECT_EQ(c->capacity.tokens_per_rank, 16777216);
  EXPECT_EQ(c->capacity.max_contexts, 1024);
  EXPECT_EQ(c->server.listen, "127.0.0.1:8080");
  EXPECT_EQ(c->server.max_body_bytes, 67108864);
  EXPECT_EQ(c->server.api_key_file, "");
  EXPECT_EQ(c->server.queue_depth, 256);
  EXPECT_EQ(c->server.max_batch, 32);
  EXPECT_EQ(c->server.http_threads, 1);
  EXPECT_EQ(c->server.busy_poll_us, -1);                 // auto: polls on a GPU backend only
  EXPECT_EQ(c->server.busy_poll_us_for(false), 1000);
  EXPECT_EQ(c->server.busy_poll_us_for(true), 0);
  EXPECT_EQ(c->server.request_timeout_s, 30);
}

TEST(Config, FullExampleAndUpperCaseDtype) {
  const Expected<Config> c = load_config_string(
      kTiny +
      "backend: {kind: cpu, storage_dtype: F16, threads: 3}\n"
      "capacity: {tokens_per_rank: 16777216, max_contexts: 7}\n"
      "server: {listen: \"0.0.0.0:9000\", max_body_bytes: 1024, api_key_file: \"/etc/key\", "
      "queue_depth: 5, max_batch: 6, http_threads: 2, request_timeout_s: 9}\n");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->backend.kind, BackendKind::kCpu);
  EXPECT_EQ(c->backend.storage_dtype, DType::kF16);
  EXPECT_EQ(c->backend.threads, 3);
  EXPECT_EQ(c->capacity.max_contexts, 7);
  EXPECT_EQ(c->server.listen, "0.0.0.0:9000");
  EXPECT_EQ(c->server.max_body_bytes, 1024);
  EXPECT_EQ(c->server.api_key_file, "/etc/key");
  EXPECT_EQ(c->server.queue_depth, 5);
  EXPECT_EQ(c->server.max_batch, 6);
  EXPECT_EQ(c->server.http_threads, 2);
  EXPECT_EQ(c->server.request_timeout_s, 9);
}

TEST(Config, ToYamlRoundTrips) {
  for (const char* name : {"tiny.yaml", "llama3-8b.yaml", "qwen2-1.5b.yaml"}) {
    const Expected<Config> c = load_config_file(config_path(name));
    ASSERT_TRUE(c.is_ok()) << c.status().to_string();
    const Expected<Config> back = load_config_string(c->to_yaml(), name);
    ASSERT_TRUE(back.is_ok()) << back.status().to_string() << "\n" << c->to_yaml();
    expect_same(*c, *back);
  }
  // Every field away from its default, and strings that would not survive unquoted.
  Config c = *load_config_string(kTiny);
  c.model.rope_theta = 12345.678901234567;
  c.reattention.final_attention = FinalAttention::kPartial;
  c.backend = {BackendKind::kCuda, DType::kF32, 5};
  c.capacity = {int64_t{1} << 40, 3};
  c.server = {"[::1]:65535", 99, "null", 1, 2, 3, 4};
  c.server.load_root = "/data/kv: loads";
  c.server.load_slice_bytes = 12345;
  ASSERT_TRUE(c.validate().is_ok()) << c.validate().to_string();
  const std::string yaml = c.to_yaml();
  const Expected<Config> back = load_config_string(yaml);
  ASSERT_TRUE(back.is_ok()) << back.status().to_string() << "\n" << yaml;
  expect_same(c, *back);
  c.server.api_key_file = "";
  expect_same(c, *load_config_string(c.to_yaml()));
}

TEST(Config, NamesRoundTrip) {
  for (FinalAttention f : {FinalAttention::kGather, FinalAttention::kPartial}) {
    EXPECT_EQ(*parse_final_attention(final_attention_name(f)), f);
  }
  for (QueryMode m : {QueryMode::kTail, QueryMode::kDetached}) {
    EXPECT_EQ(*parse_query_mode(query_mode_name(m)), m);
  }
  for (BackendKind b : {BackendKind::kAuto, BackendKind::kCpu, BackendKind::kCuda}) {
    EXPECT_EQ(*parse_backend_kind(backend_kind_name(b)), b);
  }
  const Status bad_mode = parse_query_mode("sideways").status();
  EXPECT_NE(bad_mode.message().find("'sideways'"), std::string::npos);
  EXPECT_NE(bad_mode.message().find("tail or detached"), std::string::npos);
  const Status bad_kind = parse_backend_kind("tpu").status();
  EXPECT_NE(bad_kind.message().find("'tpu'"), std::string::npos);
  EXPECT_NE(bad_kind.message().find("auto, cpu or cuda"), std::string::npos);
}

TEST(Config, DefaultConstructedConfigIsInvalid) {
  const Status s = Config{}.validate();
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("model.layers"), std::string::npos) << s.message();
}

TEST(ConfigError, KvHeadsMustDivideQHeads) {
  expect_error(tiny_with("kv_heads: 2", "kv_heads: 3"), {"model.kv_heads: 3", "model.q_heads 4"});
}

TEST(ConfigError, ScopeRule) {
  // 4 + 6*8 + 32 + 8 = 92; 92 fits exactly, 91 does not.
  EXPECT_TRUE(load_config_string(tiny_with("scope: 1024", "scope: 92")).is_ok());
  expect_error(tiny_with("scope: 1024", "scope: 91"),
               {"sink_tokens + max_recall_chunks*chunk_tokens + local_window + chunk_tokens",
                "4 + 6*8 + 32 + 8 = 92", "model.scope 91"});
}

TEST(ConfigError, ScopeRuleOverflowDoesNotWrap) {
  expect_error(tiny_with("max_recall_chunks: 6", "max_recall_chunks: 4611686018427387904"),
               {"max_recall_chunks", "4611686018427387904", "overflow", "model.scope 1024"});
}

TEST(ConfigError, OddHeadDim) {
  expect_error(tiny_with("head_dim: 16", "head_dim: 15"), {"model.head_dim", "even", "15"});
}

TEST(ConfigError, UnknownKey) {
  expect_error(tiny_with("top_k:", "topk:"), {"unknown key 'reattention.topk'"});
}

TEST(ConfigError, UnknownSection) {
  expect_error(kTiny + "sever: {listen: \"0.0.0.0:80\"}\n", {"unknown section 'sever'"});
}

TEST(ConfigError, DuplicateKey) {
  expect_error(tiny_with("top_k: 2", "top_k: 2, top_k: 3"), {"duplicate key 'reattention.top_k'"});
}

TEST(ConfigError, WrongType) {
  expect_error(tiny_with("top_k: 2", "top_k: abc"),
               {"reattention.top_k: expected an integer, got 'abc'"});
  expect_error(tiny_with("scope: 1024", "scope: 1024.5"), {"model.scope", "'1024.5'"});
  expect_error(tiny_with("rope_theta: 10000", "rope_theta: fast"), {"model.rope_theta", "'fast'"});
  expect_error(tiny_with("layers: 2", "layers: [2]"), {"model.layers", "a sequence"});
  expect_error(tiny_with("top_k: 2", "top_k: 4294967296"), {"reattention.top_k", "4294967296"});
  expect_error(kTiny + "server: {listen: {host: a}}\n", {"server.listen", "a mapping"});
  expect_error(kTiny + "backend: cpu\n", {"backend", "expected a mapping", "'cpu'"});
}

TEST(ConfigError, BadEnumValues) {
  expect_error(tiny_with("final_attention: gather", "final_attention: mixed"),
               {"reattention.final_attention", "'mixed'", "gather or partial"});
  expect_error(kTiny + "backend: {kind: tpu}\n", {"backend.kind", "'tpu'", "auto, cpu or cuda"});
  expect_error(kTiny + "backend: {storage_dtype: int8}\n", {"backend.storage_dtype", "'int8'"});
}

TEST(ConfigError, BadListen) {
  for (const char* listen : {"localhost", "localhost:65536", ":8080", "host:80x", "host:-1"}) {
    expect_error(kTiny + "server: {listen: \"" + listen + "\"}\n",
                 {"server.listen", std::string("'") + listen + "'"});
  }
}

TEST(ConfigError, ValuesBelowMinimum) {
  const struct {
    std::string yaml;
    std::string key;
    std::string value;
  } cases[] = {
      {tiny_with("layers: 2", "layers: 0"), "model.layers", "got 0"},
      {tiny_with("scope: 1024", "scope: -5"), "model.scope", "got -5"},
      {tiny_with("rope_theta: 10000", "rope_theta: 0"), "model.rope_theta", "got 0"},
      {tiny_with("sink_tokens: 4", "sink_tokens: -1"), "reattention.sink_tokens", "got -1"},
      {tiny_with("local_window: 32", "local_window: 0"), "reattention.local_window", "got 0"},
      {tiny_with("chunk_tokens: 8", "chunk_tokens: 0"), "reattention.chunk_tokens", "got 0"},
      {tiny_with("top_k: 2", "top_k: 0"), "reattention.top_k", "got 0"},
      {tiny_with("max_recall_chunks: 6", "max_recall_chunks: 0"), "reattention.max_recall_chunks",
       "got 0"},
      {kTiny + "backend: {threads: -1}\n", "backend.threads", "got -1"},
      {kTiny + "capacity: {tokens_per_rank: 0}\n", "capacity.tokens_per_rank", "got 0"},
      {kTiny + "capacity: {max_contexts: 0}\n", "capacity.max_contexts", "got 0"},
      {kTiny + "server: {max_body_bytes: 0}\n", "server.max_body_bytes", "got 0"},
      {kTiny + "server: {queue_depth: 0}\n", "server.queue_depth", "got 0"},
      {kTiny + "server: {max_batch: 0}\n", "server.max_batch", "got 0"},
      {kTiny + "server: {http_threads: 0}\n", "server.http_threads", "got 0"},
      {kTiny + "server: {request_timeout_s: 0}\n", "server.request_timeout_s", "got 0"},
      {kTiny + "server: {busy_poll_us: -2}\n", "server.busy_poll_us", "got -2"},
      {kTiny + "server: {busy_poll_us: 1000001}\n", "server.busy_poll_us", "got 1000001"},
  };
  for (const auto& c : cases) expect_error(c.yaml, {c.key, c.value});
}

TEST(ConfigError, TopKMayExceedMaxRecallChunks) {
  EXPECT_TRUE(load_config_string(tiny_with("top_k: 2", "top_k: 9")).is_ok());
}

TEST(ConfigError, MissingModelKey) {
  expect_error(tiny_with("head_dim: 16, ", ""), {"model.head_dim", "missing"});
  expect_error("reattention: {top_k: 2}\n", {"missing section 'model'"});
  expect_error("", {"missing section 'model'"});
}

TEST(ConfigError, MissingFile) {
  const std::string path = config_path("no-such-config.yaml");
  const Expected<Config> c = load_config_file(path);
  ASSERT_FALSE(c.is_ok());
  EXPECT_EQ(c.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(path), std::string::npos) << c.status().message();
  const Expected<Config> dir = load_config_file(std::string(REATTN_SOURCE_DIR) + "/configs");
  ASSERT_FALSE(dir.is_ok());
  EXPECT_NE(dir.status().message().find("directory"), std::string::npos) << dir.status().message();
}

TEST(ConfigError, YamlSyntaxError) {
  const Expected<Config> c = load_config_string(tiny_with("scope: 1024}", "scope: 1024"), "bad.yaml");
  ASSERT_FALSE(c.is_ok());
  EXPECT_EQ(c.status().code(), ErrorCode::kInvalidArgument);
  const std::string& message = c.status().message();
  EXPECT_EQ(message.rfind("bad.yaml: ", 0), 0u) << message;
  EXPECT_NE(message.find("line"), std::string::npos) << message;
  EXPECT_NE(message.find("column"), std::string::npos) << message;
  expect_error("model: [1, 2\n", {"test.yaml", "line"});
  expect_error("- 1\n- 2\n", {"top level", "a sequence"});
}

}  // namespace
}  // namespace reattn
