#include "coordinator/http_server.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <optional>
#include <utility>

namespace reattn {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;

namespace {

constexpr uint32_t kHeaderLimit = 64 * 1024;
// Room the read buffer keeps for a request body: 1 MiB per socket read.
constexpr size_t kBodyReadBytes = 1 << 20;

}  // namespace

// State shared by the listener and every session.
struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  Impl(net::io_context& io, HttpServerOptions opt, Handler h, Rejecter r)
      : ioc(io), acceptor(net::make_strand(io)), options(opt), handler(std::move(h)), rejecter(std::move(r)) {}

  void accept();

  net::io_context& ioc;
  tcp::acceptor acceptor;
  HttpServerOptions options;
  Handler handler;
  Rejecter rejecter;
  std::atomic<int> active{0};
  std::atomic<bool> closing{false};
};

namespace {

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, std::shared_ptr<HttpServer::Impl> server)
      : stream_(std::move(socket)), server_(std::move(server)) {}

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
    // room, a 64 MiB body would take 131072 reads.
    buffer_.reserve(kBodyReadBytes);
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
    keep_alive_ = parser_->get().keep_alive();
    version_ = parser_->get().version();
    ++server_->active;
    auto self = shared_from_this();
    Responder done = [self](HttpResponse response) {
      net::post(self->stream_.get_executor(), [self, r = std::move(response)]() mutable {
        self->write(std::move(r), self->keep_alive_, true);
      });
    };
    try {
      server_->handler(std::move(request), std::move(done));
    } catch (...) {
      // Handlers never throw; if one did, the responder was not called.
      write(error_response(500, "internal", "unexpected error in the request handler"), false, true);
    }
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

  void write(HttpResponse r, bool keep_alive, bool counted) {
    response_.emplace();
    response_->version(version_);
    response_->result(static_cast<unsigned>(r.status));
    response_->set(http::field::server, "reattn");
    response_->set(http::field::content_type, r.content_type);
    for (const auto& [name, value] : r.headers) response_->set(name, value);
    response_->keep_alive(keep_alive && !server_->closing.load());
    response_->body() = std::move(r.body);
    response_->prepare_payload();
    stream_.expires_after(timeout());
    http::async_write(stream_, *response_, beast::bind_front_handler(&Session::on_write, shared_from_this(), counted));
  }

  void on_write(bool counted, beast::error_code ec, size_t) {
    if (counted) --server_->active;
    if (ec) return close();
    if (!response_->keep_alive()) return linger();
    response_.reset();
    read_header();
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
    if (ec == net::error::operation_aborted || !self->acceptor.is_open()) return;
    if (!ec) std::make_shared<Session>(std::move(socket), self)->start();
    self->accept();
  });
}

HttpServer::HttpServer(net::io_context& ioc, HttpServerOptions options, Handler handler, Rejecter rejecter)
    : impl_(std::make_shared<Impl>(ioc, options, std::move(handler), std::move(rejecter))) {}

HttpServer::~HttpServer() { stop_accepting(); }

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

int HttpServer::active_requests() const { return impl_->active.load(); }

}  // namespace reattn
