#include "worker/snapshot_worker.h"

#include <cstring>
#include <filesystem>
#include <vector>

#include "common/snapshot_manifest.h"

namespace reattn {
namespace {

bool is_fault(const Status& s) { return s.code() == ErrorCode::kFatal; }

// What each rank sends rank 0 after a slice: bytes written, and at publication its file's
// size and crc32.
struct FileSummary {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
};

Expected<std::vector<FileSummary>> gather_summaries(const Control& control, const FileSummary& mine) {
  std::vector<std::string> all;
  Status s = control.gather(std::string(reinterpret_cast<const char*>(&mine), sizeof(mine)), &all);
  if (!s.is_ok()) return s;
  std::vector<FileSummary> out(all.size());
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].size() != sizeof(FileSummary)) return Status(ErrorCode::kFatal, "snapshot: malformed file summary");
    std::memcpy(&out[r], all[r].data(), sizeof(FileSummary));
  }
  return out;
}

// The name and temporary directory of a snapshot: rank 0 made them; checked again, as paths.
Status check_leaves(const Config& config, const std::string& name, const std::string* tmp) {
  if (config.server.snapshot_dir.empty()) return invalid_argument("snapshots are off: no server.snapshot_dir");
  REATTN_RETURN_IF_ERROR(check_snapshot_name(name));
  if (tmp && (tmp->rfind(kSnapshotTmpPrefix, 0) != 0 || tmp->find('/') != std::string::npos)) {
    return internal_error("snapshot: bad temporary directory name");
  }
  return Status::ok();
}

}  // namespace

SnapshotWorker::SnapshotWorker(const Control& control, Backend& backend, KvStore& store, const Config& config)
    : control_(control), backend_(backend), store_(store), config_(config) {}

std::string SnapshotWorker::path(const std::string& leaf) const {
  return (std::filesystem::path(config_.server.snapshot_dir) / leaf).string();
}

Status SnapshotWorker::agree_into(const Status& local, OperationResult* result) {
  const Status agreed = control_.agree(local);
  if (is_fault(agreed)) return agreed;
  result->status = agreed;
  return Status::ok();
}

Status SnapshotWorker::apply(const SnapshotContext& op, OperationResult* result) {
  switch (op.phase) {
    case SnapshotPhase::kWrite: return write(op, result);
    case SnapshotPhase::kPublish: return publish(op, result);
    case SnapshotPhase::kAbort: return abort(op, result);
  }
  return internal_error("snapshot: unknown phase");
}

Status SnapshotWorker::apply(const RestoreContext& op, OperationResult* result) {
  switch (op.phase) {
    case RestorePhase::kOpen: return open(op, result);
    case RestorePhase::kLayer: return restore_layer(op, result);
    case RestorePhase::kClose:
      readers_.erase(op.context_id);
      return agree_into(Status::ok(), result);
  }
  return internal_error("restore: unknown phase");
}

// Layers [first_layer, end_layer) of this rank's file; the first slice creates it.
Status SnapshotWorker::write(const SnapshotContext& op, OperationResult* result) {
  const ContextShard* ctx = store_.find(op.context_id);
  Status local = check_leaves(config_, op.name, &op.tmp);
  if (local.is_ok() && !ctx) local = not_found("context " + std::to_string(op.context_id) + " not found");
  FileSummary mine;
  if (local.is_ok() && op.first_layer == 0) {
    std::error_code ec;
    std::filesystem::create_directories(path(op.tmp), ec);
    if (ec) local = internal_error("cannot create '" + path(op.tmp) + "': " + ec.message());
    Expected<std::unique_ptr<SnapshotFileWriter>> writer =
        local.is_ok() ? SnapshotFileWriter::create(store_, backend_, config_, *ctx, path(op.tmp), control_.rank(),
                                                   control_.world())
                      : Expected<std::unique_ptr<SnapshotFileWriter>>(local);
    local = writer.status();
    if (writer) writers_[op.tmp] = std::move(*writer);
  }
  if (local.is_ok()) {
    const auto it = writers_.find(op.tmp);
    Expected<uint64_t> bytes = it == writers_.end()
                                   ? Expected<uint64_t>(internal_error("snapshot: no file open for " + op.tmp))
                                   : it->second->write_layers(*ctx, op.first_layer, op.end_layer);
    local = bytes.status();
    if (bytes) mine.bytes = *bytes;
  }
  REATTN_RETURN_IF_ERROR(agree_into(local, result));
  if (!result->status.is_ok()) return Status::ok();
  REATTN_ASSIGN_OR_RETURN(const std::vector<FileSummary> all, gather_summaries(control_, mine));
  for (const FileSummary& s : all) result->bytes += static_cast<int64_t>(s.bytes);
  return Status::ok();
}

// Every rank closes its file; rank 0 gathers their sizes and checksums, writes the manifest
// and publishes the directory.
Status SnapshotWorker::publish(const SnapshotContext& op, OperationResult* result) {
  const ContextShard* ctx = store_.find(op.context_id);
  Status local = check_leaves(config_, op.name, &op.tmp);
  if (local.is_ok() && !ctx) local = not_found("context " + std::to_string(op.context_id) + " not found");
  const auto it = writers_.find(op.tmp);
  if (local.is_ok() && it == writers_.end()) local = internal_error("snapshot: no file open for " + op.tmp);
  FileSummary mine;
  if (local.is_ok()) {
    Expected<SnapshotFile> file = it->second->finish();
    local = file.status();
    if (file) mine = FileSummary{file->bytes, file->crc32};
  }
  REATTN_RETURN_IF_ERROR(agree_into(local, result));
  if (!result->status.is_ok()) return Status::ok();
  writers_.erase(op.tmp);
  REATTN_ASSIGN_OR_RETURN(const std::vector<FileSummary> all, gather_summaries(control_, mine));
  Status published = Status::ok();
  if (control_.rank() == 0) {
    SnapshotManifest m;
    m.name = op.name;
    m.created = op.created;
    m.layers = config_.model.layers;
    m.kv_heads = config_.model.kv_heads;
    m.head_dim = config_.model.head_dim;
    m.dtype = backend_.storage_dtype();
    m.sink_tokens = config_.reattention.sink_tokens;
    m.chunk_tokens = config_.reattention.chunk_tokens;
    m.local_window = config_.reattention.local_window;
    m.world = control_.world();
    m.owner_rank = ctx->owner_rank;
    m.context_id = op.context_id;
    m.layer_tokens = ctx->layer_tokens;
    for (int r = 0; r < m.world; ++r) {
      SnapshotFile f = expected_snapshot_file(m, r);
      f.bytes = all[r].bytes;
      f.crc32 = all[r].crc32;
      m.files.push_back(std::move(f));
    }
    published = publish_snapshot(path(op.tmp), path(op.name), m);
    if (published.is_ok()) result->manifest = encode_manifest(m);
  }
  return agree_into(published, result);
}

// The rollback: every rank drops its file; once all have (the agreement), rank 0 removes the
// temporary directory, so no rank unlinks a file while rank 0 walks the directory.
Status SnapshotWorker::abort(const SnapshotContext& op, OperationResult* result) {
  writers_.erase(op.tmp);
  REATTN_RETURN_IF_ERROR(agree_into(Status::ok(), result));
  if (control_.rank() == 0 && check_leaves(config_, op.name, &op.tmp).is_ok()) {
    std::error_code ec;
    // A directory that cannot be removed is only a stale .tmp- one (never a snapshot, removed
    // at the next start-up); failing the rollback would make the step loop drop the context.
    std::filesystem::remove_all(path(op.tmp), ec);
  }
  return Status::ok();
}

// Every rank checks the manifest against its config and storage dtype, verifies the checksums
// of its share of the files and maps them all; only when every rank is ready is the context made.
Status SnapshotWorker::open(const RestoreContext& op, OperationResult* result) {
  const std::string dir = path(op.name);
  Status local = check_leaves(config_, op.name, nullptr);
  Expected<SnapshotManifest> manifest = decode_manifest(op.manifest, "snapshot '" + op.name + "' manifest");
  if (local.is_ok()) local = manifest.status();
  if (local.is_ok()) local = check_manifest_fits(*manifest, config_, backend_.storage_dtype());
  for (size_t f = control_.rank(); local.is_ok() && f < manifest->files.size(); f += control_.world()) {
    local = verify_snapshot_file(dir, manifest->files[f]);
  }
  Expected<SnapshotReader> reader = local.is_ok() ? SnapshotReader::open(dir, *manifest) : Expected<SnapshotReader>(local);
  REATTN_RETURN_IF_ERROR(agree_into(reader.status(), result));
  if (!result->status.is_ok()) return Status::ok();
  const bool existed = store_.find(op.context_id) != nullptr;
  const Status made = store_.create(op.context_id, op.owner_rank);
  REATTN_RETURN_IF_ERROR(agree_into(made, result));
  if (!result->status.is_ok()) {
    // Made on some ranks only: undone where it was made.
    if (!existed && store_.find(op.context_id)) (void)store_.erase(op.context_id);
    return Status::ok();
  }
  readers_[op.context_id] = std::make_unique<SnapshotReader>(std::move(*reader));
  result->layer_tokens = store_.find(op.context_id)->layer_tokens;
  return Status::ok();
}

// One layer from the files; KvStore places home blocks, sinks and ring as for any append.
Status SnapshotWorker::restore_layer(const RestoreContext& op, OperationResult* result) {
  const auto it = readers_.find(op.context_id);
  Status local = Status::ok();
  if (it == readers_.end() || !store_.find(op.context_id)) {
    local = internal_error("restore: context " + std::to_string(op.context_id) + " is not being restored");
  } else if (op.layer < 0 || op.layer >= config_.model.layers) {
    local = internal_error("restore: layer " + std::to_string(op.layer) + " is out of range");
  } else {
    local = it->second->check_unchanged();
    if (local.is_ok()) local = store_.append(op.context_id, SnapshotKvSource(*it->second, op.layer), op.layer);
  }
  REATTN_RETURN_IF_ERROR(agree_into(local, result));
  if (result->status.is_ok()) result->layer_tokens = store_.find(op.context_id)->layer_tokens;
  return Status::ok();
}

}  // namespace reattn
