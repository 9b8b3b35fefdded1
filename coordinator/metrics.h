// Service metrics in the Prometheus text exposition format (version 0.0.4):
//   reattn_http_requests_total{method,route,status}           counter
//   reattn_log_lines_dropped_total                            counter
// Every label value comes from a fixed set, whatever a client sends: methods outside the
// standard ones count as "other", routes are route templates or "unmatched", statuses are
// the server's own.
//   reattn_http_request_duration_seconds{route}              histogram
//   reattn_step_phase_seconds{phase=score|merge|attention|total|queue}  histogram
//   reattn_step_batch_queries                                histogram (queries per step)
//   reattn_kv_tokens{rank}, reattn_queue_depth, reattn_contexts, reattn_ready, reattn_ranks  gauges
//   reattn_operations_total{kind,state}    counter: long-running operations finished (succeeded|failed|cancelled)
//   reattn_operations{kind,state}          gauge: unfinished ones (queued|running)
//   reattn_operation_bytes_total{kind}     counter: bytes loaded, written or read by them, all ranks
// Thread-safety: every method is safe from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace reattn {

// Gauges sampled when the page is rendered.
struct MetricsSnapshot {
  std::vector<int64_t> tokens_per_rank;
  size_t queue_depth = 0;
  size_t contexts = 0;
  bool ready = false;
  std::map<std::pair<std::string, std::string>, int64_t> operations;  // unfinished, by (kind, state)
};

// The method label: a standard method's name, else "other".
std::string method_label(const std::string& method);

class Metrics {
 public:
  Metrics();

  // `method` as the client sent it (mapped by method_label); `route` a route template.
  void count_request(const std::string& method, const std::string& route, int status, double seconds);
  // phase: "score", "merge", "attention", "total" (per step) or "queue" (per query).
  void observe_phase(const std::string& phase, double seconds);
  void observe_batch(size_t queries);
  // A long-running operation finished in `state`; `bytes` more moved by one (kind, state: fixed words).
  void count_operation(const std::string& kind, const std::string& state);
  void add_operation_bytes(const std::string& kind, int64_t bytes);

  std::string render(const MetricsSnapshot& gauges) const;

 private:
  struct Histogram {
    std::vector<double> bounds;      // upper bounds, ascending; +Inf is implicit
    std::vector<uint64_t> counts;    // per bucket (not cumulative), bounds.size() + 1
    double sum = 0;
    uint64_t count = 0;
    void observe(double value);
  };
  static Histogram make_histogram(const std::vector<double>& bounds);
  static void render_histogram(std::string& out, const std::string& name, const std::string& labels,
                               const Histogram& h);

  mutable std::mutex mu_;
  std::map<std::tuple<std::string, std::string, int>, uint64_t> requests_;  // (method, route, status)
  std::map<std::string, Histogram> request_seconds_;                         // by route
  std::map<std::string, Histogram> phase_seconds_;                           // by phase
  Histogram batch_queries_;
  std::map<std::pair<std::string, std::string>, uint64_t> operations_;  // (kind, state) finished
  std::map<std::string, int64_t> operation_bytes_;                      // by kind
};

}  // namespace reattn
