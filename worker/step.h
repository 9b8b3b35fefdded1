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
#include "worker/score_blocks.h"

namespace reattn {

struct StepOptions {
  // Blocks with a query of at least this many (row, head) rows are merged and selected in
  // backend memory (Backend::merge_select); smaller ones on the host (score_blocks.h). Span
  // recall selects every block on the host (select_spans).
  int64_t device_select_rows = 2048;
};

class StepRunner {
 public:
  StepRunner(Backend& backend, Communicator& comm, const Config& config, const KvStore& store,
             StepOptions options = {});

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
    int64_t q_offset = 0;     // floats before this query's rows in the q workspace
    SelectedQuery selected;   // ok, owner, regions; U and layout after select()
    Status status;
  };

  // The phases of run(), in order. Each returns a fault; a query's own failure goes to its
  // status and it sits out the later phases.
  std::vector<QueryState> check(const StepPlan& plan, const ScoreLayout& sl) const;
  Status score(const StepPlan& plan, const ScoreLayout& sl, std::vector<QueryState>& qs, size_t send_bytes);
  Status exchange_candidates(size_t send_bytes);
  Status select(const ScoreLayout& sl, size_t send_bytes, std::vector<QueryState>& qs);
  // select()'s two paths: host merge of downloaded lists, and Backend::merge_select.
  void select_on_host(const ScoreLayout& sl, const std::string& host, size_t host_bytes, std::vector<QueryState>& qs) const;
  Status select_on_device(const ScoreLayout& sl, size_t send_bytes, std::vector<QueryState>& qs);
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
    Buffer select;  // device-selected queries: [queries][1 + R] int64 (|U|, then U)
    Buffer pack, pack_src;  // gather: this rank's outgoing chunk K/V and their block addresses
  };
  Backend& backend_;
  Communicator& comm_;
  Config config_;
  const KvStore& store_;
  StepOptions options_;
  Workspace ws_;
};

}  // namespace reattn
