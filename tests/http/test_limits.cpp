// The service's limits without a socket or mpirun (README "Reliability"): content types per
// route, canonical ids, the JSON value budget, metric labels from fixed sets, the deadline
// config keys and the deadlines other ranks wait.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>

#include "comm/deadline.h"
#include "common/config.h"
#include "common/safetensors.h"
#include "common/tensor_checks.h"
#include "coordinator/json_budget.h"
#include "coordinator/metrics.h"
#include "coordinator/requests.h"
#include "coordinator/router.h"
#include "tiny_service_config.h"

namespace reattn {
namespace {

TEST(ContentType, EachRouteTakesItsTypesOnly) {
  EXPECT_EQ(content_type_problem(Route::kCreateContext, "", 0), "");
  EXPECT_EQ(content_type_problem(Route::kCreateContext, "application/json", 2), "");
  EXPECT_NE(content_type_problem(Route::kCreateContext, "", 2), "");
  EXPECT_NE(content_type_problem(Route::kCreateContext, "text/plain", 2), "");
  EXPECT_NE(content_type_problem(Route::kSynthetic, "application/x-www-form-urlencoded", 5), "");
  EXPECT_NE(content_type_problem(Route::kSynthetic, "multipart/form-data; boundary=x", 5), "");
  EXPECT_EQ(content_type_problem(Route::kSynthetic, "Application/JSON; charset=utf-8", 5), "");
  EXPECT_EQ(content_type_problem(Route::kQuery, "application/json", 5), "");
  EXPECT_EQ(content_type_problem(Route::kQuery, "application/octet-stream", 5), "");
  EXPECT_NE(content_type_problem(Route::kQuery, "text/plain;charset=UTF-8", 5), "");
  EXPECT_EQ(content_type_problem(Route::kLayerStep, "application/json", 5), "");
  EXPECT_EQ(content_type_problem(Route::kLayerStep, "application/octet-stream", 5), "");
  EXPECT_NE(content_type_problem(Route::kLayerStep, "text/plain", 5), "");
  EXPECT_EQ(content_type_problem(Route::kAppendKv, "application/octet-stream", 5), "");
  EXPECT_NE(content_type_problem(Route::kAppendKv, "application/json", 5), "");
  // Routes without a body take anything.
  EXPECT_EQ(content_type_problem(Route::kGetContext, "text/plain", 0), "");
  // The message names what the route takes and caps what it quotes.
  const std::string why = content_type_problem(Route::kAppendKv, std::string(10000, 'x'), 5);
  EXPECT_NE(why.find("application/octet-stream"), std::string::npos);
  EXPECT_LT(why.size(), 200u);
}

TEST(Router, OnlyCanonicalIds) {
  EXPECT_TRUE(match_route("GET", "/v1/contexts/1").id_valid);
  EXPECT_TRUE(match_route("GET", "/v1/contexts/120").id_valid);
  EXPECT_EQ(match_route("GET", "/v1/contexts/120").id, 120u);
  for (const char* path : {"/v1/contexts/01", "/v1/contexts/0", "/v1/contexts/+1", "/v1/contexts/1a",
                           "/v1/contexts/-1", "/v1/contexts/99999999999999999999999"}) {
    EXPECT_FALSE(match_route("GET", path).id_valid) << path;
  }
  const RouteMatch m = match_route("GET", "/v1/contexts/" + std::string(60000, '7'));
  EXPECT_FALSE(m.id_valid);
  EXPECT_LT(m.id_text.size(), 140u);  // echoed capped
}

TEST(JsonBudget, CountsValuesAndDepthWithoutADom) {
  const JsonBudget small{10, 3};
  EXPECT_TRUE(check_json_budget(R"({"a": [1, 2, 3]})", small).is_ok());
  Status s = check_json_budget(R"({"a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]})", small);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("more than 10 JSON values"), std::string::npos) << s.message();
  s = check_json_budget(R"({"a": [[[1]]]})", small);
  EXPECT_NE(s.message().find("nested deeper than 3"), std::string::npos) << s.message();
  s = check_json_budget(R"({"a": )", small);
  EXPECT_NE(s.message().find("not valid JSON"), std::string::npos) << s.message();
  // 70,000 levels: refused at the budget's depth, no recursion.
  s = check_json_budget(std::string(70000, '[') + std::string(70000, ']'), small);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
}

TEST(JsonBudget, AQueryGetsWhatItsShapeCanNeed) {
  const Config c = test::tiny_service_config(4);
  const JsonBudget b = json_budget(Route::kQuery, c);
  // q [local_window][q_heads][head_dim] fits; a body of many more values does not.
  const uint64_t numbers = 32ull * 4 * 16;
  EXPECT_GE(b.max_values, numbers + 32 * 4 + 32);
  EXPECT_LT(b.max_values, 2 * numbers);
  std::string body = R"({"layer": 0, "q": [)";
  for (int r = 0; r < 32; ++r) {
    body += r ? ",[" : "[";
    for (int h = 0; h < 4; ++h) {
      body += h ? ",[" : "[";
      for (int d = 0; d < 16; ++d) body += d ? ",0.5" : "0.5";
      body += "]";
    }
    body += "]";
  }
  body += "]}";
  EXPECT_TRUE(check_json_budget(body, b).is_ok());
  std::string big = R"({"layer": 0, "q": [)";
  for (uint64_t i = 0; i < 2 * numbers; ++i) big += i ? ",0" : "0";
  big += "]}";
  EXPECT_FALSE(check_json_budget(big, b).is_ok());
  EXPECT_EQ(json_budget(Route::kGetContext, c).max_values, 0u);
  // A layer step carries k and v next to q.
  EXPECT_GT(json_budget(Route::kLayerStep, c).max_values, b.max_values);
}

TEST(Metrics, MethodLabelsComeFromAFixedSet) {
  EXPECT_EQ(method_label("GET"), "GET");
  EXPECT_EQ(method_label("DELETE"), "DELETE");
  EXPECT_EQ(method_label("get"), "other");
  EXPECT_EQ(method_label("M1X"), "other");
  Metrics m;
  for (int i = 0; i < 1000; ++i) m.count_request("M" + std::to_string(i) + "X", "unmatched", 404, 0.001);
  const std::string page = m.render(MetricsSnapshot{});
  size_t series = 0;
  for (size_t at = page.find("reattn_http_requests_total{"); at != std::string::npos;
       at = page.find("reattn_http_requests_total{", at + 1)) {
    ++series;
  }
  EXPECT_EQ(series, 1u);
  EXPECT_NE(page.find(R"(reattn_http_requests_total{method="other",route="unmatched",status="404"} 1000)"),
            std::string::npos);
  EXPECT_NE(page.find("reattn_log_lines_dropped_total "), std::string::npos);
}

TEST(Config, DeadlineKeysParseValidateAndPrint) {
  const std::string base =
      "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, rope_theta: 10000, scope: 1024}\n"
      "reattention: {sink_tokens: 4, local_window: 32, chunk_tokens: 8, top_k: 2, max_recall_chunks: 6}\n";
  Expected<Config> c = load_config_string(base + "server: {step_deadline_s: 2.5, operation_deadline_s: 7, "
                                                 "heartbeat_s: 0.25, queue_deadline_s: 3, drain_deadline_s: 9, "
                                                 "max_connections: 50}\n");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->server.step_deadline_s, 2.5);
  EXPECT_EQ(c->server.operation_deadline_s, 7);
  EXPECT_EQ(c->server.heartbeat_s, 0.25);
  EXPECT_EQ(c->server.max_connections, 50);
  Expected<Config> again = load_config_string(c->to_yaml());
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(again->server.drain_deadline_s, 9);
  EXPECT_EQ(again->server.queue_deadline_s, 3);
  for (const char* bad : {"step_deadline_s: 0", "operation_deadline_s: -1", "heartbeat_s: .nan", "max_connections: 0",
                          "drain_deadline_s: 100000"}) {
    Expected<Config> b = load_config_string(base + "server: {" + bad + "}\n");
    ASSERT_FALSE(b.is_ok()) << bad;
    const std::string key = std::string(bad).substr(0, std::string(bad).find(':'));
    EXPECT_NE(b.status().message().find("server." + key), std::string::npos) << b.status().message();
  }
}

TEST(Safetensors, KvBodiesAreStrict) {
  const Config c = test::tiny_service_config(4);
  const ModelConfig& m = c.model;
  const std::vector<int64_t> shape = {m.layers, m.kv_heads, 3, m.head_dim};
  const std::vector<float> values(static_cast<size_t>(m.layers * m.kv_heads * 3 * m.head_dim), 0.5f);
  const auto kv = [&](DType k_dtype, DType v_dtype, bool extra) {
    std::vector<TensorToWrite> t = {make_tensor("k", k_dtype, shape, values), make_tensor("v", v_dtype, shape, values)};
    if (extra) t.push_back(make_tensor("extra", DType::kF32, shape, values));
    return serialize_safetensors(t);
  };
  Expected<SafetensorsFile> good = SafetensorsFile::parse(kv(DType::kF32, DType::kF32, false), "kv body");
  ASSERT_TRUE(good.is_ok()) << good.status().to_string();
  EXPECT_TRUE(kv_tensors(*good, m).is_ok());

  Expected<SafetensorsFile> mixed = SafetensorsFile::parse(kv(DType::kF32, DType::kBF16, false), "kv body");
  ASSERT_TRUE(mixed.is_ok());
  Status s = kv_tensors(*mixed, m).status();
  EXPECT_NE(s.message().find("differ in dtype"), std::string::npos) << s.message();

  Expected<SafetensorsFile> extra = SafetensorsFile::parse(kv(DType::kF32, DType::kF32, true), "kv body");
  ASSERT_TRUE(extra.is_ok());
  s = kv_tensors(*extra, m).status();
  EXPECT_NE(s.message().find("unexpected tensor 'extra'"), std::string::npos) << s.message();

  s = SafetensorsFile::parse(kv(DType::kF32, DType::kF32, false) + "trailing", "kv body").status();
  EXPECT_NE(s.message().find("8 trailing bytes"), std::string::npos) << s.message();
}

// A step body travels to every rank as it came, unless its header is padded far beyond its
// tensors (a large __metadata__): then only the tensors go on, with the same values.
TEST(Safetensors, StepBodyForwardsItsTensorsNotABloatedHeader) {
  const Config c = test::tiny_service_config(4);
  const ModelConfig& m = c.model;
  const std::vector<float> q(static_cast<size_t>(m.q_heads * m.head_dim), 0.25f);
  const std::vector<float> kv(static_cast<size_t>(m.kv_heads * m.head_dim), 0.5f);
  std::vector<TensorBytes> tensors = {
      {"q", "F32", {1, m.q_heads, m.head_dim}, q.data(), q.size() * sizeof(float)},
      {"k", "F32", {m.kv_heads, 1, m.head_dim}, kv.data(), kv.size() * sizeof(float)},
      {"v", "F32", {m.kv_heads, 1, m.head_dim}, kv.data(), kv.size() * sizeof(float)}};
  const std::string plain = serialize_safetensors(tensors);
  const size_t data_bytes = (q.size() + 2 * kv.size()) * sizeof(float);
  // The same tensors after a 1 MiB __metadata__ entry in the header.
  std::string header = plain.substr(8, plain.size() - 8 - data_bytes);
  header.insert(1, "\"__metadata__\":{\"pad\":\"" + std::string(1 << 20, 'x') + "\"},");
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string bloated(8, '\0');
  for (int i = 0; i < 8; ++i) bloated[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  bloated += header + plain.substr(plain.size() - data_bytes);
  const std::string octet = "application/octet-stream";
  for (const std::string* body : {&plain, static_cast<const std::string*>(&bloated)}) {
    Expected<StepRequest> step = parse_step_request(std::make_shared<std::string>(*body), octet, "layer=0", c);
    ASSERT_TRUE(step.is_ok()) << step.status().message();
    const StepTensors& t = step->tensors;
    ASSERT_TRUE(t.fit(q.size(), kv.size()));
    if (body == &bloated) {
      EXPECT_EQ(t.body->size(), data_bytes);  // the header stayed behind
    }
    float first_q = 0, first_v = 0;
    std::memcpy(&first_q, t.at(t.q_offset), sizeof(float));
    std::memcpy(&first_v, t.at(t.v_offset), sizeof(float));
    EXPECT_EQ(first_q, 0.25f);
    EXPECT_EQ(first_v, 0.5f);
  }
}

// Query and step bodies are as strict as K/V bodies: an extra tensor is named and refused.
TEST(Safetensors, QueryAndStepBodiesRefuseExtraTensors) {
  const Config c = test::tiny_service_config(4);
  const ModelConfig& m = c.model;
  const std::vector<float> q(static_cast<size_t>(m.q_heads * m.head_dim), 0.25f);
  const std::vector<float> kv(static_cast<size_t>(m.kv_heads * m.head_dim), 0.5f);
  const auto q_t = make_tensor("q", DType::kF32, {1, m.q_heads, m.head_dim}, q);
  const auto k_t = make_tensor("k", DType::kF32, {m.kv_heads, 1, m.head_dim}, kv);
  const auto v_t = make_tensor("v", DType::kF32, {m.kv_heads, 1, m.head_dim}, kv);
  const auto extra = make_tensor("bias", DType::kF32, {1}, std::vector<float>{1.0f});
  const std::string octet = "application/octet-stream";
  EXPECT_TRUE(parse_query_request(serialize_safetensors({q_t}), octet, "layer=0", c).is_ok());
  Status s = parse_query_request(serialize_safetensors({q_t, extra}), octet, "layer=0", c).status();
  EXPECT_NE(s.message().find("unexpected tensor 'bias': a query body holds exactly 'q'"), std::string::npos)
      << s.message();
  const auto body = [](std::string bytes) { return std::make_shared<std::string>(std::move(bytes)); };
  EXPECT_TRUE(parse_step_request(body(serialize_safetensors({q_t, k_t, v_t})), octet, "layer=0", c).is_ok());
  s = parse_step_request(body(serialize_safetensors({q_t, k_t, v_t, extra})), octet, "layer=0", c).status();
  EXPECT_NE(s.message().find("unexpected tensor 'bias': a step body holds exactly 'q', 'k', 'v'"), std::string::npos)
      << s.message();
}

TEST(Deadlines, OtherRanksWaitLongerThanRankZero) {
  EXPECT_EQ(WaitDeadlines::for_rank(2.0, 0), 2.0);
  EXPECT_GT(WaitDeadlines::for_rank(2.0, 1), 2.0);
  WaitDeadlines d;
  d.step_s = 2;
  d.heartbeat_s = 0;
  EXPECT_EQ(d.idle_limit_s(), 0);  // no heartbeat: no idle limit
  d.heartbeat_s = 0.5;
  EXPECT_GT(d.idle_limit_s(), d.heartbeat_s + d.step_s);
  EXPECT_FALSE(Deadline(0.5).passed());
  EXPECT_EQ(Deadline(2.0).budget(), "2.0 s");
}

}  // namespace
}  // namespace reattn
