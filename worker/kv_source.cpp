#include "worker/kv_source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace reattn {

void Fp32KvSource::read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const {
  if (dtype == DType::kF32) return read_f32(layer, kv_head, offset, count, static_cast<float*>(k), static_cast<float*>(v));
  const size_t n = static_cast<size_t>(count) * head_dim_;
  std::vector<float> kf(n), vf(n);
  read_f32(layer, kv_head, offset, count, kf.data(), vf.data());
  convert_from_f32(dtype, kf.data(), n, k);
  convert_from_f32(dtype, vf.data(), n, v);
}

Expected<SafetensorsKvSource> SafetensorsKvSource::make(SafetensorsFile file, const ModelConfig& model) {
  REATTN_ASSIGN_OR_RETURN(KvTensors kv, kv_tensors(file, model));
  return SafetensorsKvSource(std::move(file), std::move(kv), model);
}

void SafetensorsKvSource::read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k,
                               void* v) const {
  const int64_t first = ((static_cast<int64_t>(layer) * kv_heads_ + kv_head) * kv_.tokens + offset) * head_dim_;
  convert(kv_.k.dtype, kv_.k.data + first * dtype_size(kv_.k.dtype), count * head_dim_, dtype, k);
  convert(kv_.v.dtype, kv_.v.data + first * dtype_size(kv_.v.dtype), count * head_dim_, dtype, v);
}

Expected<std::unique_ptr<FileKvSource>> FileKvSource::open(const std::string& path, const ModelConfig& model,
                                                           float max_abs) {
  // One descriptor for the header and every read: a file renamed over meanwhile is not mixed in.
  struct stat st {};
  REATTN_ASSIGN_OR_RETURN(const int fd, open_regular_file(path, &st));
  Expected<SafetensorsFile> header = SafetensorsFile::read_header(fd, static_cast<uint64_t>(st.st_size), path);
  Expected<KvTensors> kv = header ? kv_tensors(*header, model) : Expected<KvTensors>(header.status());
  if (!kv) {
    ::close(fd);
    return kv.status();
  }
  return std::unique_ptr<FileKvSource>(new FileKvSource(fd, st, std::move(*header), std::move(*kv), model, max_abs));
}

FileKvSource::FileKvSource(int fd, const struct stat& st, SafetensorsFile header, KvTensors kv,
                           const ModelConfig& model, float max_abs)
    : fd_(fd),
      bytes_(static_cast<int64_t>(st.st_size)),
      modified_ns_(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec),
      header_(std::move(header)),
      kv_(std::move(kv)),
      k_at_(header_.offset_of(kv_.k)),
      v_at_(header_.offset_of(kv_.v)),
      kv_heads_(model.kv_heads),
      head_dim_(model.head_dim),
      max_abs_(max_abs) {}

Status FileKvSource::unchanged() const {
  struct stat st {};
  if (fstat(fd_, &st) != 0) return invalid_argument(std::string("cannot stat the load file: ") + std::strerror(errno));
  if (st.st_size < bytes_) return invalid_argument("the load file was truncated while it was being loaded");
  const int64_t modified = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  if (st.st_size != bytes_ || modified != modified_ns_) {
    return invalid_argument("the load file was modified while it was being loaded");
  }
  return Status::ok();
}

FileKvSource::~FileKvSource() {
  if (fd_ >= 0) ::close(fd_);
}

Status FileKvSource::problem() const {
  std::lock_guard<std::mutex> lock(mu_);
  return problem_;
}

void FileKvSource::note(Status s) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (problem_.is_ok()) problem_ = std::move(s);
}

void FileKvSource::read_ahead(int64_t first, int64_t count) const {
  count = std::min(count, kv_.tokens - first);
  if (first < 0 || count <= 0) return;
  for (const auto& [t, at] : {std::pair{&kv_.k, k_at_}, std::pair{&kv_.v, v_at_}}) {
    const uint64_t token_bytes = static_cast<uint64_t>(head_dim_) * dtype_size(t->dtype);
    for (int64_t row = 0; row < static_cast<int64_t>(kv_.k.shape[0]) * kv_heads_; ++row) {
      const uint64_t begin = at + (static_cast<uint64_t>(row) * kv_.tokens + first) * token_bytes;
      (void)::posix_fadvise(fd_, static_cast<off_t>(begin), static_cast<off_t>(count * token_bytes),
                            POSIX_FADV_WILLNEED);
    }
  }
}

void FileKvSource::read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const {
  thread_local std::vector<unsigned char> raw;
  const size_t n = static_cast<size_t>(count) * head_dim_;
  const auto where = [&] {
    return "layer " + std::to_string(layer) + ", kv head " + std::to_string(kv_head) + ", tokens [" +
           std::to_string(offset) + ", " + std::to_string(offset + count) + ")";
  };
  for (const auto& [t, at, out] : {std::tuple{&kv_.k, k_at_, k}, std::tuple{&kv_.v, v_at_, v}}) {
    const size_t esize = dtype_size(t->dtype);
    const uint64_t element = (static_cast<uint64_t>(layer) * kv_heads_ + kv_head) * kv_.tokens + offset;
    const uint64_t first = at + element * head_dim_ * esize;
    raw.resize(n * esize);
    size_t got = 0;
    const auto started = std::chrono::steady_clock::now();
    while (got < raw.size()) {
      const ssize_t r = ::pread(fd_, raw.data() + got, raw.size() - got, static_cast<off_t>(first + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    read_ns_ += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count());
    if (got < raw.size()) {
      note(invalid_argument("the load file was truncated or became unreadable while it was being loaded (" + where() +
                            ": " + std::to_string(got) + " of " + std::to_string(raw.size()) + " bytes at offset " +
                            std::to_string(first) + ")"));
      std::memset(raw.data() + got, 0, raw.size() - got);
    } else if (max_abs_ > 0) {
      const TensorView part{t->name, t->dtype, {count, head_dim_}, raw.data(), raw.size()};
      const Status s = check_storable(part, max_abs_);
      if (!s.is_ok()) note(invalid_argument("the file's values at " + where() + ": " + s.message()));
    }
    convert(t->dtype, raw.data(), n, dtype, out);
  }
}

void LayerStepKvSource::read(int, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const {
  const StepTensors& t = step_.tensors;
  const size_t first = (static_cast<size_t>(kv_head) * step_.qlen + offset) * head_dim_ * dtype_size(t.kv_dtype);
  const size_t n = static_cast<size_t>(count) * head_dim_;
  convert(t.kv_dtype, t.at(t.k_offset) + first, n, dtype, k);
  convert(t.kv_dtype, t.at(t.v_offset) + first, n, dtype, v);
}

void SyntheticKvSource::read_f32(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const {
  for (int64_t t = 0; t < count; ++t) {
    synthetic_kv(spec_, model_, layer, kv_head, first_token_ + offset + t, k + t * model_.head_dim,
                 v + t * model_.head_dim);
  }
}

}  // namespace reattn
