// Plain HTTP request and response values passed between the socket code (http_server) and
// the pure handlers (handlers, router). Nothing here touches a socket.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace reattn {

struct HttpRequest {
  std::string method;          // "GET", "POST", ...
  std::string path;            // the target without its query string
  std::string query_string;    // after '?', may be empty
  std::string request_id;      // X-Request-Id from the client, or one made up on arrival
  std::string authorization;   // the Authorization header, verbatim
  std::string content_type;
  std::string accept;          // the Accept header, verbatim
  std::string body;
  std::string peer;            // "address:port"
  std::chrono::steady_clock::time_point received;
  // Set (from an I/O thread) when the client closes its connection before the answer.
  std::shared_ptr<std::atomic<bool>> client_gone;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers (Retry-After, Allow, timing)
  // Set by the handler for metrics and logs: the route template ("/v1/contexts/{id}/query").
  std::string route;
};

// Completes a request; called exactly once, from any thread.
using Responder = std::function<void(HttpResponse)>;

HttpResponse json_response(int status, const nlohmann::json& body);
// {"error": {"code": "<code>", "message": "<message>"}}
HttpResponse error_response(int status, const std::string& code, const std::string& message);
// The HTTP status and error code of a Status: invalid_argument 400, not_found 404, capacity
// 507, out_of_order 409, unavailable 503 (with Retry-After), internal and fatal 500.
HttpResponse status_response(const Status& status);
int http_status_of(ErrorCode code);

}  // namespace reattn
