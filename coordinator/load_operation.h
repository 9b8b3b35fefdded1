// A bulk load (POST /v1/contexts/{id}/load) as a long-running operation: LoadKv begin, then
// slices of about server.load_slice_bytes of the file (whole chunks where the file allows),
// then commit; on failure or cancel one LoadKv abort puts the context back on every rank.
// The registry follows the slices (so capacity counts what is loaded) and is put back on
// rollback. Step loop thread only (LongOperation).
#pragma once

#include <string>

#include "common/config.h"
#include "coordinator/long_operation.h"

namespace reattn {

class LoadOperation final : public LongOperation {
 public:
  // `path`: the file's real path under server.load_root; `file_tokens` and `bytes_per_token`
  // (k and v of every layer, in the file's dtypes) from its header, read at request time.
  LoadOperation(const Config& config, ContextId context_id, std::string path, int64_t file_tokens,
                int64_t bytes_per_token);

  OperationKind kind() const override { return OperationKind::kLoad; }
  Status start(Registry& registry) override;
  std::optional<Operation> next_slice() override;
  Status on_slice_done(const Operation& slice, const OperationResult& result, Registry& registry) override;
  OperationProgress progress() const override;
  std::vector<Operation> rollback() override;
  void on_rolled_back(Registry& registry) override;

  int64_t slice_tokens() const { return slice_tokens_; }

 private:
  enum class Next { kBegin, kSlices, kCommit, kDone };

  ContextId context_id_;
  std::string path_;
  int64_t file_tokens_;
  int64_t bytes_per_token_;
  int64_t slice_tokens_;
  int64_t tokens_before_ = 0;
  int64_t tokens_done_ = 0;
  Next next_ = Next::kBegin;
};

}  // namespace reattn
