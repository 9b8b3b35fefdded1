#include "common/file_roots.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "common/excerpt.h"

namespace reattn {
namespace {

// The real path of `path`, or the errno that realpath gave.
Expected<std::string> real_path(const std::string& path, int* error) {
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) {
    *error = errno;
    return internal_error(std::strerror(errno));
  }
  return std::string(buf);
}

bool has_dot_dot(const std::string& path) {
  size_t start = 0;
  while (start <= path.size()) {
    const size_t slash = std::min(path.find('/', start), path.size());
    if (path.compare(start, slash - start, "..") == 0 && slash - start == 2) return true;
    start = slash + 1;
  }
  return false;
}

}  // namespace

Expected<std::string> resolve_under_root(const std::string& root, const std::string& path, const std::string& root_key) {
  const std::string shown = "'" + capped(path) + "'";
  if (root.empty()) {
    return Status(ErrorCode::kForbidden, "reading files is disabled on this server: start it with " + root_key +
                                             " set to the directory that files may be read from");
  }
  if (path.empty()) return invalid_argument("path: must not be empty");
  if (path.find('\0') != std::string::npos) return invalid_argument("path: must not contain a NUL byte");
  if (has_dot_dot(path)) {
    return Status(ErrorCode::kForbidden, "path " + shown + ": '..' components are not allowed (paths stay under " +
                                             root_key + ")");
  }
  int error = 0;
  Expected<std::string> real_root = real_path(root, &error);
  if (!real_root) return invalid_argument(root_key + " '" + capped(root) + "' cannot be resolved: " + real_root.status().message());
  const std::string joined = path[0] == '/' ? path : *real_root + "/" + path;
  Expected<std::string> real = real_path(joined, &error);
  if (!real) {
    if (error == ENOENT || error == ENOTDIR) return invalid_argument("path " + shown + ": no such file under " + root_key);
    return invalid_argument("path " + shown + ": cannot be resolved: " + real.status().message());
  }
  const std::string prefix = *real_root == "/" ? "/" : *real_root + "/";
  if (real->compare(0, prefix.size(), prefix) != 0) {
    return Status(ErrorCode::kForbidden, "path " + shown + " resolves outside " + root_key +
                                             " (through a symbolic link or an absolute path)");
  }
  struct stat st{};
  if (::stat(real->c_str(), &st) != 0) return invalid_argument("path " + shown + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return invalid_argument("path " + shown + ": not a regular file");
  return *real;
}

}  // namespace reattn
