// The coordinator's table of contexts: id, owning rank, length. It mirrors what the ranks'
// KV stores hold and answers, without asking the ranks, whether a request can go ahead:
// unknown context (NotFound), capacity (Capacity, by check_capacity, the rule KvStore applies),
// a tail query longer than the context (InvalidArgument).
// Thread-safety: every method is safe from any thread; the mutators are called only from the
// step loop, after the ranks have applied the operation, so readers see committed state.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/protocol.h"
#include "coordinator/operations.h"

namespace reattn {

struct ContextInfo {
  ContextId id = 0;
  int owner_rank = 0;
  int64_t tokens = 0;                 // what every layer has reached (the shortest layer)
  std::vector<int64_t> layer_tokens = {};  // [layers]; they differ only while a forward pass is under way

  int64_t layer_length(int layer) const { return layer_tokens.empty() ? tokens : layer_tokens[layer]; }
  // What capacity charges: the longest layer.
  int64_t charged_tokens() const;
};

class Registry {
 public:
  Registry(const Config& config, int world);

  std::optional<ContextInfo> find(ContextId id) const;
  std::vector<ContextInfo> list() const;  // by id
  size_t size() const;
  // KV tokens charged to each rank, [world].
  std::vector<int64_t> tokens_per_rank() const;
  int world() const { return world_; }
  // The long-running operations; a context with an unfinished one is busy (check_not_busy).
  OperationTable& operations() { return operations_; }
  const OperationTable& operations() const { return operations_; }

  // NotFound for an unknown context.
  Status check_exists(ContextId id) const;
  // NotFound, or Capacity when appending `tokens` would put any rank over
  // capacity.tokens_per_rank.
  Status check_append(ContextId id, int64_t tokens) const;
  // NotFound, or InvalidArgument when the query does not fit the context's layer as it is now.
  Status check_query(ContextId id, int64_t qlen, QueryMode mode, int layer = 0) const;
  // NotFound, OutOfOrder (check_layer_step), Capacity, or InvalidArgument (qlen) for a layer
  // step of `qlen` tokens at `layer`.
  Status check_layer_step(ContextId id, int layer, int64_t qlen) const;

  // Step loop only. The id and owner of the next context: owners balanced by fewest
  // contexts, then fewest tokens, then the lowest rank. Capacity when max_contexts are held.
  // `id` non-zero: that id (a context restored at start-up keeps its own), InvalidArgument
  // when it is held.
  Expected<ContextInfo> plan_create(ContextId id = 0);
  // An id no other context will get, for a context an operation makes later (a restore
  // answers with its id at once): plan_create(id) then uses it.
  ContextId reserve_id();
  // `info.layer_tokens` empty: every layer at info.tokens. Later ids are above info.id.
  void insert(const ContextInfo& info);
  void erase(ContextId id);
  // Every layer at `tokens` (after an append to all layers).
  void set_tokens(ContextId id, int64_t tokens);
  // One layer at `tokens` (after a layer step).
  void set_layer_tokens(ContextId id, int layer, int64_t tokens);

 private:
  Status check_growth_locked(const ContextInfo& ctx, int64_t charged_after) const;
  std::vector<int64_t> tokens_per_rank_locked() const;

  const Config config_;
  const int world_;
  mutable std::mutex mu_;
  std::vector<ContextInfo> contexts_;  // by id, ascending
  ContextId next_id_ = 1;
  OperationTable operations_;
};

}  // namespace reattn
