// This rank's share of every context's KV cache, in backend memory, stored without RoPE.
// Home blocks: chunk-grid block j (tokens [S + jC, S + (j+1)C)) lives on rank j mod world, at
// slot j / world, in pages of kBlocksPerPage blocks [Hkv, C, D]. The owning rank also keeps
// the sinks [Hkv, S, D] and a ring of the latest blocks (the local-window replica).
// Call only from the step loop's thread.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "common/protocol.h"
#include "kernels/backend.h"
#include "worker/kv_source.h"

namespace reattn {

struct LayerShard {
  std::vector<Buffer> k_pages;  // [kBlocksPerPage, Hkv, C, D] each
  std::vector<Buffer> v_pages;
  Buffer k_page_table;          // [pages] pointers to k_pages, backend memory
  Buffer v_page_table;
  Buffer sink_k;                // owner only: [Hkv, S, D]
  Buffer sink_v;
  Buffer ring_k;                // owner only: [ring_blocks, Hkv, C, D]; block j at j % ring_blocks
  Buffer ring_v;
};

struct ContextShard {
  ContextId id = 0;
  int owner_rank = 0;
  int64_t tokens = 0;              // the longest layer's length (what capacity charges), the same on every rank
  std::vector<int64_t> layer_tokens;  // [layers]: each layer's length; they differ only during a forward pass
  std::vector<bool> resident;      // [layers]: whether the layer is held
  std::vector<LayerShard> layers;  // [layers]
};

// What KvStore::restore needs to put a context back as it was before appends (a failed or
// cancelled bulk load): its lengths, how many home pages each layer held, and on the owner a
// host copy of the ring blocks that hold data, which later appends overwrite (at most
// ring_blocks blocks per layer; home blocks and sinks below the old length are never written
// by an append).
struct KvCheckpoint {
  ContextId id = 0;
  int64_t tokens = 0;
  std::vector<int64_t> layer_tokens;     // [layers]
  std::vector<size_t> pages;             // [layers]
  std::vector<int64_t> ring_first;       // [layers]: the first grid block saved
  std::vector<std::vector<char>> ring_k; // [layers], owner only (else empty): blocks ring_first.., each [Hkv, C, D]
  std::vector<std::vector<char>> ring_v;
};

class KvStore {
 public:
  static constexpr int64_t kBlocksPerPage = 256;

  KvStore(Backend& backend, const Config& config, int rank, int world);

  // Every rank, in the same order. resident_layers empty: all layers.
  Status create(ContextId id, int owner_rank, const std::vector<int>& resident_layers = {});
  Status erase(ContextId id);
  const ContextShard* find(ContextId id) const;
  const std::map<ContextId, ContextShard>& contexts() const { return contexts_; }

  // Appends source.tokens() tokens to every layer (which must be at the same length:
  // OutOfOrder otherwise), or to `only_layer` alone (a layer step; the caller checked the
  // order rule). Fails with kCapacity, changing nothing, when any rank would exceed
  // capacity.tokens_per_rank (checked identically on every rank).
  // `series_end`: the length every layer reaches once a series of appends ends (a bulk load's
  // slices; the context is not read before then), so blocks that will be out of the owner's
  // ring by then are not copied into it; 0: this append's own end.
  Status append(ContextId id, const KvSource& source, int only_layer = -1, int64_t series_end = 0);

  // A checkpoint of a context for restore (NotFound for an unknown one).
  Expected<KvCheckpoint> checkpoint(ContextId id) const;
  // Puts the context back as it was at `checkpoint`, after any appends since: lengths, the
  // owner's ring, and home pages allocated since freed.
  Status restore(const KvCheckpoint& checkpoint);

  // Tokens charged to `rank` over all contexts (capacity and metrics).
  int64_t tokens_charged_to(int rank) const;
  // Bytes of one block [Hkv, C, D] in storage dtype.
  size_t block_bytes() const;
  // Address of block `block` of a layer: its home page (on its home rank) or the ring (owner).
  const void* home_block(const LayerShard& shard, bool values, int64_t block) const;
  const void* ring_block(const LayerShard& shard, bool values, int64_t block) const;

 private:
  Status ensure_pages(LayerShard& shard, int64_t slots);
  // The backend's page tables of `shard` from its pages.
  Status upload_page_tables(LayerShard& shard);
  // ring_end: the length whose ring floor decides which blocks go to the owner's ring (>= n1).
  Status write_layer(ContextShard& ctx, int layer, const KvSource& source, int64_t n0, int64_t n1, int64_t ring_end);
  Status write_block_range(LayerShard& shard, ContextShard& ctx, const KvSource& source, int layer,
                           int64_t n0, int64_t begin, int64_t end);

  Backend& backend_;
  Config config_;
  int rank_;
  int world_;
  std::map<ContextId, ContextShard> contexts_;
};

}  // namespace reattn
