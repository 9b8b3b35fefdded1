#include "coordinator/responses.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <cstring>
#include <string>
#include <vector>

#include "common/output_json.h"
#include "common/safetensors.h"

namespace reattn {

bool wants_binary(const std::string& accept) {
  std::string a = accept;
  for (char& c : a) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return a.find("application/octet-stream") != std::string::npos || a.find("safetensors") != std::string::npos;
}

bool answer_on_step_loop(bool binary, int64_t qlen, const ModelConfig& model) {
  constexpr int64_t kMaxOutBytes = 64 * 1024;
  return binary && qlen * model.q_heads * model.head_dim * static_cast<int64_t>(sizeof(float)) <= kMaxOutBytes;
}

namespace {

// `out` written in `dtype`. F16 saturates at its largest finite value: an output is an average
// of v, and v may be stored beyond F16's range (BF16 and F32 hold every storable value).
void write_out(DType dtype, const std::vector<float>& out, void* dst) {
  if (dtype != DType::kF16) return convert_from_f32(dtype, out.data(), out.size(), dst);
  constexpr float kMaxF16 = 65504.0f;
  auto* bytes = static_cast<unsigned char*>(dst);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint16_t bits = float_to_f16(std::clamp(out[i], -kMaxF16, kMaxF16));
    std::memcpy(bytes + 2 * i, &bits, 2);
  }
}

}  // namespace

HttpResponse attention_response(nlohmann::json fields, const TaskResult& r, int64_t qlen, const Config& config,
                                bool binary, DType out_dtype) {
  const ModelConfig& m = config.model;
  const ReattentionConfig& rc = config.reattention;
  const std::pair<const char*, double> timing[] = {{"score_ms", r.timing.score_ms},
                                                    {"merge_ms", r.timing.candidates_ms},
                                                    {"attention_ms", r.timing.attention_ms},
                                                    {"total_ms", r.timing.total_ms},
                                                    {"queue_ms", r.queue_ms},
                                                    {"append_ms", r.timing.append_ms}};
  if (binary) {
    // Borrowed: the answer's bytes are copied once, into the body.
    std::vector<int64_t> spans;  // span recall: [spans, 2] I64, first and end (exclusive)
    for (const auto& [first, end] : r.query.recalled_spans) spans.insert(spans.end(), {first, end});
    // `out` in out_dtype, converted as it is written into the body (its one copy).
    std::vector<TensorBytes> tensors = {
        {"out", dtype_name(out_dtype), {qlen, m.q_heads, m.head_dim}, nullptr, r.query.out.size() * dtype_size(out_dtype)},
        {"recalled_chunks", "I64", {static_cast<int64_t>(r.query.recalled.size())}, r.query.recalled.data(),
         r.query.recalled.size() * sizeof(int64_t)}};
    if (rc.recall == RecallMode::kSpan) {
      tensors.push_back({"recalled_spans", "I64", {static_cast<int64_t>(spans.size() / 2), 2}, spans.data(),
                         spans.size() * sizeof(int64_t)});
    }
    std::string body = serialize_safetensors(tensors);
    size_t data_bytes = 0;
    for (const TensorBytes& t : tensors) data_bytes += t.bytes;
    write_out(out_dtype, r.query.out, body.data() + body.size() - data_bytes);  // `out` comes first
    HttpResponse resp;
    resp.content_type = "application/octet-stream";
    resp.body = std::move(body);
    static const char* const kHeaders[] = {"X-Reattn-Score-Ms", "X-Reattn-Merge-Ms", "X-Reattn-Attention-Ms",
                                           "X-Reattn-Total-Ms", "X-Reattn-Queue-Ms", "X-Reattn-Append-Ms"};
    static_assert(sizeof(kHeaders) / sizeof(kHeaders[0]) == sizeof(timing) / sizeof(timing[0]), "a header per time");
    for (size_t i = 0; i < sizeof(kHeaders) / sizeof(kHeaders[0]); ++i) {
      resp.headers.emplace_back(kHeaders[i], std::to_string(timing[i].second));
    }
    return resp;
  }
  nlohmann::json chunks = nlohmann::json::array();
  for (int64_t j : r.query.recalled) {
    const int64_t first = rc.sink_tokens + j * rc.chunk_tokens;
    chunks.push_back({{"chunk", j}, {"first_token", first}, {"last_token", first + rc.chunk_tokens - 1}});
  }
  nlohmann::json t = nlohmann::json::object();
  for (const auto& [name, ms] : timing) t[name] = ms;
  t["batch_size"] = r.batch_size;
  nlohmann::json spans = nlohmann::json::array();  // span recall's token ranges, inclusive
  for (const auto& [first, end] : r.query.recalled_spans) spans.push_back({{"first_token", first}, {"last_token", end - 1}});
  fields["recalled_chunks"] = std::move(chunks);
  fields["recalled_spans"] = std::move(spans);
  if (out_dtype == DType::kF32) {
    fields["out"] = nested_output<nlohmann::json>(r.query.out, qlen, m.q_heads, m.head_dim);
  } else {  // the values the binary answer would hold
    std::vector<float> rounded(r.query.out.size());
    std::string bits(rounded.size() * dtype_size(out_dtype), '\0');
    write_out(out_dtype, r.query.out, bits.data());
    convert_to_f32(out_dtype, bits.data(), rounded.size(), rounded.data());
    fields["out"] = nested_output<nlohmann::json>(rounded, qlen, m.q_heads, m.head_dim);
  }
  fields["timing"] = std::move(t);
  return json_response(200, fields);
}

namespace {

nlohmann::json rfc3339(std::chrono::system_clock::time_point t) {
  if (t == std::chrono::system_clock::time_point{}) return nullptr;
  const std::time_t seconds = std::chrono::system_clock::to_time_t(t);
  const auto millis = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count() % 1000;
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", utc.tm_year + 1900, utc.tm_mon + 1,
                utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, static_cast<int>(millis));
  return buf;
}

}  // namespace

nlohmann::json operation_json(const OperationRecord& r) {
  const OperationProgress& p = r.progress;
  const bool done = r.state == OperationState::kSucceeded;
  return {{"id", r.id},
          {"kind", operation_kind_name(r.kind)},
          {"context_id", r.context_id},
          {"state", operation_state_name(r.state)},
          {"tokens_done", p.tokens_done},
          {"tokens_total", p.tokens_total},
          {"bytes_done", p.bytes_done},
          {"bytes_per_s", r.bytes_per_s},
          {"progress", done ? 1.0 : p.tokens_total > 0 ? static_cast<double>(p.tokens_done) / p.tokens_total : 0.0},
          {"created", rfc3339(r.created)},
          {"started", rfc3339(r.started)},
          {"finished", rfc3339(r.finished)},
          {"error", r.error.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.error)},
          {"cancel_requested", r.cancel_requested}};
}

}  // namespace reattn
