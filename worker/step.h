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
#include "worker/kv_store.h"

namespace reattn {

// One query of a step. Crosses ranks as bytes.
struct QueryPlan {
  uint64_t context_id = 0;
  int64_t tokens = 0;      // n as the coordinator saw it; every rank checks it
  int64_t qlen = 0;
  int64_t q_offset = 0;    // floats into StepPlan::q
  int32_t layer = 0;
  int32_t mode = 0;        // QueryMode
  int32_t owner_rank = 0;
  int32_t reserved = 0;
};

struct StepPlan {
  FinalAttention strategy = FinalAttention::kGather;
  int32_t reply_rank = 0;
  std::vector<QueryPlan> queries;
  std::vector<float> q;    // the queries' rows, each [qlen, H, D] pre-RoPE, at q_offset
};

std::string encode_step(const StepPlan& plan);
Expected<StepPlan> decode_step(const std::string& bytes);

struct StepTiming {
  double score_ms = 0;      // local chunk scoring and top-k
  double merge_ms = 0;      // candidate allgather and recall selection
  double attention_ms = 0;  // chunk or state exchange, windowed attention, merge, reply
  double total_ms = 0;
};

struct QueryResult {
  Status status;
  std::vector<int64_t> recalled;  // chunk ids, ascending
  std::vector<float> out;         // [qlen, H, D] fp32
};

class StepRunner {
 public:
  StepRunner(Backend& backend, Communicator& comm, const Config& config, const KvStore& store);

  // Every rank calls it with the same plan. On plan.reply_rank, `results` gets one entry per
  // query (a query that fails validation on any rank gets its error; the others run).
  // A non-ok return is a device or communicator fault.
  Status run(const StepPlan& plan, std::vector<QueryResult>* results, StepTiming* timing);

 private:
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
