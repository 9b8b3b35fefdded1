#include "coordinator/registry.h"

#include <algorithm>
#include <string>

#include "common/semantics.h"

namespace reattn {

int64_t ContextInfo::charged_tokens() const {
  int64_t longest = tokens;
  for (int64_t n : layer_tokens) longest = std::max(longest, n);
  return longest;
}

Registry::Registry(const Config& config, int world) : config_(config), world_(world) {}

std::optional<ContextInfo> Registry::find(ContextId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const ContextInfo& c : contexts_) {
    if (c.id == id) return c;
  }
  return std::nullopt;
}

std::vector<ContextInfo> Registry::list() const {
  std::lock_guard<std::mutex> lock(mu_);
  return contexts_;
}

size_t Registry::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return contexts_.size();
}

std::vector<int64_t> Registry::tokens_per_rank() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tokens_per_rank_locked();
}

std::vector<int64_t> Registry::tokens_per_rank_locked() const {
  std::vector<int64_t> out(world_, 0);
  for (const ContextInfo& c : contexts_) {
    const int64_t n = c.charged_tokens();
    for (int r = 0; r < world_; ++r) out[r] += tokens_charged(n, c.owner_rank, r, world_, config_.reattention);
  }
  return out;
}

Status Registry::check_exists(ContextId id) const {
  if (!find(id)) return not_found("context " + std::to_string(id) + " not found");
  return Status::ok();
}

Status Registry::check_append(ContextId id, int64_t tokens) const {
  const std::optional<ContextInfo> ctx = find(id);
  if (!ctx) return not_found("context " + std::to_string(id) + " not found");
  REATTN_RETURN_IF_ERROR(check_layers_level(ctx->layer_tokens));
  std::lock_guard<std::mutex> lock(mu_);
  // Larger than any context could hold also keeps tokens + n from overflowing.
  if (tokens > config_.capacity.tokens_per_rank * static_cast<int64_t>(world_)) {
    return check_capacity(tokens_per_rank_locked(), 0, tokens, ctx->owner_rank, config_.reattention,
                          config_.capacity.tokens_per_rank);
  }
  return check_growth_locked(*ctx, ctx->charged_tokens() + tokens);
}

Status Registry::check_growth_locked(const ContextInfo& ctx, int64_t charged_after) const {
  return check_capacity(tokens_per_rank_locked(), ctx.charged_tokens(), charged_after, ctx.owner_rank,
                        config_.reattention, config_.capacity.tokens_per_rank);
}

Status Registry::check_query(ContextId id, int64_t qlen, QueryMode mode, int layer) const {
  const std::optional<ContextInfo> ctx = find(id);
  if (!ctx) return not_found("context " + std::to_string(id) + " not found");
  const int64_t n = ctx->layer_length(layer);
  const Status s = validate_query(n, qlen, mode, config_.reattention);
  if (!s.is_ok()) {
    return invalid_argument(s.message() + " (context " + std::to_string(id) + " holds " + std::to_string(n) +
                            " tokens" + (ctx->layer_tokens.empty() ? "" : " at layer " + std::to_string(layer)) + ")");
  }
  return Status::ok();
}

Status Registry::check_layer_step(ContextId id, int layer, int64_t qlen) const {
  const std::optional<ContextInfo> ctx = find(id);
  if (!ctx) return not_found("context " + std::to_string(id) + " not found");
  REATTN_RETURN_IF_ERROR(check_qlen(qlen, QueryMode::kTail, config_.reattention));
  REATTN_RETURN_IF_ERROR(reattn::check_layer_step(ctx->layer_tokens, layer, qlen));
  std::lock_guard<std::mutex> lock(mu_);
  return check_growth_locked(*ctx, std::max(ctx->charged_tokens(), ctx->layer_tokens[layer] + qlen));
}

Expected<ContextInfo> Registry::plan_create(ContextId id) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const ContextInfo& c : contexts_) {
    if (id != 0 && c.id == id) return invalid_argument("context " + std::to_string(id) + " already exists");
  }
  if (static_cast<int64_t>(contexts_.size()) >= config_.capacity.max_contexts) {
    return Status(ErrorCode::kCapacity, "the service holds " + std::to_string(contexts_.size()) +
                                            " contexts, the most capacity.max_contexts allows");
  }
  std::vector<int64_t> owned(world_, 0);
  const std::vector<int64_t> tokens = tokens_per_rank_locked();
  for (const ContextInfo& c : contexts_) ++owned[c.owner_rank];
  int best = 0;
  for (int r = 1; r < world_; ++r) {
    if (owned[r] < owned[best] || (owned[r] == owned[best] && tokens[r] < tokens[best])) best = r;
  }
  return ContextInfo{id != 0 ? id : next_id_++, best, 0};
}

ContextId Registry::reserve_id() {
  std::lock_guard<std::mutex> lock(mu_);
  return next_id_++;
}

void Registry::insert(const ContextInfo& given) {
  ContextInfo info = given;
  if (info.layer_tokens.empty()) info.layer_tokens.assign(config_.model.layers, info.tokens);
  std::lock_guard<std::mutex> lock(mu_);
  next_id_ = std::max(next_id_, info.id + 1);
  const auto at = std::lower_bound(contexts_.begin(), contexts_.end(), info.id,
                                   [](const ContextInfo& c, ContextId id) { return c.id < id; });
  contexts_.insert(at, info);
}

void Registry::erase(ContextId id) {
  std::lock_guard<std::mutex> lock(mu_);
  contexts_.erase(std::remove_if(contexts_.begin(), contexts_.end(), [id](const ContextInfo& c) { return c.id == id; }),
                  contexts_.end());
}

void Registry::set_tokens(ContextId id, int64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  for (ContextInfo& c : contexts_) {
    if (c.id != id) continue;
    c.tokens = tokens;
    c.layer_tokens.assign(c.layer_tokens.size(), tokens);
  }
}

void Registry::set_layer_tokens(ContextId id, int layer, int64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  for (ContextInfo& c : contexts_) {
    if (c.id != id) continue;
    c.layer_tokens[layer] = tokens;
    c.tokens = *std::min_element(c.layer_tokens.begin(), c.layer_tokens.end());
  }
}

}  // namespace reattn
