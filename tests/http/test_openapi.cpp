// api/openapi.json against the router: every route the router knows is described with its
// method, every described path and method is a route, the binary serves the file as it is on
// disk, without an API key, and the document's own references and conventions hold (API
// routes carry the bearer scheme and 401, {id} routes 404, request content types are exactly
// the ones the router lets through).
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "coordinator/handlers.h"
#include "coordinator/openapi.h"
#include "coordinator/router.h"
#include "tests/http/tiny_service_config.h"

namespace reattn {
namespace {

using nlohmann::json;

const char* const kHttpMethods[] = {"get", "put", "post", "delete", "options", "head", "patch", "trace"};

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return s;
}

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
  return s;
}

json spec() {
  json doc = json::parse(openapi_document(), nullptr, false);
  EXPECT_FALSE(doc.is_discarded()) << "the embedded api/openapi.json is not valid JSON";
  return doc;
}

// A concrete path of a template: {id} -> 1.
std::string concrete(std::string pattern) {
  const size_t at = pattern.find("{id}");
  if (at != std::string::npos) pattern.replace(at, 4, "1");
  return pattern;
}

// The JSON pointer "#/components/schemas/X" resolved in `doc`, or null when it does not resolve.
const json* resolve(const json& doc, const std::string& ref) {
  if (ref.rfind("#/", 0) != 0) return nullptr;
  const json::json_pointer pointer(ref.substr(1));
  return doc.contains(pointer) ? &doc.at(pointer) : nullptr;
}

TEST(OpenApi, EmbeddedDocumentIsTheFileOnDisk) {
  std::ifstream in(std::string(REATTN_SOURCE_DIR) + "/api/openapi.json", std::ios::binary);
  ASSERT_TRUE(in) << "cannot read api/openapi.json";
  std::stringstream file;
  file << in.rdbuf();
  EXPECT_EQ(std::string(openapi_document()), file.str()) << "rebuild: the binary embeds an older api/openapi.json";
  const json doc = spec();
  EXPECT_EQ(doc["openapi"].get<std::string>().rfind("3.1.", 0), 0u) << doc["openapi"];
}

TEST(OpenApi, EveryRouteIsDescribed) {
  const json doc = spec();
  for (const RouteEntry& e : route_table()) {
    ASSERT_TRUE(doc["paths"].contains(e.pattern)) << e.method << " " << e.pattern << " is not in api/openapi.json";
    EXPECT_TRUE(doc["paths"][e.pattern].contains(lower(e.method)))
        << e.method << " " << e.pattern << ": the path is described, the method is not";
  }
}

TEST(OpenApi, EveryDescribedOperationIsARoute) {
  const json doc = spec();
  int operations = 0;
  for (const auto& [path, item] : doc["paths"].items()) {
    for (const char* method : kHttpMethods) {
      if (!item.contains(method)) continue;
      ++operations;
      const std::string m = upper(method);
      const bool in_table = std::any_of(route_table().begin(), route_table().end(), [&](const RouteEntry& e) {
        return e.method == m && e.pattern == path;
      });
      EXPECT_TRUE(in_table) << m << " " << path << " is described but the router has no such route";
      const RouteMatch match = match_route(m, concrete(path));
      EXPECT_EQ(match.error_status, 0) << m << " " << concrete(path);
      EXPECT_EQ(match.pattern, path);
    }
  }
  EXPECT_EQ(operations, static_cast<int>(route_table().size()));
}

TEST(OpenApi, SecurityAndErrorStatusesFollowTheRouteKind) {
  const json doc = spec();
  ASSERT_TRUE(doc.contains(json::json_pointer("/components/securitySchemes/bearerAuth")));
  const json& scheme = doc["components"]["securitySchemes"]["bearerAuth"];
  EXPECT_EQ(scheme["type"], "http");
  EXPECT_EQ(scheme["scheme"], "bearer");
  for (const RouteEntry& e : route_table()) {
    const json& op = doc["paths"][e.pattern][lower(e.method)];
    const json& security = op.contains("security") ? op["security"] : doc["security"];
    const bool bearer = std::any_of(security.begin(), security.end(), [](const json& s) { return s.contains("bearerAuth"); });
    const json& responses = op["responses"];
    const std::string what = std::string(e.method) + " " + e.pattern;
    if (is_api_route(e.route)) {
      EXPECT_TRUE(bearer) << what << ": an API route without the bearer scheme";
      EXPECT_TRUE(responses.contains("401")) << what;
    } else {
      EXPECT_FALSE(bearer) << what << ": an operational route never needs the key";
      EXPECT_FALSE(responses.contains("401")) << what;
    }
    // Refused by the listener before any handler, on every route.
    for (const char* status : {"400", "413", "415", "431", "501", "503"}) {
      EXPECT_TRUE(responses.contains(status)) << what << " lacks " << status;
    }
    if (std::string(e.pattern).find("{id}") != std::string::npos) {
      EXPECT_TRUE(responses.contains("404")) << what << ": an unknown context is 404";
    }
    bool success = false;
    for (const auto& [status, response] : responses.items()) success = success || status[0] == '2';
    EXPECT_TRUE(success) << what << " describes no success answer";
  }
}

TEST(OpenApi, RequestContentTypesAreTheOnesTheRouterTakes) {
  const json doc = spec();
  for (const RouteEntry& e : route_table()) {
    const json& op = doc["paths"][e.pattern][lower(e.method)];
    if (!op.contains("requestBody")) {
      // No body described: the router must not require a type either.
      EXPECT_EQ(content_type_problem(e.route, "", 0), "") << e.method << " " << e.pattern;
      continue;
    }
    const json& content = op["requestBody"]["content"];
    for (const char* type : {"application/json", "application/octet-stream", "text/plain",
                             "application/x-www-form-urlencoded", "multipart/form-data"}) {
      const bool described = content.contains(type);
      const bool taken = content_type_problem(e.route, type, 1).empty();
      EXPECT_EQ(described, taken) << e.method << " " << e.pattern << " with " << type << ": described " << described
                                  << ", taken by the router " << taken;
    }
  }
}

TEST(OpenApi, EveryReferenceResolves) {
  const json doc = spec();
  std::vector<const json*> stack = {&doc};  // an explicit stack: no recursion over the document
  int refs = 0;
  while (!stack.empty()) {
    const json* node = stack.back();
    stack.pop_back();
    if (node->is_object()) {
      if (node->contains("$ref") && (*node)["$ref"].is_string()) {
        ++refs;
        EXPECT_NE(resolve(doc, (*node)["$ref"]), nullptr) << "unresolved $ref " << (*node)["$ref"];
      }
      for (const auto& item : node->items()) stack.push_back(&item.value());
    } else if (node->is_array()) {
      for (const json& v : *node) stack.push_back(&v);
    }
  }
  EXPECT_GT(refs, 0);
}

TEST(OpenApi, ServedWithoutAnApiKey) {
  spdlog::set_level(spdlog::level::err);
  const Config config = test::tiny_service_config(4);
  Metrics metrics;
  ServiceState state;  // not ready: the document is served all the same, like /metrics
  Registry registry(config, 2);
  TaskQueue queue(4);
  Handlers handlers(config, ServiceInfo{2, "cpu", "mpi"}, "k3y", registry, queue, metrics, state);
  HttpRequest request;
  request.method = "GET";
  request.path = "/openapi.json";
  std::optional<HttpResponse> out;
  handlers.handle(request, [&out](HttpResponse r) { out = std::move(r); });
  ASSERT_TRUE(out.has_value());
  EXPECT_EQ(out->status, 200);
  EXPECT_EQ(out->content_type, "application/json");
  EXPECT_EQ(out->body, std::string(openapi_document()));
  request.method = "POST";
  out.reset();
  handlers.handle(request, [&out](HttpResponse r) { out = std::move(r); });
  ASSERT_TRUE(out.has_value());
  EXPECT_EQ(out->status, 405);
}

}  // namespace
}  // namespace reattn
