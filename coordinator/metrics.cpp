#include "coordinator/metrics.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "coordinator/logging.h"

namespace reattn {
namespace {

const std::vector<double> kSecondsBounds = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                            0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,     10};
const std::vector<double> kBatchBounds = {1, 2, 4, 8, 16, 32, 64, 128, 256};

// The shortest of 15 or 17 significant digits that reads back exactly ("0.0025", not
// "0.0025000000000000001"): bucket bounds are label values and should read as written.
std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.15g", v);
  if (std::strtod(buf, nullptr) != v) std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

// Label values are route templates and fixed words; escape anyway per the format.
std::string escape_label(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

}  // namespace

std::string method_label(const std::string& method) {
  static const char* const kMethods[] = {"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"};
  for (const char* m : kMethods) {
    if (method == m) return m;
  }
  return "other";
}

void Metrics::Histogram::observe(double value) {
  const size_t bucket = std::lower_bound(bounds.begin(), bounds.end(), value) - bounds.begin();
  ++counts[bucket];
  sum += value;
  ++count;
}

Metrics::Histogram Metrics::make_histogram(const std::vector<double>& bounds) {
  Histogram h;
  h.bounds = bounds;
  h.counts.assign(bounds.size() + 1, 0);
  return h;
}

Metrics::Metrics() : batch_queries_(make_histogram(kBatchBounds)) {
  for (const char* phase : {"score", "merge", "attention", "total", "queue"}) {
    phase_seconds_.emplace(phase, make_histogram(kSecondsBounds));
  }
}

void Metrics::count_request(const std::string& method, const std::string& route, int status, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{method_label(method), route, status}];
  auto it = request_seconds_.find(route);
  if (it == request_seconds_.end()) it = request_seconds_.emplace(route, make_histogram(kSecondsBounds)).first;
  it->second.observe(seconds);
}

void Metrics::observe_phase(const std::string& phase, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = phase_seconds_.find(phase);
  if (it == phase_seconds_.end()) it = phase_seconds_.emplace(phase, make_histogram(kSecondsBounds)).first;
  it->second.observe(seconds);
}

void Metrics::observe_batch(size_t queries) {
  std::lock_guard<std::mutex> lock(mu_);
  batch_queries_.observe(static_cast<double>(queries));
}

void Metrics::count_operation(const std::string& kind, const std::string& state) {
  std::lock_guard<std::mutex> lock(mu_);
  ++operations_[{kind, state}];
}

void Metrics::add_operation_bytes(const std::string& kind, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  operation_bytes_[kind] += bytes;
}

void Metrics::render_histogram(std::string& out, const std::string& name, const std::string& labels,
                               const Histogram& h) {
  const std::string sep = labels.empty() ? "" : ",";
  uint64_t cumulative = 0;
  for (size_t b = 0; b < h.bounds.size(); ++b) {
    cumulative += h.counts[b];
    out += name + "_bucket{" + labels + sep + "le=\"" + number(h.bounds[b]) + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_bucket{" + labels + sep + "le=\"+Inf\"} " + std::to_string(h.count) + "\n";
  const std::string braces = labels.empty() ? "" : "{" + labels + "}";
  out += name + "_sum" + braces + " " + number(h.sum) + "\n";
  out += name + "_count" + braces + " " + std::to_string(h.count) + "\n";
}

std::string Metrics::render(const MetricsSnapshot& g) const {
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  out += "# HELP reattn_http_requests_total HTTP requests answered, by method, route and status.\n";
  out += "# TYPE reattn_http_requests_total counter\n";
  for (const auto& [key, count] : requests_) {
    const auto& [method, route, status] = key;
    out += "reattn_http_requests_total{method=\"" + escape_label(method) + "\",route=\"" + escape_label(route) +
           "\",status=\"" + std::to_string(status) + "\"} " + std::to_string(count) + "\n";
  }
  out += "# HELP reattn_http_request_duration_seconds Time from a request's arrival to its response, by route.\n";
  out += "# TYPE reattn_http_request_duration_seconds histogram\n";
  for (const auto& [route, h] : request_seconds_) {
    render_histogram(out, "reattn_http_request_duration_seconds", "route=\"" + escape_label(route) + "\"", h);
  }
  out += "# HELP reattn_step_phase_seconds Step latency by phase (score, merge, attention, total per step; "
         "queue per query).\n";
  out += "# TYPE reattn_step_phase_seconds histogram\n";
  for (const auto& [phase, h] : phase_seconds_) {
    render_histogram(out, "reattn_step_phase_seconds", "phase=\"" + escape_label(phase) + "\"", h);
  }
  out += "# HELP reattn_step_batch_queries Queries per batched step.\n";
  out += "# TYPE reattn_step_batch_queries histogram\n";
  render_histogram(out, "reattn_step_batch_queries", "", batch_queries_);
  out += "# HELP reattn_kv_tokens KV tokens stored (charged) per rank.\n";
  out += "# TYPE reattn_kv_tokens gauge\n";
  for (size_t r = 0; r < g.tokens_per_rank.size(); ++r) {
    out += "reattn_kv_tokens{rank=\"" + std::to_string(r) + "\"} " + std::to_string(g.tokens_per_rank[r]) + "\n";
  }
  out += "# HELP reattn_queue_depth Requests waiting for the step loop.\n";
  out += "# TYPE reattn_queue_depth gauge\n";
  out += "reattn_queue_depth " + std::to_string(g.queue_depth) + "\n";
  out += "# HELP reattn_contexts Contexts held.\n";
  out += "# TYPE reattn_contexts gauge\n";
  out += "reattn_contexts " + std::to_string(g.contexts) + "\n";
  out += "# HELP reattn_ready 1 when every rank is up and the service takes requests.\n";
  out += "# TYPE reattn_ready gauge\n";
  out += "reattn_ready " + std::string(g.ready ? "1" : "0") + "\n";
  out += "# HELP reattn_log_lines_dropped_total Log lines dropped because stderr did not keep up.\n";
  out += "# TYPE reattn_log_lines_dropped_total counter\n";
  out += "reattn_log_lines_dropped_total " + std::to_string(dropped_log_lines()) + "\n";
  out += "# HELP reattn_operations_total Long-running operations finished, by kind and final state.\n";
  out += "# TYPE reattn_operations_total counter\n";
  for (const auto& [key, count] : operations_) {
    out += "reattn_operations_total{kind=\"" + escape_label(key.first) + "\",state=\"" + escape_label(key.second) +
           "\"} " + std::to_string(count) + "\n";
  }
  out += "# HELP reattn_operations Long-running operations not finished, by kind and state.\n";
  out += "# TYPE reattn_operations gauge\n";
  for (const auto& [key, count] : g.operations) {
    out += "reattn_operations{kind=\"" + escape_label(key.first) + "\",state=\"" + escape_label(key.second) + "\"} " +
           std::to_string(count) + "\n";
  }
  out += "# HELP reattn_operation_bytes_total Bytes moved by long-running operations (all ranks), by kind.\n";
  out += "# TYPE reattn_operation_bytes_total counter\n";
  for (const auto& [kind, bytes] : operation_bytes_) {
    out += "reattn_operation_bytes_total{kind=\"" + escape_label(kind) + "\"} " + std::to_string(bytes) + "\n";
  }
  out += "# HELP reattn_ranks Ranks in the job.\n";
  out += "# TYPE reattn_ranks gauge\n";
  out += "reattn_ranks " + std::to_string(g.tokens_per_rank.size()) + "\n";
  return out;
}

}  // namespace reattn
