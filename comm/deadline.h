// Deadlines on waits for other ranks. Every wait in comm/ polls against one of these and
// ends in a kFatal Status naming the phase (and the rank, where one rank can be named)
// rather than block for ever (NCCL's async-error protocol, PyTorch's NCCL watchdog).
// Thread-safety: plain values.
#pragma once

#include <chrono>
#include <string>

namespace reattn {

// How long each kind of wait may take, in seconds (config: server.*_deadline_s). Rank 0
// reports a fault first: the other ranks wait kPeerFactor times longer plus kPeerMarginS
// before they give up, so the coordinator can answer its clients (and linger a moment with
// readiness 503) before the job ends.
struct WaitDeadlines {
  double operation_s = 600;   // a control-plane operation (broadcast of an op, agreement)
  double step_s = 600;        // one collective of a query step (data plane)
  double heartbeat_s = 0;     // rank 0 idle: a heartbeat this often; 0: none, and no idle limit
  static constexpr double kPeerFactor = 2.0;
  static constexpr double kPeerMarginS = 3.0;

  // On `rank`, the budget of a wait whose deadline on rank 0 is `seconds`.
  static double for_rank(double seconds, int rank) {
    return rank == 0 ? seconds : seconds * kPeerFactor + kPeerMarginS;
  }
  // A rank other than 0 gives up on rank 0 after this much silence between operations
  // (0: never); rank 0 sends a heartbeat every heartbeat_s when it has nothing else to send.
  double idle_limit_s() const { return heartbeat_s > 0 ? for_rank(heartbeat_s + step_s, 1) : 0; }
};

class Deadline {
 public:
  using Clock = std::chrono::steady_clock;
  // `seconds` <= 0: no deadline.
  explicit Deadline(double seconds)
      : seconds_(seconds),
        at_(seconds > 0 ? Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds))
                        : Clock::time_point::max()) {}
  bool passed() const { return Clock::now() >= at_; }
  double seconds() const { return seconds_; }
  // "2.0 s"
  std::string budget() const;

 private:
  double seconds_;
  Clock::time_point at_;
};

// Sleeps between polls: not at all for the first `spin` polls (a step's collectives take
// microseconds), then briefly, so an idle rank does not hold a core.
class PollPacer {
 public:
  void pause();

 private:
  int polls_ = 0;
};

}  // namespace reattn
