// Block packing (Backend::pack_blocks) on the cpu backend against plain memcpy, at odd block
// sizes, unaligned and repeated sources; and the gather step that uses it (one message per
// (sender, owner) pair) on three in-process ranks, with a batch whose queries have different
// owners, against the fp64 reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "kernels/cpu/cpu_backend.h"
#include "tests/harness.h"

namespace reattn {
namespace {

TEST(PackBlocks, CpuCopiesBlocksInListOrder) {
  CpuBackend backend(2);
  std::mt19937_64 rng(11);
  for (size_t block_bytes : {size_t{1}, size_t{48}, size_t{4100}, size_t{131072}}) {
    for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{37}}) {
      SCOPED_TRACE("block_bytes " + std::to_string(block_bytes) + " count " + std::to_string(count));
      // Sources anywhere in a pool (odd offsets, repeats), as chunk blocks are in KV pages.
      std::vector<unsigned char> pool(block_bytes * 8 + 7);
      for (unsigned char& b : pool) b = static_cast<unsigned char>(rng());
      std::vector<const void*> src(count);
      for (const void*& s : src) s = pool.data() + rng() % (pool.size() - block_bytes + 1);
      if (count > 2) src[2] = src[0];
      std::vector<unsigned char> want(count * block_bytes);
      for (int64_t b = 0; b < count; ++b) std::memcpy(want.data() + b * block_bytes, src[b], block_bytes);
      std::vector<unsigned char> got(count * block_bytes + 1, 0xA5);
      PackParams p;
      p.src = src.data();
      p.count = count;
      p.block_bytes = block_bytes;
      p.dst = got.data();
      ASSERT_TRUE(backend.pack_blocks(p).is_ok());
      EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin()));
      EXPECT_EQ(got.back(), 0xA5) << "wrote past the last block";
    }
  }
}

TEST(PackBlocks, RefusesBadParams) {
  CpuBackend backend(1);
  PackParams p;
  p.count = -1;
  p.block_bytes = 16;
  EXPECT_EQ(backend.pack_blocks(p).code(), ErrorCode::kInvalidArgument);
  p.count = 3;
  EXPECT_EQ(backend.pack_blocks(p).code(), ErrorCode::kInvalidArgument);
}

// `world` ranks as threads of this process: collectives are copies between their buffers.
// Records, per exchange call, the most messages it carried between one ordered pair of ranks.
class ThreadWorld {
 public:
  explicit ThreadWorld(int world) : world_(world), posted_(world), posted_sends_(world), exchanges_(world, 0) {}
  int world() const { return world_; }
  // [exchange calls, in order]
  const std::vector<int>& max_messages_per_pair() const { return max_messages_per_pair_; }

  void barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t generation = generation_;
    if (++arrived_ == world_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

  Status allgather(int rank, const void* send, void* recv, size_t bytes) {
    posted_[rank] = send;
    barrier();
    for (int r = 0; r < world_; ++r) std::memcpy(static_cast<char*>(recv) + r * bytes, posted_[r], bytes);
    barrier();
    return Status::ok();
  }

  Status exchange(int rank, const std::vector<Communicator::Transfer>& sends,
                  const std::vector<Communicator::Transfer>& recvs) {
    posted_sends_[rank] = &sends;
    barrier();
    Status status;
    std::vector<int> per_peer(world_, 0);
    for (const auto& s : sends) ++per_peer[s.peer];
    {
      std::lock_guard<std::mutex> lock(mu_);
      const size_t call = exchanges_[rank]++;
      if (max_messages_per_pair_.size() <= call) max_messages_per_pair_.resize(call + 1, 0);
      for (int n : per_peer) max_messages_per_pair_[call] = std::max(max_messages_per_pair_[call], n);
    }
    // The k-th receive from a peer takes that peer's k-th send to this rank.
    std::vector<int> taken(world_, 0);
    for (const auto& r : recvs) {
      int k = taken[r.peer]++;
      const Communicator::Transfer* match = nullptr;
      for (const auto& s : *posted_sends_[r.peer]) {
        if (s.peer == rank && k-- == 0) {
          match = &s;
          break;
        }
      }
      if (!match || match->bytes != r.bytes) {
        status = internal_error("thread exchange: receive on rank " + std::to_string(rank) + " from " +
                                std::to_string(r.peer) + " has no matching send");
        continue;
      }
      std::memcpy(r.data, match->data, r.bytes);
    }
    barrier();
    return status;
  }

 private:
  int world_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::vector<const void*> posted_;
  std::vector<const std::vector<Communicator::Transfer>*> posted_sends_;
  std::vector<size_t> exchanges_;
  std::vector<int> max_messages_per_pair_;
};

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(ThreadWorld& world, int rank) : world_(world), rank_(rank) {}
  const char* name() const override { return "threads"; }
  int rank() const override { return rank_; }
  int world() const override { return world_.world(); }
  Status allgather(const void* send, void* recv, size_t bytes) override {
    return world_.allgather(rank_, send, recv, bytes);
  }
  Status exchange(const std::vector<Transfer>& sends, const std::vector<Transfer>& recvs) override {
    return world_.exchange(rank_, sends, recvs);
  }

 private:
  ThreadWorld& world_;
  int rank_;
};

TEST(GatherStep, OneMessagePerPeerForABatchOfOwners) {
  Config config;
  config.model = ModelConfig{2, 4, 2, 16, 10000.0, 4096, {}};
  config.reattention.sink_tokens = 4;
  config.reattention.local_window = 32;
  config.reattention.chunk_tokens = 8;
  config.reattention.top_k = 2;
  config.reattention.max_recall_chunks = 6;
  config.backend.threads = 1;
  constexpr int kWorld = 3;
  constexpr int kLayer = 1;
  // Context 1 owned by rank 0, context 2 by rank 2: rank 0 both receives and sends chunks.
  const ref::Context ctx_a = ref::synthetic_context(config.model, config.reattention, 1001, 21, {100, 600}, kLayer);
  const ref::Context ctx_b = ref::synthetic_context(config.model, config.reattention, 777, 22, {50, 400}, kLayer);
  const std::vector<const ref::Context*> contexts = {&ctx_a, &ctx_b, &ctx_a, &ctx_b};
  const std::vector<int64_t> qlens = {1, 3, 2, 1};
  std::mt19937_64 rng(23);
  std::uniform_real_distribution<float> u(-1.5f, 1.5f);
  StepPlan plan;
  plan.reply_rank = 1;
  std::vector<std::vector<float>> qs;
  for (size_t i = 0; i < contexts.size(); ++i) {
    std::vector<float> q(static_cast<size_t>(qlens[i]) * config.model.q_heads * config.model.head_dim);
    for (float& x : q) x = u(rng);
    const bool a = contexts[i] == &ctx_a;
    plan.queries.push_back(QueryPlan{a ? 1u : 2u, contexts[i]->n, qlens[i], static_cast<int64_t>(plan.q.size()),
                                     kLayer, QueryMode::kTail, a ? 0 : 2});
    plan.q.insert(plan.q.end(), q.begin(), q.end());
    qs.push_back(std::move(q));
  }
  for (FinalAttention strategy : {FinalAttention::kGather, FinalAttention::kPartial}) {
    SCOPED_TRACE(final_attention_name(strategy));
    plan.strategy = strategy;
    ThreadWorld world(kWorld);
    std::vector<Status> status(kWorld);
    std::vector<QueryResult> results;
    std::vector<std::thread> ranks;
    for (int r = 0; r < kWorld; ++r) {
      ranks.emplace_back([&, r] {
        CpuBackend backend(1);
        ThreadCommunicator comm(world, r);
        KvStore store(backend, config, r, kWorld);
        Status& st = status[r];
        st = store.create(1, 0, {kLayer});
        if (st.is_ok()) st = store.create(2, 2, {kLayer});
        if (st.is_ok()) st = store.append(1, test::ContextSource(ctx_a, kLayer, 0, ctx_a.n));
        if (st.is_ok()) st = store.append(2, test::ContextSource(ctx_b, kLayer, 0, ctx_b.n));
        StepRunner runner(backend, comm, config, store);
        std::vector<QueryResult> mine;
        // Every rank runs the step even after a local failure, so the collectives stay matched.
        const Status ran = runner.run(plan, &mine, nullptr);
        if (st.is_ok()) st = ran;
        if (r == plan.reply_rank) results = std::move(mine);
      });
    }
    for (std::thread& t : ranks) t.join();
    for (int r = 0; r < kWorld; ++r) ASSERT_TRUE(status[r].is_ok()) << "rank " << r << ": " << status[r].to_string();
    // The step's first exchange is the chunk K/V's (gather): one message per (sender, owner).
    if (strategy == FinalAttention::kGather) {
      ASSERT_FALSE(world.max_messages_per_pair().empty());
      EXPECT_EQ(world.max_messages_per_pair()[0], 1);
    }
    ASSERT_EQ(results.size(), contexts.size());
    for (size_t i = 0; i < contexts.size(); ++i) {
      SCOPED_TRACE("query " + std::to_string(i));
      ASSERT_TRUE(results[i].status.is_ok()) << results[i].status.to_string();
      const ref::Result want = ref::query(*contexts[i], qs[i], qlens[i], QueryMode::kTail);
      EXPECT_EQ(results[i].recalled, want.recalled);
      EXPECT_LT(ref::relative_error(results[i].out, want.out), 1e-5);
    }
  }
}

}  // namespace
}  // namespace reattn
