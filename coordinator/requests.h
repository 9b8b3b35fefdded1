// Parsing and validation of request bodies, before anything is queued: pure functions from
// bytes to plain values or an InvalidArgument Status that names the field and what was wrong.
// Checks that depend on a context's current state (its length) live in the registry and run
// again in the step loop. Thread-safe (no state).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/dtype.h"
#include "common/protocol.h"
#include "common/status.h"

namespace reattn {

// POST /v1/contexts/{id}/query
struct QueryRequest {
  int layer = 0;
  QueryMode mode = QueryMode::kTail;
  int64_t qlen = 0;
  std::vector<float> q;  // [qlen, H, D] fp32, pre-RoPE, all finite
  DType out_dtype = DType::kF32;  // ?out_dtype= of a safetensors body: the answer's `out`
};

// The body is JSON {"layer", "q": [qlen][H][D], "mode"} (or "synthetic_q": {"seed", "qlen"}
// in place of "q": the synthetic generator's query), or a safetensors body with a tensor "q"
// [qlen, H, D] (F32/F16/BF16) whose layer and mode come from the query string
// ("layer=3&mode=detached"; "out_dtype=BF16" or F16 rounds the answer's `out` to that dtype,
// and a binary answer then holds it in that dtype: half the bytes). `content_type` picks the form; without one the body is sniffed.
Expected<QueryRequest> parse_query_request(const std::string& body, const std::string& content_type,
                                           const std::string& query_string, const Config& config);

// POST /v1/contexts/{id}/step: one layer of a forward pass.
struct StepRequest {
  int layer = 0;
  int64_t qlen = 0;
  StepTensors tensors;   // q [qlen, H, D], k, v [Hkv, qlen, D] as sent (views of the body)
  DType out_dtype = DType::kF32;  // ?out_dtype= of a safetensors body: the answer's `out`
};

// The body is JSON {"layer", "q": [qlen][H][D], "k": [Hkv][qlen][D], "v": [Hkv][qlen][D]}, or
// a safetensors body with tensors q, k, v (F32/F16/BF16) and the layer in the query string
// ("layer=3", and "out_dtype" as for a query). Shapes, qlen agreement, qlen <= local_window and storable values are checked
// here, each error naming the field; the order rule is the registry's.
// A safetensors body is kept (shared) and the tensors are views of it; a JSON body's values
// are laid out in a new buffer.
Expected<StepRequest> parse_step_request(std::shared_ptr<std::string> body, const std::string& content_type,
                                         const std::string& query_string, const Config& config);

// POST /v1/contexts/{id}/synthetic: {"tokens": >= 1, "seed": >= 0 (default 0), "needles": [token, ...]}
struct SyntheticRequest {
  int64_t tokens = 0;
  uint64_t seed = 0;
  std::vector<int64_t> needles;  // absolute token positions; the step loop checks they fall in the append
};
Expected<SyntheticRequest> parse_synthetic_request(const std::string& body);

// POST /v1/contexts/{id}/kv: a safetensors body with k and v, each [layers, Hkv, tokens, D].
// Parses and checks it fully, once (shapes, dtypes, storable values), reading the bytes in
// place; returns the tokens it appends.
Expected<int64_t> check_kv_body(std::shared_ptr<const std::string> body, const Config& config);

// POST /v1/contexts/{id}/load: {"path": a file under server.load_root (at most 4096 bytes),
// "format": "safetensors" (the default, and the only one)}.
struct LoadRequest {
  std::string path;
};
Expected<LoadRequest> parse_load_request(const std::string& body);

// POST /v1/contexts: an empty body or a JSON object, with an optional "from_snapshot": NAME
// (the new context is restored from that snapshot). Returns NAME, "" for an empty context.
Expected<std::string> parse_create_request(const std::string& body);

// POST /v1/contexts/{id}/snapshot: {"name": NAME}, NAME by check_snapshot_name.
Expected<std::string> parse_snapshot_request(const std::string& body);

// Whether a body should be read as JSON (by content type, else by its first byte).
bool is_json_body(const std::string& body, const std::string& content_type);

}  // namespace reattn
