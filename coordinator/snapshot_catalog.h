// Rank 0's view of the snapshot directory (server.snapshot_dir): the complete snapshots (a
// `<name>/manifest.json` outside a `.tmp-` directory), their manifests, deletion, and the names
// that operations in flight hold, so a name being written is not taken twice and a snapshot
// being restored is not deleted under the ranks. Stale `.tmp-` directories (a crash mid-snapshot)
// are never listed and are removed at start-up (clean_stale).
// Thread-safety: every method is safe from any thread.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "common/snapshot_manifest.h"
#include "common/status.h"

namespace reattn {

struct StoredSnapshot {
  SnapshotManifest manifest;
  std::string text;  // manifest.json as stored
};

class SnapshotCatalog {
 public:
  // `dir` empty: snapshots are off (every call answers so).
  explicit SnapshotCatalog(std::string dir);

  bool enabled() const { return !dir_.empty(); }
  const std::string& dir() const { return dir_; }
  // Forbidden (403) naming the setting: what every snapshot call answers when snapshots are off.
  static Status off();
  Status check_enabled() const { return enabled() ? Status::ok() : off(); }

  // Creates the directory if needed and removes stale temporary directories; returns how many.
  // Start-up only, before any snapshot operation.
  Expected<int> prepare();

  // Complete snapshots by name. A manifest that does not decode is skipped (and reported in
  // `problems`, when given).
  std::vector<StoredSnapshot> list(std::vector<std::string>* problems = nullptr) const;
  // NotFound for no complete snapshot of that name; InvalidArgument for a bad name or manifest;
  // Forbidden when snapshots are off.
  Expected<StoredSnapshot> read(const std::string& name) const;

  // A new snapshot `name`: false when it exists or another operation holds it. Else held
  // until release, with the temporary directory leaf its files are written in.
  bool hold_new(const std::string& name, std::string* tmp_leaf);
  // A restore reading `name` (several may hold it at once).
  void hold_existing(const std::string& name);
  void release(const std::string& name);

  // Removes a complete snapshot: renamed away at once (no longer complete), then deleted.
  // NotFound, or Conflict while an operation holds it.
  Status remove(const std::string& name);

 private:
  bool exists_locked(const std::string& name) const;

  const std::string dir_;
  mutable std::mutex mu_;
  std::map<std::string, int> held_;  // name -> operations holding it
  uint64_t next_tag_ = 1;
};

}  // namespace reattn
