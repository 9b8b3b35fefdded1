# Script mode (cmake -P): writes OUTPUT, a C++ source defining
#   std::string_view reattn::FUNCTION()
# that returns INPUT's bytes, unchanged (declared in HEADER). Run at build time by the custom
# command in the top-level CMakeLists.txt, so the binary serves what the file says.
foreach(var INPUT OUTPUT FUNCTION HEADER)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "embed_text.cmake: -D${var}=... is required")
  endif()
endforeach()
file(READ "${INPUT}" hex HEX)
# 16 bytes a line, each as 0xNN.
string(REGEX REPLACE "(................................)" "\\1\n" hex "${hex}")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," hex "${hex}")
file(RELATIVE_PATH from "${CMAKE_CURRENT_LIST_DIR}/.." "${INPUT}")
file(WRITE "${OUTPUT}.tmp" "// Generated from ${from} by cmake/embed_text.cmake at build time; do not edit.
#include \"${HEADER}\"

namespace reattn {
namespace {

const unsigned char kBytes[] = {
${hex}};

}  // namespace

std::string_view ${FUNCTION}() { return {reinterpret_cast<const char*>(kBytes), sizeof(kBytes)}; }

}  // namespace reattn
")
# Unchanged output keeps its timestamp: nothing recompiles.
file(COPY_FILE "${OUTPUT}.tmp" "${OUTPUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUTPUT}.tmp")
