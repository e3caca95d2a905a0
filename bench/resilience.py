"""Resilience benchmark: faults and overload, each measured against the server before these features, in one run.

- Redis stopped for 10 s in a 30 s load at 16 clients: statuses, stand-in answers, time to score normally again
  after Redis returns, and whether every answered transaction is in Redis afterwards;
- 16 and 256 concurrent clients (closed loop; a 503's Retry-After honoured, as a gateway does): accepted
  throughput and p99, refused requests' latency;
- kill -9 during load, then a restart: answered transactions missing from the state (a changed retry of each
  must get 409), and what the write-ahead journal costs in throughput (off, on, fsync).

The "before" server is another checkout (`--baseline`, e.g. `git worktree add /tmp/prev 772a9cb`) serving the same
package. bench/_load.py is the load generator (latency per status). Prints tables; bench/results/resilience.json.

    python bench/resilience.py [--model artifacts/model] [--warm data/transactions.parquet] [--baseline /tmp/prev]
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _load
from _common import print_table, save
from serve import BIN, KEY, serve, stop

HERE = Path(__file__).parent
AUTH = {"Authorization": f"Bearer {KEY}"}
IDS = iter(range(100, 1000))
REDIS_DEADLINE_MS = 50  # the fault scenario's clients grant 50 ms: 16 at once fit it, so no answer is refused for the deadline


def command(checkout, model, port):
    "mlpay-serve from this checkout, or (baseline) importing mlpay from another one."
    if checkout is None: return [str(BIN / "mlpay-serve"), "--model", str(model), "--port", str(port)], {}
    return ([sys.executable, "-P", "-c", "from mlpay.serve import main; main()", "--model", str(model), "--port", str(port)],
            {"PYTHONPATH": str(Path(checkout).resolve())})


def start(checkout, model, port, warm, **env):
    cmd, extra = command(checkout, model, port)
    return serve(cmd, port, {"MLPAY_API_KEY": KEY, "MLPAY_WARM_FROM": warm, **extra, **{k: str(v) for k, v in env.items()}})


def load(port, duration, connections, answered=None, deadline_ms=None, **kw):
    "bench/_load.py with fresh transactions; `answered` collects the bodies of the 2xx answers' requests."
    txs = _load.Transactions(next(IDS) * 10**9)
    on = None
    if answered is not None:
        def on(status, i, body):
            if 200 <= status < 300: answered.append((txs.id_base + i, txs(i), body, time.perf_counter()))
    # a client honouring Retry-After: N seconds, plus up to N more at random (full jitter), so refused clients come back spread
    headers = {**AUTH, **({"X-Deadline-Ms": str(deadline_ms)} if deadline_ms else {})}
    return _load.run(port, duration, connections, txs, headers=headers, on_response=on, retry_jitter=1.0, **kw)


def post(port, path, body, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", path, body=body, headers={**AUTH, "Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r.status, r.read()


def changed_retries(port, answered):
    "Statuses of a retry of each answered transaction with another amount (409: the state knows it)."
    def one(b):
        tx = json.loads(b)
        return post(port, "/predict", json.dumps({**tx, "tx_amount": tx["tx_amount"] + 1.0}), {"X-Deadline-Ms": "10000"})[0]
    with ThreadPoolExecutor(8) as ex: return list(ex.map(one, [a[1] for a in answered]))


def redis_outage(checkout, model, warm, port):
    "Redis stopped at 10 s for 10 s of a 30 s load at 16 clients."
    d = Path(tempfile.mkdtemp())
    rport = port + 50
    redis_cmd = ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--dir", str(d), "--save", "", "--appendonly", "no"]
    import redis
    rproc, client = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL), redis.Redis(port=rport)
    for _ in range(200):
        try: client.ping(); break
        except redis.ConnectionError: time.sleep(0.02)
    try: proc = start(checkout, model, port, warm, MLPAY_REDIS_URL=f"redis://127.0.0.1:{rport}/0")
    except RuntimeError: rproc.terminate(); raise
    events, answered = {}, []
    def fault():
        time.sleep(10)
        client.shutdown(save=True); rproc.wait(10); events["down"] = time.perf_counter()
        time.sleep(10)
        events["proc"] = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
        for _ in range(200):
            try: client.ping(); break
            except redis.ConnectionError: time.sleep(0.01)
        events["up"] = time.perf_counter()
    t = threading.Thread(target=fault); t.start()
    try:
        r = load(port, 30, 16, answered, deadline_ms=REDIS_DEADLINE_MS)
        t.join()
        degraded = sum(b'"degraded":true' in a[2] for a in answered)
        # scoring normally again: the first answer after Redis is back that is the model's (no stand-in)
        normal = [a[3] for a in answered if a[3] > events["up"] and b'"degraded":true' not in a[2]]
        # every answered transaction in Redis afterwards (the backlog written back, or scored there)
        pipe = client.pipeline(transaction=False)
        for _ in range(600):  # the backlog is written behind the requests: until /health says it is (the server before has none)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5); c.request("GET", "/health")
            if not json.loads(c.getresponse().read()).get("state", {}).get("backlog"): break
            time.sleep(0.1)
        for a in answered: pipe.hexists(f"mlpay:tx:{a[0] >> 16}", str(a[0]))
        missing = len(answered) - sum(pipe.execute())
    finally:
        stop(proc); events.get("proc", rproc).terminate(); shutil.rmtree(d, ignore_errors=True)
    fivexx = sum(v for k, v in r["counts"].items() if k >= 500)
    back = min(normal) - events["up"] if normal else None
    return {"load": r, "5xx": fivexx, "degraded_answers": degraded, "answered": len(answered), "missing_from_state": missing,
            "normal_after_s": back}


def overload(checkout, model, warm, port, connections):
    proc = start(checkout, model, port, warm, MLPAY_STATE_DIR=tempfile.mkdtemp())
    try:
        load(port, 2, 16)  # warm-up
        return load(port, 15, connections)
    finally: stop(proc)


def crash(checkout, model, warm, port, **env):
    "kill -9 after 10 s of load at 16 clients; restart; changed retries of every answered transaction."
    state = tempfile.mkdtemp()
    proc = start(checkout, model, port, warm, MLPAY_STATE_DIR=state, **env)
    answered = []
    try: r = load(port, 10, 16, answered)
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
    proc = start(checkout, model, port, warm, MLPAY_STATE_DIR=state, **env)
    try: statuses = changed_retries(port, answered)
    finally: stop(proc); shutil.rmtree(state, ignore_errors=True)
    return {"load": r, "answered": len(answered), "missing_from_state": sum(s != 409 for s in statuses),
            "statuses": {str(s): statuses.count(s) for s in set(statuses)}}


def ms(r, key="2xx", q="p99"): return f"{r['latency_ms'][key].get(q, float('nan')):.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/model", type=Path)
    p.add_argument("--warm", default="data/transactions.parquet")
    p.add_argument("--baseline", type=Path, help="the checkout before these features (git worktree add /tmp/prev 772a9cb)")
    p.add_argument("--only", choices=["redis", "overload", "crash"], action="append")
    a = p.parse_args()
    servers = [("before", a.baseline)] if a.baseline else []
    servers.append(("now", None))
    out, only = {}, set(a.only or ["redis", "overload", "crash"])

    if "redis" in only and shutil.which("redis-server"):
        rows = []
        for name, checkout in servers:
            r = out[f"redis {name}"] = redis_outage(checkout, a.model, a.warm, 8301)
            rows.append([name, r["answered"], r["5xx"], r["degraded_answers"], ms(r["load"]), r["missing_from_state"],
                         "n/a" if r["normal_after_s"] is None else f"{r['normal_after_s']:.2f}"])
        print_table(f"Redis stopped 10 s in a 30 s load, 16 clients (X-Deadline-Ms: {REDIS_DEADLINE_MS})", ["server", "answered 2xx", "5xx", "stand-in", "p99 ms (2xx)",
                    "answered, not in Redis after", "normal after Redis is back (s)"], rows)

    if "overload" in only:
        rows = []
        proc = serve([sys.executable, str(HERE / "refusing_server.py"), "8304"], 8304, {"MLPAY_API_KEY": KEY})
        try: r = out["overload refusal floor"] = load(8304, 15, 256)
        finally: stop(proc)
        rows.append(["refusal floor: the edge refusing everything at once (bench/refusing_server.py)", 256, "0", "", "",
                     f"{r['rps_503']:,.0f}", ms(r, "503", "p50"), ms(r, "503", "p90"), ms(r, "503"), 0])
        for name, checkout in servers:
            for c in (16, 256):
                r = out[f"overload {name} {c}"] = overload(checkout, a.model, a.warm, 8302, c)
                rows.append([name, c, f"{r['rps_2xx']:,.0f}", ms(r, "2xx", "p50"), ms(r), f"{r['rps_503']:,.0f}", ms(r, "503", "p50"),
                             ms(r, "503", "p90"), ms(r, "503"), sum(v for k, v in r["counts"].items() if k >= 500 and k != 503)])
        print_table("Overload: closed-loop clients honouring Retry-After (1-2 s), 15 s", ["server", "clients", "accepted/s", "p50 ms accepted",
                    "p99 ms accepted", "refused/s (503)", "p50 ms refused", "p90 ms refused", "p99 ms refused", "other 5xx"], rows)

    if "crash" in only:
        rows = []
        runs = [(f"{name}", checkout, {}) for name, checkout in servers]
        runs += [("now, journal off", None, {"MLPAY_JOURNAL": "false"}), ("now, journal fsync", None, {"MLPAY_JOURNAL_FSYNC": "true"})]
        for name, checkout, env in runs:
            r = out[f"crash {name}"] = crash(checkout, a.model, a.warm, 8303, **env)
            rows.append([name, f"{r['load']['rps_2xx']:,.0f}", ms(r["load"]), r["answered"], r["missing_from_state"]])
        print_table("kill -9 after 10 s of load at 16 clients, then a restart", ["server", "accepted/s", "p99 ms", "answered",
                    "answered, missing from the state"], rows)
    save("resilience", out)


if __name__ == "__main__":
    main()
