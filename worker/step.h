// One step of the service on every rank: score this rank's mid chunks for a batch of
// queries, allgather the candidates (one collective), select the recall set, and run the
// final attention by the configured strategy (gather: chunk K/V to the owner, packed into one
// message per sending rank; partial: each rank's (out, max, sum) to the owner), then deliver
// the outputs to the reply rank.
// The plan is plain data, broadcast by the coordinator; call only from the step loop.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "common/protocol.h"
#include "worker/kv_store.h"
#include "worker/rank_plan.h"

namespace reattn {

class StepRunner {
 public:
  StepRunner(Backend& backend, Communicator& comm, const Config& config, const KvStore& store);

  // Every rank calls it with the same plan. On plan.reply_rank, `results` gets one entry per
  // query (a query that fails validation on any rank gets its error; the others run).
  // A non-ok return is a device or communicator fault.
  Status run(const StepPlan& plan, std::vector<QueryResult>* results, StepTiming* timing);

 private:
  // What this rank knows about one query of the step.
  struct QueryState {
    const QueryPlan* plan = nullptr;
    const ContextShard* ctx = nullptr;
    int64_t rows = 0;         // qlen * H
    int64_t cand_offset = 0;  // candidates before this query's in a rank's send block
    SelectedQuery selected;   // ok, owner, regions; U and layout after select()
    Status status;
  };

  // The phases of run(), in order. Each returns a fault; a query's own failure goes to its
  // status and it sits out the later phases.
  std::vector<QueryState> check(const StepPlan& plan, int64_t* total_candidates) const;
  Status score(const StepPlan& plan, std::vector<QueryState>& qs, size_t send_bytes);
  Status exchange_candidates(size_t send_bytes, std::string* gathered);
  void select(const std::string& gathered, size_t send_bytes, std::vector<QueryState>& qs) const;
  Status exchange_chunks(const RankPlan& rp, const std::vector<QueryState>& qs);
  Status exchange_spans(const RankPlan& rp, const std::vector<QueryState>& qs);
  Status attend(const RankPlan& rp, const std::vector<QueryState>& qs);
  Status merge_partial_states(const RankPlan& rp, const std::vector<QueryState>& qs);
  Status reply(const StepPlan& plan, const RankPlan& rp, const std::vector<QueryState>& qs,
               std::vector<QueryResult>* results);
  // K and V addresses of a planned segment.
  KeySegment resolve(const SegmentSource& src, const LayerShard& shard) const;

  struct Workspace {
    Buffer q, send, recv, staging, states, meta, reply;
    Buffer pack, pack_src;  // gather: this rank's outgoing chunk K/V and their block addresses
  };
  Backend& backend_;
  Communicator& comm_;
  Config config_;
  const KvStore& store_;
  Workspace ws_;
};

}  // namespace reattn
