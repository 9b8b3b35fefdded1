#include "coordinator/http_server.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <optional>
#include <utility>

#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <thread>
#include <vector>

#include "common/excerpt.h"
#include "coordinator/logging.h"

namespace reattn {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;

namespace {

constexpr uint32_t kHeaderLimit = 64 * 1024;
// Room the read buffer keeps for a request body: 1 MiB per socket read.
constexpr size_t kBodyReadBytes = 1 << 20;

// Nice value of the parse pool's threads (the I/O threads keep the process's).
constexpr int kParseNice = 10;

// Back-off of the accept loop when the process is out of file descriptors or memory.
constexpr std::chrono::milliseconds kFirstBackoff{10};
constexpr std::chrono::milliseconds kMaxBackoff{1000};

// Answered on a connection over max_connections, written once without waiting.
const char kRefusal[] =
    "HTTP/1.1 503 Service Unavailable\r\nServer: reattn\r\nContent-Type: application/json\r\n"
    "Retry-After: 1\r\nConnection: close\r\nContent-Length: 95\r\n\r\n"
    "{\"error\":{\"code\":\"unavailable\",\"message\":\"too many open connections (server.max_connections)\"}}";

// Bodies up to this size (a decode step's q, k, v in binary) are parsed on the I/O thread that
// read them: that takes well under a millisecond, and saves the hand-off to the parse pool (a
// thread wake-up per request).
constexpr size_t kInlineBodyBytes = 32 * 1024;

// Answers up to this size (head and body) are written by the thread that completes the request,
// straight to the socket when it has room, instead of being posted to the session's strand
// first: a decode step's answer then leaves without waking an I/O thread.
constexpr size_t kDirectWriteBytes = 256 * 1024;

// Requests answered on the I/O threads (no or small bodies); the rest go to the parse pool.
bool is_light_request(const std::string& path, size_t body_bytes) {
  return path == "/health/live" || path == "/health/ready" || path == "/metrics" || body_bytes <= kInlineBodyBytes;
}

// Accept errors that mean "out of descriptors or memory": wait before trying again.
bool is_resource_exhaustion(const boost::system::error_code& ec) {
  return ec == boost::asio::error::no_descriptors || ec == boost::asio::error::no_memory ||
         ec == boost::asio::error::no_buffer_space || ec.value() == ENFILE;
}

}  // namespace

// State shared by the listener and every session.
struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  Impl(net::io_context& io, HttpServerOptions opt, Handler h, Rejecter r)
      : ioc(io),
        acceptor(net::make_strand(io)),
        backoff_timer(acceptor.get_executor()),
        options(opt),
        handler(std::move(h)),
        rejecter(std::move(r)),
        parse_work(net::make_work_guard(parse_ioc)) {
    for (int i = 0; i < std::max(1, opt.parse_threads); ++i) {
      parse_threads.emplace_back([this] {
        // Below the I/O threads: under CPU contention a health check wins over a heavy body.
        setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), kParseNice);
        parse_ioc.run();
      });
    }
  }
  ~Impl() { stop_parse_pool(); }
  // Called by the HttpServer's owner before it lets go of its reference: a session finishing
  // on a parse thread may hold the last one, and ~Impl there would join its own thread
  // (std::system_error "Resource deadlock avoided", the job aborted at shutdown).
  void stop_parse_pool() {
    parse_work.reset();
    parse_ioc.stop();
    for (std::thread& t : parse_threads) {
      if (t.joinable()) t.join();
    }
  }

  void accept();
  void on_accept(beast::error_code ec, tcp::socket socket);
  void refuse(tcp::socket socket);

  net::io_context& ioc;
  tcp::acceptor acceptor;
  net::steady_timer backoff_timer;   // on the acceptor's strand
  std::chrono::milliseconds backoff{0};
  HttpServerOptions options;
  Handler handler;
  Rejecter rejecter;
  // The parse pool: runs the handler for every request but health and metrics.
  net::io_context parse_ioc;
  net::executor_work_guard<net::io_context::executor_type> parse_work;
  std::vector<std::thread> parse_threads;
  std::atomic<int> active{0};
  std::atomic<int> connections{0};
  std::atomic<uint64_t> refused{0};
  std::atomic<bool> closing{false};
};

namespace {

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, std::shared_ptr<HttpServer::Impl> server)
      : stream_(std::move(socket)), server_(std::move(server)) {
    ++server_->connections;
  }
  ~Session() { --server_->connections; }

  void start() {
    // Run on the session's strand from the first operation on.
    net::dispatch(stream_.get_executor(), beast::bind_front_handler(&Session::read_header, shared_from_this()));
  }

 private:
  std::chrono::seconds timeout() const { return std::chrono::seconds(server_->options.request_timeout_s); }

  void read_header() {
    parser_.emplace();
    parser_->header_limit(kHeaderLimit);
    parser_->body_limit(static_cast<uint64_t>(server_->options.max_body_bytes));
    stream_.expires_after(timeout());
    http::async_read_header(stream_, buffer_, *parser_,
                            beast::bind_front_handler(&Session::on_header, shared_from_this()));
  }

  void on_header(beast::error_code ec, size_t) {
    if (ec == http::error::end_of_stream || ec == beast::error::timeout || ec == net::error::operation_aborted ||
        ec == net::error::connection_reset || ec == net::error::eof) {
      return close();
    }
    // Beast checks Content-Length against the body limit while parsing the header.
    if (ec == http::error::body_limit) return reject_too_large();
    if (ec == http::error::header_limit) {
      return reject(431, "headers_too_large", "request headers are over " + std::to_string(kHeaderLimit) + " bytes");
    }
    if (ec) return reject(400, "bad_request", "malformed HTTP request: " + ec.message());
    const auto& req = parser_->get();
    if (req.count(http::field::transfer_encoding) > 0) {
      // Only "chunked" is decoded; anything else (gzip, "gzip, chunked") would be misread.
      const std::string te(req[http::field::transfer_encoding]);
      if (req.count(http::field::transfer_encoding) > 1 || !beast::iequals(te, "chunked")) {
        return reject(501, "not_implemented",
                      "Transfer-Encoding '" + capped(te) + "' is not supported; only 'chunked' is");
      }
    }
    if (req.count(http::field::content_encoding) > 0 &&
        !beast::iequals(req[http::field::content_encoding], "identity")) {
      return reject(415, "unsupported_media_type",
                    "Content-Encoding '" + capped(std::string(req[http::field::content_encoding])) +
                        "' is not supported; send the body uncompressed");
    }
    const auto length = parser_->content_length();
    if (length && *length > static_cast<uint64_t>(server_->options.max_body_bytes)) {
      return reject_too_large();
    }
    if (beast::iequals(req[http::field::expect], "100-continue")) {
      continue_.emplace(http::status::continue_, req.version());
      http::async_write(stream_, *continue_, beast::bind_front_handler(&Session::on_continue, shared_from_this()));
      return;
    }
    read_body();
  }

  void on_continue(beast::error_code ec, size_t) {
    if (ec) return close();
    read_body();
  }

  void read_body() {
    // Beast reads at most the buffer's spare capacity (at least 512 bytes) per call: without
    // room, a 64 MiB body would take 131072 reads. The room is given back after the body.
    const auto length = parser_->content_length();
    buffer_.reserve(static_cast<size_t>(std::min<uint64_t>(length ? *length : kBodyReadBytes, kBodyReadBytes)));
    http::async_read(stream_, buffer_, *parser_, beast::bind_front_handler(&Session::on_body, shared_from_this()));
  }

  void on_body(beast::error_code ec, size_t) {
    if (ec == http::error::body_limit) return reject_too_large();
    if (ec == beast::error::timeout || ec == http::error::end_of_stream || ec == net::error::eof ||
        ec == net::error::connection_reset || ec == net::error::operation_aborted || ec == http::error::partial_message) {
      return close();
    }
    if (ec) return reject(400, "bad_request", "malformed HTTP request: " + ec.message());
    // The handler may take long (queued compute); no read timeout while it runs.
    stream_.expires_never();
    HttpRequest request = head();
    request.body = std::move(parser_->get().body());
    buffer_.shrink_to_fit();
    keep_alive_ = parser_->get().keep_alive();
    version_ = parser_->get().version();
    ++server_->active;
    auto self = shared_from_this();
    Responder done = [self, received = std::chrono::steady_clock::now()](HttpResponse response) {
      // From the complete request to its answer: what the service spent on it, parse and
      // queue included (the client's own time and the transport are the rest of its wait).
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - received).count();
      response.headers.emplace_back("X-Reattn-Server-Ms", std::to_string(ms));
      if (response.body.size() <= kDirectWriteBytes) return self->write_now(std::move(response));
      net::post(self->stream_.get_executor(), [self, r = std::move(response)]() mutable {
        self->write(std::move(r), self->keep_alive_, true);
      });
    };
    request.client_gone = std::make_shared<std::atomic<bool>>(false);
    watch_client(request.client_gone);
    if (is_light_request(request.path, request.body.size())) {
      return dispatch(server_, std::move(request), std::move(done));
    }
    // Parsing a body (up to max_body_bytes of JSON) runs on the parse pool.
    net::post(server_->parse_ioc, [server = server_, r = std::move(request), d = std::move(done)]() mutable {
      dispatch(server, std::move(r), std::move(d));
    });
  }

  static void dispatch(const std::shared_ptr<HttpServer::Impl>& server, HttpRequest request, Responder done) {
    try {
      server->handler(std::move(request), done);
    } catch (...) {
      // Handlers never throw; if one did, the responder was not called.
      done(error_response(500, "internal", "unexpected error in the request handler"));
    }
  }

  // Marks `gone` when the client closes its side while its request is being handled, so a
  // queued request whose client has left is dropped rather than run.
  void watch_client(std::shared_ptr<std::atomic<bool>> gone) {
    stream_.socket().async_wait(tcp::socket::wait_read,
                                [self = shared_from_this(), gone = std::move(gone)](beast::error_code ec) {
                                  if (ec) return;
                                  char byte;
                                  const ssize_t n = ::recv(self->stream_.socket().native_handle(), &byte, 1,
                                                           MSG_PEEK | MSG_DONTWAIT);
                                  // 0: orderly close; < 0 other than "no data": reset.
                                  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) gone->store(true);
                                });
  }

  HttpRequest head() const {
    const auto& req = parser_->get();
    HttpRequest r;
    r.method = std::string(req.method_string());
    const beast::string_view target = req.target();
    const size_t q = target.find('?');
    r.path = std::string(target.substr(0, q));
    if (q != beast::string_view::npos) r.query_string = std::string(target.substr(q + 1));
    r.request_id = std::string(req["X-Request-Id"]);
    r.authorization = std::string(req[http::field::authorization]);
    r.content_type = std::string(req[http::field::content_type]);
    r.accept = std::string(req[http::field::accept]);
    beast::error_code ec;
    const auto ep = stream_.socket().remote_endpoint(ec);
    if (!ec) r.peer = ep.address().to_string() + ":" + std::to_string(ep.port());
    r.received = std::chrono::steady_clock::now();
    return r;
  }

  void reject_too_large() {
    reject(413, "payload_too_large",
           "request body is over the limit of " + std::to_string(server_->options.max_body_bytes) +
               " bytes (server.max_body_bytes)");
  }

  // Answers a request the handler never sees, then closes: its body was not read.
  void reject(int status, const std::string& code, const std::string& message) {
    HttpRequest request = parser_ && parser_->is_header_done() ? head() : HttpRequest{};
    if (parser_ && parser_->is_header_done()) version_ = parser_->get().version();
    ++server_->active;
    write(server_->rejecter(request, status, code, message), false, true);
  }

  static void fill(http::response<http::string_body>& m, HttpResponse r, unsigned version, bool keep_alive) {
    m.version(version);
    m.result(static_cast<unsigned>(r.status));
    m.set(http::field::server, "reattn");
    m.set(http::field::content_type, r.content_type);
    for (const auto& [name, value] : r.headers) m.set(name, value);
    m.keep_alive(keep_alive);
    m.body() = std::move(r.body);
    m.prepare_payload();
  }

  void write(HttpResponse r, bool keep_alive, bool counted) {
    response_.emplace();
    fill(*response_, std::move(r), version_, keep_alive && !server_->closing.load());
    stream_.expires_after(timeout());
    http::async_write(stream_, *response_, beast::bind_front_handler(&Session::on_write, shared_from_this(), counted));
  }

  void on_write(bool counted, beast::error_code ec, size_t) {
    after_write(counted, ec, response_->keep_alive());
  }

  void after_write(bool counted, beast::error_code ec, bool keep_alive) {
    if (counted) --server_->active;
    if (ec) return close();
    if (!keep_alive) return linger();
    response_.reset();
    read_header();
  }

  // The answer to a request the handler had, from whichever thread completed it: serialized
  // and sent with one non-blocking send. While the handler runs the session has no read or
  // write of its own in flight (only watch_client's wait for readability, which peeks), so
  // nothing else writes to the socket. What does not fit in the socket buffer, and what
  // follows (the next request's read, or the close), runs on the session's strand.
  void write_now(HttpResponse r) {
    const bool keep_alive = keep_alive_ && !server_->closing.load();
    http::response<http::string_body> m;
    fill(m, std::move(r), version_, keep_alive);
    auto wire = std::make_shared<std::string>();
    http::response_serializer<http::string_body> serializer{m};
    beast::error_code ec;
    while (!ec && !serializer.is_done()) {
      serializer.next(ec, [&](beast::error_code&, const auto& buffers) {
        for (const auto b : beast::buffers_range_ref(buffers)) {
          wire->append(static_cast<const char*>(b.data()), b.size());
        }
        serializer.consume(beast::buffer_bytes(buffers));
      });
    }
    size_t sent = 0;
    if (!ec) {
      const int fd = stream_.socket().native_handle();
      const ssize_t n = ::send(fd, wire->data(), wire->size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0) sent = static_cast<size_t>(n);
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        ec = beast::error_code(errno, beast::system_category());
      }
    }
    auto self = shared_from_this();
    if (ec || sent == wire->size()) {
      net::post(stream_.get_executor(), [self, ec, keep_alive] { self->after_write(true, ec, keep_alive); });
      return;
    }
    net::post(stream_.get_executor(), [self, wire, sent, keep_alive] {
      self->stream_.expires_after(self->timeout());
      net::async_write(self->stream_, net::buffer(wire->data() + sent, wire->size() - sent),
                       [self, wire, keep_alive](beast::error_code write_ec, size_t) {
                         self->after_write(true, write_ec, keep_alive);
                       });
    });
  }

  // Half-closes, then reads and drops what the client still sends (e.g. the rest of a body
  // over the limit) until it closes too: closing with unread data would reset the connection
  // and the client could lose the response.
  void linger() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    if (ec) return close();
    stream_.expires_after(std::chrono::seconds(std::min(server_->options.request_timeout_s, 5)));
    drain_some();
  }

  void drain_some() {
    stream_.async_read_some(net::buffer(scratch_), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->close();
      self->drain_some();
    });
  }

  void close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
  }

  beast::tcp_stream stream_;
  std::shared_ptr<HttpServer::Impl> server_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::optional<http::response<http::empty_body>> continue_;
  std::optional<http::response<http::string_body>> response_;
  std::array<char, 16384> scratch_;
  bool keep_alive_ = true;
  unsigned version_ = 11;
};

}  // namespace

void HttpServer::Impl::accept() {
  acceptor.async_accept(net::make_strand(ioc), [self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
    self->on_accept(ec, std::move(socket));
  });
}

void HttpServer::Impl::on_accept(beast::error_code ec, tcp::socket socket) {
  if (ec == net::error::operation_aborted || !acceptor.is_open()) return;
  if (is_resource_exhaustion(ec)) {
    // Out of descriptors: accepting again at once would spin. The pending connection waits
    // in the backlog until a descriptor is free.
    backoff = std::min(kMaxBackoff, backoff.count() == 0 ? kFirstBackoff : backoff * 2);
    if (backoff == kFirstBackoff) {
      log_event(LogLevel::kWarn, "accept failed; backing off",
                {{"error", ec.message()}, {"open_connections", connections.load()}});
    }
    backoff_timer.expires_after(backoff);
    backoff_timer.async_wait([self = shared_from_this()](beast::error_code wait_ec) {
      if (!wait_ec) self->accept();
    });
    return;
  }
  if (!ec) {
    backoff = std::chrono::milliseconds(0);
    if (connections.load() >= options.max_connections) {
      refuse(std::move(socket));
    } else {
      // Small request/answer pairs on a kept connection: an answer must not wait for the ACK
      // of the previous one (Nagle). Best effort: a socket that refuses still works.
      beast::error_code nodelay_ec;
      socket.set_option(tcp::no_delay(true), nodelay_ec);
      std::make_shared<Session>(std::move(socket), shared_from_this())->start();
    }
  }
  accept();
}

void HttpServer::Impl::refuse(tcp::socket socket) {
  ++refused;
  beast::error_code ec;
  // One write that fits the socket buffer; never waits on the client.
  socket.non_blocking(true, ec);
  socket.write_some(net::buffer(kRefusal, sizeof(kRefusal) - 1), ec);
  socket.shutdown(tcp::socket::shutdown_both, ec);
  socket.close(ec);
}

HttpServer::HttpServer(net::io_context& ioc, HttpServerOptions options, Handler handler, Rejecter rejecter)
    : impl_(std::make_shared<Impl>(ioc, options, std::move(handler), std::move(rejecter))) {}

HttpServer::~HttpServer() {
  stop_accepting();
  impl_->stop_parse_pool();
}

Expected<int> HttpServer::listen(const std::string& host, int port) {
  beast::error_code ec;
  const auto address = net::ip::make_address(host, ec);
  if (ec) return invalid_argument("listen address '" + host + "': " + ec.message());
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
  tcp::acceptor& a = impl_->acceptor;
  const std::string where = host + ":" + std::to_string(port);
  if (a.open(endpoint.protocol(), ec); ec) return Status(ErrorCode::kUnavailable, "open " + where + ": " + ec.message());
  if (a.set_option(net::socket_base::reuse_address(true), ec); ec) {
    return Status(ErrorCode::kUnavailable, "set SO_REUSEADDR on " + where + ": " + ec.message());
  }
  if (a.bind(endpoint, ec); ec) return Status(ErrorCode::kUnavailable, "bind " + where + ": " + ec.message());
  if (a.listen(net::socket_base::max_listen_connections, ec); ec) {
    return Status(ErrorCode::kUnavailable, "listen on " + where + ": " + ec.message());
  }
  const int bound = a.local_endpoint(ec).port();
  impl_->accept();
  return bound;
}

void HttpServer::stop_accepting() {
  impl_->closing = true;
  // Close on the acceptor's strand: the accept loop runs there.
  net::post(impl_->acceptor.get_executor(), [impl = impl_] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
}

void HttpServer::post_work(std::function<void()> work) { net::post(impl_->parse_ioc, std::move(work)); }

int HttpServer::active_requests() const { return impl_->active.load(); }

int HttpServer::open_connections() const { return impl_->connections.load(); }

uint64_t HttpServer::refused_connections() const { return impl_->refused.load(); }

}  // namespace reattn
