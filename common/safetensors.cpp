#include "common/safetensors.h"

#include "common/excerpt.h"
#include "common/json_shape.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

namespace reattn {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// A safetensors header nests 3 deep, and even a snapshot file of 64K layers holds ~3M values:
// json_shape's default bounds (16 levels, 8M values) keep a hostile header from costing gigabytes.

// Names listed in a NotFound message; model files can hold thousands of tensors.
constexpr size_t kMaxListedNames = 32;

// A non-negative JSON integer that fits int64, or nullopt.
std::optional<int64_t> as_index(const nlohmann::json& v) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return v.get<int64_t>();
  return std::nullopt;
}

Expected<DType> parse_safetensors_dtype(const nlohmann::json& v) {
  // Only the safetensors spelling: parse_dtype also takes config spellings like "bf16".
  const std::string name = v.is_string() ? v.get<std::string>() : json_excerpt(v);
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  return invalid_argument("unknown dtype '" + capped(name) + "' (expected F32, F16 or BF16)");
}

}  // namespace

struct SafetensorsFile::Storage {
  std::string origin;
  const unsigned char* data = nullptr;
  size_t size = 0;
  void* mapping = nullptr;  // set when the bytes are a file mapping
  bool header_only = false; // `buffer` holds the length and header; `size` is the file's
  std::string buffer;       // set when the bytes were parsed from memory
  std::shared_ptr<const std::string> shared;  // set when the bytes are shared with the caller

  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (mapping != nullptr) munmap(mapping, size);
  }
};

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<float> TensorView::to_f32() const {
  std::vector<float> out(bytes / dtype_size(dtype));
  convert_to_f32(dtype, data, out.size(), out.data());
  return out;
}

Expected<int> open_regular_file(const std::string& path, struct stat* st) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return invalid_argument("cannot open '" + path + "': " + std::strerror(errno));
  const bool stat_ok = fstat(fd, st) == 0;
  if (!stat_ok || !S_ISREG(st->st_mode)) {
    const std::string why = stat_ok ? "not a regular file" : std::strerror(errno);
    ::close(fd);
    return invalid_argument("cannot open '" + path + "': " + why);
  }
  return fd;
}

Expected<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  struct stat st {};
  REATTN_ASSIGN_OR_RETURN(const int fd, open_regular_file(path, &st));
  auto storage = std::make_shared<Storage>();
  storage->origin = path;
  storage->size = static_cast<size_t>(st.st_size);
  // mmap rejects length 0; an empty file is reported by the parser like any short file.
  if (storage->size > 0) {
    void* p = mmap(nullptr, storage->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      return invalid_argument("cannot map '" + path + "': " + why);
    }
    storage->mapping = p;
    storage->data = static_cast<const unsigned char*>(p);
  }
  ::close(fd);  // the mapping stays valid without the descriptor
  return parse_storage(std::move(storage), path);
}

Expected<SafetensorsFile> SafetensorsFile::read_header(int fd, uint64_t size, const std::string& origin) {
  const auto read_at = [&](uint64_t offset, size_t bytes, std::string* out) {
    out->resize(bytes);
    size_t got = 0;
    while (got < bytes) {
      const ssize_t r = ::pread(fd, &(*out)[got], bytes - got, static_cast<off_t>(offset + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      got += static_cast<size_t>(r);
    }
    return true;
  };
  auto storage = std::make_shared<Storage>();
  storage->origin = origin;
  storage->header_only = true;
  storage->size = static_cast<size_t>(size);
  std::string length;
  if (size >= 8) {
    if (!read_at(0, 8, &length)) return invalid_argument(origin + ": cannot read the header length (the file changed?)");
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(length[i]);
    // Out-of-range lengths are refused by the parse, naming the limit; only a length that fits
    // both is read.
    if (header_len <= kMaxHeaderBytes && header_len <= size - 8) {
      std::string header;
      if (!read_at(8, static_cast<size_t>(header_len), &header)) {
        return invalid_argument(origin + ": cannot read the header (the file changed?)");
      }
      length += header;
    }
  }
  storage->buffer = std::move(length);
  storage->data = reinterpret_cast<const unsigned char*>(storage->buffer.data());
  return parse_storage(std::move(storage), origin);
}

Expected<SafetensorsFile> SafetensorsFile::open_header(const std::string& path) {
  struct stat st {};
  REATTN_ASSIGN_OR_RETURN(const int fd, open_regular_file(path, &st));
  Expected<SafetensorsFile> file = read_header(fd, static_cast<uint64_t>(st.st_size), path);
  ::close(fd);
  return file;
}

Expected<SafetensorsFile> SafetensorsFile::parse(std::string bytes, const std::string& origin) {
  auto storage = std::make_shared<Storage>();
  storage->origin = origin;
  storage->buffer = std::move(bytes);
  storage->data = reinterpret_cast<const unsigned char*>(storage->buffer.data());
  storage->size = storage->buffer.size();
  return parse_storage(std::move(storage), origin);
}

Expected<SafetensorsFile> SafetensorsFile::parse_borrowed(const std::string& bytes, const std::string& origin) {
  auto storage = std::make_shared<Storage>();
  storage->origin = origin;
  storage->data = reinterpret_cast<const unsigned char*>(bytes.data());
  storage->size = bytes.size();
  return parse_storage(std::move(storage), origin);
}

Expected<SafetensorsFile> SafetensorsFile::parse_shared(std::shared_ptr<const std::string> bytes,
                                                        const std::string& origin) {
  auto storage = std::make_shared<Storage>();
  storage->origin = origin;
  storage->data = reinterpret_cast<const unsigned char*>(bytes->data());
  storage->size = bytes->size();
  storage->shared = std::move(bytes);
  return parse_storage(std::move(storage), origin);
}

Expected<SafetensorsFile> SafetensorsFile::parse_storage(std::shared_ptr<Storage> storage,
                                                         const std::string& origin) {
  const auto fail = [&](const std::string& what) { return invalid_argument(origin + ": " + what); };
  const size_t size = storage->size;
  if (size < 8) {
    return fail(size == 0 ? "empty file" : "truncated: " + std::to_string(size) +
                                               " bytes, need at least 8 for the header length");
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | storage->data[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8) {
    return fail("header length " + std::to_string(header_len) + " exceeds " +
                (header_len > kMaxHeaderBytes ? "the 100 MiB limit"
                                              : "the file (" + std::to_string(size - 8) +
                                                    " bytes after the length)"));
  }
  const char* header_begin = reinterpret_cast<const char*>(storage->data + 8);
  // Where the data section starts (not read for a header-only storage).
  const unsigned char* data = storage->header_only ? nullptr : storage->data + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  if (const std::string why = json_shape_refusal(check_json_shape(header_begin, header_begin + header_len));
      !why.empty()) {
    return fail("header " + why);
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_len, nullptr,
                                   /*allow_exceptions=*/false);
  } catch (const std::exception& e) {  // e.g. bad_alloc; parse errors come back as discarded
    return fail(std::string("cannot parse header: ") + e.what());
  }
  if (header.is_discarded()) return fail("header is not valid JSON");
  if (!header.is_object()) return fail("header is not a JSON object");

  SafetensorsFile file;
  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = "tensor '" + capped(name) + "': ";
    if (!entry.is_object()) return fail(where + "entry is not a JSON object");
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(key)) return fail(where + "missing '" + key + "'");
    }
    auto dtype = parse_safetensors_dtype(entry["dtype"]);
    if (!dtype) return fail(where + dtype.status().message());

    const auto& shape_json = entry["shape"];
    if (!shape_json.is_array()) return fail(where + "'shape' is not an array");
    TensorView view;
    view.name = name;
    view.dtype = *dtype;
    // numel of the non-zero dims: with a zero dim the tensor is empty, but TensorView::numel()
    // still multiplies every dim, so the product must fit int64 either way.
    uint64_t numel = 1;
    bool empty = false;
    for (const auto& d : shape_json) {
      const auto dim = as_index(d);
      if (!dim) return fail(where + "shape " + json_excerpt(shape_json) + " has a negative or non-integer dim");
      view.shape.push_back(*dim);
      if (*dim == 0) {
        empty = true;
        continue;
      }
      if (numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / static_cast<uint64_t>(*dim)) {
        return fail(where + "shape " + json_excerpt(shape_json) + " overflows numel");
      }
      numel *= static_cast<uint64_t>(*dim);
    }
    if (empty) numel = 0;

    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !as_index(offsets[0]) || !as_index(offsets[1])) {
      return fail(where + "'data_offsets' must be [begin, end] of non-negative integers, got " +
                  json_excerpt(offsets));
    }
    const auto begin = static_cast<uint64_t>(*as_index(offsets[0]));
    const auto end = static_cast<uint64_t>(*as_index(offsets[1]));
    if (begin > end) return fail(where + "data_offsets begin " + std::to_string(begin) + " > end " + std::to_string(end));
    if (end > data_size) {
      return fail(where + "data_offsets end " + std::to_string(end) + " is past the data section (" +
                  std::to_string(data_size) + " bytes)");
    }
    // end <= data_size, so a numel whose byte count overflows cannot match anyway.
    const uint64_t elem = dtype_size(*dtype);
    if (numel > data_size / elem || end - begin != numel * elem) {
      return fail(where + "data_offsets span " + std::to_string(end - begin) + " bytes but shape " +
                  json_excerpt(shape_json) + " of " + dtype_name(*dtype) + " needs " +
                  (numel > data_size / elem ? "more than the file holds"
                                            : std::to_string(numel * elem) + " bytes"));
    }
    view.data = storage->header_only ? nullptr : data + begin;
    view.bytes = static_cast<size_t>(end - begin);
    file.offsets_[name] = 8 + header_len + begin;
    auto it = file.tensors_.emplace(name, std::move(view)).first;
    if (begin != end) ranges.push_back({begin, end, &it->first});
  }

  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      return fail("tensors '" + capped(*ranges[i - 1].name) + "' and '" + capped(*ranges[i].name) +
                  "' overlap in the data section");
    }
  }
  // Strict, as the reference implementation: the tensors tile the data section exactly.
  uint64_t covered = 0;
  for (const Range& r : ranges) {
    if (r.begin != covered) {
      return fail("bytes [" + std::to_string(covered) + ", " + std::to_string(r.begin) +
                  ") of the data section belong to no tensor");
    }
    covered = r.end;
  }
  if (covered != data_size) {
    return fail(std::to_string(data_size - covered) + " trailing bytes after the last tensor (the data section is " +
                std::to_string(data_size) + " bytes, the tensors end at " + std::to_string(covered) + ")");
  }
  file.storage_ = std::move(storage);
  return file;
}

uint64_t SafetensorsFile::offset_of(const TensorView& view) const {
  const auto it = offsets_.find(view.name);
  return it == offsets_.end() ? 0 : it->second;
}

Expected<TensorView> SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it != tensors_.end()) return it->second;
  std::string has;
  size_t listed = 0;
  for (const auto& [key, view] : tensors_) {
    if (listed == kMaxListedNames) {
      has += ", ... " + std::to_string(tensors_.size() - listed) + " more";
      break;
    }
    has += (listed++ == 0 ? "" : ", ") + key;
  }
  const std::string origin = storage_ ? storage_->origin : "<empty>";
  return not_found("tensor '" + name + "' not found in " + origin + " (it has: " +
                   (tensors_.empty() ? std::string("no tensors") : has) + ")");
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [key, view] : tensors_) out.push_back(key);
  return out;
}

std::string serialize_safetensors(const std::vector<TensorToWrite>& tensors) {
  std::vector<TensorBytes> views;
  views.reserve(tensors.size());
  for (const auto& t : tensors) {
    views.push_back({t.name, t.dtype_label ? t.dtype_label : dtype_name(t.dtype), t.shape, t.data.data(), t.data.size()});
  }
  return serialize_safetensors(views);
}

std::string safetensors_header(const std::vector<TensorBytes>& tensors) {
  // ordered_json keeps the given order in the header.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", t.dtype_label}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes}}};
    offset += t.bytes;
  }
  // replace: a name that is not UTF-8 must not throw.
  std::string json = header.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  // Pad to 8 bytes so the data section starts aligned, as the reference writer does.
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + json.size());
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((json.size() >> (8 * i)) & 0xff));
  return out + json;
}

std::string serialize_safetensors(const std::vector<TensorBytes>& tensors) {
  std::string out = safetensors_header(tensors);
  size_t data_bytes = 0;
  for (const auto& t : tensors) data_bytes += t.bytes;
  out.reserve(out.size() + data_bytes);
  for (const auto& t : tensors) {
    if (t.data != nullptr) {
      out.append(static_cast<const char*>(t.data), t.bytes);
    } else {
      out.append(t.bytes, '\0');  // the caller's to fill
    }
  }
  return out;
}

TensorToWrite make_tensor(const std::string& name, DType dtype, std::vector<int64_t> shape,
                          const std::vector<float>& values) {
  TensorToWrite t{name, dtype, std::move(shape), std::string(values.size() * dtype_size(dtype), '\0')};
  convert_from_f32(dtype, values.data(), values.size(), t.data.data());
  return t;
}

Status write_file(const std::string& path, const std::string& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return invalid_argument("cannot write '" + path + "': " + std::strerror(errno));
  const bool wrote = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int saved = errno;
  // fclose flushes, so its failure is a write failure too.
  if (std::fclose(f) != 0 || !wrote) {
    return invalid_argument("cannot write '" + path + "': " + std::strerror(wrote ? errno : saved));
  }
  return Status::ok();
}

}  // namespace reattn
