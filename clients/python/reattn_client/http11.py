"""A minimal HTTP/1.1 client connection for small request/response pairs on one kept socket.

Why not http.client: a layer step is one small request per layer per token, and http.client
spends most of the client's time per call parsing headers through the email package and
writing the head and the body in separate writes. This sends each request in one write and
reads the answer with a plain parser (Content-Length or chunked bodies, keep-alive, close).

Not thread-safe."""

import socket
import ssl
import time

_MAX_HEAD_BYTES = 64 * 1024
_RECV_BYTES = 256 * 1024
_RECV_BYTES_BODY = 8 * 1024 * 1024  # one recv_into of a body's rest
_MAX_IOV = 64  # buffers per sendmsg (IOV_MAX is at least 1024 on Linux)


class Closed(ConnectionError):
    """The server closed the connection before any byte of the answer (a kept connection that
    timed out while idle): the request did not reach it and may be sent again."""


class Response:
    def __init__(self, status, reason, headers):
        self.status = status
        self.reason = reason
        self.headers = headers  # [(name, value)] in arrival order
        self._by_name = None    # lower-cased name -> the last value, made on the first look-up

    def getheader(self, name, default=None):
        if self._by_name is None:
            self._by_name = {k.lower(): v for k, v in self.headers}
        return self._by_name.get(name.lower(), default)


class Connection:
    """busy_wait: seconds to poll for the first bytes of an answer (non-blocking reads) before
    a blocking one: a quick answer is then read without the thread being put to sleep and
    woken again."""

    def __init__(self, host, port, timeout, tls=False, busy_wait=0.0):
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
        self.busy_wait = busy_wait if not tls else 0.0
        self.sock = None
        self.buf = bytearray()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = bytearray()

    def _connect(self):
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        # Small request/response pairs on one connection: Nagle would add a delayed-ACK wait.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        self.buf = bytearray()

    def roundtrip(self, method, target, headers, body=None, into=None):
        """Sends one request, returns (Response, body). body: bytes or a list of byte buffers
        (sent in order without joining them). The answer's body is a bytearray (or b"" when
        empty); into: a writable buffer that a 2xx answer's body is received into when it
        fits (the body is then a memoryview of it: no allocation, e.g. pinned memory that a
        GPU copy reads next). Raises Closed when the kept connection was found closed before the answer
        began, OSError/ValueError otherwise."""
        if self.sock is None:
            self._connect()
        parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body or ())
        parts = [memoryview(b).cast("B") for b in parts if memoryview(b).nbytes]
        lines = ["%s %s HTTP/1.1" % (method, target), "Host: %s:%d" % (self.host, self.port)]
        lines += ["%s: %s" % kv for kv in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: %d" % sum(p.nbytes for p in parts))
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self._send([memoryview(head)] + parts)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.close()
            raise Closed(str(e)) from None
        try:
            response, data = self._read_response(method, into)
        except Exception:
            self.close()
            raise
        if (response.getheader("Connection") or "").lower() == "close":
            self.close()
        return response, data

    def _send(self, parts):
        """Writes the buffers in order, a small head and body in one segment, a large body
        without copying it into one block (sendmsg gathers them)."""
        if self.tls or not hasattr(self.sock, "sendmsg"):
            for p in parts:
                self.sock.sendall(p)
            return
        while parts:
            sent = self.sock.sendmsg(parts[:_MAX_IOV])
            while parts and sent >= parts[0].nbytes:
                sent -= parts[0].nbytes
                parts.pop(0)
            if sent:
                parts[0] = parts[0][sent:]

    def _poll(self):
        """Up to busy_wait seconds of non-blocking reads; what arrived, or None. (The socket's
        timeout is lifted meanwhile: with one, each read would first wait in poll().)"""
        deadline = time.perf_counter() + self.busy_wait
        self.sock.settimeout(0.0)
        try:
            while True:
                try:
                    return self.sock.recv(_RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    if time.perf_counter() >= deadline:
                        return None
        finally:
            self.sock.settimeout(self.timeout)

    def _fill(self, first):
        """Reads more bytes into the buffer; `first`: nothing of this answer has arrived yet."""
        try:
            chunk = self._poll() if first and self.busy_wait > 0 else None
            if chunk is None:
                chunk = self.sock.recv(_RECV_BYTES)
        except ConnectionResetError as e:
            if first:
                raise Closed(str(e)) from None
            raise
        if not chunk:
            if first:
                raise Closed("connection closed by the server")
            raise ConnectionError("connection closed in the middle of an answer")
        self.buf += chunk

    def _read_until(self, marker, limit, first=False):
        while True:
            at = self.buf.find(marker)
            if at >= 0:
                out = bytes(self.buf[:at])
                del self.buf[:at + len(marker)]
                return out
            if len(self.buf) > limit:
                raise ValueError("HTTP answer: no %r within %d bytes" % (marker, limit))
            self._fill(first and not self.buf)

    def _read_exact(self, n, into=None):
        """The next n bytes as one bytearray (or a memoryview of `into`, when given and large
        enough): what the buffer holds, then the rest received straight into the result (no
        intermediate copies of a large body)."""
        view = None
        if into is not None:
            view = memoryview(into).cast("B")
            view = view[:n] if view.nbytes >= n and not view.readonly else None
        if view is None and len(self.buf) >= n:
            out = self.buf[:n]
            del self.buf[:n]
            return out
        if view is None:
            out = bytearray(n)
            view = memoryview(out)
        else:
            out = view
        if len(self.buf) >= n:
            view[:] = self.buf[:n]
            del self.buf[:n]
            return out
        have = len(self.buf)
        view[:have] = self.buf
        self.buf = bytearray()
        while have < n:
            got = self.sock.recv_into(view[have:], min(n - have, _RECV_BYTES_BODY))
            if not got:
                raise ConnectionError("connection closed in the middle of an answer")
            have += got
        return out

    def _read_response(self, method, into=None):
        while True:
            head = self._read_until(b"\r\n\r\n", _MAX_HEAD_BYTES, first=True).decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise ValueError("HTTP answer: bad status line %r" % lines[0][:200])
            status = int(parts[1])
            headers = []
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers.append((name.strip(), value.strip()))
            response = Response(status, parts[2] if len(parts) > 2 else "", headers)
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            break
        if method == "HEAD" or status in (204, 304):
            return response, b""
        if "chunked" in (response.getheader("Transfer-Encoding") or "").lower():
            return response, self._read_chunked()
        length = response.getheader("Content-Length")
        if length is not None:
            return response, self._read_exact(int(length), into if 200 <= status < 300 else None)
        # No length: the body runs to the end of the connection.
        while True:
            try:
                self._fill(False)
            except ConnectionError:
                break
        data = bytes(self.buf)
        self.close()
        return response, data

    def _read_chunked(self):
        parts = []
        while True:
            size = int(self._read_until(b"\r\n", _MAX_HEAD_BYTES).split(b";")[0].strip(), 16)
            if size == 0:
                while self._read_until(b"\r\n", _MAX_HEAD_BYTES):  # trailers, then the blank line
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(size))
            self._read_until(b"\r\n", 2)
