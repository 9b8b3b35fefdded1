#include "comm/deadline.h"

#include <cstdio>
#include <thread>

namespace reattn {

std::string Deadline::budget() const {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f s", seconds_);
  return text;
}

void PollPacer::pause() {
  // Spin for the first 20 ms (a step's collectives take microseconds to milliseconds, and
  // back-to-back steps keep a rank spinning, as a blocking MPI wait would), then nap 100 us
  // between polls so an idle rank does not hold a core.
  constexpr auto kSpin = std::chrono::milliseconds(20);
  const auto now = std::chrono::steady_clock::now();
  if (polls_++ == 0) started_ = now;
  if (now - started_ < kSpin) return;
  std::this_thread::sleep_for(std::chrono::microseconds(100));
}

}  // namespace reattn
