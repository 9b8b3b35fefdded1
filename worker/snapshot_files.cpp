#include "worker/snapshot_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/semantics.h"

namespace reattn {
namespace {

uint32_t crc32_update(uint32_t crc, const void* data, size_t bytes) {
  const auto* p = static_cast<const Bytef*>(data);
  // zlib takes 32-bit lengths.
  while (bytes > 0) {
    const uInt piece = static_cast<uInt>(std::min<size_t>(bytes, 1u << 30));
    crc = static_cast<uint32_t>(::crc32(crc, p, piece));
    p += piece;
    bytes -= piece;
  }
  return crc;
}

// A disk or quota that is full, or the file-size limit, is a capacity problem (507); other
// failures to write the server's own directory are the server's (500).
Status system_error(const std::string& what, const std::string& path, int err) {
  const bool full = err == ENOSPC || err == EFBIG || err == EDQUOT;
  return Status(full ? ErrorCode::kCapacity : ErrorCode::kInternal,
                "cannot " + what + " '" + path + "': " + std::strerror(err));
}

Status fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return system_error("open", path, errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  return rc == 0 ? Status::ok() : system_error("fsync", path, err);
}

// A new file written sequentially, its crc32 computed on the way. Removed unless finished.
class FileWriter {
 public:
  explicit FileWriter(std::string path) : path_(std::move(path)) {}
  ~FileWriter() {
    if (fd_ >= 0) ::close(fd_);
    if (!finished_) ::unlink(path_.c_str());
  }
  Status open() {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    return fd_ < 0 ? system_error("create", path_, errno) : Status::ok();
  }
  Status write(const void* data, size_t bytes) {
    crc_ = crc32_update(crc_, data, bytes);
    const char* p = static_cast<const char*>(data);
    while (bytes > 0) {
      const ssize_t n = ::write(fd_, p, bytes);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return system_error("write", path_, n < 0 ? errno : EIO);
      p += n;
      bytes -= static_cast<size_t>(n);
      written_ += static_cast<uint64_t>(n);
    }
    return Status::ok();
  }
  Status finish() {
    if (::fsync(fd_) != 0) return system_error("fsync", path_, errno);
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) return system_error("close", path_, errno);
    finished_ = true;
    return Status::ok();
  }
  uint64_t written() const { return written_; }
  uint32_t crc() const { return crc_; }

 private:
  std::string path_;
  int fd_ = -1;
  bool finished_ = false;
  uint64_t written_ = 0;
  uint32_t crc_ = 0;
};

// Zeroes rows [valid, rows) of each of `heads` consecutive [rows, D] matrices at `data`.
void zero_tail(char* data, int64_t heads, int64_t rows, int64_t valid, size_t row_bytes) {
  if (valid >= rows) return;
  for (int64_t g = 0; g < heads; ++g) {
    std::memset(data + (g * rows + valid) * row_bytes, 0, (rows - valid) * row_bytes);
  }
}

}  // namespace

std::string snapshot_tensor_name(int layer, const char* what) {
  return "layers." + std::to_string(layer) + "." + what;
}

struct SnapshotFileWriter::File : FileWriter {
  using FileWriter::FileWriter;
};

SnapshotFileWriter::SnapshotFileWriter(const KvStore& store, Backend& backend, const Config& config, int rank,
                                       int world)
    : store_(store), backend_(backend), config_(config), rank_(rank), world_(world) {}

SnapshotFileWriter::~SnapshotFileWriter() = default;

Expected<std::unique_ptr<SnapshotFileWriter>> SnapshotFileWriter::create(const KvStore& store, Backend& backend,
                                                                         const Config& config, const ContextShard& ctx,
                                                                         const std::string& dir, int rank, int world,
                                                                         size_t staging_bytes) {
  const ModelConfig& m = config.model;
  const ReattentionConfig& rc = config.reattention;
  const DType dtype = backend.storage_dtype();
  const size_t block_bytes = store.block_bytes();
  const size_t sink_bytes = static_cast<size_t>(m.kv_heads) * rc.sink_tokens * m.head_dim * dtype_size(dtype);
  std::unique_ptr<SnapshotFileWriter> w(new SnapshotFileWriter(store, backend, config, rank, world));
  SnapshotFile& entry = w->entry_;
  entry.file = snapshot_file_name(rank);
  entry.rank = rank;
  entry.sinks = ctx.owner_rank == rank;
  std::vector<TensorBytes> layout;
  for (int layer = 0; layer < m.layers; ++layer) {
    if (!ctx.resident[layer]) {
      return invalid_argument("context " + std::to_string(ctx.id) + ": layer " + std::to_string(layer) +
                              " is not held; only whole contexts can be snapshotted");
    }
    const int64_t blocks = home_blocks_held(ctx.layer_tokens[layer], rc.sink_tokens, rc.chunk_tokens, rank, world);
    entry.layer_blocks.push_back(blocks);
    const std::vector<int64_t> block_shape = {blocks, m.kv_heads, rc.chunk_tokens, m.head_dim};
    if (blocks > 0) {
      layout.push_back({snapshot_tensor_name(layer, "k"), dtype_name(dtype), block_shape, nullptr, blocks * block_bytes});
      layout.push_back({snapshot_tensor_name(layer, "v"), dtype_name(dtype), block_shape, nullptr, blocks * block_bytes});
    }
    if (entry.sinks && rc.sink_tokens > 0) {
      const std::vector<int64_t> sink_shape = {m.kv_heads, rc.sink_tokens, m.head_dim};
      layout.push_back({snapshot_tensor_name(layer, "sink_k"), dtype_name(dtype), sink_shape, nullptr, sink_bytes});
      layout.push_back({snapshot_tensor_name(layer, "sink_v"), dtype_name(dtype), sink_shape, nullptr, sink_bytes});
    }
  }
  // Host staging: whole blocks, at least one block and the sinks.
  w->staging_blocks_ = std::max<size_t>(1, staging_bytes / block_bytes);
  w->staging_.resize(std::max(w->staging_blocks_ * block_bytes, sink_bytes));
  w->file_ = std::make_unique<File>((std::filesystem::path(dir) / entry.file).string());
  REATTN_RETURN_IF_ERROR(w->file_->open());
  const std::string header = safetensors_header(layout);
  REATTN_RETURN_IF_ERROR(w->file_->write(header.data(), header.size()));
  return w;
}

Expected<uint64_t> SnapshotFileWriter::write_layers(const ContextShard& ctx, int first, int end) {
  if (first != next_layer_ || end < first || end > config_.model.layers) {
    return internal_error("snapshot: layers [" + std::to_string(first) + ", " + std::to_string(end) +
                          ") do not continue the file at layer " + std::to_string(next_layer_));
  }
  const ModelConfig& m = config_.model;
  const ReattentionConfig& rc = config_.reattention;
  const size_t esize = dtype_size(backend_.storage_dtype());
  const size_t block_bytes = store_.block_bytes();
  const size_t row_bytes = static_cast<size_t>(m.head_dim) * esize;
  const size_t sink_bytes = static_cast<size_t>(m.kv_heads) * rc.sink_tokens * row_bytes;
  const uint64_t before = file_->written();
  char* staging = staging_.data();
  for (int layer = first; layer < end; ++layer) {
    const LayerShard& shard = ctx.layers[layer];
    const int64_t n = ctx.layer_tokens[layer];
    const int64_t blocks = entry_.layer_blocks[layer];
    if (home_blocks_held(n, rc.sink_tokens, rc.chunk_tokens, rank_, world_) != blocks) {
      return internal_error("snapshot: layer " + std::to_string(layer) + " changed while it was written");
    }
    for (bool values : {false, true}) {
      // Slots in runs that stay within one page (consecutive there) and fit the staging.
      for (int64_t slot = 0; slot < blocks;) {
        const int64_t page_left = KvStore::kBlocksPerPage - slot % KvStore::kBlocksPerPage;
        const int64_t run = std::min({blocks - slot, page_left, static_cast<int64_t>(staging_blocks_)});
        const int64_t first_block = slot * world_ + rank_;
        REATTN_RETURN_IF_ERROR(backend_.download(staging, store_.home_block(shard, values, first_block), run * block_bytes));
        if (slot + run == blocks) {
          // The layer's last block of this rank may be partial.
          const int64_t last_block = (slot + run - 1) * world_ + rank_;
          const int64_t valid = std::min(rc.chunk_tokens, n - (rc.sink_tokens + last_block * rc.chunk_tokens));
          zero_tail(staging + (run - 1) * block_bytes, m.kv_heads, rc.chunk_tokens, valid, row_bytes);
        }
        REATTN_RETURN_IF_ERROR(file_->write(staging, run * block_bytes));
        slot += run;
      }
    }
    if (!entry_.sinks || rc.sink_tokens == 0) continue;
    for (const Buffer* sink : {&shard.sink_k, &shard.sink_v}) {
      REATTN_RETURN_IF_ERROR(backend_.download(staging, sink->data(), sink_bytes));
      zero_tail(staging, m.kv_heads, rc.sink_tokens, std::min(n, rc.sink_tokens), row_bytes);
      REATTN_RETURN_IF_ERROR(file_->write(staging, sink_bytes));
    }
  }
  next_layer_ = end;
  return file_->written() - before;
}

Expected<SnapshotFile> SnapshotFileWriter::finish() {
  if (next_layer_ != config_.model.layers) {
    return internal_error("snapshot: finished after " + std::to_string(next_layer_) + " of " +
                          std::to_string(config_.model.layers) + " layers");
  }
  REATTN_RETURN_IF_ERROR(file_->finish());
  entry_.bytes = file_->written();
  entry_.crc32 = file_->crc();
  return entry_;
}

Expected<SnapshotFile> write_snapshot_file(const KvStore& store, Backend& backend, const Config& config,
                                           const ContextShard& ctx, const std::string& dir, int rank, int world,
                                           size_t staging_bytes) {
  REATTN_ASSIGN_OR_RETURN(std::unique_ptr<SnapshotFileWriter> writer,
                          SnapshotFileWriter::create(store, backend, config, ctx, dir, rank, world, staging_bytes));
  REATTN_RETURN_IF_ERROR(writer->write_layers(ctx, 0, config.model.layers).status());
  return writer->finish();
}

Status publish_snapshot(const std::string& tmp_dir, const std::string& final_dir, const SnapshotManifest& manifest) {
  const std::string path = (std::filesystem::path(tmp_dir) / kSnapshotManifestFile).string();
  {
    FileWriter out(path);
    REATTN_RETURN_IF_ERROR(out.open());
    const std::string text = encode_manifest(manifest);
    REATTN_RETURN_IF_ERROR(out.write(text.data(), text.size()));
    REATTN_RETURN_IF_ERROR(out.finish());
  }
  REATTN_RETURN_IF_ERROR(fsync_path(tmp_dir, true));
  // rename() would replace an empty directory: a snapshot that appeared meanwhile is refused.
  std::error_code ec;
  if (std::filesystem::exists(final_dir, ec)) {
    return invalid_argument("snapshot '" + manifest.name + "' already exists");
  }
  if (::rename(tmp_dir.c_str(), final_dir.c_str()) != 0) return system_error("rename to", final_dir, errno);
  return fsync_path(std::filesystem::path(final_dir).parent_path().string(), true);
}

Status verify_snapshot_file(const std::string& dir, const SnapshotFile& file) {
  const std::string path = (std::filesystem::path(dir) / file.file).string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return invalid_argument("snapshot file '" + path + "' cannot be read: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != file.bytes) {
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    ::close(fd);
    return invalid_argument("snapshot file '" + path + "' holds " + std::to_string(size) + " bytes, the manifest says " +
                            std::to_string(file.bytes) + (size < file.bytes ? " (truncated)" : ""));
  }
  std::vector<char> buffer(size_t{4} << 20);
  uint32_t crc = 0;
  for (;;) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return invalid_argument("snapshot file '" + path + "' cannot be read: " + std::strerror(err));
    }
    if (n == 0) break;
    crc = crc32_update(crc, buffer.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  if (crc != file.crc32) {
    return invalid_argument("snapshot file '" + path + "' is corrupt: crc32 " + std::to_string(crc) +
                            ", the manifest says " + std::to_string(file.crc32));
  }
  return Status::ok();
}

Expected<SnapshotReader> SnapshotReader::open(const std::string& dir, SnapshotManifest manifest) {
  SnapshotReader reader;
  const SnapshotManifest& m = manifest;
  const std::vector<int64_t> sink_shape = {m.kv_heads, m.sink_tokens, m.head_dim};
  reader.sinks_.resize(m.layers);
  for (const SnapshotFile& f : m.files) {
    const std::string path = (std::filesystem::path(dir) / f.file).string();
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      return invalid_argument("snapshot file '" + path + "' cannot be read: " + std::strerror(errno));
    }
    if (static_cast<uint64_t>(st.st_size) != f.bytes) {
      return invalid_argument("snapshot file '" + path + "' holds " + std::to_string(st.st_size) +
                              " bytes, the manifest says " + std::to_string(f.bytes));
    }
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return invalid_argument("snapshot file '" + path + "' cannot be read: " + std::strerror(errno));
    reader.fds_.push_back(std::shared_ptr<const int>(new int(fd), [](const int* p) {
      ::close(*p);
      delete p;
    }));
    reader.paths_.push_back(path);
    Expected<SafetensorsFile> file = SafetensorsFile::open(path);
    if (!file) return invalid_argument("snapshot file '" + path + "': " + file.status().message());
    // A tensor of the layout this manifest implies, or an error naming it.
    const auto tensor = [&](const std::string& name, const std::vector<int64_t>& shape) -> Expected<const unsigned char*> {
      Expected<TensorView> t = file->get(name);
      if (!t) return invalid_argument("snapshot file '" + path + "': " + t.status().message());
      if (t->dtype != m.dtype || t->shape != shape) {
        return invalid_argument("snapshot file '" + path + "': tensor '" + name + "' is not " + dtype_name(m.dtype) +
                                " of the shape the manifest implies");
      }
      return t->data;
    };
    std::vector<LayerTensors> layers(m.layers);
    for (int layer = 0; layer < m.layers; ++layer) {
      const int64_t blocks = f.layer_blocks[layer];
      if (blocks > 0) {
        const std::vector<int64_t> shape = {blocks, m.kv_heads, m.chunk_tokens, m.head_dim};
        REATTN_ASSIGN_OR_RETURN(layers[layer].k, tensor(snapshot_tensor_name(layer, "k"), shape));
        REATTN_ASSIGN_OR_RETURN(layers[layer].v, tensor(snapshot_tensor_name(layer, "v"), shape));
      }
      if (f.sinks && m.sink_tokens > 0) {
        REATTN_ASSIGN_OR_RETURN(reader.sinks_[layer].k, tensor(snapshot_tensor_name(layer, "sink_k"), sink_shape));
        REATTN_ASSIGN_OR_RETURN(reader.sinks_[layer].v, tensor(snapshot_tensor_name(layer, "sink_v"), sink_shape));
      }
    }
    reader.blocks_.push_back(std::move(layers));
    reader.files_.push_back(std::move(*file));
  }
  reader.manifest_ = std::move(manifest);
  return reader;
}

Status SnapshotReader::check_unchanged() const {
  for (size_t f = 0; f < fds_.size(); ++f) {
    struct stat st {};
    if (::fstat(*fds_[f], &st) != 0 || static_cast<uint64_t>(st.st_size) != manifest_.files[f].bytes) {
      return invalid_argument("snapshot file '" + paths_[f] + "' changed while it was being restored (now " +
                              std::to_string(st.st_size) + " bytes, the manifest says " +
                              std::to_string(manifest_.files[f].bytes) + ")");
    }
  }
  return Status::ok();
}

void SnapshotReader::read(int layer, int kv_head, int64_t first, int64_t count, DType dtype, void* k, void* v) const {
  const SnapshotManifest& m = manifest_;
  const size_t from_row = static_cast<size_t>(m.head_dim) * dtype_size(m.dtype);
  const size_t to_row = static_cast<size_t>(m.head_dim) * dtype_size(dtype);
  char* k_out = static_cast<char*>(k);
  char* v_out = static_cast<char*>(v);
  while (count > 0) {
    const LayerTensors* src;
    int64_t row;    // the first row's index in src, in rows of D
    int64_t rows;   // rows of this piece
    if (first < m.sink_tokens) {
      src = &sinks_[layer];
      row = kv_head * m.sink_tokens + first;
      rows = std::min(count, m.sink_tokens - first);
    } else {
      const int64_t block = (first - m.sink_tokens) / m.chunk_tokens;
      const int64_t within = (first - m.sink_tokens) % m.chunk_tokens;
      src = &blocks_[home_rank(block, m.world)][layer];
      row = (home_slot(block, m.world) * m.kv_heads + kv_head) * m.chunk_tokens + within;
      rows = std::min(count, m.chunk_tokens - within);
    }
    const size_t elems = static_cast<size_t>(rows) * m.head_dim;
    convert(m.dtype, src->k + row * from_row, elems, dtype, k_out);
    convert(m.dtype, src->v + row * from_row, elems, dtype, v_out);
    k_out += rows * to_row;
    v_out += rows * to_row;
    first += rows;
    count -= rows;
  }
}

}  // namespace reattn
