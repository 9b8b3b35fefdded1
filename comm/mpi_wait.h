// Waits on non-blocking MPI requests, polled against a deadline, so that a dead or hung rank
// ends in a Status naming it and the phase instead of a wait for ever.
// Thread-safety: call from the thread that makes MPI calls.
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

#include "comm/deadline.h"
#include "common/status.h"

namespace reattn {

// Polls until every request completes or `deadline` passes. `peers[i]` is the rank that
// requests[i] sends to or receives from. On time-out: kFatal "<phase>: rank 1 did not answer
// within 2.0 s (dead or hung)", naming every rank still owed. The requests stay
// posted: after a fault the caller makes no further MPI calls but MPI_Abort.
Status wait_for_peers(std::vector<MPI_Request>& requests, const std::vector<int>& peers, const Deadline& deadline,
                      const std::string& phase);

// One request of a collective (no one rank to name).
Status wait_for_collective(MPI_Request& request, const Deadline& deadline, const std::string& phase);

}  // namespace reattn
