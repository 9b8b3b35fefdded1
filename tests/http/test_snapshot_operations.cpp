// Snapshot and restore as long-running operations, against a fake of the ranks: the slices
// they send in order, their progress, the registry after each, their rollback after a failure
// at every slice, and the catalog hold on the snapshot's name released however they end.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "coordinator/snapshot_operations.h"
#include "tests/snapshot_fixture.h"
#include "tiny_service_config.h"

namespace reattn {
namespace {

// Records every operation; fails the `fail_at`-th (0-based) with InvalidArgument.
class FakeRanks : public OperationRunner {
 public:
  explicit FakeRanks(int layers, int fail_at = -1) : layers_(layers), fail_at_(fail_at) {}
  Status submit(const Operation& op, OperationResult* result) override {
    *result = OperationResult{};
    const int index = static_cast<int>(seen.size());
    seen.push_back(op);
    if (index == fail_at_) {
      result->status = invalid_argument("slice " + std::to_string(index) + " failed");
      return Status::ok();
    }
    if (const auto* s = std::get_if<SnapshotContext>(&op)) {
      if (s->phase == SnapshotPhase::kWrite) result->bytes = 100 * (s->end_layer - s->first_layer);
      if (s->phase == SnapshotPhase::kPublish) result->manifest = "{manifest}";
    }
    if (const auto* r = std::get_if<RestoreContext>(&op)) {
      if (r->phase == RestorePhase::kOpen) lengths_.assign(layers_, 0);
      if (r->phase == RestorePhase::kLayer) lengths_[r->layer] = 40;
      result->layer_tokens = lengths_;
    }
    return Status::ok();
  }
  std::vector<Operation> seen;

 private:
  int layers_;
  int fail_at_;
  std::vector<int64_t> lengths_;
};

SnapshotManifest manifest(int layers) {
  SnapshotManifest m = test::tiny_manifest("snap", std::vector<int64_t>(layers, 40), 2, 0);
  m.context_id = 9;
  return m;
}

TEST(SnapshotOperation, WritesEveryLayerThenPublishes) {
  const Config config = test::tiny_service_config(4);
  Registry registry(config, 2);
  registry.insert(ContextInfo{1, 0, 40});
  SnapshotCatalog catalog("/nonexistent-snapshot-dir");
  std::string tmp;
  ASSERT_TRUE(catalog.hold_new("snap", &tmp));
  FakeRanks ranks(config.model.layers);
  Status outcome;
  {
    SnapshotOperation op(catalog, 1, "snap", tmp, "2026-11-30T19:00:00Z", config.model.layers);
    ASSERT_TRUE(run_operation_now(op, ranks, registry, &outcome).is_ok());
    EXPECT_TRUE(outcome.is_ok()) << outcome.to_string();
    EXPECT_EQ(op.manifest(), "{manifest}");
    EXPECT_EQ(op.progress().tokens_done, 40);
    EXPECT_EQ(op.progress().bytes_done, 100 * config.model.layers);
    EXPECT_TRUE(op.rollback().empty());
    std::string again;
    EXPECT_FALSE(catalog.hold_new("snap", &again)) << "held while the operation exists";
  }
  ASSERT_EQ(ranks.seen.size(), static_cast<size_t>(config.model.layers + 1));
  for (int i = 0; i < config.model.layers; ++i) {
    const auto& s = std::get<SnapshotContext>(ranks.seen[i]);
    EXPECT_EQ(s.phase, SnapshotPhase::kWrite);
    EXPECT_EQ(s.first_layer, i);
    EXPECT_EQ(s.end_layer, i + 1);
    EXPECT_EQ(s.tmp, tmp);
  }
  EXPECT_EQ(std::get<SnapshotContext>(ranks.seen.back()).phase, SnapshotPhase::kPublish);
  std::string again;
  EXPECT_TRUE(catalog.hold_new("snap", &again)) << "released when the operation is gone";
}

TEST(SnapshotOperation, AFailedSliceIsRolledBackWithAbort) {
  const Config config = test::tiny_service_config(4);
  for (int fail_at = 0; fail_at <= config.model.layers; ++fail_at) {
    Registry registry(config, 2);
    registry.insert(ContextInfo{1, 0, 40});
    SnapshotCatalog catalog("/nonexistent-snapshot-dir");
    std::string tmp;
    ASSERT_TRUE(catalog.hold_new("snap", &tmp));
    SnapshotOperation op(catalog, 1, "snap", tmp, "t", config.model.layers);
    FakeRanks ranks(config.model.layers, fail_at);
    Status outcome;
    ASSERT_TRUE(run_operation_now(op, ranks, registry, &outcome).is_ok());
    EXPECT_EQ(outcome.code(), ErrorCode::kInvalidArgument) << fail_at;
    ASSERT_EQ(ranks.seen.size(), static_cast<size_t>(fail_at + 2));
    const auto& last = std::get<SnapshotContext>(ranks.seen.back());
    EXPECT_EQ(last.phase, SnapshotPhase::kAbort);
    EXPECT_EQ(last.tmp, tmp);
    EXPECT_EQ(registry.find(1)->tokens, 40) << "a snapshot changes no context";
  }
  // A context gone before it starts: nothing is sent.
  Registry registry(config, 2);
  SnapshotCatalog catalog("/nonexistent-snapshot-dir");
  SnapshotOperation op(catalog, 5, "snap", ".tmp-snap-1-1", "t", config.model.layers);
  FakeRanks ranks(config.model.layers);
  Status outcome;
  ASSERT_TRUE(run_operation_now(op, ranks, registry, &outcome).is_ok());
  EXPECT_EQ(outcome.code(), ErrorCode::kNotFound);
  EXPECT_TRUE(ranks.seen.empty());
}

TEST(RestoreOperation, OpensRestoresEveryLayerAndCloses) {
  const Config config = test::tiny_service_config(4);
  Registry registry(config, 2);
  SnapshotCatalog catalog("/nonexistent-snapshot-dir");
  const SnapshotManifest m = manifest(config.model.layers);
  catalog.hold_existing("snap");
  const ContextId id = registry.reserve_id();
  FakeRanks ranks(config.model.layers);
  Status outcome;
  {
    RestoreOperation op(catalog, StoredSnapshot{m, encode_manifest(m)}, id);
    ASSERT_TRUE(run_operation_now(op, ranks, registry, &outcome).is_ok());
    EXPECT_TRUE(outcome.is_ok()) << outcome.to_string();
    EXPECT_EQ(op.progress().tokens_done, 40);
    EXPECT_GT(op.progress().bytes_done, 0);
    EXPECT_FALSE(catalog.remove("snap").code() == ErrorCode::kNotFound) << "held: remove is refused first";
    EXPECT_EQ(catalog.remove("snap").code(), ErrorCode::kConflict);
  }
  EXPECT_EQ(catalog.remove("snap").code(), ErrorCode::kNotFound) << "released (and there is no such directory)";
  ASSERT_EQ(ranks.seen.size(), static_cast<size_t>(config.model.layers + 2));
  const auto& open = std::get<RestoreContext>(ranks.seen.front());
  EXPECT_EQ(open.phase, RestorePhase::kOpen);
  EXPECT_EQ(open.manifest, encode_manifest(m));
  EXPECT_EQ(open.context_id, id);
  for (int l = 0; l < config.model.layers; ++l) {
    EXPECT_EQ(std::get<RestoreContext>(ranks.seen[1 + l]).layer, l);
    EXPECT_TRUE(std::get<RestoreContext>(ranks.seen[1 + l]).manifest.empty()) << "the manifest travels once";
  }
  EXPECT_EQ(std::get<RestoreContext>(ranks.seen.back()).phase, RestorePhase::kClose);
  const std::optional<ContextInfo> ctx = registry.find(id);
  ASSERT_TRUE(ctx.has_value());
  EXPECT_EQ(ctx->tokens, 40);
  EXPECT_EQ(ctx->layer_tokens, std::vector<int64_t>(config.model.layers, 40));
  EXPECT_GT(registry.reserve_id(), id);
}

// SIGTERM during a start-up restore (--restore): the restore stops before its next slice and
// rolls back, so the job drains at once instead of restoring on until the drain deadline ends
// it with exit 4.
TEST(RestoreOperation, AStopRequestEndsItBetweenSlicesWithNoContext) {
  const Config config = test::tiny_service_config(4);
  FakeRanks ranks(config.model.layers);
  const auto stop = [&] { return ranks.seen.size() >= 2; };  // after the open and one layer
  Registry registry(config, 2);
  SnapshotCatalog catalog("/nonexistent-snapshot-dir");
  catalog.hold_existing("snap");
  const SnapshotManifest m = manifest(config.model.layers);
  RestoreOperation op(catalog, StoredSnapshot{m, encode_manifest(m)}, 7);
  Status outcome;
  ASSERT_TRUE(run_operation_now(op, ranks, registry, &outcome, {}, stop).is_ok());
  EXPECT_EQ(outcome.code(), ErrorCode::kUnavailable) << outcome.to_string();
  EXPECT_NE(outcome.message().find("shutting down"), std::string::npos) << outcome.message();
  ASSERT_EQ(ranks.seen.size(), 4u);  // open, layer 0, then the rollback: close, erase
  EXPECT_EQ(std::get<RestoreContext>(ranks.seen[2]).phase, RestorePhase::kClose);
  EXPECT_TRUE(std::holds_alternative<EraseContext>(ranks.seen[3]));
  EXPECT_FALSE(registry.find(7).has_value());
}

TEST(RestoreOperation, AFailureAnywhereLeavesNoContext) {
  const Config config = test::tiny_service_config(4);
  const SnapshotManifest m = manifest(config.model.layers);
  for (int fail_at = 0; fail_at <= config.model.layers + 1; ++fail_at) {
    Registry registry(config, 2);
    SnapshotCatalog catalog("/nonexistent-snapshot-dir");
    catalog.hold_existing("snap");
    RestoreOperation op(catalog, StoredSnapshot{m, encode_manifest(m)}, 7);
    FakeRanks ranks(config.model.layers, fail_at);
    Status outcome;
    ASSERT_TRUE(run_operation_now(op, ranks, registry, &outcome).is_ok());
    EXPECT_FALSE(outcome.is_ok()) << fail_at;
    EXPECT_FALSE(registry.find(7).has_value()) << fail_at;
    // The rollback: the files let go; the context erased once the ranks had made it.
    std::vector<Operation> tail(ranks.seen.begin() + fail_at + 1, ranks.seen.end());
    ASSERT_FALSE(tail.empty()) << fail_at;
    EXPECT_EQ(std::get<RestoreContext>(tail[0]).phase, RestorePhase::kClose) << fail_at;
    if (fail_at == 0) {
      EXPECT_EQ(tail.size(), 1u);
    } else {
      ASSERT_EQ(tail.size(), 2u) << fail_at;
      EXPECT_EQ(std::get<EraseContext>(tail[1]).context_id, 7u);
    }
  }
  // A started restore holds its place: a create planned before its first slice (the step
  // loop runs other operations' slices in between) no longer takes a fourth context.
  {
    Registry registry(config, 2);
    for (ContextId id = 1; id <= 2; ++id) registry.insert(ContextInfo{id, 0, 0});
    SnapshotCatalog catalog("/nonexistent-snapshot-dir");
    RestoreOperation op(catalog, StoredSnapshot{m, encode_manifest(m)}, 3);
    ASSERT_TRUE(op.start(registry).is_ok());
    EXPECT_EQ(registry.plan_create().status().code(), ErrorCode::kCapacity);
    op.on_rolled_back(registry);  // cancelled before its first slice: the place is given back
    EXPECT_FALSE(registry.find(3).has_value());
    EXPECT_TRUE(registry.plan_create().is_ok());
  }
  // Capacity: a fourth context when max_contexts is 3 fails before any slice.
  Registry registry(config, 2);
  for (ContextId id = 1; id <= 3; ++id) registry.insert(ContextInfo{id, 0, 0});
  SnapshotCatalog catalog("/nonexistent-snapshot-dir");
  RestoreOperation op(catalog, StoredSnapshot{m, encode_manifest(m)}, 4);
  FakeRanks ranks(config.model.layers);
  Status outcome;
  ASSERT_TRUE(run_operation_now(op, ranks, registry, &outcome).is_ok());
  EXPECT_EQ(outcome.code(), ErrorCode::kCapacity);
  EXPECT_TRUE(ranks.seen.empty());
}

}  // namespace
}  // namespace reattn

namespace reattn {
namespace {

TEST(SnapshotCatalog, OffWithoutADirectory) {
  SnapshotCatalog off("");
  EXPECT_FALSE(off.enabled());
  EXPECT_TRUE(off.list().empty());
  EXPECT_EQ(off.read("a").status().code(), ErrorCode::kForbidden);
  EXPECT_EQ(off.remove("a").code(), ErrorCode::kForbidden);
  EXPECT_NE(off.check_enabled().message().find("--snapshot-dir"), std::string::npos);
}

TEST(SnapshotCatalog, NamesAreHeldOnceAndNeverPaths) {
  SnapshotCatalog catalog("/nonexistent-snapshot-dir");
  std::string tmp;
  ASSERT_TRUE(catalog.hold_new("a", &tmp));
  EXPECT_EQ(tmp.rfind(".tmp-a-", 0), 0u) << tmp;
  std::string again;
  EXPECT_FALSE(catalog.hold_new("a", &again));
  catalog.release("a");
  EXPECT_TRUE(catalog.hold_new("a", &again));
  EXPECT_NE(again, tmp) << "every attempt writes its own temporary directory";
  for (const char* bad : {"../x", ".tmp-a-1", "a/b", ""}) {
    EXPECT_EQ(catalog.read(bad).status().code(), ErrorCode::kInvalidArgument) << bad;
    EXPECT_EQ(catalog.remove(bad).code(), ErrorCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace reattn
