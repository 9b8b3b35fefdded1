// The route table of the HTTP API (DESIGN.md section 5): maps a method and a path to a route
// and its path parameter, or says why none matches (404 unknown route, 405 wrong method, with
// the methods the path allows). Pure and thread-safe.
#pragma once

#include <string>
#include <vector>

#include "common/protocol.h"

namespace reattn {

enum class Route {
  kNone,
  kHealthLive,        // GET /health/live
  kHealthReady,       // GET /health/ready
  kMetrics,           // GET /metrics
  kOpenApi,           // GET /openapi.json
  kInfo,              // GET /v1/info
  kCreateContext,     // POST /v1/contexts
  kListContexts,      // GET /v1/contexts
  kGetContext,        // GET /v1/contexts/{id}
  kDeleteContext,     // DELETE /v1/contexts/{id}
  kAppendKv,          // POST /v1/contexts/{id}/kv
  kSynthetic,         // POST /v1/contexts/{id}/synthetic
  kQuery,             // POST /v1/contexts/{id}/query
  kLayerStep,         // POST /v1/contexts/{id}/step
  kLoad,              // POST /v1/contexts/{id}/load
  kListOperations,    // GET /v1/operations
  kGetOperation,      // GET /v1/operations/{op}
  kCancelOperation,   // DELETE /v1/operations/{op}
  kSnapshotContext,   // POST /v1/contexts/{id}/snapshot
  kListSnapshots,     // GET /v1/snapshots
  kDeleteSnapshot,    // DELETE /v1/snapshots/{name}
};

struct RouteMatch {
  Route route = Route::kNone;
  std::string pattern;        // the route template, for metrics and logs ("unmatched" when none)
  int error_status = 0;       // 0 matched; 404 no such path; 405 path known, method not
  std::string allow;          // 405: the allowed methods, "GET, DELETE"
  std::string id_text;        // the {id} (or {op}, {name}) segment as given, capped for echoing
  bool id_valid = false;      // {id} is a context id in canonical form (decimal, no sign or leading 0)
  ContextId id = 0;
};

RouteMatch match_route(const std::string& method, const std::string& path);

// One row of the route table: what match_route knows. api/openapi.json must describe exactly
// these (tests/test_openapi.cpp checks it both ways).
struct RouteEntry {
  const char* method;   // "GET", "POST", "DELETE"
  const char* pattern;  // "/v1/contexts/{id}/query"
  Route route;
};
const std::vector<RouteEntry>& route_table();

// Routes under /v1 (API key, readiness) versus operational ones (health, metrics, openapi).
bool is_api_route(Route route);

// Why a body's Content-Type does not fit its route ("" when it does): JSON routes take
// application/json (create may have no body at all), the K/V append takes
// application/octet-stream (safetensors), a query and a layer step either. Parameters (";charset=utf-8") are
// ignored. Any other type, or none with a body, is refused (415): browsers send text/plain,
// form and multipart bodies cross-origin without a CORS preflight.
std::string content_type_problem(Route route, const std::string& content_type, size_t body_bytes);

}  // namespace reattn
