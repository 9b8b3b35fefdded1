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

// The roll call after a collective timed out where the library cannot name the silent peer
// (NCCL): rank 0 asks every other rank to answer within `seconds` (they answer from inside
// their own waits, answer_roll_call). kFatal naming the ranks that did not answer; ok when all
// did (the collective itself is stuck).
Status roll_call(int world, double seconds);
// Ranks other than 0, polled inside a wait: answers rank 0's roll call if one is pending and
// returns true (rank 0 has called the collective off).
bool answer_roll_call();

// One request of a collective (no one rank to name).
Status wait_for_collective(MPI_Request& request, const Deadline& deadline, const std::string& phase);

}  // namespace reattn
