#include "worker/kv_store.h"

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "common/semantics.h"

namespace reattn {
namespace {

// Runs fn(i) for i in [0, count) on the hardware threads (KvSource::read is const and
// keeps no state, so sources are read concurrently). Bulk loads of millions of tokens spend
// their time generating and converting values; this spreads that over the cores.
template <typename Fn>
void parallel_for(int64_t count, Fn fn) {
  const int64_t threads = std::min<int64_t>(count, std::max(1u, std::thread::hardware_concurrency()));
  if (threads <= 1) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  auto work = [&]() {
    for (int64_t i = next++; i < count; i = next++) fn(i);
  };
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& th : pool) th.join();
}

// Full home blocks written by one upload per K and V at most (bounds the host staging).
constexpr int64_t kBatchBlocks = 64;

// Ranges of fewer values than this (a decode step's token: Hkv x D) are read on the calling
// thread: starting threads would cost more than the conversion.
constexpr int64_t kParallelValues = 1 << 16;

// fn(g) for every KV head g of a range of `count` tokens: in parallel when the range is large.
template <typename Fn>
void for_each_head(const ModelConfig& m, int64_t count, Fn fn) {
  if (count * m.kv_heads * m.head_dim < kParallelValues) {
    for (int64_t g = 0; g < m.kv_heads; ++g) fn(g);
  } else {
    parallel_for(m.kv_heads, fn);
  }
}

// Writes whole home blocks first_block, first_block + world, ... (`blocks` of them, in
// consecutive slots of one page starting at k_dst / v_dst), read straight into the storage
// dtype: in place for host memory, else staged and uploaded once for K and once for V.
Status write_home_blocks(Backend& backend, const ModelConfig& m, const ReattentionConfig& rc, int world,
                         size_t block_bytes, void* k_dst, void* v_dst, const KvSource& source, int layer, int64_t n0,
                         int64_t first_block, int64_t blocks) {
  const DType dtype = backend.storage_dtype();
  const size_t head_bytes = static_cast<size_t>(rc.chunk_tokens) * m.head_dim * dtype_size(dtype);
  const bool in_place = backend.host_memory();
  std::vector<char> k_store(in_place ? 0 : blocks * block_bytes), v_store(k_store.size());
  char* k_out = in_place ? static_cast<char*>(k_dst) : k_store.data();
  char* v_out = in_place ? static_cast<char*>(v_dst) : v_store.data();
  parallel_for(blocks * m.kv_heads, [&](int64_t item) {
    const int64_t b = item / m.kv_heads;
    const int g = static_cast<int>(item % m.kv_heads);
    const int64_t first_token = rc.sink_tokens + (first_block + b * world) * rc.chunk_tokens;
    const size_t offset = (static_cast<size_t>(b) * m.kv_heads + g) * head_bytes;
    source.read(layer, g, first_token - n0, rc.chunk_tokens, dtype, k_out + offset, v_out + offset);
  });
  if (in_place) return Status::ok();
  REATTN_RETURN_IF_ERROR(backend.upload(k_dst, k_store.data(), k_store.size()));
  return backend.upload(v_dst, v_store.data(), v_store.size());
}

}  // namespace

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
  ctx.layer_tokens.assign(m.layers, 0);
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
  return upload_page_tables(shard);
}

Status KvStore::upload_page_tables(LayerShard& shard) {
  const size_t pages = shard.k_pages.size();
  std::vector<const void*> k_ptrs, v_ptrs;
  for (size_t p = 0; p < pages; ++p) {
    k_ptrs.push_back(shard.k_pages[p].data());
    v_ptrs.push_back(shard.v_pages[p].data());
  }
  if (pages == 0) {
    shard.k_page_table = Buffer();
    shard.v_page_table = Buffer();
    return Status::ok();
  }
  const size_t table_bytes = pages * sizeof(void*);
  REATTN_ASSIGN_OR_RETURN(shard.k_page_table, backend_.allocate(table_bytes));
  REATTN_ASSIGN_OR_RETURN(shard.v_page_table, backend_.allocate(table_bytes));
  REATTN_RETURN_IF_ERROR(backend_.upload(shard.k_page_table.data(), k_ptrs.data(), table_bytes));
  return backend_.upload(shard.v_page_table.data(), v_ptrs.data(), table_bytes);
}

Expected<KvCheckpoint> KvStore::checkpoint(ContextId id) const {
  const ContextShard* ctx = find(id);
  if (!ctx) return not_found("context " + std::to_string(id) + " not found");
  const ReattentionConfig& rc = config_.reattention;
  KvCheckpoint cp;
  cp.id = id;
  cp.tokens = ctx->tokens;
  cp.layer_tokens = ctx->layer_tokens;
  const bool owner = ctx->owner_rank == rank_;
  for (size_t layer = 0; layer < ctx->layers.size(); ++layer) {
    const LayerShard& shard = ctx->layers[layer];
    cp.pages.push_back(shard.k_pages.size());
    // The grid blocks the ring holds now: the latest ring_blocks of those written.
    const int64_t n = ctx->layer_tokens[layer];
    const int64_t written = n > rc.sink_tokens ? (n - rc.sink_tokens + rc.chunk_tokens - 1) / rc.chunk_tokens : 0;
    const int64_t first = std::max<int64_t>(0, written - ring_blocks(rc));
    const bool saved = owner && shard.ring_k.data() && written > 0;
    cp.ring_first.push_back(first);
    cp.ring_k.emplace_back(saved ? (written - first) * block_bytes() : 0);
    cp.ring_v.emplace_back(cp.ring_k.back().size());
    for (int64_t b = first; saved && b < written; ++b) {
      const size_t at = (b - first) * block_bytes();
      REATTN_RETURN_IF_ERROR(backend_.download(cp.ring_k.back().data() + at, ring_block(shard, false, b), block_bytes()));
      REATTN_RETURN_IF_ERROR(backend_.download(cp.ring_v.back().data() + at, ring_block(shard, true, b), block_bytes()));
    }
  }
  return cp;
}

Status KvStore::restore(const KvCheckpoint& cp) {
  auto it = contexts_.find(cp.id);
  if (it == contexts_.end()) return not_found("context " + std::to_string(cp.id) + " not found");
  ContextShard& ctx = it->second;
  if (cp.layer_tokens.size() != ctx.layers.size() || cp.pages.size() != ctx.layers.size()) {
    return internal_error("checkpoint of context " + std::to_string(cp.id) + " does not match its layers");
  }
  for (size_t layer = 0; layer < ctx.layers.size(); ++layer) {
    LayerShard& shard = ctx.layers[layer];
    const int64_t saved = static_cast<int64_t>(cp.ring_k[layer].size() / block_bytes());
    for (int64_t i = 0; i < saved; ++i) {
      const int64_t b = cp.ring_first[layer] + i;
      REATTN_RETURN_IF_ERROR(backend_.upload(const_cast<void*>(ring_block(shard, false, b)),
                                             cp.ring_k[layer].data() + i * block_bytes(), block_bytes()));
      REATTN_RETURN_IF_ERROR(backend_.upload(const_cast<void*>(ring_block(shard, true, b)),
                                             cp.ring_v[layer].data() + i * block_bytes(), block_bytes()));
    }
    if (shard.k_pages.size() > cp.pages[layer]) {
      shard.k_pages.resize(cp.pages[layer]);
      shard.v_pages.resize(cp.pages[layer]);
      REATTN_RETURN_IF_ERROR(upload_page_tables(shard));
    }
  }
  ctx.layer_tokens = cp.layer_tokens;
  ctx.tokens = cp.tokens;
  return Status::ok();
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
  const size_t head_elems = static_cast<size_t>(count) * m.head_dim;

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
  // Head g's rows [begin, end) of a target: contiguous, count x D.
  const auto head_at = [&](const Target& t, bool values, int64_t g) {
    return (values ? t.v : t.k) + ((g * t.head_stride_tokens) + (begin - t.first_token)) * m.head_dim * esize;
  };
  if (backend_.host_memory()) {
    // Read straight into the first place, then copy to the others (home page and ring).
    const Target& first = targets[0];
    for_each_head(m, count, [&](int64_t g) {
      source.read(layer, static_cast<int>(g), begin - n0, count, dtype, head_at(first, false, g), head_at(first, true, g));
    });
    for (size_t i = 1; i < targets.size(); ++i) {
      for (int64_t g = 0; g < m.kv_heads; ++g) {
        REATTN_RETURN_IF_ERROR(backend_.copy(head_at(targets[i], false, g), head_at(first, false, g), head_elems * esize));
        REATTN_RETURN_IF_ERROR(backend_.copy(head_at(targets[i], true, g), head_at(first, true, g), head_elems * esize));
      }
    }
    return Status::ok();
  }
  // K [Hkv][count][D] then V, in storage dtype, staged on the host and written to every
  // place by one upload_pieces (a decode step's token: one transfer, not one per head).
  const int64_t head_bytes = static_cast<int64_t>(head_elems * esize);
  const int64_t all_heads = m.kv_heads * head_bytes;
  std::vector<char> staged(2 * all_heads);
  for_each_head(m, count, [&](int64_t g) {
    source.read(layer, static_cast<int>(g), begin - n0, count, dtype, staged.data() + g * head_bytes,
                staged.data() + all_heads + g * head_bytes);
  });
  std::vector<UploadPiece> pieces;
  for (const Target& t : targets) {
    if (begin == t.first_token && count == t.head_stride_tokens) {
      // The range covers whole rows of every head: one contiguous piece each for K and V.
      pieces.push_back({t.k, 0, all_heads});
      pieces.push_back({t.v, all_heads, all_heads});
      continue;
    }
    for (int64_t g = 0; g < m.kv_heads; ++g) {
      pieces.push_back({head_at(t, false, g), g * head_bytes, head_bytes});
      pieces.push_back({head_at(t, true, g), all_heads + g * head_bytes, head_bytes});
    }
  }
  return backend_.upload_pieces(staged.data(), staged.size(), pieces.data(), static_cast<int64_t>(pieces.size()));
}

Status KvStore::append(ContextId id, const KvSource& source, int only_layer, int64_t series_end) {
  auto it = contexts_.find(id);
  if (it == contexts_.end()) return not_found("context " + std::to_string(id) + " not found");
  ContextShard& ctx = it->second;
  const ReattentionConfig& rc = config_.reattention;
  const int layers = config_.model.layers;
  std::vector<int> targets;
  if (only_layer < 0) {
    REATTN_RETURN_IF_ERROR(check_layers_level(ctx.layer_tokens));
    for (int layer = 0; layer < layers; ++layer) targets.push_back(layer);
  } else if (only_layer >= layers || !ctx.resident[only_layer]) {
    return invalid_argument("layer " + std::to_string(only_layer) + " is not held");
  } else {
    targets.push_back(only_layer);
  }
  // Capacity is charged once per token, by the longest layer.
  int64_t charged_after = ctx.tokens;
  for (int layer : targets) charged_after = std::max(charged_after, ctx.layer_tokens[layer] + source.tokens());
  std::vector<int64_t> charged(world_);
  for (int r = 0; r < world_; ++r) charged[r] = tokens_charged_to(r);
  REATTN_RETURN_IF_ERROR(
      check_capacity(charged, ctx.tokens, charged_after, ctx.owner_rank, rc, config_.capacity.tokens_per_rank));
  // Allocate every page this append needs before writing anything: a refused allocation then
  // leaves the context as it was (the owner's ring is only overwritten once nothing can fail
  // short of a device fault).
  for (int layer : targets) {
    const int64_t n1 = ctx.layer_tokens[layer] + source.tokens();
    if (!ctx.resident[layer] || n1 <= rc.sink_tokens) continue;
    const int64_t last_grid_block = (n1 - 1 - rc.sink_tokens) / rc.chunk_tokens;
    const int64_t my_last = last_grid_block - ((last_grid_block - rank_) % world_ + world_) % world_;
    if (my_last >= 0) REATTN_RETURN_IF_ERROR(ensure_pages(ctx.layers[layer], home_slot(my_last, world_) + 1));
  }
  for (int layer : targets) {
    const int64_t n0 = ctx.layer_tokens[layer];
    if (ctx.resident[layer]) {
      const int64_t n1 = n0 + source.tokens();
      REATTN_RETURN_IF_ERROR(write_layer(ctx, layer, source, n0, n1, std::max(n1, series_end)));
    }
    ctx.layer_tokens[layer] = n0 + source.tokens();
  }
  ctx.tokens = charged_after;
  return Status::ok();
}

// Writes tokens [n0, n1) of one layer to every place this rank keeps them.
Status KvStore::write_layer(ContextShard& ctx, int layer, const KvSource& source, int64_t n0, int64_t n1,
                            int64_t ring_end) {
  const ReattentionConfig& rc = config_.reattention;
  LayerShard& shard = ctx.layers[layer];
  // Blocks that end below this floor are out of the owner's ring by the end of the append
  // (or of the series of appends it belongs to).
  const int64_t last_block = ring_end > rc.sink_tokens ? (ring_end - 1 - rc.sink_tokens) / rc.chunk_tokens : 0;
  const int64_t ring_floor = rc.sink_tokens + std::max<int64_t>(0, last_block - ring_blocks(rc) + 1) * rc.chunk_tokens;
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
      const int64_t block_first = rc.sink_tokens + block * rc.chunk_tokens;
      if (home && !in_ring && t == block_first && end == block_first + rc.chunk_tokens) {
        // A run of whole home blocks below the ring floor, in consecutive slots of one page
        // (the other ranks' blocks between them are skipped here anyway). Their ring copy is
        // skipped too: a block below the floor is overwritten in the ring by the end of this
        // append before anything reads it.
        int64_t blocks = 1;
        while (blocks < kBatchBlocks) {
          const int64_t next = block + blocks * world_;
          const int64_t next_end = rc.sink_tokens + (next + 1) * rc.chunk_tokens;
          const bool next_in_ring = ctx.owner_rank == rank_ && next_end > ring_floor;
          if (next_end > n1 || next_in_ring ||
              home_slot(next, world_) / kBlocksPerPage != home_slot(block, world_) / kBlocksPerPage) {
            break;
          }
          ++blocks;
        }
        REATTN_RETURN_IF_ERROR(ensure_pages(shard, home_slot(block + (blocks - 1) * world_, world_) + 1));
        REATTN_RETURN_IF_ERROR(write_home_blocks(backend_, config_.model, rc, world_, block_bytes(),
                                                 const_cast<void*>(home_block(shard, false, block)),
                                                 const_cast<void*>(home_block(shard, true, block)), source, layer,
                                                 n0, block, blocks));
        t = rc.sink_tokens + (block + (blocks - 1) * world_ + 1) * rc.chunk_tokens;
        continue;
      }
    }
    REATTN_RETURN_IF_ERROR(write_block_range(shard, ctx, source, layer, n0, t, end));
    t = end;
  }
  return Status::ok();
}

}  // namespace reattn
