// Bounded, non-recursive text for echoing client data in error messages and logs. A client
// value is never serialized recursively (a value nested 70,000 levels deep would overflow the
// stack) and never echoed uncapped: scalars are printed, containers are described by their
// size, and every string is cut at kExcerptBytes with "…". Thread-safe (pure functions).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace reattn {

constexpr size_t kExcerptBytes = 128;

// `text` cut to at most `max_bytes` bytes (never inside a UTF-8 sequence), "…" appended when cut.
std::string capped(std::string_view text, size_t max_bytes = kExcerptBytes);

// A short description of a JSON value: numbers, booleans and null as JSON, strings quoted and
// capped, a short array of numbers in full ("[2, 16]", one level only), other arrays and
// objects as "an array of N entries" / "an object of N fields". Works for nlohmann::json and
// nlohmann::ordered_json without recursing into containers.
template <class Json>
std::string json_excerpt(const Json& v) {
  if (v.is_array()) {
    bool numbers = v.size() <= 16;
    for (size_t i = 0; numbers && i < v.size(); ++i) numbers = v[i].is_number();
    if (!numbers) return "an array of " + std::to_string(v.size()) + " entries";
    std::string text = "[";
    for (size_t i = 0; i < v.size(); ++i) text += (i ? "," : "") + v[i].dump();
    return capped(text + "]");
  }
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " fields";
  if (v.is_string()) return "\"" + capped(v.template get_ref<const std::string&>()) + "\"";
  return capped(v.dump(-1, ' ', false, Json::error_handler_t::replace));
}

}  // namespace reattn
