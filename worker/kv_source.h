// Where appended K/V come from: a safetensors file or body, or the synthetic generator.
// A source is read per (layer, KV head, token range), straight into the KV cache's storage
// dtype, so each rank reads only the blocks it holds and converts each value at most once.
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "common/protocol.h"
#include "common/synthetic.h"
#include "common/tensor_checks.h"

namespace reattn {

class KvSource {
 public:
  virtual ~KvSource() = default;
  // Tokens this append adds.
  virtual int64_t tokens() const = 0;
  // K and V of tokens [offset, offset + count) of the append, [count, D] each in `dtype`.
  // Called from several threads at once: implementations keep no mutable state.
  virtual void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const = 0;
};

// A source that makes fp32 values (the synthetic generator, tests' references): each value is
// converted to the storage dtype once, here.
class Fp32KvSource : public KvSource {
 public:
  explicit Fp32KvSource(int head_dim) : head_dim_(head_dim) {}
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const final;
  // As read, in fp32: [count, D] each.
  virtual void read_f32(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const = 0;

 private:
  int head_dim_;
};

// `k` and `v` of a safetensors file, [layers, Hkv, tokens, D] each, F32/F16/BF16, whose
// shapes kv_tensors checked. Values are read as they are: the caller checks them
// (check_storable) once, where they arrive.
class SafetensorsKvSource final : public KvSource {
 public:
  SafetensorsKvSource(SafetensorsFile file, KvTensors tensors, const ModelConfig& model)
      : file_(std::move(file)), kv_(std::move(tensors)), kv_heads_(model.kv_heads), head_dim_(model.head_dim) {}
  // Parses and shape-checks the file's k and v.
  static Expected<SafetensorsKvSource> make(SafetensorsFile file, const ModelConfig& model);
  int64_t tokens() const override { return kv_.tokens; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const override;
  const KvTensors& tensors() const { return kv_; }

 private:
  SafetensorsFile file_;  // keeps the bytes behind kv_ alive
  KvTensors kv_;
  int kv_heads_ = 0;
  int head_dim_ = 0;
};

// `k` and `v` [layers, Hkv, tokens, D] of a safetensors file on disk, read with pread rather
// than through a mapping: a file cut short while it is being read gives a short read, kept as
// the source's problem (the values missing read as zeros), where reading a mapping past the
// file's end would end the process (SIGBUS). Each value range read is checked
// (check_storable against max_abs) as it arrives, so only the blocks a rank reads are checked.
class FileKvSource final : public KvSource {
 public:
  // Opens the file, reads its header (pread: SafetensorsFile::read_header) and checks it
  // against the model (kv_tensors).
  static Expected<std::unique_ptr<FileKvSource>> open(const std::string& path, const ModelConfig& model,
                                                      float max_abs);
  // Its size when it was opened.
  int64_t file_bytes() const { return bytes_; }
  // ok while the open file has its size and modification time of open(); else an error
  // naming a truncation or a modification (a file rewritten in place mid-load).
  Status unchanged() const;
  ~FileKvSource() override;
  FileKvSource(const FileKvSource&) = delete;
  FileKvSource& operator=(const FileKvSource&) = delete;
  int64_t tokens() const override { return kv_.tokens; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const override;
  // The first problem any read found (a short read, a value that cannot be stored), or ok.
  Status problem() const;
  // Asks the kernel to start reading tokens [first, first + count) of every layer and KV head
  // now (posix_fadvise WILLNEED), so a later read of them finds them in the page cache: a
  // load reads the next slice ahead while queries run between slices. Out-of-range parts are
  // skipped; advice the kernel refuses changes nothing.
  void read_ahead(int64_t first, int64_t count) const;
  // Time spent in pread so far, summed over the threads that read (milliseconds).
  double read_ms() const { return static_cast<double>(read_ns_.load()) / 1e6; }

 private:
  FileKvSource(int fd, const struct stat& st, SafetensorsFile header, KvTensors kv, const ModelConfig& model,
               float max_abs);
  void note(Status s) const;

  int fd_ = -1;
  int64_t bytes_ = 0;        // size and modification time at open()
  int64_t modified_ns_ = 0;
  SafetensorsFile header_;  // the views' shapes and dtypes; their bytes are never read
  KvTensors kv_;
  uint64_t k_at_ = 0;       // file offsets of k's and v's data
  uint64_t v_at_ = 0;
  int kv_heads_ = 0;
  int head_dim_ = 0;
  float max_abs_ = 0;
  mutable std::mutex mu_;   // reads run on several threads at once
  mutable Status problem_;
  mutable std::atomic<uint64_t> read_ns_{0};
};

// The k and v of a layer step ([Hkv, qlen, D] each in the step's dtype), for whichever layer
// is written.
class LayerStepKvSource final : public KvSource {
 public:
  LayerStepKvSource(const LayerStep& step, int head_dim) : step_(step), head_dim_(head_dim) {}
  int64_t tokens() const override { return step_.qlen; }
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const override;

 private:
  const LayerStep& step_;
  int head_dim_;
};

// Tokens [first_token, first_token + count) of a synthetic context.
class SyntheticKvSource final : public Fp32KvSource {
 public:
  SyntheticKvSource(SyntheticSpec spec, ModelConfig model, int64_t first_token, int64_t count)
      : Fp32KvSource(model.head_dim), spec_(std::move(spec)), model_(model), first_token_(first_token), count_(count) {}
  int64_t tokens() const override { return count_; }
  void read_f32(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const override;

 private:
  SyntheticSpec spec_;
  ModelConfig model_;
  int64_t first_token_;
  int64_t count_;
};

}  // namespace reattn
