// One error type across every layer: a code and a message that names what was wrong.
// Functions that can fail return [[nodiscard]] Status or Expected<T>; nothing below main()
// exits the process or throws across a layer boundary.
#pragma once

#include <optional>
#include <string>
#include <utility>

namespace reattn {

enum class ErrorCode {
  kOk = 0,
  kInvalidArgument,   // bad input from a user: file, tensor, config value, request field
  kNotFound,          // unknown context, tensor or layer
  kCapacity,          // KV capacity exhausted
  kOutOfOrder,        // a layer step that does not follow the context's layer lengths
  kUnavailable,       // not ready, queue full, shutting down
  kInternal,          // a bug or an unexpected library failure
  kFatal,             // a device, communicator or protocol fault: ends the job
  kConflict,          // the target is busy with a long-running operation, or that operation has finished
  kForbidden,         // a path outside the configured roots, or a feature the server has disabled
};

const char* error_code_name(ErrorCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return {}; }
  bool is_ok() const { return code_ == ErrorCode::kOk; }
  explicit operator bool() const { return is_ok(); }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "invalid_argument: <message>"
  std::string to_string() const;

 private:
  ErrorCode code_ = ErrorCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string message) {
  return {ErrorCode::kInvalidArgument, std::move(message)};
}
inline Status not_found(std::string message) { return {ErrorCode::kNotFound, std::move(message)}; }
inline Status internal_error(std::string message) {
  return {ErrorCode::kInternal, std::move(message)};
}

// A value or the Status that explains why there is none.
template <typename T>
class [[nodiscard]] Expected {
 public:
  Expected(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Expected(Status status) : status_(std::move(status)) {}  // NOLINT: implicit by design

  bool is_ok() const { return value_.has_value(); }
  explicit operator bool() const { return is_ok(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() { return *value_; }
  const T& operator*() const { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace reattn

// Propagate a failed Status to the caller.
#define REATTN_RETURN_IF_ERROR(expr)        \
  do {                                      \
    ::reattn::Status reattn_status_ = (expr); \
    if (!reattn_status_.is_ok()) return reattn_status_; \
  } while (0)

#define REATTN_CONCAT_INNER(a, b) a##b
#define REATTN_CONCAT(a, b) REATTN_CONCAT_INNER(a, b)
#define REATTN_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.is_ok()) return tmp.status();              \
  lhs = std::move(tmp).value()
// Assign the value of an Expected<T> or return its Status.
#define REATTN_ASSIGN_OR_RETURN(lhs, expr) \
  REATTN_ASSIGN_OR_RETURN_IMPL(REATTN_CONCAT(reattn_expected_, __LINE__), lhs, expr)
