// Found while fuzzing the API (issue 13; a probe with extreme finite values after the schemathesis
// runs came out clean, now also drawn by tests/fuzz): finite q/k/v values near fp32's largest made
// q.k overflow, so a query answered NaN (JSON null in "out") and a layer step with such a k
// poisoned every later answer of its context. Values are now held to Config::max_stored_value
// (2^e with 4 * head_dim * B^2 <= 2^127) and refused with a 400 naming the element and the limit;
// at the limit itself the pipeline stays finite.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/safetensors.h"
#include "common/tensor_checks.h"
#include "coordinator/requests.h"
#include "kernels/cpu/cpu_backend.h"
#include "tests/harness.h"
#include "tests/http/tiny_service_config.h"

namespace reattn {
namespace {

using nlohmann::json;

json nested(int64_t a, int64_t b, int64_t c, double value) {
  return json(std::vector<std::vector<std::vector<double>>>(a, std::vector<std::vector<double>>(b, std::vector<double>(c, value))));
}

std::string f32_bytes(int64_t n, float value) {
  std::string out(static_cast<size_t>(n) * 4, '\0');
  for (int64_t i = 0; i < n; ++i) std::memcpy(&out[static_cast<size_t>(i) * 4], &value, 4);
  return out;
}

TEST(ValueLimits, TheLimitFollowsHeadDimAndStorage) {
  Config c = test::tiny_service_config(4);  // head_dim 16
  EXPECT_EQ(c.max_stored_value(), std::ldexp(1.0f, 60));
  c.model.head_dim = 128;
  EXPECT_EQ(c.max_stored_value(), std::ldexp(1.0f, 59));
  for (int d : {1, 16, 64, 128, 256, 512}) {
    c.model.head_dim = d;
    const double b = c.max_stored_value();
    EXPECT_LE(4.0 * d * b * b, std::ldexp(1.0, 127)) << "head_dim " << d;  // |q.k| <= D B^2, with room
    EXPECT_GT(16.0 * d * b * b, std::ldexp(1.0, 127)) << "head_dim " << d;  // and not needlessly small
  }
  c.backend.kind = BackendKind::kCuda;
  c.backend.storage_dtype = DType::kF16;
  EXPECT_EQ(c.max_stored_value(), 65504.0f);
  EXPECT_EQ(stored_value_limit(65504.0f), "the f16 storage limit 65504");
}

TEST(ValueLimits, HugeJsonQueryIsRefusedNamingTheElementAndLimit) {
  const Config config = test::tiny_service_config(4);
  const std::string body = json{{"layer", 0}, {"q", nested(1, 4, 16, 3e38)}}.dump();
  const Expected<QueryRequest> q = parse_query_request(body, "application/json", "", config);
  ASSERT_FALSE(q.is_ok());
  EXPECT_EQ(q.status().code(), ErrorCode::kInvalidArgument);
  const std::string& message = q.status().message();
  EXPECT_NE(message.find("q[0][0][0]"), std::string::npos) << message;
  EXPECT_NE(message.find("2^60 = 1152921504606846976"), std::string::npos) << message;
  // At the limit: accepted.
  const std::string at_limit = json{{"layer", 0}, {"q", nested(1, 4, 16, -std::ldexp(1.0, 60))}}.dump();
  EXPECT_TRUE(parse_query_request(at_limit, "application/json", "", config).is_ok());
}

TEST(ValueLimits, HugeKInALayerStepIsRefused) {
  const Config config = test::tiny_service_config(4);
  const std::string body =
      json{{"layer", 0}, {"q", nested(1, 4, 16, 1.0)}, {"k", nested(2, 1, 16, 1e30)}, {"v", nested(2, 1, 16, 1.0)}}.dump();
  const Expected<StepRequest> step = parse_step_request(std::make_shared<std::string>(body), "application/json", "", config);
  ASSERT_FALSE(step.is_ok());
  EXPECT_NE(step.status().message().find("k[0][0][0]"), std::string::npos) << step.status().message();
  EXPECT_NE(step.status().message().find("finite in fp32"), std::string::npos) << step.status().message();
}

TEST(ValueLimits, HugeValuesInASafetensorsKvBodyAreRefused) {
  const Config config = test::tiny_service_config(4);  // [layers 2, kv_heads 2, tokens, head_dim 16]
  const int64_t tokens = 3, n = 2 * 2 * tokens * 16;
  std::vector<TensorToWrite> tensors;
  tensors.push_back({"k", DType::kF32, {2, 2, tokens, 16}, f32_bytes(n, 1.0f)});
  tensors.push_back({"v", DType::kF32, {2, 2, tokens, 16}, f32_bytes(n, 1e30f)});
  const Expected<int64_t> got =
      check_kv_body(std::make_shared<const std::string>(serialize_safetensors(tensors)), config);
  ASSERT_FALSE(got.is_ok());
  EXPECT_NE(got.status().message().find("tensor 'v'"), std::string::npos) << got.status().message();
  EXPECT_NE(got.status().message().find("2^60"), std::string::npos) << got.status().message();
}

// Every key and q value at +B and every v at -B: the largest scores the limit allows. The
// answer must be finite and, as every v is -B, exactly -B.
TEST(ValueLimits, AtTheLimitThePipelineStaysFinite) {
  Config config = test::tiny_service_config(4);
  config.backend.threads = 2;
  const float b = config.max_stored_value();
  for (const FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    for (const QueryMode mode : {QueryMode::kTail, QueryMode::kDetached}) {
      ref::Context ctx = ref::synthetic_context(config.model, config.reattention, 200, 3, {}, 1);
      for (double& x : ctx.k) x = b;
      for (double& x : ctx.v) x = -b;
      const int64_t qlen = 2;
      const std::vector<float> q(static_cast<size_t>(qlen) * config.model.q_heads * config.model.head_dim, b);
      CpuBackend backend(2);
      test::LoopbackCommunicator comm(backend);
      test::PipelineCase c;
      c.layer = 1;
      c.mode = mode;
      c.strategy = strategy;
      const test::PipelineResult got = test::run_pipeline(backend, comm, config, ctx, q, qlen, c);
      ASSERT_TRUE(got.status.is_ok()) << got.status.to_string();
      ASSERT_EQ(got.out.size(), q.size());
      for (float x : got.out) {
        ASSERT_TRUE(std::isfinite(x));
        EXPECT_NEAR(x / -b, 1.0, 1e-5);
      }
    }
  }
}

}  // namespace
}  // namespace reattn
