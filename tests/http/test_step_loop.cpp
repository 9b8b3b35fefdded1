// The rank-0 step loop without MPI: a fake OperationRunner stands in for the ranks, so plan
// building, the registry re-check, failed and partial appends, and a fault failing the queue
// are checked as plain unit tests.
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <functional>
#include <optional>
#include <thread>

#include "coordinator/load_operation.h"
#include "coordinator/long_operation.h"
#include "coordinator/step_loop.h"
#include "tests/http/tiny_service_config.h"

namespace reattn {
namespace {

Config tiny_config() { return test::tiny_service_config(16); }

// Records what the step loop submits and answers as `answer` says.
class FakeRanks final : public OperationRunner {
 public:
  std::function<Status(const Operation&, OperationResult*)> answer = [](const Operation&, OperationResult*) {
    return Status::ok();
  };
  std::vector<Operation> seen;
  Status submit(const Operation& op, OperationResult* result) override {
    seen.push_back(op);
    *result = OperationResult{};
    return answer(op, result);
  }
};

class StepLoopTest : public ::testing::Test {
 protected:
  StepLoopTest() : config_(tiny_config()), registry_(config_, 2), queue_(16) {
    spdlog::set_level(spdlog::level::err);
    state_.set_ready();
  }

  // Pushes a task whose result lands in results_[slot].
  void push(Operation op, size_t slot) {
    if (results_.size() <= slot) results_.resize(slot + 1);
    Task t;
    t.op = std::move(op);
    t.done = [this, slot](TaskResult r) { results_[slot] = std::move(r); };
    ASSERT_TRUE(queue_.push(std::move(t)).is_ok());
  }

  static StepPlan query(ContextId id, int64_t qlen, QueryMode mode = QueryMode::kTail) {
    StepPlan plan;
    plan.queries.push_back(QueryPlan{id, 0, qlen, 0, 1, mode, 0});
    plan.q.assign(static_cast<size_t>(qlen) * 4 * 16, static_cast<float>(id));
    return plan;
  }

  // Runs the loop over what is queued, until the queue is empty.
  Status run() {
    queue_.close();
    StepLoop loop(ranks_, queue_, registry_, metrics_, state_, config_, [](std::function<void()> f) { f(); });
    return loop.run();
  }

  Config config_;
  Metrics metrics_;
  ServiceState state_;
  Registry registry_;
  TaskQueue queue_;
  FakeRanks ranks_;
  std::vector<std::optional<TaskResult>> results_;
};

TEST_F(StepLoopTest, QueuedQueriesBecomeOneStepPlanFromTheRegistry) {
  registry_.insert({1, 0, 40});
  registry_.insert({2, 1, 100});
  push(query(1, 2), 0);
  push(query(9, 1), 1);  // no such context: fails alone
  push(query(2, 3, QueryMode::kDetached), 2);
  push(query(1, 50), 3);  // longer than the context holds (and the window): fails alone
  ranks_.answer = [](const Operation& op, OperationResult* r) {
    const StepPlan& plan = std::get<StepPlan>(op);
    for (const QueryPlan& q : plan.queries) {
      QueryResult qr;
      qr.recalled = {static_cast<int64_t>(q.context_id)};
      qr.out.assign(plan.q.begin() + q.q_offset, plan.q.begin() + q.q_offset + q.qlen * 4 * 16);
      r->queries.push_back(qr);
    }
    r->timing.total_ms = 1.5;
    return Status::ok();
  };
  ASSERT_TRUE(run().is_ok());
  ASSERT_EQ(ranks_.seen.size(), 1u);
  const StepPlan& plan = std::get<StepPlan>(ranks_.seen[0]);
  EXPECT_EQ(plan.strategy, config_.reattention.final_attention);
  ASSERT_EQ(plan.queries.size(), 2u);
  EXPECT_EQ(plan.queries[0].context_id, 1u);
  EXPECT_EQ(plan.queries[0].tokens, 40);
  EXPECT_EQ(plan.queries[0].owner_rank, 0);
  EXPECT_EQ(plan.queries[0].q_offset, 0);
  EXPECT_EQ(plan.queries[1].context_id, 2u);
  EXPECT_EQ(plan.queries[1].tokens, 100);
  EXPECT_EQ(plan.queries[1].owner_rank, 1);
  EXPECT_EQ(plan.queries[1].q_offset, 2 * 4 * 16);
  EXPECT_EQ(plan.queries[1].mode, QueryMode::kDetached);
  EXPECT_EQ(plan.q.size(), 5u * 4 * 16);

  ASSERT_TRUE(results_[0] && results_[1] && results_[2] && results_[3]);
  EXPECT_TRUE(results_[0]->status.is_ok());
  EXPECT_EQ(results_[0]->query.recalled, (std::vector<int64_t>{1}));
  EXPECT_EQ(results_[0]->query.out, std::vector<float>(2 * 4 * 16, 1.0f));
  EXPECT_EQ(results_[0]->batch_size, 2u);
  EXPECT_EQ(results_[0]->context.tokens, 40);
  EXPECT_EQ(results_[1]->status.code(), ErrorCode::kNotFound);
  EXPECT_EQ(results_[2]->query.out, std::vector<float>(3 * 4 * 16, 2.0f));
  EXPECT_EQ(results_[3]->status.code(), ErrorCode::kInvalidArgument);
}

TEST_F(StepLoopTest, AppendsUpdateTheRegistryOnlyWhenTheRanksDid) {
  registry_.insert({1, 0, 10});
  registry_.insert({2, 1, 10});
  push(AppendSynthetic{1, 5, 0, {}}, 0);      // goes through
  push(AppendSynthetic{2, 7, 0, {}}, 1);      // refused by the ranks: nothing changes
  push(AppendSynthetic{2, 3, 0, {}}, 2);      // went through on some ranks only: dropped
  push(AppendSynthetic{1, 5000, 0, {}}, 3);   // over capacity: never reaches the ranks
  push(AppendSynthetic{9, 1, 0, {}}, 4);      // unknown context: never reaches the ranks
  int call = 0;
  ranks_.answer = [&call](const Operation& op, OperationResult* r) {
    const auto& a = std::get<AppendSynthetic>(op);
    if (call++ == 0) {
      r->tokens = 10 + a.tokens;
    } else if (call == 2) {
      r->status = invalid_argument("refused");
    } else {
      r->status = internal_error("partial");
      r->context_dropped = true;
    }
    return Status::ok();
  };
  ASSERT_TRUE(run().is_ok());
  EXPECT_EQ(ranks_.seen.size(), 3u);
  EXPECT_TRUE(results_[0]->status.is_ok());
  EXPECT_EQ(results_[0]->context.tokens, 15);
  EXPECT_EQ(registry_.find(1)->tokens, 15);
  EXPECT_EQ(results_[1]->status.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(results_[2]->status.code(), ErrorCode::kInternal);
  EXPECT_FALSE(registry_.find(2).has_value());
  EXPECT_EQ(results_[3]->status.code(), ErrorCode::kCapacity);
  EXPECT_EQ(results_[4]->status.code(), ErrorCode::kNotFound);
}

// Found while fuzzing the API (issue 13): an append's answer carried the new `tokens` but every
// layer's length from before the append ({"tokens": 301, "layer_tokens": [300, 300]}).
TEST_F(StepLoopTest, AnAppendAnswersEveryLayersNewLength) {
  registry_.insert({1, 0, 10});
  push(AppendSynthetic{1, 5, 0, {}}, 0);
  push(AppendKv{1, 3, std::make_shared<std::string>()}, 1);
  ranks_.answer = [this](const Operation& op, OperationResult* r) {
    const ContextInfo before = *registry_.find(1);
    r->tokens = before.tokens + (std::holds_alternative<AppendSynthetic>(op) ? std::get<AppendSynthetic>(op).tokens
                                                                               : std::get<AppendKv>(op).tokens);
    return Status::ok();
  };
  ASSERT_TRUE(run().is_ok());
  ASSERT_TRUE(results_[0] && results_[1]);
  EXPECT_EQ(results_[0]->context.tokens, 15);
  EXPECT_EQ(results_[0]->context.layer_tokens, (std::vector<int64_t>{15, 15}));
  EXPECT_EQ(results_[1]->context.tokens, 18);
  EXPECT_EQ(results_[1]->context.layer_tokens, (std::vector<int64_t>{18, 18}));
}

TEST_F(StepLoopTest, CreatePlansIdAndOwnerAndInsertsOnlyOnSuccess) {
  push(CreateContext{}, 0);
  push(CreateContext{}, 1);
  int call = 0;
  ranks_.answer = [&call](const Operation&, OperationResult* r) {
    if (call++ == 1) r->status = Status(ErrorCode::kCapacity, "no memory");
    return Status::ok();
  };
  ASSERT_TRUE(run().is_ok());
  ASSERT_EQ(ranks_.seen.size(), 2u);
  const auto& first = std::get<CreateContext>(ranks_.seen[0]);
  EXPECT_EQ(first.context_id, results_[0]->context.id);
  EXPECT_EQ(first.owner_rank, results_[0]->context.owner_rank);
  EXPECT_EQ(results_[0]->context.layer_tokens, (std::vector<int64_t>{0, 0}));  // every layer, empty
  EXPECT_TRUE(registry_.find(first.context_id).has_value());
  EXPECT_EQ(results_[1]->status.code(), ErrorCode::kCapacity);
  EXPECT_EQ(registry_.size(), 1u);
}

TEST_F(StepLoopTest, AFatalFaultFailsTheBatchAndEveryQueuedTask) {
  registry_.insert({1, 0, 40});
  push(EraseContext{1}, 0);
  push(query(1, 1), 1);
  push(query(1, 1), 2);
  ranks_.answer = [](const Operation&, OperationResult*) { return Status(ErrorCode::kFatal, "MPI_Bcast failed"); };
  const Status fault = run();
  EXPECT_EQ(fault.code(), ErrorCode::kFatal);
  EXPECT_EQ(ranks_.seen.size(), 1u);
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(results_[i].has_value()) << i;
    EXPECT_EQ(results_[i]->status.code(), ErrorCode::kUnavailable) << i;
  }
  EXPECT_EQ(state_.phase(), ServicePhase::kFaulted);
  EXPECT_TRUE(registry_.find(1).has_value());  // the erase did not go through
}

// A task marked answer_on_step_loop (a small binary answer) completes on the step loop's own
// thread, without the post to an HTTP thread; the others are posted.
TEST_F(StepLoopTest, SmallAnswersCompleteOnTheStepLoopOthersArePosted) {
  registry_.insert({1, 0, 40});
  std::vector<bool> posted_when_done;
  bool in_post = false;
  for (bool on_loop : {true, false}) {
    Task t;
    t.op = query(1, 1);
    t.answer_on_step_loop = on_loop;
    t.done = [&](TaskResult r) {
      EXPECT_TRUE(r.status.is_ok()) << r.status.to_string();
      posted_when_done.push_back(in_post);
    };
    ASSERT_TRUE(queue_.push(std::move(t)).is_ok());
  }
  ranks_.answer = [](const Operation& op, OperationResult* r) {
    r->queries.resize(std::get<StepPlan>(op).queries.size());
    return Status::ok();
  };
  queue_.close();
  StepLoop loop(ranks_, queue_, registry_, metrics_, state_, config_, [&](std::function<void()> f) {
    in_post = true;
    f();
    in_post = false;
  });
  ASSERT_TRUE(loop.run().is_ok());
  EXPECT_EQ(posted_when_done, (std::vector<bool>{false, true}));
}

}  // namespace
}  // namespace reattn

namespace reattn {
namespace {

// A long operation of `slices` slices, each appending 10 synthetic tokens to its context;
// its rollback is one append of 0 tokens with seed 777 (a marker the fake ranks record).
class FakeLoad final : public LongOperation {
 public:
  FakeLoad(ContextId id, int slices) : id_(id), slices_(slices) {}
  OperationKind kind() const override { return OperationKind::kLoad; }
  Status start(Registry& registry) override {
    const std::optional<ContextInfo> ctx = registry.find(id_);
    if (!ctx) return not_found("no context");
    before_ = ctx->tokens;
    return Status::ok();
  }
  std::optional<Operation> next_slice() override {
    if (done_ == slices_) return std::nullopt;
    return AppendSynthetic{id_, 10, 0, {}};
  }
  Status on_slice_done(const Operation&, const OperationResult& result, Registry& registry) override {
    if (!result.status.is_ok()) return result.status;
    ++done_;
    registry.set_tokens(id_, before_ + 10 * done_);
    return Status::ok();
  }
  OperationProgress progress() const override { return {10 * done_, 10 * slices_, 100 * done_}; }
  std::vector<Operation> rollback() override { return {AppendSynthetic{id_, 0, 777, {}}}; }
  void on_rolled_back(Registry& registry) override { registry.set_tokens(id_, before_); }

 private:
  ContextId id_;
  int64_t slices_;
  int64_t done_ = 0;
  int64_t before_ = 0;
};

bool is_undo(const Operation& op) {
  const auto* a = std::get_if<AppendSynthetic>(&op);
  return a && a->seed == 777;
}
bool is_slice(const Operation& op) {
  const auto* a = std::get_if<AppendSynthetic>(&op);
  return a && a->seed == 0 && a->tokens == 10;
}

class LongOperationTest : public StepLoopTest {
 protected:
  // Queues the operation's task; returns its id.
  std::string push_long(ContextId id, int slices) {
    Task t;
    t.operation_id = registry_.operations().create(OperationKind::kLoad, id, 10 * slices);
    t.long_operation = std::make_shared<FakeLoad>(id, slices);
    const std::string op = t.operation_id;
    EXPECT_TRUE(queue_.push(std::move(t)).is_ok());
    return op;
  }
  // Runs the loop on a thread until operation `op` finishes, then closes the queue.
  Status run_until_finished(const std::string& op) {
    Status result;
    std::thread loop_thread([&] {
      StepLoop loop(ranks_, queue_, registry_, metrics_, state_, config_, [](std::function<void()> f) { f(); });
      result = loop.run();
    });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!is_finished(registry_.operations().get(op)->state) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    queue_.close();
    loop_thread.join();
    return result;
  }
  static StepPlan answered(const Operation& op, OperationResult* r) {
    const StepPlan& plan = std::get<StepPlan>(op);
    for (size_t i = 0; i < plan.queries.size(); ++i) r->queries.push_back(QueryResult{});
    return plan;
  }
};

TEST_F(LongOperationTest, SlicesInterleaveWithTasksAndTheContextIsBusyMeanwhile) {
  registry_.insert({1, 0, 40});
  registry_.insert({2, 1, 100});
  const std::string op = push_long(1, 3);
  push(query(2, 1), 0);
  push(query(1, 1), 1);                   // the context is being loaded: refused
  push(AppendSynthetic{1, 5, 0, {}}, 2);  // likewise
  push(EraseContext{1}, 3);               // likewise
  ranks_.answer = [](const Operation& op, OperationResult* r) {
    if (std::holds_alternative<StepPlan>(op)) answered(op, r);
    return Status::ok();
  };
  // At request time the table already names the operation.
  const Status busy = registry_.operations().check_not_busy(1);
  EXPECT_EQ(busy.code(), ErrorCode::kConflict);
  EXPECT_NE(busy.message().find(op), std::string::npos) << busy.message();
  EXPECT_TRUE(registry_.operations().check_not_busy(2).is_ok());
  ASSERT_TRUE(run_until_finished(op).is_ok());

  ASSERT_EQ(ranks_.seen.size(), 4u);
  EXPECT_TRUE(is_slice(ranks_.seen[0]));
  ASSERT_TRUE(std::holds_alternative<StepPlan>(ranks_.seen[1]));  // the query on context 2, between slices
  EXPECT_EQ(std::get<StepPlan>(ranks_.seen[1]).queries.size(), 1u);
  EXPECT_EQ(std::get<StepPlan>(ranks_.seen[1]).queries[0].context_id, 2u);
  EXPECT_TRUE(is_slice(ranks_.seen[2]));
  EXPECT_TRUE(is_slice(ranks_.seen[3]));
  EXPECT_TRUE(results_[0]->status.is_ok());
  for (size_t i = 1; i <= 3; ++i) {
    EXPECT_EQ(results_[i]->status.code(), ErrorCode::kConflict) << i;
    EXPECT_NE(results_[i]->status.message().find(op), std::string::npos) << results_[i]->status.message();
  }
  const OperationRecord r = *registry_.operations().get(op);
  EXPECT_EQ(r.state, OperationState::kSucceeded);
  EXPECT_EQ(r.progress.tokens_done, 30);
  EXPECT_EQ(r.progress.bytes_done, 300);
  EXPECT_TRUE(r.error.empty());
  EXPECT_EQ(registry_.find(1)->tokens, 70);
  EXPECT_TRUE(registry_.operations().check_not_busy(1).is_ok());
  EXPECT_EQ(registry_.operations().request_cancel(op).code(), ErrorCode::kConflict);  // already finished
  EXPECT_NE(metrics_.render({}).find("reattn_operations_total{kind=\"load\",state=\"succeeded\"} 1"), std::string::npos);
}

TEST_F(LongOperationTest, ACancelMidwayRollsBackAndRestoresTheRegistry) {
  registry_.insert({1, 0, 40});
  const std::string op = push_long(1, 5);
  int slices = 0;
  ranks_.answer = [&](const Operation& o, OperationResult*) {
    if (is_slice(o) && ++slices == 2) {
      EXPECT_TRUE(registry_.operations().request_cancel(op).is_ok());
    }
    return Status::ok();
  };
  ASSERT_TRUE(run_until_finished(op).is_ok());
  ASSERT_EQ(ranks_.seen.size(), 3u);  // two slices, then the undo
  EXPECT_TRUE(is_undo(ranks_.seen[2]));
  const OperationRecord r = *registry_.operations().get(op);
  EXPECT_EQ(r.state, OperationState::kCancelled);
  EXPECT_EQ(r.progress.tokens_done, 20);
  EXPECT_EQ(registry_.find(1)->tokens, 40);
}

// A cancel that arrives after a load's commit went through on the ranks is too late: the
// ranks keep the loaded tokens (their abort has nothing to undo), so the operation succeeded
// and the registry keeps the new length. Rolling back here left the registry 100 tokens short
// of the ranks and the record saying "cancelled".
TEST_F(LongOperationTest, ACancelAfterTheLoadCommittedIsTooLateAndTheLoadStays) {
  registry_.insert({1, 0, 40});
  Task t;
  t.operation_id = registry_.operations().create(OperationKind::kLoad, 1, 100);
  t.long_operation = std::make_shared<LoadOperation>(config_, 1, "/nowhere/kv.safetensors", 100, 1 << 30);
  const std::string op = t.operation_id;
  ASSERT_TRUE(queue_.push(std::move(t)).is_ok());
  ranks_.answer = [&](const Operation& o, OperationResult* r) {
    const auto* load = std::get_if<LoadKv>(&o);
    if (load && load->phase == LoadPhase::kSlice) r->tokens = 40 + load->offset + load->count;
    if (load && load->phase == LoadPhase::kCommit) {
      EXPECT_TRUE(registry_.operations().request_cancel(op).is_ok());
    }
    return Status::ok();
  };
  ASSERT_TRUE(run_until_finished(op).is_ok());
  for (const Operation& o : ranks_.seen) {
    EXPECT_NE(std::get<LoadKv>(o).phase, LoadPhase::kAbort) << "an abort after the commit";
  }
  const OperationRecord r = *registry_.operations().get(op);
  EXPECT_EQ(r.state, OperationState::kSucceeded) << r.error;
  EXPECT_EQ(registry_.find(1)->tokens, 140);
}

TEST_F(LongOperationTest, AFailedSliceFailsTheOperationWithItsErrorAndRollsBack) {
  registry_.insert({1, 0, 40});
  const std::string op = push_long(1, 5);
  int slices = 0;
  ranks_.answer = [&](const Operation& o, OperationResult* r) {
    if (is_slice(o) && ++slices == 3) r->status = invalid_argument("tensor 'k': NaN at index 12345");
    return Status::ok();
  };
  ASSERT_TRUE(run_until_finished(op).is_ok());
  ASSERT_EQ(ranks_.seen.size(), 4u);
  EXPECT_TRUE(is_undo(ranks_.seen[3]));
  const OperationRecord r = *registry_.operations().get(op);
  EXPECT_EQ(r.state, OperationState::kFailed);
  EXPECT_NE(r.error.find("NaN at index 12345"), std::string::npos) << r.error;
  EXPECT_EQ(registry_.find(1)->tokens, 40);
}

TEST_F(LongOperationTest, AFailedRollbackDropsTheContextRatherThanLeaveItInconsistent) {
  registry_.insert({1, 0, 40});
  const std::string op = push_long(1, 5);
  ranks_.answer = [&](const Operation& o, OperationResult* r) {
    if (is_slice(o)) r->status = invalid_argument("bad slice");
    if (is_undo(o)) r->status = internal_error("could not restore");
    return Status::ok();
  };
  ASSERT_TRUE(run_until_finished(op).is_ok());
  ASSERT_EQ(ranks_.seen.size(), 3u);
  EXPECT_TRUE(std::holds_alternative<EraseContext>(ranks_.seen[2]));
  EXPECT_FALSE(registry_.find(1).has_value());
  EXPECT_NE(registry_.operations().get(op)->error.find("dropped"), std::string::npos);
}

TEST_F(LongOperationTest, CancelledBeforeItStartsRunsNothingAndStartFailuresAreRecorded) {
  registry_.insert({1, 0, 40});
  const std::string cancelled = push_long(1, 5);
  EXPECT_TRUE(registry_.operations().request_cancel(cancelled).is_ok());
  const std::string orphan = push_long(9, 5);  // no such context by the time it starts
  ASSERT_TRUE(run_until_finished(orphan).is_ok());
  EXPECT_TRUE(ranks_.seen.empty());
  EXPECT_EQ(registry_.operations().get(cancelled)->state, OperationState::kCancelled);
  EXPECT_EQ(registry_.operations().get(orphan)->state, OperationState::kFailed);
  EXPECT_EQ(registry_.operations().request_cancel("op-999").code(), ErrorCode::kNotFound);
}

TEST_F(LongOperationTest, ShuttingDownCancelsARunningOperation) {
  registry_.insert({1, 0, 40});
  const std::string op = push_long(1, 1000);
  ranks_.answer = [&](const Operation& o, OperationResult*) {
    if (is_slice(o)) queue_.close();
    return Status::ok();
  };
  ASSERT_TRUE(run_until_finished(op).is_ok());
  EXPECT_EQ(registry_.operations().get(op)->state, OperationState::kCancelled);
  EXPECT_TRUE(is_undo(ranks_.seen.back()));
  EXPECT_EQ(registry_.find(1)->tokens, 40);
}

TEST_F(LongOperationTest, AFaultDuringASliceFailsTheOperationAndTheService) {
  registry_.insert({1, 0, 40});
  const std::string op = push_long(1, 5);
  ranks_.answer = [&](const Operation& o, OperationResult*) {
    return is_slice(o) ? Status(ErrorCode::kFatal, "rank 1 stopped answering") : Status::ok();
  };
  const std::string queued = push_long(2, 5);  // still in the queue when the fault comes
  EXPECT_EQ(run_until_finished(op).code(), ErrorCode::kFatal);
  const OperationRecord r = *registry_.operations().get(op);
  EXPECT_EQ(r.state, OperationState::kFailed);
  EXPECT_NE(r.error.find("rank 1 stopped answering"), std::string::npos) << r.error;
  EXPECT_EQ(state_.phase(), ServicePhase::kFaulted);
  // Not left "queued" for ever: it will never run.
  const OperationRecord q = *registry_.operations().get(queued);
  EXPECT_EQ(q.state, OperationState::kFailed);
  EXPECT_NE(q.error.find("rank 1 stopped answering"), std::string::npos) << q.error;
}

TEST(OperationTable, KeepsABoundedNumberOfFinishedRecordsOldestDropped) {
  OperationTable table;
  const std::string running = table.create(OperationKind::kSnapshot, 5, 0);
  table.set_running(running);
  std::string first;
  for (size_t i = 0; i < OperationTable::kKeptFinished + 10; ++i) {
    const std::string id = table.create(OperationKind::kLoad, 1, 10);
    if (i == 0) first = id;
    table.finish(id, OperationState::kFailed, std::string(5000, 'x'));
  }
  EXPECT_EQ(table.list().size(), OperationTable::kKeptFinished + 1);
  EXPECT_FALSE(table.get(first).has_value());
  EXPECT_TRUE(table.get(running).has_value());  // unfinished records are never dropped
  EXPECT_LE(table.list().back().error.size(), OperationTable::kErrorBytes + 4);
  // A snapshot leaves queries alone; other requests on its context are refused.
  EXPECT_TRUE(table.check_not_busy(5, /*queries_too=*/true).is_ok());
  EXPECT_EQ(table.check_not_busy(5).code(), ErrorCode::kConflict);
}

}  // namespace
}  // namespace reattn

namespace reattn {
namespace {

// The order rule of per-layer steps, as the registry applies it (and the length it charges).
TEST(RegistryLayerSteps, OrderRuleCapacityAndLengths) {
  const Config c = tiny_config();  // 2 layers
  Registry r(c, 2);
  r.insert({1, 0, 100});
  ContextInfo info = *r.find(1);
  EXPECT_EQ(info.layer_tokens, (std::vector<int64_t>{100, 100}));
  EXPECT_TRUE(r.check_layer_step(1, 0, 5).is_ok());
  const Status skip = r.check_layer_step(1, 1, 5);  // layer 1 before layer 0
  EXPECT_EQ(skip.code(), ErrorCode::kOutOfOrder);
  EXPECT_NE(skip.message().find("100"), std::string::npos) << skip.message();
  EXPECT_NE(skip.message().find("105"), std::string::npos) << skip.message();
  r.set_layer_tokens(1, 0, 105);
  info = *r.find(1);
  EXPECT_EQ(info.tokens, 100);           // what every layer has reached
  EXPECT_EQ(info.charged_tokens(), 105); // what capacity charges
  EXPECT_EQ(r.check_layer_step(1, 0, 5).code(), ErrorCode::kOutOfOrder);  // layer 0 again mid-pass
  EXPECT_EQ(r.check_layer_step(1, 1, 4).code(), ErrorCode::kOutOfOrder);  // not the pass's qlen
  EXPECT_TRUE(r.check_layer_step(1, 1, 5).is_ok());
  EXPECT_EQ(r.check_append(1, 3).code(), ErrorCode::kOutOfOrder);        // all layers mid-pass
  EXPECT_EQ(r.check_layer_step(1, 2, 5).code(), ErrorCode::kInvalidArgument);  // no layer 2
  EXPECT_EQ(r.check_layer_step(1, 0, 33).code(), ErrorCode::kInvalidArgument); // over the window
  EXPECT_EQ(r.check_layer_step(9, 0, 1).code(), ErrorCode::kNotFound);
  r.set_layer_tokens(1, 1, 105);
  EXPECT_EQ(r.find(1)->tokens, 105);
  EXPECT_TRUE(r.check_append(1, 3).is_ok());
  // Charged once per token: the registry's per-rank tokens follow the longest layer.
  const std::vector<int64_t> per_rank = r.tokens_per_rank();
  int64_t sum = 0;
  for (int64_t t : per_rank) sum += t;
  EXPECT_EQ(sum, 105);
  // Capacity: 1000 per rank on 2 ranks; a layer-0 step past it is refused.
  r.set_tokens(1, 1990);
  EXPECT_EQ(r.check_layer_step(1, 0, 20).code(), ErrorCode::kCapacity);
}

}  // namespace
}  // namespace reattn
