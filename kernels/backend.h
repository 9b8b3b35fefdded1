// The compute backend: memory where the KV cache and step workspaces live, and the
// operations of a step (score, attend, merge; pack gathers blocks into one message). The cpu backend is the multi-threaded
// reference; cuda runs the same operations on a GPU. Call only from the step loop's thread.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "common/config.h"
#include "kernels/params.h"

namespace reattn {

class Backend;

// A block of backend memory, released through the backend that made it.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend* owner, void* data, size_t bytes) : owner_(owner), data_(data), bytes_(bytes) {}
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }
  size_t bytes() const { return bytes_; }

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // The element type the KV cache is stored in.
  virtual DType storage_dtype() const = 0;
  // Whether backend memory is host memory (the cpu backend).
  virtual bool host_memory() const = 0;

  virtual Expected<Buffer> allocate(size_t bytes) = 0;
  virtual void release(void* data) = 0;
  virtual Status upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual Status download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual Status copy(void* dst, const void* src, size_t bytes) = 0;
  // Writes `count` pieces of one host buffer [bytes] to their places in backend memory, as
  // one transfer on a device (a decode step's token goes to its home block and the ring
  // without a copy call per KV head). Ordered like upload; `host_src` and `pieces` (host
  // memory) may be reused as soon as it returns.
  virtual Status upload_pieces(const void* host_src, size_t bytes, const UploadPiece* pieces, int64_t count) = 0;
  // Waits for all issued work.
  virtual Status synchronize() = 0;

  virtual Status score_chunks(const ScoreParams& p) = 0;
  virtual Status attend(const AttendParams& p) = 0;
  virtual Status merge_states(const MergeParams& p) = 0;
  // Ordered with the other operations (and the communicator's transfers) like a copy.
  virtual Status pack_blocks(const PackParams& p) = 0;
  // Span recall: position-agnostic scores of single tokens and the per-(row, head) local
  // token top-k (ScoreParams::first_token numbers the tokens).
  virtual Status score_tokens(const ScoreParams& p) = 0;
  // Ordered like pack_blocks.
  virtual Status copy_ranges(const CopyRangesParams& p) = 0;
  // Merges the ranks' candidate lists of one query and selects its recall set, in backend
  // memory (no host round trip per row on a device).
  virtual Status merge_select(const MergeSelectParams& p) = 0;
};

// Checks an upload_pieces list against its host buffer: no null destination, every piece
// inside [0, bytes).
Status check_upload_pieces(size_t bytes, const UploadPiece* pieces, int64_t count);

// Grows a buffer only when a larger size is asked for: the step's workspace does not
// allocate on the hot path once warm.
Status ensure_capacity(Backend& backend, Buffer& buffer, size_t bytes);

}  // namespace reattn
