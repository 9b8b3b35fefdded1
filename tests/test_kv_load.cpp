// The KV store's side of bulk loads: an append (a load's slices included) reads from its
// source only the blocks this rank stores, and a checkpoint taken before appends puts a
// context back byte for byte (sinks, home blocks, the owner's ring, lengths, pages).
// Every rank of a job is simulated in one process (KvStore takes its rank and world).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "common/safetensors.h"
#include "common/semantics.h"
#include "kernels/make_backend.h"
#include "worker/kv_source.h"
#include "worker/kv_store.h"

namespace reattn {
namespace {

Config tiny() {
  Expected<Config> c = load_config_string(
      "model: {layers: 2, q_heads: 4, kv_heads: 2, head_dim: 16, rope_theta: 10000, scope: 1024}\n"
      "reattention: {sink_tokens: 4, local_window: 32, chunk_tokens: 8, top_k: 2, max_recall_chunks: 6}\n"
      "backend: {kind: cpu}\n");
  EXPECT_TRUE(c.is_ok()) << c.status().to_string();
  return *c;
}

// Tokens [first, first + count) of synthetic context `seed`, recording each token it is asked for.
class RecordingSource final : public KvSource {
 public:
  RecordingSource(const Config& c, uint64_t seed, int64_t first, int64_t count)
      : inner_(SyntheticSpec{seed, {}}, c.model, first, count), first_(first) {}
  int64_t tokens() const override { return inner_.tokens(); }
  void read(int layer, int kv_head, int64_t offset, int64_t count, DType dtype, void* k, void* v) const override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int64_t t = 0; t < count; ++t) read_tokens.insert(first_ + offset + t);
    }
    inner_.read(layer, kv_head, offset, count, dtype, k, v);
  }
  mutable std::set<int64_t> read_tokens;  // absolute token positions

 private:
  SyntheticKvSource inner_;
  int64_t first_;
  mutable std::mutex mu_;
};

// Appends tokens [n, n + count) of `seed` in slices of `slice` tokens, as a load does.
void append_slices(KvStore& store, const Config& c, uint64_t seed, int64_t count, int64_t slice,
                   std::set<int64_t>* read = nullptr) {
  const int64_t n = store.find(1)->tokens;
  for (int64_t done = 0; done < count; done += slice) {
    RecordingSource src(c, seed, n + done, std::min(slice, count - done));
    ASSERT_TRUE(store.append(1, src, -1, n + count).is_ok());
    if (read) read->insert(src.read_tokens.begin(), src.read_tokens.end());
  }
}

TEST(KvLoad, EachRankReadsOnlyTheBlocksItStores) {
  const Config c = tiny();
  const ReattentionConfig& rc = c.reattention;
  Expected<std::unique_ptr<Backend>> backend = make_backend(c, 0);
  ASSERT_TRUE(backend.is_ok());
  const int world = 3, owner = 1;
  const int64_t n = 500;
  const int64_t last_block = (n - 1 - rc.sink_tokens) / rc.chunk_tokens;
  for (int rank = 0; rank < world; ++rank) {
    for (int64_t slice : {int64_t{5}, int64_t{64}, n}) {
      KvStore store(**backend, c, rank, world);
      ASSERT_TRUE(store.create(1, owner).is_ok());
      std::set<int64_t> read;
      append_slices(store, c, 3, n, slice, &read);
      ASSERT_FALSE(read.empty());
      for (int64_t t : read) {
        const bool sink = t < rc.sink_tokens;
        const int64_t block = sink ? -1 : (t - rc.sink_tokens) / rc.chunk_tokens;
        const bool home = !sink && home_rank(block, world) == rank;
        // The owner also holds the sinks and the blocks in its ring at the end of the load.
        const bool owned = rank == owner && (sink || block > last_block - ring_blocks(rc));
        EXPECT_TRUE(home || owned) << "rank " << rank << " read token " << t << " (slice " << slice << ")";
      }
      // Roughly its share: a third of the mid, and on the owner the sinks and the ring too.
      const int64_t ring = rank == owner ? rc.sink_tokens + ring_blocks(rc) * rc.chunk_tokens : 0;
      EXPECT_LT(static_cast<int64_t>(read.size()), n / world + rc.chunk_tokens + ring) << rank << " " << slice;
    }
  }
}

// Everything a context holds on a rank, as bytes: lengths, pages, sinks, the home blocks
// below its length and the ring blocks of its local region.
std::vector<char> contents(const KvStore& store, const Config& c, int rank, int world) {
  const ReattentionConfig& rc = c.reattention;
  const ContextShard& ctx = *store.find(1);
  std::vector<char> out;
  const auto put = [&](const void* p, size_t bytes) {
    out.insert(out.end(), static_cast<const char*>(p), static_cast<const char*>(p) + bytes);
  };
  put(&ctx.tokens, sizeof(ctx.tokens));
  for (size_t layer = 0; layer < ctx.layers.size(); ++layer) {
    const LayerShard& shard = ctx.layers[layer];
    const int64_t n = ctx.layer_tokens[layer];
    const size_t pages = shard.k_pages.size();
    put(&n, sizeof(n));
    put(&pages, sizeof(pages));
    const int64_t full = n > rc.sink_tokens ? (n - rc.sink_tokens) / rc.chunk_tokens : 0;  // whole blocks
    const size_t token_bytes = static_cast<size_t>(c.model.head_dim) * sizeof(float);
    if (ctx.owner_rank == rank) {
      for (int g = 0; g < c.model.kv_heads; ++g) {  // sinks below n only
        const size_t at = g * rc.sink_tokens * token_bytes, bytes = std::min(n, rc.sink_tokens) * token_bytes;
        put(shard.sink_k.as<char>() + at, bytes);
        put(shard.sink_v.as<char>() + at, bytes);
      }
      for (int64_t b = std::max<int64_t>(0, full - ring_blocks(rc) + 1); b < full; ++b) {
        put(store.ring_block(shard, false, b), store.block_bytes());
        put(store.ring_block(shard, true, b), store.block_bytes());
      }
    }
    for (int64_t b = rank; b < full; b += world) {
      put(store.home_block(shard, false, b), store.block_bytes());
      put(store.home_block(shard, true, b), store.block_bytes());
    }
  }
  return out;
}

TEST(KvLoad, ARestoredCheckpointIsTheContextAsItWas) {
  const Config c = tiny();
  Expected<std::unique_ptr<Backend>> backend = make_backend(c, 0);
  ASSERT_TRUE(backend.is_ok());
  const int world = 2;
  for (int rank = 0; rank < world; ++rank) {
    for (int64_t before : {int64_t{0}, int64_t{3}, int64_t{300}, int64_t{301}}) {
      KvStore loaded(**backend, c, rank, world), plain(**backend, c, rank, world);
      ASSERT_TRUE(loaded.create(1, 0).is_ok());
      ASSERT_TRUE(plain.create(1, 0).is_ok());
      if (before > 0) {
        append_slices(loaded, c, 1, before, before);
        append_slices(plain, c, 1, before, before);
      }
      Expected<KvCheckpoint> cp = loaded.checkpoint(1);
      ASSERT_TRUE(cp.is_ok());
      append_slices(loaded, c, 2, 700, 13);  // wraps the ring many times, allocates pages
      ASSERT_NE(contents(loaded, c, rank, world), contents(plain, c, rank, world));
      ASSERT_TRUE(loaded.restore(*cp).is_ok());
      EXPECT_EQ(contents(loaded, c, rank, world), contents(plain, c, rank, world)) << rank << " " << before;
      // And it grows as the other does afterwards.
      append_slices(loaded, c, 3, 77, 77);
      append_slices(plain, c, 3, 77, 77);
      EXPECT_EQ(contents(loaded, c, rank, world), contents(plain, c, rank, world)) << rank << " " << before;
    }
  }
  KvStore store(**backend, c, 0, 1);
  EXPECT_EQ(store.checkpoint(9).status().code(), ErrorCode::kNotFound);
}

// A load's file is read with pread: reads match the file's values; a file cut short in place
// while it is read (between the checks a slice makes and its reads) is a problem the load
// reports, not a SIGBUS; a value that cannot be stored is named with its place.
TEST(KvLoad, FileSourceReadsAndSurvivesATruncation) {
  const Config c = tiny();
  const ModelConfig& m = c.model;
  const int64_t tokens = 64;
  const size_t per = static_cast<size_t>(m.layers) * m.kv_heads * tokens * m.head_dim;
  std::vector<float> k(per), v(per);
  for (size_t i = 0; i < per; ++i) {
    k[i] = static_cast<float>(i % 97) * 0.25f;
    v[i] = -static_cast<float>(i % 89) * 0.5f;
  }
  const std::string path = ::testing::TempDir() + "file_kv_source.safetensors";
  const std::vector<int64_t> shape = {m.layers, m.kv_heads, tokens, m.head_dim};
  ASSERT_TRUE(write_file(path, serialize_safetensors({make_tensor("k", DType::kF32, shape, k),
                                                      make_tensor("v", DType::kF32, shape, v)}))
                  .is_ok());
  Expected<std::unique_ptr<FileKvSource>> file = FileKvSource::open(path, m, c.max_stored_value());
  ASSERT_TRUE(file.is_ok()) << file.status().to_string();
  const FileKvSource& src = **file;
  EXPECT_EQ(src.tokens(), tokens);
  // Layer 1, kv head 1, tokens [10, 15) in F32: the file's own values.
  std::vector<float> got_k(5 * m.head_dim), got_v(5 * m.head_dim);
  src.read(1, 1, 10, 5, DType::kF32, got_k.data(), got_v.data());
  const size_t at = ((static_cast<size_t>(1) * m.kv_heads + 1) * tokens + 10) * m.head_dim;
  EXPECT_EQ(got_k, std::vector<float>(k.begin() + at, k.begin() + at + got_k.size()));
  EXPECT_EQ(got_v, std::vector<float>(v.begin() + at, v.begin() + at + got_v.size()));
  EXPECT_TRUE(src.problem().is_ok());
  // Cut to half its size: v lies wholly past the end now.
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(per * sizeof(float))), 0);
  src.read(1, 1, 10, 5, DType::kF32, got_k.data(), got_v.data());
  const Status s = src.problem();
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("truncated"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("layer 1, kv head 1, tokens [10, 15)"), std::string::npos) << s.message();
  EXPECT_EQ(got_v, std::vector<float>(got_v.size(), 0.0f));  // what was missing reads as zeros
  EXPECT_NE(src.unchanged().message().find("truncated"), std::string::npos) << src.unchanged().message();
  std::remove(path.c_str());

  // Rewritten in place at the same size: unchanged() names the modification.
  ASSERT_TRUE(write_file(path, serialize_safetensors({make_tensor("k", DType::kF32, shape, k),
                                                      make_tensor("v", DType::kF32, shape, v)}))
                  .is_ok());
  Expected<std::unique_ptr<FileKvSource>> again = FileKvSource::open(path, m, c.max_stored_value());
  ASSERT_TRUE(again.is_ok());
  EXPECT_TRUE((*again)->unchanged().is_ok());
  struct stat on_disk {};
  ASSERT_EQ(::stat(path.c_str(), &on_disk), 0);
  EXPECT_EQ((*again)->file_bytes(), static_cast<int64_t>(on_disk.st_size));
  const struct timespec later[2] = {{0, UTIME_OMIT}, {2000000000, 0}};  // a new modification time
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), later, 0), 0);
  EXPECT_NE((*again)->unchanged().message().find("modified"), std::string::npos) << (*again)->unchanged().message();
  std::remove(path.c_str());

  // A value beyond what the store can hold is named where it is.
  k[at + 3] = std::numeric_limits<float>::infinity();
  ASSERT_TRUE(write_file(path, serialize_safetensors({make_tensor("k", DType::kF32, shape, k),
                                                      make_tensor("v", DType::kF32, shape, v)}))
                  .is_ok());
  Expected<std::unique_ptr<FileKvSource>> bad = FileKvSource::open(path, m, c.max_stored_value());
  ASSERT_TRUE(bad.is_ok());
  std::vector<float> more_k(8 * m.head_dim), more_v(8 * m.head_dim);
  (*bad)->read(1, 1, 8, 8, DType::kF32, more_k.data(), more_v.data());  // [8, 16) holds token 10's value
  EXPECT_NE((*bad)->problem().message().find("layer 1, kv head 1, tokens [8, 16)"), std::string::npos)
      << (*bad)->problem().message();
  std::remove(path.c_str());
}

}  // namespace
}  // namespace reattn
