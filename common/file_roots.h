// Paths that clients name in requests (bulk loads, snapshots) resolved safely under a root
// directory the operator configured: the real path (symlinks followed) must lie inside the
// root's real path, `..` components are refused outright, and the target must be an existing
// regular file. Errors name the path (capped) and the config key of the root.
// Thread-safe (no state; reads the file system).
#pragma once

#include <string>

#include "common/status.h"

namespace reattn {

// `path` is relative to `root` (or absolute, then it must lie under root). Errors:
//   Forbidden        root empty (the feature is disabled), a `..` component, or a real path
//                    outside the root (a symlink escape)
//   InvalidArgument  an empty path or one with a NUL byte, no such file, not a regular file,
//                    the root itself missing
// `root_key` names the setting in messages ("server.load_root").
Expected<std::string> resolve_under_root(const std::string& root, const std::string& path, const std::string& root_key);

}  // namespace reattn
