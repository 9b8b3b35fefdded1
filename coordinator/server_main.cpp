// reattn-server: the long-running service. `mpirun -np N reattn-server --config C.yaml`.
// Rank 0 hosts the coordinator (HTTP on Boost.Beast/Asio threads) and runs the step loop on
// its main thread, which is the only thread that makes MPI calls; every other rank runs the
// worker loop (ServiceLoop::serve) until rank 0 broadcasts shutdown.
// SIGTERM/SIGINT on rank 0: readiness turns 503, new requests are refused, queued and running
// requests finish, then every rank is told to shut down and exits 0; if that takes longer than
// server.drain_deadline_s, rank 0 ends the job (exit 4). Other ranks ignore SIGTERM/SIGINT
// (mpirun forwards them) and wait for rank 0.
// A fault (a rank dead or hung past a deadline, see README "Reliability"): every request in
// flight or queued gets 503 naming it, readiness turns 503, and the job ends non-zero (exit 3).
// --snapshot-dir DIR: snapshots are written and restored there (stale .tmp- directories of a
// crash mid-snapshot are removed at start-up); --restore: every complete snapshot there is
// restored before readiness turns 200 (README "Snapshots and restore").
#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "comm/control.h"
#include "coordinator/handlers.h"
#include "coordinator/http_server.h"
#include "coordinator/logging.h"
#include "coordinator/metrics.h"
#include "coordinator/registry.h"
#include "coordinator/service_state.h"
#include "coordinator/snapshot_catalog.h"
#include "coordinator/snapshot_operations.h"
#include "coordinator/step_loop.h"
#include "coordinator/task_queue.h"
#include "kernels/make_backend.h"
#include "worker/service_loop.h"
#include "comm/make_communicator.h"

namespace reattn {
namespace {

struct ServerOptions {
  std::string config_path;
  std::string listen;
  std::string api_key_file;
  std::string load_root;
  int64_t max_body_bytes = 0;
  std::string backend;
  std::string log_level = "info";
  std::string snapshot_dir;
  bool restore = false;  // restore every complete snapshot at start-up
};

// The config file with the command line's overrides, validated.
Expected<Config> effective_config(const ServerOptions& opt) {
  REATTN_ASSIGN_OR_RETURN(Config c, load_config_file(opt.config_path));
  if (!opt.listen.empty()) c.server.listen = opt.listen;
  if (!opt.api_key_file.empty()) c.server.api_key_file = opt.api_key_file;
  if (!opt.load_root.empty()) c.server.load_root = opt.load_root;
  if (opt.max_body_bytes != 0) c.server.max_body_bytes = opt.max_body_bytes;
  if (!opt.backend.empty()) {
    REATTN_ASSIGN_OR_RETURN(c.backend.kind, parse_backend_kind(opt.backend));
  }
  if (!opt.snapshot_dir.empty()) c.server.snapshot_dir = opt.snapshot_dir;
  if (opt.restore && c.server.snapshot_dir.empty()) {
    return invalid_argument("--restore: no snapshot directory to restore from (server.snapshot_dir, --snapshot-dir)");
  }
  if (Status s = c.validate(); !s.is_ok()) return invalid_argument("after command-line overrides: " + s.message());
  return c;
}

// The first line of the key file, without surrounding whitespace. Never logged.
Expected<std::string> read_api_key(const std::string& path) {
  if (path.empty()) return std::string();
  std::ifstream in(path);
  if (!in) return invalid_argument("server.api_key_file: cannot read '" + path + "'");
  std::string key;
  std::getline(in, key);
  const auto first = key.find_first_not_of(" \t\r\n");
  const auto last = key.find_last_not_of(" \t\r\n");
  key = first == std::string::npos ? "" : key.substr(first, last - first + 1);
  if (key.empty()) return invalid_argument("server.api_key_file: '" + path + "' holds no key");
  return key;
}

// The control and data planes' deadlines from the config.
WaitDeadlines wait_deadlines(const ServerConfig& server) {
  WaitDeadlines d;
  d.operation_s = server.operation_deadline_s;
  d.step_s = server.step_deadline_s;
  d.heartbeat_s = server.heartbeat_s;
  return d;
}

// After a fault: how long rank 0 keeps answering (503 to /v1 and readiness) and then how long
// answered requests get to be written, before the job ends.
constexpr double kFaultAnswerSeconds = 2.0;

// The coordinator's HTTP side on rank 0: its threads, the signal handling and the drain.
class Coordinator {
 public:
  Coordinator(const Config& config, const std::string& api_key, int world)
      : config_(config),
        registry_(config, world),
        snapshots_(config.server.snapshot_dir),
        queue_(static_cast<size_t>(config.server.queue_depth)),
        handlers_(config, ServiceInfo{world, "", ""}, api_key, registry_, queue_, metrics_, state_),
        server_(ioc_,
                HttpServerOptions{config.server.max_body_bytes, config.server.request_timeout_s,
                                  config.server.max_connections},
                [this](HttpRequest r, Responder d) { handlers_.handle(std::move(r), std::move(d)); },
                [this](const HttpRequest& h, int s, const std::string& c, const std::string& m) {
                  return handlers_.reject(h, s, c, m);
                }),
        signals_(ioc_, SIGTERM, SIGINT),
        drain_timer_(ioc_),
        work_(boost::asio::make_work_guard(ioc_)) {
    handlers_.set_snapshots(&snapshots_);
  }

  ~Coordinator() { stop(); }

  Status start() {
    if (snapshots_.enabled()) {
      // Temporary directories left by a crash mid-snapshot are never complete: removed.
      REATTN_ASSIGN_OR_RETURN(const int stale, snapshots_.prepare());
      log_event(LogLevel::kInfo, "snapshot directory", {{"path", snapshots_.dir()}, {"stale_removed", stale}});
    }
    REATTN_ASSIGN_OR_RETURN(const ListenAddress address, parse_listen(config_.server.listen));
    const std::string& host = address.host;
    REATTN_ASSIGN_OR_RETURN(const int bound, server_.listen(host, address.port));
    signals_.async_wait([this](const boost::system::error_code& ec, int signo) {
      if (!ec) drain(signo);
    });
    for (int i = 0; i < config_.server.http_threads; ++i) threads_.emplace_back([this] { serve_io(); });
    log_event(LogLevel::kInfo, "listening", {{"address", host}, {"port", bound}, {"pid", static_cast<int64_t>(getpid())}});
    return Status::ok();
  }

  void set_ready(const ServiceInfo& info) {
    handlers_.set_info(info);
    state_.set_ready();
    if (state_.ready()) log_event(LogLevel::kInfo, "ready", {{"ranks", info.world}, {"backend", info.backend}});
  }

  // --restore, before readiness: every complete snapshot becomes a context again, under its
  // original id where that is free (two snapshots of one context: the first by name keeps it, the
  // others get new ids above every restored one).
  // A snapshot that cannot be restored is logged and skipped; a fault is returned.
  Status restore_snapshots(OperationRunner& ranks) {
    std::vector<std::string> problems;
    std::vector<StoredSnapshot> all = snapshots_.list(&problems);
    // The first snapshot (by name) of each context first, under their own ids; then the other
    // snapshots of a context already restored, under ids above all of those.
    std::set<ContextId> claimed;
    std::stable_partition(all.begin(), all.end(),
                          [&](const StoredSnapshot& s) { return claimed.insert(s.manifest.context_id).second; });
    for (const std::string& p : problems) log_event(LogLevel::kError, "snapshot not restored", {{"error", p}});
    log_event(LogLevel::kInfo, "restoring snapshots", {{"snapshots", all.size()}, {"path", snapshots_.dir()}});
    size_t restored = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      const SnapshotManifest& m = all[i].manifest;
      const auto t0 = std::chrono::steady_clock::now();
      // Its own id where that is free, else a new one.
      const ContextId id = registry_.find(m.context_id) ? registry_.reserve_id() : m.context_id;
      snapshots_.hold_existing(m.name);
      RestoreOperation op(snapshots_, all[i], id);
      Status outcome;
      // A line per tenth of the snapshot (or every 5 s): a large one takes minutes.
      int logged_tenths = 0;
      auto last_log = std::chrono::steady_clock::now();
      const auto progress = [&](const OperationProgress& p) {
        const int tenths = p.tokens_total > 0 ? static_cast<int>(10 * p.tokens_done / p.tokens_total) : 0;
        const auto now = std::chrono::steady_clock::now();
        if (tenths <= logged_tenths && now - last_log < std::chrono::seconds(5)) return;
        logged_tenths = tenths;
        last_log = now;
        log_event(LogLevel::kInfo, "restore progress",
                  {{"snapshot", m.name}, {"tokens_done", p.tokens_done}, {"tokens_total", p.tokens_total},
                   {"bytes_done", p.bytes_done}, {"done", i}, {"of", all.size()}});
      };
      // SIGTERM (the queue closed) stops it between slices: the job then drains at once.
      const auto stopping = [this] { return queue_.closed(); };
      REATTN_RETURN_IF_ERROR(run_operation_now(op, ranks, registry_, &outcome, progress, stopping));
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      nlohmann::json fields = {{"snapshot", m.name}, {"done", i + 1}, {"of", all.size()}, {"seconds", seconds}};
      if (!outcome.is_ok()) {
        fields["error"] = outcome.to_string();
        log_event(LogLevel::kError, "snapshot not restored", fields);
        if (stopping()) break;
        continue;
      }
      ++restored;
      fields.update({{"context_id", id}, {"snapshot_context_id", m.context_id}, {"tokens", m.tokens()},
                     {"bytes", m.total_bytes()}, {"gb_per_s", seconds > 0 ? m.total_bytes() / seconds / 1e9 : 0.0}});
      log_event(LogLevel::kInfo, "snapshot restored", fields);
    }
    log_event(LogLevel::kInfo, "snapshots restored", {{"restored", restored}, {"of", all.size()}});
    return Status::ok();
  }

  // The step loop; returns when draining is done or on a fault. host_compute: the backend
  // computes on the host's cores (server.busy_poll_us's auto value depends on it).
  Status run(ServiceLoop& loop, bool host_compute) {
    Config config = config_;
    config.server.busy_poll_us = config_.server.busy_poll_us_for(host_compute);
    io_poll_us_.store(config.server.busy_poll_us, std::memory_order_relaxed);
    StepLoop step_loop(loop, queue_, registry_, metrics_, state_, config,
                       [this](std::function<void()> f) { server_.post_work(std::move(f)); });
    return step_loop.run();
  }

  void fault(const Status& why) {
    state_.set_faulted(why.message());
    queue_.close();
  }

  // Waits for answered requests to be written (up to `wait_s`, default the request timeout),
  // then stops.
  void stop(double wait_s = 0) {
    if (stopped_) return;
    stopped_ = true;
    server_.stop_accepting();
    if (wait_s <= 0) wait_s = config_.server.request_timeout_s;
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(wait_s));
    while (server_.active_requests() > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    work_.reset();
    ioc_.stop();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }

 private:
  // Readiness turns 503 and new work is refused with 503, but the listener stays open until
  // stop() so probes and clients get an answer rather than a refused connection.
  void drain(int signo) {
    log_event(LogLevel::kInfo, "draining", {{"signal", signo}, {"queued", queue_.depth()},
                                           {"drain_deadline_s", config_.server.drain_deadline_s}});
    state_.set_draining();
    queue_.close();
    arm_drain_deadline();
  }

  // The drain's own deadline: if the job has not ended by then (a rank hung in a way no
  // other deadline caught), rank 0 exits non-zero and the launcher ends the other ranks.
  void arm_drain_deadline() {
    drain_timer_.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double>(config_.server.drain_deadline_s)));
    drain_timer_.async_wait([](const boost::system::error_code& ec) {
      if (ec) return;
      log_event(LogLevel::kError, "drain deadline passed; ending the job", {{"exit_code", 4}});
      flush_logs(0.5);
      std::_Exit(4);
    });
  }

  // An HTTP I/O thread: runs the sockets' handlers; after each, it polls for busy_poll_us
  // before it sleeps in the kernel, so the next request of a decode (a layer step a few
  // hundred microseconds later) is read without a thread wake-up.
  void serve_io() {
    for (;;) {
      const int poll_us = io_poll_us_.load(std::memory_order_relaxed);
      if (poll_us > 0) {
        const auto window = std::chrono::microseconds(poll_us);
        auto until = std::chrono::steady_clock::now() + window;
        while (!ioc_.stopped() && std::chrono::steady_clock::now() < until) {
          if (ioc_.poll() > 0) until = std::chrono::steady_clock::now() + window;
        }
      }
      if (ioc_.run_one() == 0) return;  // stopped
    }
  }

  const Config config_;
  // server.busy_poll_us as resolved for the backend (run()); 0 until then.
  std::atomic<int> io_poll_us_{0};
  boost::asio::io_context ioc_;
  Metrics metrics_;
  ServiceState state_;
  Registry registry_;
  SnapshotCatalog snapshots_;
  TaskQueue queue_;
  Handlers handlers_;
  HttpServer server_;
  boost::asio::signal_set signals_;
  boost::asio::steady_timer drain_timer_;
  // Keeps the HTTP threads running while no socket operation is pending: answers from other
  // threads are posted to them.
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::vector<std::thread> threads_;
  bool stopped_ = false;
};

// Every rank: config, backend, communicator; rank 0 also the coordinator. Failures before the
// loop are agreed, so all ranks exit together with the same message.
int serve(Control& control, const ServerOptions& opt) {
  const int rank = control.rank();
  Expected<Config> config = effective_config(opt);
  Status s = control.agree(config.status());
  if (!s.is_ok()) {
    if (rank == 0) log_event(LogLevel::kError, "bad configuration", {{"error", s.message()}});
    return 2;
  }
  control.set_deadlines(wait_deadlines(config->server));
  if (rank == 0) {
    log_event(LogLevel::kInfo, "starting",
              {{"ranks", control.world()}, {"config", opt.config_path}, {"listen", config->server.listen},
               {"api_key_required", !config->server.api_key_file.empty()},
               {"effective_config", config->to_yaml()}});
  }

  std::unique_ptr<Coordinator> coordinator;
  Status up = Status::ok();
  if (rank == 0) {
    Expected<std::string> key = read_api_key(config->server.api_key_file);
    if (!key) {
      up = key.status();
    } else {
      coordinator = std::make_unique<Coordinator>(*config, *key, control.world());
      up = coordinator->start();
    }
  } else {
    // mpirun forwards SIGTERM/SIGINT to every rank; only rank 0 decides when to stop.
    std::signal(SIGTERM, SIG_IGN);
    std::signal(SIGINT, SIG_IGN);
  }
  if (s = control.agree(up); !s.is_ok()) {
    if (rank == 0) log_event(LogLevel::kError, "cannot start the coordinator", {{"error", s.message()}});
    return 2;
  }

  Expected<std::unique_ptr<Backend>> backend = make_backend(*config, control.local_rank());
  if (s = control.agree(backend.status()); !s.is_ok()) {
    log_event(LogLevel::kError, "cannot make the backend", {{"error", s.message()}});
    return 2;
  }
  Expected<std::unique_ptr<Communicator>> comm = make_communicator(**backend, control);
  if (s = control.agree(comm.status()); !s.is_ok()) {
    log_event(LogLevel::kError, "cannot make the communicator", {{"error", s.message()}});
    return 2;
  }
  ServiceLoop loop(control, **backend, **comm, *config);
  // Every rank reached this point: the service is up.
  if (s = control.barrier(); !s.is_ok()) {
    log_event(LogLevel::kError, "start-up barrier failed", {{"error", s.message()}});
    control.abort(3);
  }
  log_event(LogLevel::kInfo, "rank up", {{"backend", (*backend)->name()}, {"communicator", (*comm)->name()}});

  if (rank != 0) {
    const Status served = loop.serve();
    if (!served.is_ok()) {
      log_event(LogLevel::kError, "fault in the worker loop; ending the job", {{"error", served.to_string()}});
      flush_logs(0.5);
      control.abort(3);
    }
    if (s = control.barrier(); !s.is_ok()) {
      log_event(LogLevel::kError, "shutdown not confirmed; ending the job", {{"error", s.to_string()}});
      control.abort(3);
    }
    log_event(LogLevel::kInfo, "shut down");
    return 0;
  }

  if (opt.restore) {
    if (s = coordinator->restore_snapshots(loop); !s.is_ok()) {
      log_event(LogLevel::kError, "fault while restoring snapshots; ending the job", {{"error", s.to_string()}, {"exit_code", 3}});
      flush_logs(0.5);
      control.abort(3);
    }
  }
  coordinator->set_ready(ServiceInfo{control.world(), (*backend)->name(), (*comm)->name()});
  const Status ran = coordinator->run(loop, (*backend)->host_memory());
  if (!ran.is_ok()) {
    // The ranks may be stuck in a collective: answer what can be answered, then end the job.
    coordinator->fault(ran);
    // Probes and clients see why for a moment (readiness 503 naming the fault, liveness 200).
    std::this_thread::sleep_for(std::chrono::duration<double>(kFaultAnswerSeconds));
    coordinator->stop(kFaultAnswerSeconds);
    log_event(LogLevel::kError, "fault in the step loop; ending the job", {{"error", ran.to_string()}, {"exit_code", 3}});
    flush_logs(0.5);
    control.abort(3);
  }
  OperationResult ignored;
  if (s = loop.submit(Shutdown{}, &ignored); !s.is_ok()) {
    log_event(LogLevel::kError, "cannot broadcast shutdown; ending the job", {{"error", s.to_string()}});
    control.abort(3);
  }
  // Every rank confirms, so a rank that died during the drain makes the job end non-zero.
  if (s = control.barrier(); !s.is_ok()) {
    coordinator->fault(s);
    coordinator->stop(kFaultAnswerSeconds);
    log_event(LogLevel::kError, "shutdown not confirmed; ending the job", {{"error", s.to_string()}, {"exit_code", 3}});
    flush_logs(0.5);
    control.abort(3);
  }
  coordinator->stop();
  log_event(LogLevel::kInfo, "shut down");
  return 0;
}

}  // namespace
}  // namespace reattn

namespace {

// Everything that runs with MPI initialised; MPI_Finalize (unless after a fault) on return.
int run_server(int argc, char** argv) {
  using namespace reattn;
  Expected<Control> control = Control::init(&argc, &argv);
  if (!control) {
    std::fprintf(stderr, "reattn-server: error: %s\n", control.status().message().c_str());
    return 3;
  }
  ServerOptions opt;
  CLI::App app{"reattn-server: the ReAttention service. Run under mpirun; rank 0 serves HTTP.\n"
               "  mpirun -np N reattn-server --config C.yaml [--listen 127.0.0.1:8080]\n"
               "Command-line values override the config file's server section."};
  app.add_option("--config", opt.config_path, "YAML config (model, reattention, backend, capacity, server)")
      ->required();
  app.add_option("--listen", opt.listen, "address:port to serve HTTP on (default 127.0.0.1:8080)");
  app.add_option("--api-key-file", opt.api_key_file,
                 "file whose first line is the API key; /v1 requests then need Authorization: Bearer <key>");
  app.add_option("--load-root", opt.load_root,
                 "directory bulk loads may read files from (server.load_root; default: loads disabled)");
  app.add_option("--max-body-bytes", opt.max_body_bytes, "largest request body accepted (413 above)")
      ->check(CLI::PositiveNumber);
  app.add_option("--backend", opt.backend, "auto, cpu or cuda (default: the config's)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--snapshot-dir", opt.snapshot_dir,
                 "directory snapshots are written to and restored from (server.snapshot_dir; shared storage in a cluster)");
  app.add_flag("--restore", opt.restore,
               "at start-up, restore every complete snapshot in the snapshot directory (readiness 503 until done)");
  app.add_option("--log-level", opt.log_level, "debug, info, warn or error")
      ->check(CLI::IsMember({"debug", "info", "warn", "error"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (control->rank() == 0) return app.exit(e);
    return e.get_exit_code();
  }
  init_logging(control->rank(), opt.log_level);
  // A write past the file-size limit (ulimit -f) then fails with EFBIG, which a snapshot
  // reports, instead of killing the rank.
  std::signal(SIGXFSZ, SIG_IGN);
  return serve(*control, opt);
}

}  // namespace

int main(int argc, char** argv) {
  // Request and answer buffers of tens of MiB (a prefill step's q and out) are allocated and
  // freed on every call. glibc maps blocks above 32 MiB afresh each time, and every page of a
  // fresh mapping faults and is zeroed on first touch: keep them on the heap for reuse.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  const int code = run_server(argc, argv);
  // The log writer may be blocked on a stderr nobody reads: give it a moment, then end
  // without waiting for it (static destructors would join it).
  reattn::flush_logs(1.0);
  std::fflush(stdout);
  std::_Exit(code);
}
