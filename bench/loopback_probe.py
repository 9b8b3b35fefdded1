#!/usr/bin/env python3
"""Loopback TCP throughput between two Python sockets on this machine: the ceiling for the
bytes a layer step sends and receives over HTTP (the client is Python, the server reads with
one thread). --mib per message, --reps timed messages after one warm-up; prints one JSON line.

    python3 bench/loopback_probe.py --mib 64 --reps 8"""
import argparse, json, socket, threading, time
p = argparse.ArgumentParser(); p.add_argument("--mib", type=int, default=64); p.add_argument("--reps", type=int, default=8)
a = p.parse_args()
n = a.mib << 20
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def sink():
    conn, _ = srv.accept(); buf = bytearray(n); view = memoryview(buf)
    for _ in range(a.reps + 1):
        got = 0
        while got < n:
            got += conn.recv_into(view[got:], n - got)
        conn.sendall(b"k")
t = threading.Thread(target=sink); t.start()
c = socket.create_connection(srv.getsockname()); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
data = bytes(n); times = []
for i in range(a.reps + 1):
    t0 = time.perf_counter(); c.sendall(data); c.recv(1)
    if i: times.append(time.perf_counter() - t0)
t.join(); times.sort(); med = times[len(times) // 2]
print(json.dumps({"probe": "loopback_tcp", "mib": a.mib, "median_ms": round(med * 1e3, 2), "gb_s": round(n / med / 1e9, 3)}))
