// Reading and writing the safetensors format (8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw data).
// Every malformed input is an InvalidArgument Status naming what is wrong; nothing here
// crashes on hostile bytes.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace reattn {

// A view of one tensor inside a parsed file; `data` points into the owning SafetensorsFile.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const unsigned char* data = nullptr;
  size_t bytes = 0;

  int64_t numel() const;
  // Copies the tensor out as fp32, converting from its dtype.
  std::vector<float> to_f32() const;
};

// A parsed safetensors blob. Owns its bytes (a read-only file mapping, a copied or shared
// buffer), except after parse_borrowed.
class SafetensorsFile {
 public:
  // Maps the file read-only. Errors: missing/unreadable file, truncated header, bad JSON,
  // unknown dtype, offsets outside the data, size != numel * dtype size, overlapping tensors.
  static Expected<SafetensorsFile> open(const std::string& path);
  // The header alone of the open file `fd` (`size`: its size, from fstat), read with pread:
  // the data section is neither read nor mapped, so a file cut short meanwhile cannot fault
  // the process. Shapes, dtypes and offset_of are usable; the views' `data` is null. The
  // same checks as open() (offsets within `size`, tiling, dtypes).
  static Expected<SafetensorsFile> read_header(int fd, uint64_t size, const std::string& origin);
  // read_header of the file at `path` (opened and closed here).
  static Expected<SafetensorsFile> open_header(const std::string& path);
  // Parses a copy of an in-memory blob (e.g. an HTTP body).
  static Expected<SafetensorsFile> parse(std::string bytes, const std::string& origin = "<body>");
  // Parses bytes it does not own or copy: the caller keeps `bytes` alive and unchanged for as
  // long as the file or any of its views is used (a request body parsed and copied out at once).
  static Expected<SafetensorsFile> parse_borrowed(const std::string& bytes, const std::string& origin);
  // Parses bytes shared with the caller, without copying them (the file keeps them alive).
  static Expected<SafetensorsFile> parse_shared(std::shared_ptr<const std::string> bytes,
                                                const std::string& origin = "<body>");

  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  // Where a view of this file's tensor begins, in bytes from the start of the blob (the file
  // offset of an open() file's tensor).
  uint64_t offset_of(const TensorView& view) const;
  // NotFound naming the tensor and the ones the file has.
  Expected<TensorView> get(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  struct Storage;
  static Expected<SafetensorsFile> parse_storage(std::shared_ptr<Storage> storage, const std::string& origin);
  std::shared_ptr<Storage> storage_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, uint64_t> offsets_;  // each tensor's first byte, from the start of the blob
};

// Opens `path` read-only (close-on-exec): the descriptor, with *st its fstat; anything but a
// regular file is refused, naming the path.
Expected<int> open_regular_file(const std::string& path, struct stat* st);

// One tensor to write: `data` holds numel * dtype_size(dtype) bytes.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string data;
  // Written in place of dtype's name: a type only written here, never read (e.g. "I64" for
  // the chunk ids of a response).
  const char* dtype_label = nullptr;
};

// A tensor to write whose bytes the caller keeps (an answer's `out`, written without a copy of
// its own before the one into the blob).
struct TensorBytes {
  std::string name;
  const char* dtype_label = nullptr;  // "F32", "I64", ...
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t bytes = 0;
};

// A file's first bytes: the 8-byte header length and the JSON header (padded to 8 bytes) for
// tensors stored back to back after it, in the given order (their `data` is not read: a
// writer that streams the bytes itself, e.g. a snapshot file).
std::string safetensors_header(const std::vector<TensorBytes>& tensors);

// Serialises tensors (in the given order) to a safetensors blob.
std::string serialize_safetensors(const std::vector<TensorToWrite>& tensors);
// The same from borrowed bytes: each tensor's bytes are copied once, into the blob; a tensor
// whose `data` is null is left zeroed there, for the caller to write (e.g. converted).
std::string serialize_safetensors(const std::vector<TensorBytes>& tensors);
// Convenience: an fp32 vector converted to `dtype`.
TensorToWrite make_tensor(const std::string& name, DType dtype, std::vector<int64_t> shape,
                          const std::vector<float>& values);
Status write_file(const std::string& path, const std::string& bytes);

}  // namespace reattn
