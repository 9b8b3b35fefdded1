#include "worker/kv_store.h"

#include <algorithm>
#include <string>

#include "common/semantics.h"

namespace reattn {

KvStore::KvStore(Backend& backend, const Config& config, int rank, int world)
    : backend_(backend), config_(config), rank_(rank), world_(world) {}

size_t KvStore::block_bytes() const {
  const ModelConfig& m = config_.model;
  return static_cast<size_t>(m.kv_heads) * config_.reattention.chunk_tokens * m.head_dim *
         dtype_size(backend_.storage_dtype());
}

Status KvStore::create(ContextId id, int owner_rank, const std::vector<int>& resident_layers) {
  if (contexts_.count(id)) return invalid_argument("context " + std::to_string(id) + " already exists");
  if (owner_rank < 0 || owner_rank >= world_) {
    return invalid_argument("owner_rank " + std::to_string(owner_rank) + " is outside [0, " + std::to_string(world_) + ")");
  }
  const ModelConfig& m = config_.model;
  ContextShard ctx;
  ctx.id = id;
  ctx.owner_rank = owner_rank;
  ctx.resident.assign(m.layers, resident_layers.empty());
  for (int layer : resident_layers) {
    if (layer < 0 || layer >= m.layers) {
      return invalid_argument("layer " + std::to_string(layer) + " is outside [0, " + std::to_string(m.layers) + ")");
    }
    ctx.resident[layer] = true;
  }
  ctx.layers.resize(m.layers);
  if (owner_rank == rank_) {
    const size_t esize = dtype_size(backend_.storage_dtype());
    const size_t sink_bytes = static_cast<size_t>(m.kv_heads) * config_.reattention.sink_tokens * m.head_dim * esize;
    const size_t ring_bytes = ring_blocks(config_.reattention) * block_bytes();
    for (int layer = 0; layer < m.layers; ++layer) {
      if (!ctx.resident[layer]) continue;
      LayerShard& shard = ctx.layers[layer];
      REATTN_ASSIGN_OR_RETURN(shard.sink_k, backend_.allocate(sink_bytes));
      REATTN_ASSIGN_OR_RETURN(shard.sink_v, backend_.allocate(sink_bytes));
      REATTN_ASSIGN_OR_RETURN(shard.ring_k, backend_.allocate(ring_bytes));
      REATTN_ASSIGN_OR_RETURN(shard.ring_v, backend_.allocate(ring_bytes));
    }
  }
  contexts_.emplace(id, std::move(ctx));
  return Status::ok();
}

Status KvStore::erase(ContextId id) {
  if (contexts_.erase(id) == 0) return not_found("context " + std::to_string(id) + " not found");
  return Status::ok();
}

const ContextShard* KvStore::find(ContextId id) const {
  const auto it = contexts_.find(id);
  return it == contexts_.end() ? nullptr : &it->second;
}

int64_t KvStore::tokens_charged_to(int rank) const {
  int64_t total = 0;
  for (const auto& [id, ctx] : contexts_) {
    total += tokens_charged(ctx.tokens, ctx.owner_rank, rank, world_, config_.reattention);
  }
  return total;
}

const void* KvStore::home_block(const LayerShard& shard, bool values, int64_t block) const {
  const int64_t slot = home_slot(block, world_);
  const auto& pages = values ? shard.v_pages : shard.k_pages;
  return pages[slot / kBlocksPerPage].as<char>() + (slot % kBlocksPerPage) * block_bytes();
}

const void* KvStore::ring_block(const LayerShard& shard, bool values, int64_t block) const {
  const Buffer& ring = values ? shard.ring_v : shard.ring_k;
  return ring.as<char>() + (block % ring_blocks(config_.reattention)) * block_bytes();
}

Status KvStore::ensure_pages(LayerShard& shard, int64_t slots) {
  const size_t pages = static_cast<size_t>((slots + kBlocksPerPage - 1) / kBlocksPerPage);
  if (shard.k_pages.size() >= pages) return Status::ok();
  while (shard.k_pages.size() < pages) {
    REATTN_ASSIGN_OR_RETURN(Buffer k, backend_.allocate(kBlocksPerPage * block_bytes()));
    REATTN_ASSIGN_OR_RETURN(Buffer v, backend_.allocate(kBlocksPerPage * block_bytes()));
    shard.k_pages.push_back(std::move(k));
    shard.v_pages.push_back(std::move(v));
  }
  std::vector<const void*> k_ptrs, v_ptrs;
  for (size_t p = 0; p < pages; ++p) {
    k_ptrs.push_back(shard.k_pages[p].data());
    v_ptrs.push_back(shard.v_pages[p].data());
  }
  const size_t table_bytes = pages * sizeof(void*);
  REATTN_ASSIGN_OR_RETURN(shard.k_page_table, backend_.allocate(table_bytes));
  REATTN_ASSIGN_OR_RETURN(shard.v_page_table, backend_.allocate(table_bytes));
  REATTN_RETURN_IF_ERROR(backend_.upload(shard.k_page_table.data(), k_ptrs.data(), table_bytes));
  return backend_.upload(shard.v_page_table.data(), v_ptrs.data(), table_bytes);
}

// Writes tokens [begin, end) (absolute, within one block or the sinks) of one layer to every
// place this rank keeps them. n0 is the context's length before the append.
Status KvStore::write_block_range(LayerShard& shard, ContextShard& ctx, const KvSource& source, int layer,
                                  int64_t n0, int64_t begin, int64_t end) {
  const ModelConfig& m = config_.model;
  const ReattentionConfig& rc = config_.reattention;
  const DType dtype = backend_.storage_dtype();
  const size_t esize = dtype_size(dtype);
  const int64_t count = end - begin;
  std::vector<float> k(count * m.head_dim), v(count * m.head_dim);
  std::vector<char> k_store(k.size() * esize), v_store(v.size() * esize);

  struct Target {
    char* k;
    char* v;
    int64_t head_stride_tokens;  // tokens between KV heads at the destination
    int64_t first_token;         // token index of the destination's row 0
  };
  std::vector<Target> targets;
  if (begin < rc.sink_tokens) {
    targets.push_back({shard.sink_k.as<char>(), shard.sink_v.as<char>(), rc.sink_tokens, 0});
  } else {
    const int64_t block = (begin - rc.sink_tokens) / rc.chunk_tokens;
    const int64_t block_first = rc.sink_tokens + block * rc.chunk_tokens;
    if (home_rank(block, world_) == rank_) {
      REATTN_RETURN_IF_ERROR(ensure_pages(shard, home_slot(block, world_) + 1));
      targets.push_back({const_cast<char*>(static_cast<const char*>(home_block(shard, false, block))),
                         const_cast<char*>(static_cast<const char*>(home_block(shard, true, block))),
                         rc.chunk_tokens, block_first});
    }
    if (ctx.owner_rank == rank_) {
      targets.push_back({const_cast<char*>(static_cast<const char*>(ring_block(shard, false, block))),
                         const_cast<char*>(static_cast<const char*>(ring_block(shard, true, block))),
                         rc.chunk_tokens, block_first});
    }
  }
  if (targets.empty()) return Status::ok();
  for (int g = 0; g < m.kv_heads; ++g) {
    source.read(layer, g, begin - n0, count, k.data(), v.data());
    convert_from_f32(dtype, k.data(), k.size(), k_store.data());
    convert_from_f32(dtype, v.data(), v.size(), v_store.data());
    for (const Target& t : targets) {
      const size_t offset = ((g * t.head_stride_tokens) + (begin - t.first_token)) * m.head_dim * esize;
      REATTN_RETURN_IF_ERROR(backend_.upload(t.k + offset, k_store.data(), k_store.size()));
      REATTN_RETURN_IF_ERROR(backend_.upload(t.v + offset, v_store.data(), v_store.size()));
    }
  }
  return Status::ok();
}

Status KvStore::append(ContextId id, const KvSource& source) {
  auto it = contexts_.find(id);
  if (it == contexts_.end()) return not_found("context " + std::to_string(id) + " not found");
  ContextShard& ctx = it->second;
  const ReattentionConfig& rc = config_.reattention;
  const int64_t n0 = ctx.tokens;
  const int64_t n1 = n0 + source.tokens();
  for (int r = 0; r < world_; ++r) {
    const int64_t after = tokens_charged_to(r) - tokens_charged(n0, ctx.owner_rank, r, world_, rc) +
                          tokens_charged(n1, ctx.owner_rank, r, world_, rc);
    if (after > config_.capacity.tokens_per_rank) {
      return Status(ErrorCode::kCapacity,
                    "appending " + std::to_string(source.tokens()) + " tokens would put " + std::to_string(after) +
                        " tokens on rank " + std::to_string(r) + ", above capacity.tokens_per_rank " +
                        std::to_string(config_.capacity.tokens_per_rank));
    }
  }
  // Blocks that end below this floor are out of the owner's ring by the end of the append.
  const int64_t last_block = n1 > rc.sink_tokens ? (n1 - 1 - rc.sink_tokens) / rc.chunk_tokens : 0;
  const int64_t ring_floor = rc.sink_tokens + std::max<int64_t>(0, last_block - ring_blocks(rc) + 1) * rc.chunk_tokens;
  for (int layer = 0; layer < config_.model.layers; ++layer) {
    if (!ctx.resident[layer]) continue;
    LayerShard& shard = ctx.layers[layer];
    int64_t t = n0;
    while (t < n1) {
      int64_t end;
      if (t < rc.sink_tokens) {
        end = std::min(n1, rc.sink_tokens);
        if (ctx.owner_rank != rank_) {
          t = end;
          continue;
        }
      } else {
        const int64_t block = (t - rc.sink_tokens) / rc.chunk_tokens;
        end = std::min(n1, rc.sink_tokens + (block + 1) * rc.chunk_tokens);
        const bool home = home_rank(block, world_) == rank_;
        const bool in_ring = ctx.owner_rank == rank_ && end > ring_floor;
        if (!home && !in_ring) {
          t = end;
          continue;
        }
      }
      REATTN_RETURN_IF_ERROR(write_block_range(shard, ctx, source, layer, n0, t, end));
      t = end;
    }
  }
  ctx.tokens = n1;
  return Status::ok();
}

}  // namespace reattn
