#include "common/check.h"

#include <atomic>

namespace reattn {
namespace {

// Written once at start-up, read by fault messages from any thread.
std::atomic<int> process_rank{-1};

}  // namespace

void record_process_rank(int rank) { process_rank.store(rank); }

std::string fault_site(const char* file, int line) {
  const int rank = process_rank.load();
  return " at " + std::string(file) + ":" + std::to_string(line) + " on rank " +
         (rank < 0 ? std::string("?") : std::to_string(rank));
}

}  // namespace reattn
