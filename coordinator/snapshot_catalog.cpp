#include "coordinator/snapshot_catalog.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace reattn {
namespace {

namespace fs = std::filesystem;

// The largest manifest read (a 64K-layer model at 64 ranks stays far below).
constexpr uintmax_t kMaxManifestBytes = uintmax_t{64} << 20;

Expected<std::string> read_text(const fs::path& path) {
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) return not_found("'" + path.string() + "': " + ec.message());
  if (size > kMaxManifestBytes) return invalid_argument("'" + path.string() + "' is too large for a manifest");
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("'" + path.string() + "' cannot be read");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

SnapshotCatalog::SnapshotCatalog(std::string dir) : dir_(std::move(dir)) {}

Status SnapshotCatalog::off() {
  return Status(ErrorCode::kForbidden, "snapshots are off: the server has no snapshot directory (server.snapshot_dir, --snapshot-dir)");
}

Expected<int> SnapshotCatalog::prepare() {
  REATTN_RETURN_IF_ERROR(check_enabled());
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) return invalid_argument("server.snapshot_dir: cannot create '" + dir_ + "': " + ec.message());
  int removed = 0;
  for (const fs::directory_entry& e : fs::directory_iterator(dir_, ec)) {
    if (e.path().filename().string().rfind(kSnapshotTmpPrefix, 0) != 0) continue;
    std::error_code rm;
    fs::remove_all(e.path(), rm);
    if (!rm) ++removed;
  }
  if (ec) return invalid_argument("server.snapshot_dir: cannot list '" + dir_ + "': " + ec.message());
  return removed;
}

std::vector<StoredSnapshot> SnapshotCatalog::list(std::vector<std::string>* problems) const {
  std::vector<StoredSnapshot> out;
  if (!enabled()) return out;
  std::error_code ec;
  std::vector<std::string> names;
  for (const fs::directory_entry& e : fs::directory_iterator(dir_, ec)) {
    const std::string name = e.path().filename().string();
    if (check_snapshot_name(name).is_ok() && fs::exists(e.path() / kSnapshotManifestFile)) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    Expected<StoredSnapshot> s = read(name);
    if (s) {
      out.push_back(std::move(*s));
    } else if (problems && s.status().code() != ErrorCode::kNotFound) {
      problems->push_back(s.status().message());
    }
  }
  return out;
}

Expected<StoredSnapshot> SnapshotCatalog::read(const std::string& name) const {
  REATTN_RETURN_IF_ERROR(check_enabled());
  REATTN_RETURN_IF_ERROR(check_snapshot_name(name));
  const fs::path path = fs::path(dir_) / name / kSnapshotManifestFile;
  Expected<std::string> text = read_text(path);
  if (!text) {
    if (text.status().code() == ErrorCode::kNotFound) return not_found("snapshot '" + name + "' not found");
    return text.status();
  }
  REATTN_ASSIGN_OR_RETURN(SnapshotManifest m, decode_manifest(*text, "snapshot '" + name + "' manifest"));
  if (m.name != name) {
    return invalid_argument("snapshot '" + name + "' manifest names another snapshot ('" + m.name + "')");
  }
  return StoredSnapshot{std::move(m), std::move(*text)};
}

bool SnapshotCatalog::exists_locked(const std::string& name) const {
  std::error_code ec;
  return held_.count(name) != 0 || fs::exists(fs::path(dir_) / name, ec);
}

bool SnapshotCatalog::hold_new(const std::string& name, std::string* tmp_leaf) {
  std::lock_guard<std::mutex> lock(mu_);
  if (exists_locked(name)) return false;
  ++held_[name];
  *tmp_leaf = std::string(kSnapshotTmpPrefix) + name + "-" + std::to_string(::getpid()) + "-" + std::to_string(next_tag_++);
  return true;
}

void SnapshotCatalog::hold_existing(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  ++held_[name];
}

void SnapshotCatalog::release(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = held_.find(name);
  if (it != held_.end() && --it->second <= 0) held_.erase(it);
}

Status SnapshotCatalog::remove(const std::string& name) {
  REATTN_RETURN_IF_ERROR(check_enabled());
  REATTN_RETURN_IF_ERROR(check_snapshot_name(name));
  std::lock_guard<std::mutex> lock(mu_);
  if (held_.count(name)) {
    return Status(ErrorCode::kConflict, "snapshot '" + name + "' is in use by an operation (being written or restored)");
  }
  const fs::path path = fs::path(dir_) / name;
  std::error_code ec;
  if (!fs::exists(path / kSnapshotManifestFile, ec)) return not_found("snapshot '" + name + "' not found");
  // Renamed first: from here on it is no longer a complete snapshot, whatever happens next.
  const fs::path doomed = fs::path(dir_) / (std::string(kSnapshotTmpPrefix) + name + "-deleted-" +
                                            std::to_string(::getpid()) + "-" + std::to_string(next_tag_++));
  fs::rename(path, doomed, ec);
  if (ec) return invalid_argument("cannot delete snapshot '" + name + "': " + ec.message());
  fs::remove_all(doomed, ec);
  if (ec) return invalid_argument("snapshot '" + name + "' deleted, but its files were not all removed: " + ec.message());
  return Status::ok();
}

}  // namespace reattn
