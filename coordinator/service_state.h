// The service's lifecycle as the HTTP side sees it: starting (ranks not all up), ready,
// draining (SIGTERM: finishing in-flight work), faulted (a communicator or device fault).
// /health/ready answers 200 only when ready; /v1 requests are refused (503) otherwise.
// Thread-safety: every method is safe from any thread.
#pragma once

#include <atomic>
#include <mutex>
#include <string>

namespace reattn {

enum class ServicePhase { kStarting, kReady, kDraining, kFaulted };

class ServiceState {
 public:
  ServicePhase phase() const { return phase_.load(); }
  bool ready() const { return phase() == ServicePhase::kReady; }

  void set_ready() { move_to(ServicePhase::kReady, ""); }
  // Draining and faulted are final: a later set_ready does nothing.
  void set_draining() { move_to(ServicePhase::kDraining, "the service is shutting down"); }
  void set_faulted(const std::string& why) { move_to(ServicePhase::kFaulted, "communicator or device fault: " + why); }

  // Why the service is not ready ("" when it is).
  std::string reason() const {
    if (phase() == ServicePhase::kStarting) return "the service is starting: not every rank is up yet";
    std::lock_guard<std::mutex> lock(mu_);
    return reason_;
  }

 private:
  void move_to(ServicePhase next, const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    const ServicePhase now = phase_.load();
    if (now == ServicePhase::kFaulted) return;
    if (now == ServicePhase::kDraining && next != ServicePhase::kFaulted) return;
    reason_ = why;
    phase_.store(next);
  }

  std::atomic<ServicePhase> phase_{ServicePhase::kStarting};
  mutable std::mutex mu_;
  std::string reason_;
};

}  // namespace reattn
