// A memory bound on JSON bodies, checked before any DOM is built: one streaming (SAX) pass in
// constant memory counts the body's values and its nesting depth and refuses a body that holds
// more than its route can need (a query: at most local_window rows of q_heads x head_dim
// numbers; a layer step also k and v), or that is not JSON at all. A DOM costs tens of bytes per value, so without this a
// 60 MB body of small numbers would take gigabytes.
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>

#include "common/config.h"
#include "common/status.h"
#include "coordinator/http_types.h"
#include "coordinator/router.h"

namespace reattn {

struct JsonBudget {
  uint64_t max_values = 0;  // scalars, keys and containers together; 0: the route takes no JSON
  int max_depth = 8;
};

// The budget of a route's JSON body for this model.
JsonBudget json_budget(Route route, const Config& config);

// invalid_argument naming the first limit crossed (or the syntax error); ok within budget.
Status check_json_budget(const std::string& body, const JsonBudget& budget);

// The route's budget applied to a request whose body is JSON (by its Content-Type; an empty
// body or a binary one passes).
Status check_json_body(Route route, const HttpRequest& request, const Config& config);

}  // namespace reattn
