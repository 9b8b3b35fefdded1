// The API's OpenAPI 3.1 description (api/openapi.json), embedded into the binary at build time
// (cmake/embed_text.cmake) and served at GET /openapi.json. Thread-safe: constant data.
#pragma once

#include <string_view>

namespace reattn {

// The bytes of api/openapi.json as they were when the binary was built.
std::string_view openapi_document();

}  // namespace reattn
