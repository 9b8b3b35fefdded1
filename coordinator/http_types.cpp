#include "coordinator/http_types.h"

namespace reattn {

HttpResponse json_response(int status, const nlohmann::json& body) {
  HttpResponse r;
  r.status = status;
  // Replace invalid UTF-8 rather than throw: messages may quote user input.
  r.body = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return r;
}

HttpResponse error_response(int status, const std::string& code, const std::string& message) {
  HttpResponse r = json_response(status, {{"error", {{"code", code}, {"message", message}}}});
  if (status == 503) r.headers.emplace_back("Retry-After", "1");
  return r;
}

int http_status_of(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk: return 200;
    case ErrorCode::kInvalidArgument: return 400;
    case ErrorCode::kNotFound: return 404;
    case ErrorCode::kCapacity: return 507;
    case ErrorCode::kOutOfOrder: return 409;
    case ErrorCode::kUnavailable: return 503;
    case ErrorCode::kConflict: return 409;
    case ErrorCode::kForbidden: return 403;
    case ErrorCode::kInternal: return 500;
    case ErrorCode::kFatal: return 500;
  }
  return 500;
}

HttpResponse status_response(const Status& status) {
  return error_response(http_status_of(status.code()), error_code_name(status.code()), status.message());
}

}  // namespace reattn
