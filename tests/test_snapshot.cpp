// Snapshots: the manifest codec and its checks, the rank-file writer and reader, and restore
// onto a different number of ranks (each rank's KV store, compared block by block with the same
// tokens appended directly), with corrupt, truncated and missing files refused by name.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include "common/protocol.h"
#include "common/semantics.h"
#include "common/snapshot_manifest.h"
#include "kernels/cpu/cpu_backend.h"
#include "worker/kv_source.h"
#include "worker/kv_store.h"
#include "worker/snapshot_files.h"
#include "tests/http/tiny_service_config.h"
#include "tests/snapshot_fixture.h"

namespace reattn {
namespace {

namespace fs = std::filesystem;

Config tiny_config() { return test::tiny_service_config(4); }

SnapshotManifest sample_manifest() { return test::tiny_manifest("ctx-7.v1", {301, 250}, 2, 1); }

TEST(SnapshotManifest, RoundTrips) {
  const SnapshotManifest m = sample_manifest();
  Expected<SnapshotManifest> back = decode_manifest(encode_manifest(m), "manifest");
  ASSERT_TRUE(back.is_ok()) << back.status().message();
  EXPECT_EQ(encode_manifest(*back), encode_manifest(m));
  EXPECT_EQ(back->files[1].crc32, 0xdeadbeefu - 1);
  EXPECT_EQ(back->tokens(), 250);
  EXPECT_EQ(back->total_bytes(), 2001u);
  // (301 - 4) tokens = 38 blocks (the last partial): 19 on each of 2 ranks.
  EXPECT_EQ(back->files[0].layer_blocks, (std::vector<int64_t>{19, 16}));
  EXPECT_TRUE(back->files[1].sinks);
  EXPECT_FALSE(back->files[0].sinks);
}

TEST(SnapshotManifest, RefusesMalformedNamingTheField) {
  const std::string good = encode_manifest(sample_manifest());
  const auto refused = [](const std::string& text, const std::string& want) {
    Expected<SnapshotManifest> m = decode_manifest(text, "m.json");
    ASSERT_FALSE(m.is_ok()) << want;
    EXPECT_NE(m.status().message().find(want), std::string::npos) << m.status().message();
  };
  const auto replaced = [&](const std::string& from, const std::string& to) {
    std::string t = good;
    const size_t at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return t.replace(at, from.size(), to);
  };
  refused("not json", "not a JSON object");
  refused(replaced("\"format_version\": 1", "\"format_version\": 9"), "format_version 9");
  refused(replaced("\"head_dim\": 16", "\"head_dim\": \"16\""), "'head_dim' must be an integer");
  refused(replaced("\"dtype\": \"F32\"", "\"dtype\": \"F8\""), "model.dtype");
  refused(replaced("\"name\": \"ctx-7.v1\"", "\"name\": \"../x\""), "snapshot name");
  refused(replaced("\"owner_rank\": 1", "\"owner_rank\": 2"), "owner_rank 2");
  refused(replaced("\"world\": 2", "\"world\": 3"), "one file per rank (3)");
  refused(replaced("\"sinks\": true", "\"sinks\": false"), "files[1] does not match");
  refused(replaced("301", "1301"), "files[0] does not match");
  refused(replaced("\"crc32\": 3735928559", "\"crc32\": -1"), "'crc32' must be in");
  // Refused by its shape before a DOM is built (8 MiB of '[' would take ~700 MB as a DOM).
  refused(std::string(8 << 20, '['), "nests deeper than 16 levels");
  refused(replaced("\"files\"", "\"pad\": [" + std::string(20, '[') + std::string(20, ']') + "], \"files\""),
          "nests deeper than 16 levels");
}

TEST(SnapshotManifest, NameRule) {
  for (const std::string& ok : std::vector<std::string>{"a", "A9", "ctx.1_b-2", "0", std::string(64, 'x')}) {
    EXPECT_TRUE(check_snapshot_name(ok).is_ok()) << ok;
  }
  for (const char* bad : {"", ".hidden", "..", "a/b", "-x", "_x", "a b", "a\\b", "é", "a:b", "x\n"}) {
    EXPECT_FALSE(check_snapshot_name(bad).is_ok()) << bad;
  }
  EXPECT_FALSE(check_snapshot_name(std::string(65, 'x')).is_ok());
}

TEST(SnapshotManifest, FitsNamesEveryDifference) {
  SnapshotManifest m = sample_manifest();
  Config c = tiny_config();
  EXPECT_TRUE(check_manifest_fits(m, c, DType::kF32).is_ok());
  c.reattention.chunk_tokens = 16;
  c.model.head_dim = 32;
  const Status s = check_manifest_fits(m, c, DType::kBF16);
  ASSERT_FALSE(s.is_ok());
  for (const char* want : {"model.head_dim 16 (this service: 32)", "storage dtype F32 (this service: BF16)",
                           "reattention.chunk_tokens 8 (this service: 16)"}) {
    EXPECT_NE(s.message().find(want), std::string::npos) << s.message();
  }
}

TEST(SnapshotOperations, RoundTripThroughTheCodec) {
  SnapshotContext snap;
  snap.context_id = 9;
  snap.phase = SnapshotPhase::kPublish;
  snap.name = "name.1";
  snap.tmp = ".tmp-name.1-77-3";
  snap.created = "2026-11-30T19:00:00Z";
  snap.first_layer = 3;
  snap.end_layer = 5;
  Expected<Operation> back = decode_operation(encode_operation(snap));
  ASSERT_TRUE(back.is_ok());
  const auto* s = std::get_if<SnapshotContext>(&*back);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->context_id, 9u);
  EXPECT_EQ(s->phase, SnapshotPhase::kPublish);
  EXPECT_EQ(s->name, snap.name);
  EXPECT_EQ(s->tmp, snap.tmp);
  EXPECT_EQ(s->created, snap.created);
  EXPECT_EQ(s->first_layer, 3);
  EXPECT_EQ(s->end_layer, 5);
  EXPECT_STREQ(operation_name(*back), "snapshot");
  RestoreContext restore;
  restore.context_id = 4;
  restore.phase = RestorePhase::kLayer;
  restore.owner_rank = 1;
  restore.name = "name.1";
  restore.manifest = encode_manifest(sample_manifest());
  restore.layer = 1;
  const std::string bytes = encode_operation(restore);
  back = decode_operation(bytes);
  ASSERT_TRUE(back.is_ok());
  const auto* r = std::get_if<RestoreContext>(&*back);
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->context_id, 4u);
  EXPECT_EQ(r->phase, RestorePhase::kLayer);
  EXPECT_EQ(r->owner_rank, 1);
  EXPECT_EQ(r->manifest, restore.manifest);
  EXPECT_EQ(r->layer, 1);
  EXPECT_EQ(operation_context(*back), 4u);
  EXPECT_STREQ(operation_name(*back), "restore");
  for (size_t cut : {size_t{5}, size_t{20}, bytes.size() - 1}) EXPECT_FALSE(decode_operation(bytes.substr(0, cut)).is_ok());
  // A phase out of range is malformed.
  std::string bad = encode_operation(restore);
  const int32_t phase = 7;
  std::memcpy(&bad[4 + 4 + 8], &phase, sizeof(phase));
  EXPECT_FALSE(decode_operation(bad).is_ok());
}

// A context of `layer_tokens` synthetic tokens per layer on rank `rank` of `world`.
struct RankStore {
  RankStore(const Config& config, int rank, int world) : backend(1), store(backend, config, rank, world) {}
  CpuBackend backend;
  KvStore store;
};

std::vector<std::unique_ptr<RankStore>> fill(const Config& config, int world, int owner,
                                             const std::vector<int64_t>& layer_tokens, const SyntheticSpec& spec) {
  std::vector<std::unique_ptr<RankStore>> ranks;
  for (int r = 0; r < world; ++r) {
    ranks.push_back(std::make_unique<RankStore>(config, r, world));
    EXPECT_TRUE(ranks.back()->store.create(1, owner).is_ok());
    for (int layer = 0; layer < config.model.layers; ++layer) {
      const SyntheticKvSource source(spec, config.model, 0, layer_tokens[layer]);
      EXPECT_TRUE(ranks.back()->store.append(1, source, layer).is_ok());
    }
  }
  return ranks;
}

class SnapshotFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("reattn-snapshot-test-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes a snapshot "s" of the ranks' context 1 and returns its manifest.
  SnapshotManifest write(const Config& config, std::vector<std::unique_ptr<RankStore>>& ranks, int owner) {
    const int world = static_cast<int>(ranks.size());
    const fs::path tmp = dir_ / ".tmp-s-1";
    fs::create_directories(tmp);
    SnapshotManifest m;
    m.name = "s";
    m.created = "2026-11-30T19:00:00Z";
    m.layers = config.model.layers;
    m.kv_heads = config.model.kv_heads;
    m.head_dim = config.model.head_dim;
    m.dtype = DType::kF32;
    m.sink_tokens = config.reattention.sink_tokens;
    m.chunk_tokens = config.reattention.chunk_tokens;
    m.local_window = config.reattention.local_window;
    m.world = world;
    m.owner_rank = owner;
    m.context_id = 1;
    m.layer_tokens = ranks[0]->store.find(1)->layer_tokens;
    for (int r = 0; r < world; ++r) {
      // A small staging buffer: runs of 3 blocks.
      Expected<SnapshotFile> f = write_snapshot_file(ranks[r]->store, ranks[r]->backend, config, *ranks[r]->store.find(1),
                                                     tmp.string(), r, world, 3 * ranks[r]->store.block_bytes());
      EXPECT_TRUE(f.is_ok()) << f.status().message();
      m.files.push_back(*f);
    }
    EXPECT_TRUE(publish_snapshot(tmp.string(), (dir_ / "s").string(), m).is_ok());
    return m;
  }

  fs::path dir_;
};

TEST_F(SnapshotFiles, ReaderReturnsEveryTokenAsWritten) {
  const Config config = tiny_config();
  const SyntheticSpec spec{42, {100}};
  const std::vector<int64_t> lengths = {301, 250};
  auto ranks = fill(config, 2, 1, lengths, spec);
  const SnapshotManifest m = write(config, ranks, 1);
  EXPECT_FALSE(fs::exists(dir_ / ".tmp-s-1"));
  std::ifstream in(dir_ / "s" / kSnapshotManifestFile);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Expected<SnapshotManifest> read_back = decode_manifest(text, "manifest");
  ASSERT_TRUE(read_back.is_ok()) << read_back.status().message();
  for (const SnapshotFile& f : read_back->files) {
    EXPECT_TRUE(verify_snapshot_file((dir_ / "s").string(), f).is_ok());
  }
  Expected<SnapshotReader> reader = SnapshotReader::open((dir_ / "s").string(), *read_back);
  ASSERT_TRUE(reader.is_ok()) << reader.status().message();
  const int D = config.model.head_dim;
  for (int layer = 0; layer < 2; ++layer) {
    const SyntheticKvSource want(spec, config.model, 0, lengths[layer]);
    for (int g = 0; g < config.model.kv_heads; ++g) {
      std::vector<float> k(lengths[layer] * D), v(k.size()), wk(k.size()), wv(k.size());
      reader->read(layer, g, 0, lengths[layer], DType::kF32, k.data(), v.data());
      want.read_f32(layer, g, 0, lengths[layer], wk.data(), wv.data());
      EXPECT_EQ(k, wk) << "layer " << layer << " head " << g;
      EXPECT_EQ(v, wv) << "layer " << layer << " head " << g;
    }
  }
}

// Restored on 3 ranks (and on 1): every rank's home blocks, sinks and ring hold what a direct
// append on that many ranks puts there.
TEST_F(SnapshotFiles, RestoresOntoAnyRankCount) {
  const Config config = tiny_config();
  const SyntheticSpec spec{7, {}};
  const std::vector<int64_t> lengths = {205, 205};
  auto written = fill(config, 2, 0, lengths, spec);
  const SnapshotManifest m = write(config, written, 0);
  Expected<SnapshotReader> reader = SnapshotReader::open((dir_ / "s").string(), m);
  ASSERT_TRUE(reader.is_ok()) << reader.status().message();
  const ReattentionConfig& rc = config.reattention;
  const size_t row = config.model.head_dim * sizeof(float);
  for (int world : {3, 1}) {
    const int owner = world - 1;
    auto direct = fill(config, world, owner, lengths, spec);
    for (int r = 0; r < world; ++r) {
      RankStore restored(config, r, world);
      ASSERT_TRUE(restored.store.create(1, owner).is_ok());
      for (int layer = 0; layer < 2; ++layer) {
        ASSERT_TRUE(restored.store.append(1, SnapshotKvSource(*reader, layer), layer).is_ok());
      }
      const ContextShard& got = *restored.store.find(1);
      const ContextShard& want = *direct[r]->store.find(1);
      EXPECT_EQ(got.layer_tokens, want.layer_tokens);
      EXPECT_EQ(got.tokens, want.tokens);
      for (int layer = 0; layer < 2; ++layer) {
        const int64_t n = lengths[layer];
        const int64_t blocks = (n - rc.sink_tokens + rc.chunk_tokens - 1) / rc.chunk_tokens;
        // Compares the valid rows of one [Hkv, rows, D] place.
        const auto same = [&](const void* a, const void* b, int64_t rows, int64_t valid, const std::string& what) {
          for (int g = 0; g < config.model.kv_heads; ++g) {
            EXPECT_EQ(std::memcmp(static_cast<const char*>(a) + g * rows * row,
                                  static_cast<const char*>(b) + g * rows * row, valid * row),
                      0)
                << what << " world " << world << " rank " << r << " layer " << layer << " head " << g;
          }
        };
        for (int64_t j = 0; j < blocks; ++j) {
          const int64_t valid = std::min(rc.chunk_tokens, n - rc.sink_tokens - j * rc.chunk_tokens);
          for (bool values : {false, true}) {
            if (home_rank(j, world) == r) {
              same(restored.store.home_block(got.layers[layer], values, j),
                   direct[r]->store.home_block(want.layers[layer], values, j), rc.chunk_tokens, valid, "home block");
            }
            if (r == owner && j >= blocks - ring_blocks(rc)) {
              same(restored.store.ring_block(got.layers[layer], values, j),
                   direct[r]->store.ring_block(want.layers[layer], values, j), rc.chunk_tokens, valid, "ring block");
            }
          }
        }
        if (r == owner) {
          same(got.layers[layer].sink_k.data(), want.layers[layer].sink_k.data(), rc.sink_tokens, rc.sink_tokens, "sink k");
          same(got.layers[layer].sink_v.data(), want.layers[layer].sink_v.data(), rc.sink_tokens, rc.sink_tokens, "sink v");
        }
      }
    }
  }
}

TEST_F(SnapshotFiles, RefusesCorruptTruncatedAndMissingFilesByName) {
  const Config config = tiny_config();
  auto ranks = fill(config, 2, 0, {120, 120}, SyntheticSpec{3, {}});
  const SnapshotManifest m = write(config, ranks, 0);
  const fs::path file = dir_ / "s" / "rank-1.safetensors";
  const std::string dir = (dir_ / "s").string();
  // One byte flipped in the data: same size, another crc.
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(m.files[1].bytes - 5));
    f.put('\x7f');
  }
  Status s = verify_snapshot_file(dir, m.files[1]);
  EXPECT_NE(s.message().find("rank-1.safetensors' is corrupt"), std::string::npos) << s.message();
  EXPECT_TRUE(verify_snapshot_file(dir, m.files[0]).is_ok());
  fs::resize_file(file, m.files[1].bytes - 100);
  s = verify_snapshot_file(dir, m.files[1]);
  EXPECT_NE(s.message().find("(truncated)"), std::string::npos) << s.message();
  EXPECT_FALSE(SnapshotReader::open(dir, m).is_ok());
  fs::remove(file);
  s = verify_snapshot_file(dir, m.files[1]);
  EXPECT_NE(s.message().find("rank-1.safetensors' cannot be read"), std::string::npos) << s.message();
  Expected<SnapshotReader> r = SnapshotReader::open(dir, m);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("rank-1.safetensors"), std::string::npos) << r.status().message();
}

// A file cut short while a restore has it mapped is refused before any read (which would
// raise SIGBUS).
TEST_F(SnapshotFiles, ReaderNoticesAFileCutShortUnderIt) {
  const Config config = tiny_config();
  auto ranks = fill(config, 2, 0, {120, 120}, SyntheticSpec{3, {}});
  const SnapshotManifest m = write(config, ranks, 0);
  Expected<SnapshotReader> reader = SnapshotReader::open((dir_ / "s").string(), m);
  ASSERT_TRUE(reader.is_ok()) << reader.status().message();
  EXPECT_TRUE(reader->check_unchanged().is_ok());
  fs::resize_file(dir_ / "s" / "rank-0.safetensors", 64);
  const Status s = reader->check_unchanged();
  EXPECT_NE(s.message().find("rank-0.safetensors' changed while it was being restored (now 64 bytes"),
            std::string::npos)
      << s.message();
}

TEST_F(SnapshotFiles, PublishRefusesAnExistingSnapshot) {
  const Config config = tiny_config();
  auto ranks = fill(config, 1, 0, {40, 40}, SyntheticSpec{3, {}});
  write(config, ranks, 0);
  fs::create_directories(dir_ / ".tmp-s-2");
  const Status s = publish_snapshot((dir_ / ".tmp-s-2").string(), (dir_ / "s").string(), sample_manifest());
  EXPECT_NE(s.message().find("already exists"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace reattn
