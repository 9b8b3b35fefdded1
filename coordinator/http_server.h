// The HTTP/1.1 listener and sessions (Boost.Beast on Asio). Owns all socket I/O: reading
// headers and bodies with a size limit (413 before the body is read when Content-Length says
// so), per-read and per-write timeouts for slow clients, Expect: 100-continue, keep-alive.
// Limits (Envoy/nginx style): at most max_connections open connections (one more is answered
// 503 and closed); when accept fails for want of file descriptors (EMFILE, ENFILE) or memory,
// the listener backs off (10 ms doubling to 1 s) instead of spinning. Transfer codings other
// than "chunked" and any Content-Encoding get 501/415 before the body is read.
// Complete requests go to the handler with a Responder: requests for the health and metrics
// paths and requests with bodies up to 32 KiB on the I/O threads (no thread hand-off for a
// decode step), larger bodies on a separate pool of `parse_threads`, so a heavy body never
// delays a health check. Sockets are TCP_NODELAY. The handler may answer from any thread, later:
// answers up to 256 KiB are sent by that thread at once (one non-blocking send; the rest, if
// any, on the session's strand), larger ones are written on the strand. Every answer to a
// handled request carries X-Reattn-Server-Ms: from the complete request to the answer.
// Thread-safety: construct, listen and stop from one thread; the io_context may run on many.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "coordinator/http_types.h"

namespace boost {
namespace asio {
class io_context;
}  // namespace asio
}  // namespace boost

namespace reattn {

struct HttpServerOptions {
  int64_t max_body_bytes = 64ll << 20;
  int request_timeout_s = 30;    // limit on reading one request and on writing one response
  int max_connections = 1024;    // open connections; one more is answered 503 and closed
  int parse_threads = 2;         // threads that run the handler for large requests, and post_work
};

class HttpServer {
 public:
  // A complete request; the handler calls `done` exactly once.
  using Handler = std::function<void(HttpRequest request, Responder done)>;
  // The response to a request the server refuses before handing it over (body over the
  // limit, malformed HTTP). `head` has no body. The connection is closed after it.
  using Rejecter = std::function<HttpResponse(const HttpRequest& head, int status, const std::string& code,
                                              const std::string& message)>;

  HttpServer(boost::asio::io_context& ioc, HttpServerOptions options, Handler handler, Rejecter rejecter);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and starts accepting. host is a numeric address ("127.0.0.1", "0.0.0.0", "::");
  // port 0 picks a free port. Returns the bound port.
  Expected<int> listen(const std::string& host, int port);
  // Closes the listening socket; open connections carry on, and answer with Connection: close.
  void stop_accepting();
  // Runs `work` on the parse pool (not on the I/O threads): heavy completions, such as
  // formatting a large answer, never hold up socket I/O or a health check.
  void post_work(std::function<void()> work);
  // Requests handed to the handler and not yet answered (written or failed).
  int active_requests() const;
  // Connections open now, and refused since start (over max_connections).
  int open_connections() const;
  uint64_t refused_connections() const;

  struct Impl;  // the listener's and sessions' shared state (http_server.cpp)

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace reattn
