#!/usr/bin/env python3
"""Usage: python3 bench/client_overhead.py REPO_ROOT QLEN CALLS (REPO_ROOT picks whose client is timed).
Client side only: one step's request building + send, and reading + decoding its answer,
over a local socket to a thread that swallows the request and answers a prepared body."""
import socket, sys, threading, time
root = sys.argv[1]; qlen = int(sys.argv[2]); n = int(sys.argv[3])
sys.path.insert(0, root + "/clients/python")
import numpy as np
from reattn_client import http11, safetensors as S
from reattn_client.client import _binary_result
from reattn_client.tensors import to_wire
rng = np.random.default_rng(0)
q = rng.standard_normal((qlen, 32, 128)).astype(np.float32); k = rng.standard_normal((8, qlen, 128)).astype(np.float32)
ans = S.dumps({"out": rng.standard_normal((qlen, 32, 128)).astype(np.float32), "recalled_chunks": np.arange(32, dtype=np.int64)})
reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(ans) + ans
req_len = None
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
def serve():
    c, _ = ls.accept(); buf = bytearray(64 << 20)
    while True:
        head = b""
        while b"\r\n\r\n" not in head:
            d = c.recv(65536)
            if not d: return
            head += d
        h, _, rest = head.partition(b"\r\n\r\n")
        clen = int([l.split(b":")[1] for l in h.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        got = len(rest)
        while got < clen: got += c.recv_into(buf, min(len(buf), clen - got))
        c.sendall(reply)
threading.Thread(target=serve, daemon=True).start()
conn = http11.Connection("127.0.0.1", ls.getsockname()[1], 60)
dumps = getattr(S, "dumps_parts", S.dumps)
ts = []
for i in range(n + 1):
    t0 = time.perf_counter()
    qw, _ = to_wire(q, "q", "F16"); kw, _ = to_wire(k, "k", "F16"); vw, _ = to_wire(k, "v", "F16")
    body = dumps({"q": qw, "k": kw, "v": vw})
    r, data = conn.roundtrip("POST", "/v1/contexts/1/step?layer=0", {"Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}, body)
    res = _binary_result(r, data, 0)
    ts.append((time.perf_counter() - t0) * 1e3)
print("%s qlen %d: client round trip (no service work) p50 %.3f ms" % (root, qlen, np.median(ts[1:])))
