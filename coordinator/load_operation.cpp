#include "coordinator/load_operation.h"

#include <algorithm>
#include <utility>

namespace reattn {

LoadOperation::LoadOperation(const Config& config, ContextId context_id, std::string path, int64_t file_tokens,
                             int64_t bytes_per_token)
    : context_id_(context_id),
      path_(std::move(path)),
      file_tokens_(file_tokens),
      bytes_per_token_(std::max<int64_t>(1, bytes_per_token)) {
  // About load_slice_bytes of the file per slice, in whole chunks when that is at least one.
  const int64_t chunk = config.reattention.chunk_tokens;
  const int64_t tokens = std::max<int64_t>(1, config.server.load_slice_bytes / bytes_per_token_);
  slice_tokens_ = tokens >= chunk ? tokens / chunk * chunk : tokens;
}

Status LoadOperation::start(Registry& registry) {
  const std::optional<ContextInfo> ctx = registry.find(context_id_);
  if (!ctx) return not_found("context " + std::to_string(context_id_) + " not found");
  REATTN_RETURN_IF_ERROR(registry.check_append(context_id_, file_tokens_));
  tokens_before_ = ctx->tokens;
  return Status::ok();
}

std::optional<Operation> LoadOperation::next_slice() {
  LoadKv op;
  op.context_id = context_id_;
  switch (next_) {
    case Next::kBegin:
      op.phase = LoadPhase::kBegin;
      op.path = path_;
      op.file_tokens = file_tokens_;
      op.context_tokens = tokens_before_;
      op.count = std::min(slice_tokens_, file_tokens_);  // the first slice's, for the ranks to read ahead
      return op;
    case Next::kSlices:
      op.phase = LoadPhase::kSlice;
      op.offset = tokens_done_;
      op.count = std::min(slice_tokens_, file_tokens_ - tokens_done_);
      return op;
    case Next::kCommit:
      op.phase = LoadPhase::kCommit;
      return op;
    case Next::kDone:
      break;
  }
  return std::nullopt;
}

Status LoadOperation::on_slice_done(const Operation& slice, const OperationResult& result, Registry& registry) {
  if (!result.status.is_ok()) return result.status;
  const LoadKv& op = std::get<LoadKv>(slice);
  switch (op.phase) {
    case LoadPhase::kBegin:
      next_ = Next::kSlices;
      break;
    case LoadPhase::kSlice:
      tokens_done_ += op.count;
      registry.set_tokens(context_id_, result.tokens);
      break;
    case LoadPhase::kCommit:
      next_ = Next::kDone;
      break;
    case LoadPhase::kAbort:
      break;
  }
  if (next_ == Next::kSlices && tokens_done_ == file_tokens_) next_ = Next::kCommit;
  return Status::ok();
}

OperationProgress LoadOperation::progress() const {
  return {tokens_done_, file_tokens_, tokens_done_ * bytes_per_token_};
}

std::vector<Operation> LoadOperation::rollback() {
  if (next_ == Next::kBegin) return {};  // nothing began anywhere
  LoadKv op;
  op.context_id = context_id_;
  op.phase = LoadPhase::kAbort;
  return {op};
}

void LoadOperation::on_rolled_back(Registry& registry) {
  if (registry.find(context_id_)) registry.set_tokens(context_id_, tokens_before_);
}

}  // namespace reattn
