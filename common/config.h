// The service's configuration: parsed from YAML, validated at load, printable.
// Only config.cpp includes the YAML library. Every validation error names the key and the
// bad value ("reattention.top_k: must be >= 1, got 0").
#pragma once

#include <cstdint>
#include <string>

#include "common/dtype.h"
#include "common/status.h"

namespace reattn {

enum class FinalAttention { kGather, kPartial };
enum class QueryMode { kTail, kDetached };
enum class BackendKind { kAuto, kCpu, kCuda };
enum class RecallMode { kChunk, kSpan };
enum class RopeScalingType { kNone, kLlama3 };

const char* final_attention_name(FinalAttention f);
Expected<FinalAttention> parse_final_attention(const std::string& name);  // "gather" | "partial"
const char* query_mode_name(QueryMode m);
Expected<QueryMode> parse_query_mode(const std::string& name);  // "tail" | "detached"
const char* backend_kind_name(BackendKind b);
Expected<BackendKind> parse_backend_kind(const std::string& name);  // "auto" | "cpu" | "cuda"
const char* recall_mode_name(RecallMode r);
Expected<RecallMode> parse_recall_mode(const std::string& name);  // "chunk" | "span"
const char* rope_scaling_name(RopeScalingType t);
Expected<RopeScalingType> parse_rope_scaling(const std::string& name);  // "none" | "llama3"

// RoPE frequency scaling as LLaMA-3.1/3.2 checkpoints use it (`rope_type: llama3`): only the
// inverse frequencies change (rope_inv_freq); positions stay the layout positions.
struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_positions = 8192;  // original_max_position_embeddings
};

struct ModelConfig {
  int layers = 0;
  int q_heads = 0;      // H
  int kv_heads = 0;     // Hkv; G = H / Hkv
  int head_dim = 0;     // D, even (RoPE rotates halves)
  double rope_theta = 10000.0;
  int64_t scope = 0;    // the model's trained length, in positions
  RopeScaling rope_scaling;

  int group_size() const { return q_heads / kv_heads; }
};

struct ReattentionConfig {
  int64_t sink_tokens = 32;        // S
  int64_t local_window = 4096;     // W
  int64_t chunk_tokens = 64;       // C
  int top_k = 4;
  int64_t max_recall_chunks = 32;  // R (chunk recall)
  FinalAttention final_attention = FinalAttention::kGather;
  RecallMode recall = RecallMode::kChunk;
  int64_t span_tokens = 32;         // s: span recall widens each kept token to s tokens
  int64_t max_recall_tokens = 127;  // R (span recall): kept tokens before widening
};

struct BackendConfig {
  BackendKind kind = BackendKind::kAuto;
  DType storage_dtype = DType::kBF16;  // KV storage on the GPU; the CPU backend stores fp32
  int threads = 0;                     // CPU kernel threads; 0 = all hardware threads
};

struct CapacityConfig {
  int64_t tokens_per_rank = 1 << 24;   // KV tokens (all layers of a token count once) per rank
  int max_contexts = 1024;
};

struct ServerConfig {
  std::string listen = "127.0.0.1:8080";
  int64_t max_body_bytes = 64ll << 20;
  std::string api_key_file;            // empty: no API key required
  int queue_depth = 256;               // queued requests before 503
  int max_batch = 32;                  // queries merged into one step
  // Threads that run the HTTP sockets. One serves a decode step without hand-offs between I/O
  // threads (measured: bench/NOTES.md, "qlen-1 step overhead"); heavy work is on the parse pool.
  int http_threads = 1;
  int request_timeout_s = 30;          // slow clients are cut off after this
  // Reliability (README "Reliability"): every wait on another rank has a deadline.
  double step_deadline_s = 30;         // one collective of a query step; the heartbeat round trip
  double operation_deadline_s = 300;   // one control-plane operation (create, append, synthetic)
  double heartbeat_s = 1;              // rank 0 idle: checks every rank this often
  double queue_deadline_s = 60;        // a request not started this long after arrival gets 503
  double drain_deadline_s = 60;        // SIGTERM: the job ends by then, drained or not
  int max_connections = 1024;          // open HTTP connections; more are refused
  // After a step, the step loop polls the queue this long (yielding) before it sleeps, and
  // after each event an HTTP I/O thread polls its sockets this long: the next layer's step of
  // a decode is then read and started without thread wake-ups. 0: sleep at once;
  // -1 (auto): 1000 with a GPU backend (host cores are free while the GPU works), 0 with the
  // cpu backend (its kernels use every core, and a polling thread would take one from them).
  int busy_poll_us = -1;
  int busy_poll_us_for(bool host_compute) const { return busy_poll_us >= 0 ? busy_poll_us : host_compute ? 0 : 1000; }
  // Bulk loads (POST /v1/contexts/{id}/load): files are read only under this directory
  // (empty: loads are disabled), in slices of about this many file bytes between query steps.
  std::string load_root = {};
  int64_t load_slice_bytes = 64ll << 20;
  std::string snapshot_dir;            // where snapshots are written and read; empty: snapshots are off
};

// A listen address "host:port" split: IPv6 in brackets ("[::1]:8080") loses them and
// "localhost" becomes 127.0.0.1; the port is decimal in 0..65535 (0: any free port).
struct ListenAddress {
  std::string host;
  int port = 0;
};
Expected<ListenAddress> parse_listen(const std::string& listen);

struct Config {
  ModelConfig model;
  ReattentionConfig reattention;
  BackendConfig backend;
  CapacityConfig capacity;
  ServerConfig server;

  // Checks every value and the cross-key rules (kv_heads divides q_heads; the scope rule
  // S + R*C + W + C <= scope, in span recall S + R*s + W + C <= scope). Returns the first problem, naming key and value.
  Status validate() const;
  // The largest magnitude a K, V or q value may have: f16 storage on the GPU holds at most
  // 65504 (above it a value would turn into inf); otherwise the power of two B with
  // 4 * head_dim * B^2 <= 2^127, so that every q.k (|q||k| <= head_dim * B^2, RoPE keeps norms)
  // and every softmax sum stays finite in fp32 (larger finite values made NaN answers and
  // poisoned the context: found while fuzzing the API).
  float max_stored_value() const;
  // The effective configuration as YAML (round-trips through load_config_string).
  std::string to_yaml() const;
};

// Parses and validates. Unknown sections or keys are errors, never ignored.
Expected<Config> load_config_string(const std::string& yaml_text, const std::string& origin = "<string>");
Expected<Config> load_config_file(const std::string& path);

}  // namespace reattn
