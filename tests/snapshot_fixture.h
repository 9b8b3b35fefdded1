// A snapshot manifest of the tiny model (2 KV heads, head_dim 16, 4 sinks, 8-token chunks, F32)
// for the snapshot tests: files as expected_snapshot_file lays them out, sizes and checksums
// made up.
#pragma once

#include <string>
#include <vector>

#include "common/snapshot_manifest.h"

namespace reattn::test {

inline SnapshotManifest tiny_manifest(const std::string& name, std::vector<int64_t> layer_tokens, int world,
                                      int owner_rank) {
  SnapshotManifest m;
  m.name = name;
  m.created = "2026-11-30T19:00:00Z";
  m.layers = static_cast<int>(layer_tokens.size());
  m.kv_heads = 2;
  m.head_dim = 16;
  m.dtype = DType::kF32;
  m.sink_tokens = 4;
  m.chunk_tokens = 8;
  m.local_window = 32;
  m.world = world;
  m.owner_rank = owner_rank;
  m.context_id = 7;
  m.layer_tokens = std::move(layer_tokens);
  for (int r = 0; r < world; ++r) {
    SnapshotFile f = expected_snapshot_file(m, r);
    f.bytes = 1000 + r;
    f.crc32 = 0xdeadbeefu - r;
    m.files.push_back(f);
  }
  return m;
}

}  // namespace reattn::test
