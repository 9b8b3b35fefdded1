// The answer to a query or a layer step: JSON {fields..., "recalled_chunks", "out", "timing"},
// or, when the client asks for it (Accept: application/octet-stream), a safetensors body with
// `out` F32 [qlen, H, D] and `recalled_chunks` I64 [n] (chunk ids ascending), and the timing
// in X-Reattn-*-Ms headers (score, merge, attention, total: the query step; queue: waiting in
// the queue; append: a layer step's k/v append before its query). Pure; thread-safe.
#pragma once

#include <nlohmann/json.hpp>

#include "common/config.h"
#include "coordinator/http_types.h"
#include "coordinator/operations.h"
#include "coordinator/task_queue.h"

namespace reattn {

// Whether the Accept header asks for safetensors rather than JSON.
bool wants_binary(const std::string& accept);

// Whether the answer to `qlen` rows is formatted and sent by the step loop itself (binary, and
// `out` at most 64 KiB: a decode step's; a few microseconds of formatting instead of a hand-off
// to an HTTP thread). Larger and JSON answers are formatted on the HTTP threads.
bool answer_on_step_loop(bool binary, int64_t qlen, const ModelConfig& model);

// `fields`: what the route reports besides the output (context_id, layer, tokens, ...).
// out_dtype: `out` is rounded to it (the binary answer holds it in that dtype; JSON the
// rounded values); F16 saturates at +-65504.
HttpResponse attention_response(nlohmann::json fields, const TaskResult& r, int64_t qlen, const Config& config,
                                bool binary, DType out_dtype = DType::kF32);

// JSON of a long-running operation: {"id", "kind", "context_id", "state", "tokens_done",
// "tokens_total", "bytes_done", "bytes_per_s", "progress" (0..1), "created", "started",
// "finished" (RFC 3339 UTC, null until then), "error" (null unless failed or cancelled),
// "cancel_requested"}.
nlohmann::json operation_json(const OperationRecord& r);

}  // namespace reattn
