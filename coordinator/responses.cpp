#include "coordinator/responses.h"

#include <cctype>
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

HttpResponse attention_response(nlohmann::json fields, const TaskResult& r, int64_t qlen, const Config& config,
                                bool binary) {
  const ModelConfig& m = config.model;
  const ReattentionConfig& rc = config.reattention;
  const std::pair<const char*, double> timing[] = {{"score_ms", r.timing.score_ms},
                                                    {"merge_ms", r.timing.candidates_ms},
                                                    {"attention_ms", r.timing.attention_ms},
                                                    {"total_ms", r.timing.total_ms},
                                                    {"queue_ms", r.queue_ms},
                                                    {"append_ms", r.timing.append_ms}};
  if (binary) {
    TensorToWrite out{"out", DType::kF32, {qlen, m.q_heads, m.head_dim}, std::string(r.query.out.size() * 4, '\0')};
    if (!r.query.out.empty()) std::memcpy(out.data.data(), r.query.out.data(), out.data.size());
    TensorToWrite ids{"recalled_chunks", DType::kF32, {static_cast<int64_t>(r.query.recalled.size())},
                      std::string(r.query.recalled.size() * 8, '\0'), "I64"};
    if (!r.query.recalled.empty()) std::memcpy(ids.data.data(), r.query.recalled.data(), ids.data.size());
    std::vector<TensorToWrite> tensors;  // moved in: `out` is the answer's largest buffer
    tensors.push_back(std::move(out));
    tensors.push_back(std::move(ids));
    if (rc.recall == RecallMode::kSpan) {  // [spans, 2] I64: first, end (exclusive)
      const auto& spans = r.query.recalled_spans;
      TensorToWrite t{"recalled_spans", DType::kF32, {static_cast<int64_t>(spans.size()), 2},
                      std::string(spans.size() * 16, '\0'), "I64"};
      for (size_t i = 0; i < spans.size(); ++i) {
        const int64_t pair[2] = {spans[i].first, spans[i].second};
        std::memcpy(t.data.data() + i * 16, pair, 16);
      }
      tensors.push_back(std::move(t));
    }
    HttpResponse resp;
    resp.content_type = "application/octet-stream";
    resp.body = serialize_safetensors(tensors);
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
  fields["out"] = nested_output<nlohmann::json>(r.query.out, qlen, m.q_heads, m.head_dim);
  fields["timing"] = std::move(t);
  return json_response(200, fields);
}

}  // namespace reattn
