// Unit tests of the coordinator's pure parts: routes, request parsing, the task queue's
// batching order and bound, the registry's balance and capacity checks (against KvStore's),
// the operation wire format, metrics text, and the handlers' status codes without a socket.
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <optional>
#include <thread>

#include "common/file_roots.h"
#include "common/safetensors.h"
#include "common/semantics.h"
#include "common/synthetic.h"
#include "coordinator/handlers.h"
#include "coordinator/metrics.h"
#include "coordinator/registry.h"
#include "coordinator/requests.h"
#include "coordinator/router.h"
#include "coordinator/step_loop.h"
#include "tests/http/tiny_service_config.h"
#include "coordinator/task_queue.h"
#include "kernels/make_backend.h"
#include "worker/kv_store.h"

namespace reattn {
namespace {

using nlohmann::json;

Config tiny_config() { return test::tiny_service_config(4); }

std::shared_ptr<const std::string> shared(const std::string& bytes) { return std::make_shared<const std::string>(bytes); }

json q_json(int64_t qlen, int heads, int dim, float value = 0.25f) {
  json q = json::array();
  for (int64_t i = 0; i < qlen; ++i) {
    json row = json::array();
    for (int h = 0; h < heads; ++h) row.push_back(std::vector<float>(dim, value));
    q.push_back(row);
  }
  return q;
}

TEST(Router, MatchesRoutesAndIds) {
  RouteMatch m = match_route("POST", "/v1/contexts/12/query");
  EXPECT_EQ(m.route, Route::kQuery);
  EXPECT_EQ(m.pattern, "/v1/contexts/{id}/query");
  EXPECT_TRUE(m.id_valid);
  EXPECT_EQ(m.id, 12u);
  EXPECT_EQ(match_route("GET", "/v1/contexts/").route, Route::kListContexts);
  EXPECT_EQ(match_route("DELETE", "/v1/contexts/3").route, Route::kDeleteContext);
  m = match_route("GET", "/v1/contexts/abc");
  EXPECT_EQ(m.route, Route::kGetContext);
  EXPECT_FALSE(m.id_valid);
}

TEST(Router, UnknownPathIs404AndWrongMethodIs405WithAllow) {
  EXPECT_EQ(match_route("GET", "/v2/x").error_status, 404);
  EXPECT_EQ(match_route("POST", "/v1/contexts/1/bogus").error_status, 404);
  RouteMatch m = match_route("PUT", "/v1/contexts");
  EXPECT_EQ(m.error_status, 405);
  EXPECT_EQ(m.allow, "POST, GET");
  m = match_route("GET", "/v1/contexts/7/query");
  EXPECT_EQ(m.error_status, 405);
  EXPECT_EQ(m.allow, "POST");
  EXPECT_FALSE(is_api_route(Route::kHealthReady));
  EXPECT_TRUE(is_api_route(Route::kInfo));
}

TEST(Requests, JsonQueryParsesAndChecksShapeAndValues) {
  const Config c = tiny_config();
  Expected<QueryRequest> q =
      parse_query_request(json{{"layer", 1}, {"q", q_json(2, 4, 16)}, {"mode", "detached"}}.dump(), "", "", c);
  ASSERT_TRUE(q.is_ok()) << q.status().to_string();
  EXPECT_EQ(q->layer, 1);
  EXPECT_EQ(q->mode, QueryMode::kDetached);
  EXPECT_EQ(q->qlen, 2);
  EXPECT_EQ(q->q.size(), 2u * 4 * 16);

  const auto bad = [&](const std::string& body) {
    Expected<QueryRequest> r = parse_query_request(body, "application/json", "", c);
    EXPECT_FALSE(r.is_ok()) << body;
    return r.status().message();
  };
  EXPECT_NE(bad(json{{"layer", 2}, {"q", q_json(1, 4, 16)}}.dump()).find("layer"), std::string::npos);
  EXPECT_NE(bad(json{{"layer", 0}, {"q", q_json(1, 3, 16)}}.dump()).find("q[0]"), std::string::npos);
  EXPECT_NE(bad(json{{"layer", 0}, {"q", q_json(1, 4, 15)}}.dump()).find("q[0][0]"), std::string::npos);
  // tail qlen > local_window
  EXPECT_NE(bad(json{{"layer", 0}, {"q", q_json(33, 4, 16)}}.dump()).find("local_window"), std::string::npos);
  EXPECT_NE(bad(json{{"layer", 0.5}, {"q", q_json(1, 4, 16)}}.dump()).find("layer: expected an integer"),
            std::string::npos);
  EXPECT_NE(bad(json{{"layer", 0}, {"q", q_json(1, 4, 16)}, {"typo", 1}}.dump()).find("'typo'"), std::string::npos);
  EXPECT_NE(bad("{\"layer\": 0, \"q\": [[[NaN]]]}").find("JSON"), std::string::npos);  // NaN is not JSON
  EXPECT_NE(bad("{\"layer\": 0, \"q\": [").find("JSON"), std::string::npos);
  std::string inf = json{{"layer", 0}, {"q", q_json(1, 4, 16, 0.5f)}}.dump();
  inf.replace(inf.find("0.5"), 3, "1e39");
  EXPECT_NE(bad(inf).find("finite"), std::string::npos);
}

TEST(Requests, SyntheticQueryIsTheGeneratorsQuery) {
  const Config c = tiny_config();
  Expected<QueryRequest> q =
      parse_query_request(R"({"layer": 1, "synthetic_q": {"seed": 9, "qlen": 3}})", "", "", c);
  ASSERT_TRUE(q.is_ok()) << q.status().to_string();
  EXPECT_EQ(q->q, synthetic_query(SyntheticSpec{9, {}}, c.model, 1, 3));
}

TEST(Requests, SafetensorsQueryTakesLayerAndModeFromTheUrl) {
  const Config c = tiny_config();
  const std::string body =
      serialize_safetensors({make_tensor("q", DType::kBF16, {2, 4, 16}, std::vector<float>(128, 0.5f))});
  Expected<QueryRequest> q = parse_query_request(body, "application/octet-stream", "layer=1&mode=detached", c);
  ASSERT_TRUE(q.is_ok()) << q.status().to_string();
  EXPECT_EQ(q->layer, 1);
  EXPECT_EQ(q->mode, QueryMode::kDetached);
  EXPECT_EQ(q->qlen, 2);
  EXPECT_FALSE(parse_query_request(body, "application/octet-stream", "", c).is_ok());
  EXPECT_FALSE(parse_query_request(body, "application/octet-stream", "layer=x", c).is_ok());
  EXPECT_FALSE(parse_query_request(body.substr(0, body.size() - 3), "", "layer=0", c).is_ok());
  std::vector<float> nan(128, 0.0f);
  nan[5] = std::nanf("");
  EXPECT_FALSE(parse_query_request(serialize_safetensors({make_tensor("q", DType::kF32, {2, 4, 16}, nan)}), "",
                                   "layer=0", c)
                   .is_ok());
}

TEST(Requests, KvBodyAndSyntheticBody) {
  const Config c = tiny_config();
  const std::vector<float> vals(2 * 2 * 5 * 16, 0.5f);
  const std::string kv = serialize_safetensors({make_tensor("k", DType::kF16, {2, 2, 5, 16}, vals),
                                                make_tensor("v", DType::kF16, {2, 2, 5, 16}, vals)});
  Expected<int64_t> tokens = check_kv_body(shared(kv), c);
  ASSERT_TRUE(tokens.is_ok()) << tokens.status().to_string();
  EXPECT_EQ(*tokens, 5);
  EXPECT_FALSE(check_kv_body(shared(kv.substr(0, 20)), c).is_ok());
  EXPECT_FALSE(check_kv_body(shared(""), c).is_ok());

  // f16 storage on the GPU holds at most 65504: larger values are refused, naming the limit.
  Config f16 = c;
  f16.backend.kind = BackendKind::kCuda;
  f16.backend.storage_dtype = DType::kF16;
  std::vector<float> big = vals;
  big[7] = 70000.0f;
  const std::string big_kv = serialize_safetensors({make_tensor("k", DType::kF32, {2, 2, 5, 16}, big),
                                                    make_tensor("v", DType::kF32, {2, 2, 5, 16}, vals)});
  EXPECT_TRUE(check_kv_body(shared(big_kv), c).is_ok());  // bf16 storage holds it
  Expected<int64_t> refused = check_kv_body(shared(big_kv), f16);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("f16 storage limit 65504"), std::string::npos)
      << refused.status().message();
  nlohmann::json q = nlohmann::json::array({nlohmann::json::array()});
  for (int h = 0; h < 4; ++h) q[0].push_back(std::vector<float>(16, 0.25f));
  q[0][2][5] = 70000.0;
  const std::string query = nlohmann::json{{"layer", 0}, {"q", q}}.dump();
  EXPECT_TRUE(parse_query_request(query, "application/json", "", c).is_ok());
  Expected<QueryRequest> big_q = parse_query_request(query, "application/json", "", f16);
  ASSERT_FALSE(big_q.is_ok());
  EXPECT_NE(big_q.status().message().find("q[0][2][5]"), std::string::npos) << big_q.status().message();

  Expected<SyntheticRequest> s = parse_synthetic_request(R"({"tokens": 100, "seed": 3, "needles": [5, 50]})");
  ASSERT_TRUE(s.is_ok());
  EXPECT_EQ(s->tokens, 100);
  EXPECT_EQ(s->seed, 3u);
  EXPECT_EQ(s->needles, (std::vector<int64_t>{5, 50}));
  EXPECT_FALSE(parse_synthetic_request(R"({"tokens": 0})").is_ok());
  EXPECT_FALSE(parse_synthetic_request(R"({"tokens": 5, "needles": [-1]})").is_ok());
  EXPECT_FALSE(parse_synthetic_request(R"({"seed": 1})").is_ok());
  EXPECT_TRUE(parse_create_request("").is_ok());
  EXPECT_TRUE(parse_create_request(" {} ").is_ok());
  EXPECT_FALSE(parse_create_request("{\"x\": 1}").is_ok());
}

// A value nested ~100,000 levels deep in any echoed field is answered with a short 400 naming
// the field; before, quoting it serialized it recursively and overflowed rank 0's stack.
TEST(Requests, DeeplyNestedOrHugeValuesAreRefusedWithShortMessages) {
  const Config c = tiny_config();
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string huge(10 << 20, 'k');
  struct Case {
    std::string body;
    const char* field;
  };
  const std::vector<Case> synthetic_cases = {
      {R"({"tokens": 10, "seed": )" + deep + "}", "seed"},
      {R"({"tokens": 10, "needles": [)" + deep + "]}", "needles[0]"},
      {R"({"tokens": )" + deep + "}", "tokens"},
      {R"({"tokens": 10, ")" + huge + R"(": 1})", "unknown field"},
  };
  for (const Case& k : synthetic_cases) {
    Expected<SyntheticRequest> r = parse_synthetic_request(k.body);
    ASSERT_FALSE(r.is_ok()) << k.field;
    EXPECT_NE(r.status().message().find(k.field), std::string::npos) << r.status().message().substr(0, 200);
    EXPECT_LT(r.status().message().size(), 400u) << k.field;
  }
  const std::vector<Case> query_cases = {
      {R"({"layer": 0, "synthetic_q": {"seed": )" + deep + "}}", "synthetic_q.seed"},
      {R"({"layer": )" + deep + "}", "layer"},
      {R"({"layer": 0, "mode": )" + deep + "}", "mode"},
      {R"({"layer": 0, "q": [[)" + deep + "]]}", "q[0]"},
  };
  for (const Case& k : query_cases) {
    Expected<QueryRequest> r = parse_query_request(k.body, "application/json", "", c);
    ASSERT_FALSE(r.is_ok()) << k.field;
    EXPECT_NE(r.status().message().find(k.field), std::string::npos) << r.status().message().substr(0, 200);
    EXPECT_LT(r.status().message().size(), 400u) << k.field;
  }
}

Task make_task(bool query) {
  Task t;
  if (query) {
    t.op = StepPlan{};
  } else {
    t.op = AppendKv{};
  }
  return t;
}

TEST(TaskQueue, BatchesRunsOfQueriesInArrivalOrderAndIsBounded) {
  TaskQueue q(5);
  for (bool query : {true, true, false, true, true}) ASSERT_TRUE(q.push(make_task(query)).is_ok());
  Expected<uint64_t> over = q.push(make_task(true));
  ASSERT_FALSE(over.is_ok());
  EXPECT_EQ(over.status().code(), ErrorCode::kUnavailable);
  std::vector<Task> b = q.pop_batch(8, std::chrono::milliseconds(0));
  ASSERT_EQ(b.size(), 2u);
  EXPECT_LT(b[0].id, b[1].id);
  b = q.pop_batch(8, std::chrono::milliseconds(0));
  ASSERT_EQ(b.size(), 1u);
  EXPECT_TRUE(std::holds_alternative<AppendKv>(b[0].op));
  b = q.pop_batch(1, std::chrono::milliseconds(0));
  EXPECT_EQ(b.size(), 1u);
  q.close();
  EXPECT_FALSE(q.push(make_task(true)).is_ok());
  EXPECT_EQ(q.pop_batch(8, std::chrono::milliseconds(0)).size(), 1u);  // queued work still drains
  EXPECT_TRUE(q.pop_batch(8, std::chrono::milliseconds(0)).empty());
}

// The step loop's poll before it sleeps: a task pushed while it polls is taken; with none, it
// comes back empty once the wait is over; polling finds a close too.
TEST(TaskQueue, PollingPopTakesATaskPushedMeanwhile) {
  TaskQueue q(4);
  std::thread pusher([&q] {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    ASSERT_TRUE(q.push(make_task(true)).is_ok());
  });
  std::vector<Task> b = q.pop_batch(8, std::chrono::milliseconds(5000), std::chrono::microseconds(5000000));
  pusher.join();
  ASSERT_EQ(b.size(), 1u);
  EXPECT_TRUE(q.pop_batch(8, std::chrono::milliseconds(1), std::chrono::microseconds(500)).empty());
  ASSERT_TRUE(q.push(make_task(false)).is_ok());
  EXPECT_EQ(q.pop_batch(8, std::chrono::milliseconds(1), std::chrono::microseconds(500)).size(), 1u);
  std::thread closer([&q] {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    q.close();
  });
  EXPECT_TRUE(q.pop_batch(8, std::chrono::milliseconds(5000), std::chrono::microseconds(5000000)).empty());
  closer.join();
  EXPECT_TRUE(q.closed());
}

TEST(Registry, BalancesOwnersAndLimitsContexts) {
  const Config c = tiny_config();
  Registry r(c, 2);
  Expected<ContextInfo> a = r.plan_create();
  ASSERT_TRUE(a.is_ok());
  r.insert(*a);
  Expected<ContextInfo> b = r.plan_create();
  ASSERT_TRUE(b.is_ok());
  r.insert(*b);
  EXPECT_NE(a->owner_rank, b->owner_rank);
  EXPECT_NE(a->id, b->id);
  r.set_tokens(a->id, 100);
  Expected<ContextInfo> d = r.plan_create();  // both own one; rank of b holds fewer tokens
  ASSERT_TRUE(d.is_ok());
  EXPECT_EQ(d->owner_rank, b->owner_rank);
  r.insert(*d);
  Expected<ContextInfo> e = r.plan_create();
  ASSERT_FALSE(e.is_ok());
  EXPECT_EQ(e.status().code(), ErrorCode::kCapacity);
  EXPECT_EQ(r.check_exists(999).code(), ErrorCode::kNotFound);
  EXPECT_EQ(r.check_query(b->id, 1, QueryMode::kTail).code(), ErrorCode::kInvalidArgument);  // empty context
  EXPECT_TRUE(r.check_query(a->id, 4, QueryMode::kTail).is_ok());
}

// The registry's capacity answer is KvStore's, for every append size around the limit.
TEST(Registry, CapacityCheckAgreesWithKvStore) {
  const Config c = tiny_config();
  const int world = 2;
  Expected<std::unique_ptr<Backend>> backend = make_backend(c, 0);
  ASSERT_TRUE(backend.is_ok());
  for (int rank = 0; rank < world; ++rank) {
    KvStore store(**backend, c, rank, world);
    Registry reg(c, world);
    ASSERT_TRUE(store.create(1, 0).is_ok());
    ASSERT_TRUE(store.create(2, 1).is_ok());
    reg.insert({1, 0, 0});
    reg.insert({2, 1, 0});
    const SyntheticKvSource fill(SyntheticSpec{1, {}}, c.model, 0, 777);
    ASSERT_TRUE(store.append(1, fill).is_ok());
    reg.set_tokens(1, 777);
    for (int64_t n : {1, 100, 600, 1000, 1100, 1222, 1223, 1224, 1300, 2000}) {
      const SyntheticKvSource src(SyntheticSpec{2, {}}, c.model, 0, n);
      KvStore probe(**backend, c, rank, world);
      ASSERT_TRUE(probe.create(1, 0).is_ok());
      ASSERT_TRUE(probe.create(2, 1).is_ok());
      ASSERT_TRUE(probe.append(1, fill).is_ok());
      const Status want = probe.append(2, src);
      const Status got = reg.check_append(2, n);
      EXPECT_EQ(got.code(), want.code()) << "append " << n << " on rank " << rank << ": " << got.to_string()
                                         << " vs " << want.to_string();
    }
  }
}

TEST(Operation, RoundTripsAndRejectsMalformedBytes) {
  const Operation op = AppendSynthetic{42, 1000, 7, {3, 500}};
  const std::string bytes = encode_operation(op);
  Expected<Operation> back = decode_operation(bytes);
  ASSERT_TRUE(back.is_ok());
  const auto* syn = std::get_if<AppendSynthetic>(&*back);
  ASSERT_NE(syn, nullptr);
  EXPECT_EQ(syn->context_id, 42u);
  EXPECT_EQ(syn->tokens, 1000);
  EXPECT_EQ(syn->seed, 7u);
  EXPECT_EQ(syn->needles, (std::vector<int64_t>{3, 500}));
  for (size_t cut : {size_t{0}, size_t{3}, bytes.size() - 1}) {
    EXPECT_FALSE(decode_operation(bytes.substr(0, cut)).is_ok()) << cut;
  }
  EXPECT_FALSE(decode_operation(bytes + "x").is_ok());

  // Every kind survives, and names itself.
  const Operation kinds[] = {CreateContext{5, 1}, EraseContext{5}, AppendKv{5, 9, std::make_shared<std::string>("body")},
                             StepPlan{}, Shutdown{},
                             LayerStep{5, 1, 40, 1, StepTensors{std::make_shared<std::string>("qqqqkkvv"), DType::kF16,
                                                                DType::kBF16, 0, 4, 6}}};
  for (const Operation& k : kinds) {
    Expected<Operation> again = decode_operation(encode_operation(k));
    ASSERT_TRUE(again.is_ok()) << operation_name(k);
    EXPECT_EQ(again->index(), k.index());
    EXPECT_EQ(operation_context(*again), operation_context(k));
  }
  // A bulk load's phase, path and ranges survive; a phase out of range does not decode.
  LoadKv load{7, LoadPhase::kSlice, "/data/kv.safetensors", 5000, 300, 128, 64};
  Expected<Operation> load_back = decode_operation(encode_operation(load));
  ASSERT_TRUE(load_back.is_ok());
  const auto* l = std::get_if<LoadKv>(&*load_back);
  ASSERT_NE(l, nullptr);
  EXPECT_EQ(std::string(operation_name(*load_back)), "load_kv");
  EXPECT_EQ(l->context_id, 7u);
  EXPECT_EQ(l->phase, LoadPhase::kSlice);
  EXPECT_EQ(l->path, "/data/kv.safetensors");
  EXPECT_EQ(l->file_tokens, 5000);
  EXPECT_EQ(l->context_tokens, 300);
  EXPECT_EQ(l->offset, 128);
  EXPECT_EQ(l->count, 64);
  load.phase = static_cast<LoadPhase>(9);
  EXPECT_FALSE(decode_operation(encode_operation(load)).is_ok());
  Expected<Operation> step_op = decode_operation(encode_operation(kinds[5]));
  ASSERT_TRUE(step_op.is_ok());
  const auto* step = std::get_if<LayerStep>(&*step_op);
  ASSERT_NE(step, nullptr);
  EXPECT_EQ(step->layer, 1);
  EXPECT_EQ(step->layer_tokens, 40);
  EXPECT_EQ(step->tensors.q_dtype, DType::kF16);
  EXPECT_EQ(step->tensors.kv_dtype, DType::kBF16);
  EXPECT_EQ(step->tensors.k_offset, 4u);
  EXPECT_EQ(step->tensors.v_offset, 6u);
  ASSERT_NE(step->tensors.body, nullptr);  // empty, for the next broadcast to fill
  EXPECT_TRUE(step->tensors.body->empty());
  // q [1, 2] F16 and k, v [1, 1] BF16 fit the 8 bytes; one value more does not.
  EXPECT_TRUE(std::get<LayerStep>(kinds[5]).tensors.fit(2, 1));
  EXPECT_FALSE(std::get<LayerStep>(kinds[5]).tensors.fit(2, 2));
  EXPECT_FALSE(std::get<LayerStep>(kinds[5]).tensors.fit(5, 1));
  // The bodies do not travel in the operation's bytes.
  EXPECT_EQ(encode_operation(kinds[2]).find("body"), std::string::npos);
  EXPECT_EQ(encode_operation(kinds[5]).find("qqqq"), std::string::npos);
}

// Enum fields out of range are refused, not cast.
TEST(Operation, StepPlanEnumsAreRangeChecked) {
  StepPlan plan;
  plan.queries.push_back(QueryPlan{1, 10, 1, 0, 0, QueryMode::kDetached, 0});
  plan.q = {1.0f};
  const std::string bytes = encode_operation(plan);
  ASSERT_TRUE(decode_operation(bytes).is_ok());
  const int32_t bogus = 7;
  // [magic][kind][strategy]...: the strategy is the third int32.
  std::string bad_strategy = bytes;
  std::memcpy(&bad_strategy[8], &bogus, 4);
  EXPECT_FALSE(decode_operation(bad_strategy).is_ok());
  // The query's mode sits after context_id, tokens, qlen, q_offset (int64) and layer (int32).
  std::string bad_mode = bytes;
  std::memcpy(&bad_mode[8 + 4 + 4 + 8 + 4 * 8 + 4], &bogus, 4);
  EXPECT_FALSE(decode_operation(bad_mode).is_ok());
}

TEST(Metrics, RendersPrometheusText) {
  Metrics m;
  m.count_request("POST", "/v1/contexts/{id}/query", 200, 0.002);
  m.count_request("POST", "/v1/contexts/{id}/query", 400, 0.0001);
  m.observe_phase("score", 0.003);
  m.observe_batch(4);
  MetricsSnapshot g;
  g.tokens_per_rank = {10, 20};
  g.queue_depth = 2;
  const std::string text = m.render(g);
  EXPECT_NE(text.find("reattn_http_requests_total{method=\"POST\",route=\"/v1/contexts/{id}/query\",status=\"200\"} 1"),
            std::string::npos);
  EXPECT_NE(text.find("reattn_step_phase_seconds_bucket{phase=\"score\",le=\"0.0025\"} 0"), std::string::npos);
  EXPECT_NE(text.find("reattn_step_phase_seconds_bucket{phase=\"score\",le=\"0.005\"} 1"), std::string::npos);
  EXPECT_NE(text.find("reattn_step_phase_seconds_count{phase=\"score\"} 1"), std::string::npos);
  EXPECT_NE(text.find("reattn_kv_tokens{rank=\"1\"} 20"), std::string::npos);
  EXPECT_NE(text.find("reattn_queue_depth 2"), std::string::npos);
  EXPECT_NE(text.find("# TYPE reattn_step_batch_queries histogram"), std::string::npos);
}

// Handlers without a socket: the response of each request, taken from the responder.
class HandlersTest : public ::testing::Test {
 protected:
  HandlersTest()
      : config_(tiny_config()),
        registry_(config_, 2),
        queue_(4),
        handlers_(config_, ServiceInfo{2, "cpu", "mpi"}, "k3y", registry_, queue_, metrics_, state_) {
    spdlog::set_level(spdlog::level::err);  // the request log lines are not under test here
  }

  HttpResponse call(const std::string& method, const std::string& path, const std::string& body = "",
                    const std::string& auth = "Bearer k3y") {
    HttpRequest r;
    r.method = method;
    r.path = path;
    r.body = body;
    r.content_type = body.empty() ? "" : "application/json";
    r.authorization = auth;
    r.request_id = "t-1";
    r.received = std::chrono::steady_clock::now();
    std::optional<HttpResponse> out;
    handlers_.handle(r, [&out](HttpResponse resp) { out = std::move(resp); });
    EXPECT_TRUE(out.has_value()) << method << " " << path << " did not answer at once";
    return out ? *out : HttpResponse{};
  }

  static std::string code_of(const HttpResponse& r) { return json::parse(r.body)["error"]["code"]; }

  Config config_;
  Metrics metrics_;
  ServiceState state_;
  Registry registry_;
  TaskQueue queue_;
  Handlers handlers_;
};

TEST_F(HandlersTest, ReadinessFollowsTheServiceState) {
  EXPECT_EQ(call("GET", "/health/live").status, 200);
  HttpResponse r = call("GET", "/health/ready");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(code_of(r), "unavailable");
  EXPECT_EQ(call("GET", "/v1/info").status, 503);
  state_.set_ready();
  EXPECT_EQ(call("GET", "/health/ready").status, 200);
  const HttpResponse info = call("GET", "/v1/info");
  EXPECT_EQ(info.status, 200);
  EXPECT_EQ(json::parse(info.body)["reattention"]["recall"], "chunk");
  EXPECT_EQ(json::parse(info.body)["model"]["rope_scaling"]["type"], "none");
  state_.set_draining();
  EXPECT_EQ(call("GET", "/health/ready").status, 503);
  state_.set_ready();  // draining is final
  EXPECT_EQ(call("GET", "/health/ready").status, 503);
}

TEST_F(HandlersTest, ErrorsHaveTheRightStatusAndEchoTheRequestId) {
  state_.set_ready();
  HttpResponse r = call("GET", "/v1/contexts", "", "");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(code_of(r), "unauthorized");
  EXPECT_EQ(call("GET", "/v1/contexts", "", "Bearer nope").status, 401);
  EXPECT_EQ(call("GET", "/metrics", "", "").status, 200);
  EXPECT_EQ(call("GET", "/nowhere").status, 404);
  r = call("DELETE", "/v1/contexts");
  EXPECT_EQ(r.status, 405);
  EXPECT_EQ(code_of(r), "method_not_allowed");
  EXPECT_EQ(call("POST", "/v1/contexts/5/query", R"({"layer": 0, "q": [[[1]]]})").status, 404);
  r = call("GET", "/v1/contexts/5");
  EXPECT_EQ(r.status, 404);
  bool echoed = false;
  for (const auto& [k, v] : r.headers) echoed = echoed || (k == "X-Request-Id" && v == "t-1");
  EXPECT_TRUE(echoed);
}

TEST_F(HandlersTest, WorkGoesToTheQueueAndFullQueueIs503) {
  state_.set_ready();
  registry_.insert({1, 0, 40});
  const std::string body = json{{"layer", 0}, {"q", q_json(1, 4, 16)}}.dump();
  EXPECT_EQ(call("POST", "/v1/contexts/1/query", json{{"layer", 5}, {"q", q_json(1, 4, 16)}}.dump()).status, 400);
  EXPECT_EQ(queue_.depth(), 0u);  // a bad request changes nothing
  std::vector<std::optional<HttpResponse>> answers(5);
  for (int i = 0; i < 5; ++i) {
    HttpRequest r;
    r.method = "POST";
    r.path = "/v1/contexts/1/query";
    r.body = body;
    r.content_type = "application/json";
    r.authorization = "Bearer k3y";
    handlers_.handle(r, [&answers, i](HttpResponse resp) { answers[i] = std::move(resp); });
  }
  EXPECT_EQ(queue_.depth(), 4u);
  ASSERT_TRUE(answers[4].has_value());
  EXPECT_EQ(answers[4]->status, 503);
  bool retry_after = false;
  for (const auto& [k, v] : answers[4]->headers) retry_after = retry_after || k == "Retry-After";
  EXPECT_TRUE(retry_after);
  std::vector<Task> batch = queue_.pop_batch(8, std::chrono::milliseconds(0));
  ASSERT_EQ(batch.size(), 4u);
  TaskResult result;
  result.context = {1, 0, 40};
  result.query.recalled = {0, 2};
  result.query.recalled_spans = {{7, 12}};  // span recall's ranges, [first, end)
  result.query.out.assign(4 * 16, 0.5f);
  batch[0].done(result);
  ASSERT_TRUE(answers[0].has_value());
  EXPECT_EQ(answers[0]->status, 200);
  const json doc = json::parse(answers[0]->body);
  EXPECT_EQ(doc["recalled_chunks"][1]["chunk"], 2);
  EXPECT_EQ(doc["recalled_chunks"][1]["first_token"], 4 + 2 * 8);
  EXPECT_EQ(doc["recalled_chunks"][1]["last_token"], 4 + 3 * 8 - 1);
  EXPECT_EQ(doc["recalled_spans"], json::parse(R"([{"first_token":7,"last_token":11}])")) << answers[0]->body;
  EXPECT_EQ(doc["out"].size(), 1u);
  EXPECT_EQ(doc["out"][0].size(), 4u);
  EXPECT_EQ(doc["out"][0][0].size(), 16u);
  TaskResult failed;
  failed.status = Status(ErrorCode::kCapacity, "full");
  batch[1].done(failed);
  EXPECT_EQ(answers[1]->status, 507);
}

}  // namespace

}  // namespace reattn

namespace reattn {
namespace {

// Paths clients name resolve only to regular files under the root.
TEST(FileRoots, ResolvesUnderTheRootAndRefusesEscapes) {
  char tmpl[] = "/tmp/reattn-roots-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string base = tmpl;
  const std::string root = base + "/root";
  ASSERT_EQ(mkdir(root.c_str(), 0755), 0);
  ASSERT_EQ(mkdir((root + "/sub").c_str(), 0755), 0);
  ASSERT_TRUE(write_file(root + "/sub/a.bin", "x").is_ok());
  ASSERT_TRUE(write_file(base + "/secret", "x").is_ok());
  ASSERT_EQ(symlink((base + "/secret").c_str(), (root + "/out").c_str()), 0);
  ASSERT_EQ(symlink("sub/a.bin", (root + "/in").c_str()), 0);
  const std::string key = "server.load_root";

  Expected<std::string> ok = resolve_under_root(root, "sub/a.bin", key);
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_EQ(*ok, root + "/sub/a.bin");
  EXPECT_EQ(*resolve_under_root(root, "in", key), root + "/sub/a.bin");          // a link inside is fine
  EXPECT_EQ(*resolve_under_root(root, root + "/sub/a.bin", key), root + "/sub/a.bin");  // absolute, inside
  EXPECT_EQ(*resolve_under_root(root + "/", "./sub//a.bin", key), root + "/sub/a.bin");

  const struct {
    std::string root, path;
    ErrorCode code;
    const char* words;
  } bad[] = {
      {"", "sub/a.bin", ErrorCode::kForbidden, "disabled"},
      {root, "../secret", ErrorCode::kForbidden, "'..'"},
      {root, "sub/../sub/a.bin", ErrorCode::kForbidden, "'..'"},
      {root, "out", ErrorCode::kForbidden, "outside"},
      {root, base + "/secret", ErrorCode::kForbidden, "outside"},
      {root, "missing", ErrorCode::kInvalidArgument, "no such file"},
      {root, "sub/a.bin/x", ErrorCode::kInvalidArgument, "no such file"},
      {root, "sub", ErrorCode::kInvalidArgument, "not a regular file"},
      {root, "", ErrorCode::kInvalidArgument, "empty"},
      {root, std::string("a\0b", 3), ErrorCode::kInvalidArgument, "NUL"},
      {base + "/nope", "a", ErrorCode::kInvalidArgument, "cannot be resolved"},
  };
  for (const auto& b : bad) {
    const Expected<std::string> r = resolve_under_root(b.root, b.path, key);
    ASSERT_FALSE(r.is_ok()) << b.path;
    EXPECT_EQ(r.status().code(), b.code) << b.path << ": " << r.status().to_string();
    EXPECT_NE(r.status().message().find(b.words), std::string::npos) << r.status().message();
  }
  // A path of any length is echoed capped.
  const Expected<std::string> long_path = resolve_under_root(root, std::string(5000, 'a'), key);
  ASSERT_FALSE(long_path.is_ok());
  EXPECT_LT(long_path.status().message().size(), 400u);
  std::filesystem::remove_all(base);
}

}  // namespace
}  // namespace reattn

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <future>

#include "coordinator/http_server.h"

namespace reattn {
namespace {

// The server's owner lets go of it (and of the I/O context) while a large request is still
// in its handler on a parse thread. That thread then held the last reference to the server's
// state, whose destructor joined the thread it ran on: std::system_error ("Resource deadlock
// avoided") and the job aborted at shutdown (seen in http_e2e's drain, exit 134).
TEST(HttpServer, ReleasedWhileAHandlerRunsOnTheParsePool) {
  auto ioc = std::make_unique<boost::asio::io_context>();
  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
  HttpServerOptions options;
  options.parse_threads = 1;
  auto server = std::make_unique<HttpServer>(
      *ioc, options,
      [&entered, released](HttpRequest, Responder) {
        entered.set_value();
        released.wait();  // the responder is dropped unanswered: the client is gone by then
      },
      [](const HttpRequest&, int status, const std::string&, const std::string&) { return HttpResponse{status}; });
  Expected<int> port = server->listen("127.0.0.1", 0);
  ASSERT_TRUE(port.is_ok()) << port.status().to_string();
  std::thread io([&] { ioc->run(); });
  boost::asio::io_context client_ioc;
  boost::asio::ip::tcp::socket client(client_ioc);
  client.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(*port)});
  const std::string body(64 * 1024, 'x');  // over the inline limit: handled on the parse pool
  const std::string request = "POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: " + std::to_string(body.size()) +
                              "\r\n\r\n" + body;
  boost::asio::write(client, boost::asio::buffer(request));
  entered.get_future().wait();
  ioc->stop();
  io.join();
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    release.set_value();
  });
  server.reset();
  client.close();
  ioc.reset();
  releaser.join();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the parse thread, had it lived on, ends here
}

}  // namespace
}  // namespace reattn
