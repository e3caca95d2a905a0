"""A closed-loop HTTP/1.1 load generator with latency per response status (wrk has none): for the overload benchmarks.

`connections` keep-alive connections each send one request at a time; the next one leaves as soon as the answer's body
is in (closed loop), or, on a 503 (or 429) with `Retry-After: N` when `honor_retry_after`, N x (1 + U(0, retry_jitter))
seconds later, as a well-behaved client (an acquirer's gateway) waits: the jitter (10 % by default) keeps the
connections refused together from coming back in one burst. Latency: time.perf_counter from just before the request
is written to the end of the response body (connecting, body(i) and waiting out a Retry-After are not in it).

asyncio on uvloop with an asyncio.Protocol per TCP connection, header bytes built once, and a minimal response parser
(status line, Content-Length or chunked, Retry-After, Connection: close). `procs` > 1 forks processes, each with a share
of the connections, and merges their results.

What is counted (the measured window is [t0, t1): after `warmup` seconds, `duration` long):
- `counts`, `latency_ms`, `errors`: the requests sent in the window; those still in flight at t1 are waited for (up to
  `timeout`), so a slow answer at the end still counts in the tail.
- `rps_*`: the responses completed in the window, / duration (like wrk; the drained ones are not in them).

    python bench/_load.py --port 8000 --connections 256 --duration 10 [--no-retry-after]  # POST /predict, key from MLPAY_KEY
"""
import argparse
import array
import asyncio
import gc
import json
import math
import os
import random
import sys
import time
from typing import Callable

perf = time.perf_counter  # CLOCK_MONOTONIC on Linux: one clock for all the processes


def _chunked(buf: bytes, pos: int):
    "Decode a chunked body starting at buf[pos]: (body, end) or None while incomplete."
    parts = []
    while True:
        e = buf.find(b"\r\n", pos)
        if e < 0: return None
        size = int(buf[pos:e].split(b";", 1)[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", e)  # no trailers expected: the last chunk's line is followed by an empty one
            return (b"".join(parts), end + 4) if end >= 0 else None
        if len(buf) < e + 2 + size + 2: return None
        parts.append(buf[e + 2:e + 2 + size])
        pos = e + 2 + size + 2


class _Conn(asyncio.Protocol):
    "One TCP connection: one request in flight at a time; a fresh _Conn after each reconnect."
    __slots__ = ("w", "tr", "buf", "busy", "dead", "t", "i", "head")

    def __init__(self, w):
        self.w, self.tr, self.buf, self.busy, self.dead, self.t, self.i, self.head = w, None, b"", False, False, 0.0, -1, None

    def connection_made(self, tr):
        self.tr = tr
        self.w.conns.add(self)
        if self.w.started: self.w.send(self)

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        if self.head is None:
            e = buf.find(b"\r\n\r\n")
            if e < 0: self.buf = buf; return
            try: self.head = self._parse(buf[:e]) + (e + 4,)
            except ValueError:
                self.buf = b""; return self.w.fail(self, "parse")
        status, clen, retry, close, start = self.head
        if clen >= 0:
            if len(buf) < start + clen: self.buf = buf; return
            body = buf[start:start + clen]
        elif clen == -1:  # chunked
            try: r = _chunked(buf, start)
            except ValueError:
                self.buf = b""; return self.w.fail(self, "parse")
            if r is None: self.buf = buf; return
            body = r[0]
        else: self.buf = buf; return  # no length: the body ends when the server closes (connection_lost)
        self.buf, self.head = b"", None
        self.w.done(self, status, body, retry, close)

    @staticmethod
    def _parse(head: bytes):
        "(status, content length (-1: chunked, -2: until close), Retry-After seconds or None, Connection: close)."
        status = int(head[9:12])
        h = head.lower()
        j = h.find(b"\r\ncontent-length:")
        if j >= 0:
            e = h.find(b"\r\n", j + 17)
            clen = int(h[j + 17:e if e >= 0 else None])
        elif b"\r\ntransfer-encoding: chunked" in h: clen = -1
        else: clen = 0 if status in (204, 304) or status < 200 else -2
        retry = None
        j = h.find(b"\r\nretry-after:")
        if j >= 0:
            e = h.find(b"\r\n", j + 14)
            try: retry = float(h[j + 14:e if e >= 0 else None])
            except ValueError: retry = 1.0  # an HTTP-date: not worth parsing here
        return status, clen, retry, b"\r\nconnection: close" in h

    def connection_lost(self, exc):
        w = self.w
        w.conns.discard(self)
        if self.dead: return  # closed on purpose, already accounted for
        self.dead = True
        if self.head is not None and self.head[1] == -2:  # a body that ends with the connection
            status, _, retry, _, start = self.head
            self.head = None
            return w.done(self, status, self.buf[start:], retry, True)
        if self.busy:
            self.busy = False
            w.error(self.t, "closed")  # the server closed with our request unanswered
            w.open()


class _Worker:
    "The connections of one process and what they measured."

    def __init__(self, host, port, connections, body, prefix, honor, jitter, timeout, on_response, i0, stride):
        self.host, self.port, self.n, self.body, self.prefix = host, port, connections, body, prefix
        self.honor, self.jitter, self.timeout, self.on_response = honor, jitter, timeout, on_response
        self.next_i, self.stride = i0, stride
        self.conns, self.started, self.t0, self.t1 = set(), False, math.inf, math.inf
        self.counts, self.lat, self.window = {}, {}, {}
        self.errors = {"connect": 0, "closed": 0, "timeout": 0, "parse": 0}
        self.loop = None

    # --- requests ---
    def send(self, c):
        "Send connection c's next request (a new connection if c is gone), unless the window is over."
        if perf() >= self.t1: return
        if c.dead: return self.open()
        i = self.next_i
        self.next_i += self.stride
        b = self.body(i)
        req = self.prefix + str(len(b)).encode() + b"\r\n\r\n" + b
        c.i, c.busy = i, True
        c.t = perf()
        c.tr.write(req)

    def done(self, c, status, body, retry, close):
        t = perf()
        c.busy = False
        if self.t0 <= c.t < self.t1:
            self.counts[status] = self.counts.get(status, 0) + 1
            lat = self.lat.get(status)
            if lat is None: lat = self.lat[status] = array.array("d")
            lat.append((t - c.t) * 1e3)
        if self.t0 <= t < self.t1: self.window[status] = self.window.get(status, 0) + 1
        if self.on_response is not None: self.on_response(status, c.i, body)
        if close and not c.dead:
            c.dead = True
            c.tr.close()
        if retry is not None and self.honor and (status == 503 or status == 429):
            self.loop.call_later(retry * (1 + random.random() * self.jitter), self.send, c)
        else: self.send(c)

    def error(self, t, kind):
        if self.t0 <= t < self.t1: self.errors[kind] += 1

    def fail(self, c, kind):
        "Give up on c's request (unparsable answer, timeout): drop the connection, carry on with a new one."
        self.error(c.t, kind)
        c.busy, c.dead, c.head = False, True, None
        self.conns.discard(c)
        c.tr.abort()
        self.open()

    # --- connections ---
    def open(self):
        if perf() < self.t1: self.loop.create_task(self._connect())

    async def _connect(self):
        try: await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.error(perf(), "connect")
            await asyncio.sleep(0.05)  # a refused connection: not a busy loop
            self.open()

    async def _sweep(self):
        "Every 100 ms: time out the requests waiting longer than `timeout`."
        while True:
            await asyncio.sleep(0.1)
            now = perf()
            for c in [c for c in self.conns if c.busy and now - c.t > self.timeout]: self.fail(c, "timeout")

    async def run(self, ready: Callable[[], float], warmup: float, duration: float):
        "Connect, wait for the start time ready() gives, run warmup + duration, drain; this process's raw results."
        self.loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._connect() for _ in range(self.n)))
        start = ready()
        await asyncio.sleep(max(0.0, start - perf()))
        cpu0, wall0 = time.process_time(), perf()
        self.t0, self.t1 = start + warmup, start + warmup + duration
        self.started = True
        missing = self.n - len(self.conns)
        for c in list(self.conns): self.send(c)
        for _ in range(missing): self.open()
        sweep = self.loop.create_task(self._sweep())
        await asyncio.sleep(max(0.0, self.t1 - perf()))
        deadline = self.t1 + self.timeout
        while any(c.busy for c in self.conns) and perf() < deadline: await asyncio.sleep(0.005)
        sweep.cancel()
        left = sum(c.busy for c in self.conns)
        for c in list(self.conns):
            c.dead = True
            c.tr.close()
        cpu, wall = time.process_time() - cpu0, perf() - wall0
        return {"counts": self.counts, "lat": self.lat, "window": self.window, "errors": self.errors, "in_flight_at_end": left,
                "cpu_s": cpu, "wall_s": wall}


def _worker_main(kw, ready, warmup, duration):
    import uvloop
    gc.freeze()  # what exists already is never garbage: keep the collector's passes short
    try: return uvloop.run(_Worker(**kw).run(ready, warmup, duration))
    finally: gc.unfreeze()


def _child(pipe, kw, warmup, duration, collect):
    "A forked process: connect, report ready, get the start time, run; send the results back through the pipe."
    got = [] if collect else None
    if collect: kw = {**kw, "on_response": lambda s, i, b: got.append((s, i, b))}
    def ready():
        pipe.send("ready")
        return pipe.recv()
    try: out = _worker_main(kw, ready, warmup, duration)
    except BaseException as e:  # noqa: BLE001 (report any failure to the parent)
        pipe.send({"failed": repr(e)}); raise
    out["responses"] = got
    pipe.send(out)
    pipe.close()


def _percentiles(v) -> dict:
    "p50, p90, p99, p99.9, max, mean (ms) of the values v (nearest rank)."
    n = len(v)
    if not n: return {"n": 0}
    s = sorted(v)
    q = lambda p: s[min(n - 1, max(0, math.ceil(p * n) - 1))]
    return {"n": n, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99.9": q(0.999), "max": s[-1], "mean": sum(s) / n}


def run(port: int, duration: float, connections: int, body: Callable[[int], bytes], *, path: str = "/predict",
        headers: dict | None = None, honor_retry_after: bool = True, host: str = "127.0.0.1", warmup: float = 0.0,
        procs: int = 1, timeout: float = 10.0, retry_jitter: float = 0.1,
        on_response: Callable[[int, int, bytes], None] | None = None) -> dict:
    """Load http://host:port/path with `connections` closed-loop keep-alive connections for `warmup` + `duration` s.

    body(i): the request body of the i-th request (i unique across connections and processes: process p of `procs`
    numbers its requests p, p + procs, p + 2 procs, ...). headers: added to Host, Content-Type: application/json and
    Content-Length. timeout: a request unanswered this long counts as an error, its connection is replaced.
    on_response(status, i, body_bytes): called for every response, warm-up included; in the event loop when procs == 1
    (its time is the generator's), in this process after the run when procs > 1 (the children collect the responses).
    procs > 1 forks (body and headers need not pickle); connections are shared out as evenly as possible.

    Returns duration, counts by status, rps_2xx / rps_503 / rps_all, latency_ms {"2xx", "503", "all"} with
    p50/p90/p99/p99.9/max/mean, errors (connect, closed, timeout, parse), in_flight_at_end (still unanswered after the
    drain), client_cpu (cores the generator used on average), by_status (latency for every status)."""
    hdrs = {"Host": f"{host}:{port}", "Content-Type": "application/json", **(headers or {})}
    prefix = (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "Content-Length: ").encode()
    procs = max(1, min(procs, connections))
    kw = {"host": host, "port": port, "body": body, "prefix": prefix, "honor": honor_retry_after, "jitter": retry_jitter,
          "timeout": timeout, "stride": procs}
    if procs == 1:
        parts = [_worker_main({**kw, "connections": connections, "on_response": on_response, "i0": 0}, perf, warmup, duration)]
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        kids = []
        for p in range(procs):
            a, b = ctx.Pipe()
            share = connections // procs + (p < connections % procs)
            pr = ctx.Process(target=_child, args=(b, {**kw, "connections": share, "on_response": None, "i0": p}, warmup, duration,
                                                 on_response is not None), daemon=True)
            pr.start()
            kids.append((pr, a))
        try:
            for pr, a in kids:
                m = a.recv()
                if m != "ready": raise RuntimeError(f"load process failed: {m}")
            start = perf() + 0.05
            for pr, a in kids: a.send(start)
            parts = [a.recv() for pr, a in kids]
        finally:
            for pr, a in kids: pr.join(5); pr.kill() if pr.is_alive() else None
        for m in parts:
            if "failed" in m: raise RuntimeError(f"load process failed: {m['failed']}")
        if on_response is not None:
            for m in parts:
                for r in m["responses"]: on_response(*r)
    return _merge(parts, duration, connections, procs)


def _merge(parts, duration, connections, procs) -> dict:
    counts, window, lat, errors = {}, {}, {}, {}
    for m in parts:
        for k, v in m["counts"].items(): counts[k] = counts.get(k, 0) + v
        for k, v in m["window"].items(): window[k] = window.get(k, 0) + v
        for k, v in m["lat"].items(): lat.setdefault(k, array.array("d")).extend(v)
        for k, v in m["errors"].items(): errors[k] = errors.get(k, 0) + v
    ok = [v for k, a in lat.items() if 200 <= k < 300 for v in a]
    return {
        "duration": duration, "connections": connections, "procs": procs,
        "requests": sum(counts.values()), "counts": dict(sorted(counts.items())),
        "rps_2xx": sum(v for k, v in window.items() if 200 <= k < 300) / duration,
        "rps_503": window.get(503, 0) / duration,
        "rps_all": sum(window.values()) / duration,
        "latency_ms": {"2xx": _percentiles(ok), "503": _percentiles(lat.get(503, ())),
                       "all": _percentiles([v for a in lat.values() for v in a])},
        "by_status": {k: _percentiles(lat[k]) for k in sorted(lat)},
        "errors": errors, "in_flight_at_end": sum(m["in_flight_at_end"] for m in parts),
        "client_cpu": sum(m["cpu_s"] for m in parts) / max(m["wall_s"] for m in parts),
    }


class Transactions:
    "Request bodies as bench/predict.lua makes them: transaction id id_base + i, a random card, terminal and amount."

    def __init__(self, id_base: int): self.id_base = id_base

    def __call__(self, i: int) -> bytes:
        s = i % 86400
        r = random.randrange
        return (f'{{"transaction_id":{self.id_base + i},"tx_datetime":"2018-10-01T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}",'
                f'"customer_id":{r(5000)},"terminal_id":{r(10000)},"tx_amount":{r(100, 20001) / 100:.2f}}}').encode()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--connections", "-c", type=int, default=16)
    p.add_argument("--duration", "-d", type=float, default=10)
    p.add_argument("--warmup", type=float, default=0)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--path", default="/predict")
    p.add_argument("--no-retry-after", action="store_true", help="send the next request at once after a 503")
    p.add_argument("--id-base", type=int, help="first transaction id (default MLPAY_ID_BASE, else a random multiple of 10^9)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    a = p.parse_args()
    key = os.environ.get("MLPAY_KEY")
    if not key: sys.exit("set MLPAY_KEY to the server's API key")
    base = a.id_base if a.id_base is not None else int(os.environ.get("MLPAY_ID_BASE") or random.randrange(100, 1000) * 10**9)
    r = run(a.port, a.duration, a.connections, Transactions(base), path=a.path, headers={"Authorization": f"Bearer {key}"},
            honor_retry_after=not a.no_retry_after, host=a.host, warmup=a.warmup, procs=a.procs)
    if a.json: return print(json.dumps(r, indent=2))
    print(f"{a.connections} connections, {a.duration:g} s, retry-after {'ignored' if a.no_retry_after else 'honored'}: "
          f"{r['rps_2xx']:,.0f} 2xx/s, {r['rps_all']:,.0f} all/s; counts {r['counts']}; errors {r['errors']}; "
          f"generator CPU {r['client_cpu']:.2f} cores")
    print("| status | n | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|---|---|")
    for k, v in r["latency_ms"].items():
        if v["n"]: print(f"| {k} | {v['n']} | " + " | ".join(f"{v[q]:.2f}" for q in ("p50", "p90", "p99", "p99.9", "max")) + " |")


if __name__ == "__main__":
    main()
