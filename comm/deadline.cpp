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
  // About 2 ms of spinning, then 200 us naps: a wake-up costs far less than a step.
  constexpr int kSpinPolls = 20000;
  if (++polls_ < kSpinPolls) return;
  std::this_thread::sleep_for(std::chrono::microseconds(200));
}

}  // namespace reattn
