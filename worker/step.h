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

namespace reattn {

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
