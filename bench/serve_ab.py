"""Interleaved A/B of bench/serve.py's servers: all started at once, then measured in turn, round after round, so that
a slow spell of the machine hits every variant alike; with each server's CPU per request (its process group, /proc).

A variant is a name of `variants()`, optionally with settings: `default+MLPAY_GC_YOUNG=700`. Ratios are to the first.
Throughput is the mean over the rounds, p99 the median round's and the worst's (a rare pause shows in one round).

    python bench/serve_ab.py [--seconds 5] [--rounds 3] bare default dlog default+MLPAY_OBSERVE_SLICE=64

`redis` is bench/serve.py's Redis row (a redis-server of its own, 2 HTTP processes); its CPU per request leaves out
the redis-server's.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median

import serve as S

ROOT = S.HERE.parent


def variants(model: Path, replay: Path, warm: Path, redis_url: str | None = None) -> dict:
    "name -> (command, port, server environment, wrk script, wrk environment)."
    body = Path(tempfile.mkdtemp()) / "body.json"
    body.write_text(json.dumps(S.feature_body(model)))
    shadow = Path(tempfile.mkdtemp()) / "shadow"
    shutil.copytree(model, shadow)  # a shadow of itself costs what a challenger of the same architecture would
    traffic = {"MLPAY_KEY": S.KEY, "MLPAY_REPLAY_FILE": str(replay)}

    def mlpay(port, package=model, **settings):
        env = {"MLPAY_API_KEY": S.KEY, "MLPAY_STATE_DIR": tempfile.mkdtemp(), "MLPAY_WARM_FROM": str(warm), **settings}
        return [str(S.BIN / "mlpay-serve"), "--model", str(package), "--port", str(port)], port, env, "replay.lua", traffic

    return {"bare": ([sys.executable, str(S.HERE / "bare_server.py"), str(model), "8101"], 8101, {}, "features.lua", {"MLPAY_BODY_FILE": str(body)}),
            "default": mlpay(8111),
            "dlog": mlpay(8112, MLPAY_DECISION_LOG_DIR=tempfile.mkdtemp()),
            "shadow": mlpay(8113, MLPAY_DECISION_LOG_DIR=tempfile.mkdtemp(), MLPAY_SHADOW_MODEL=str(shadow)),
            "nomon": mlpay(8114, S.unmonitored(model))} | (
            {"redis": mlpay(8115, MLPAY_REDIS_URL=redis_url, MLPAY_API_SERVERS="2")} if redis_url else {})  # bench/serve.py's Redis row


def with_settings(v: dict, name: str, port: int) -> tuple:
    "The variant `base+NAME=value+...`: `base` on its own port and state, with those settings added."
    base, *settings = name.split("+")
    cmd, old, env, script, wenv = v[base]
    cmd = [str(port) if c == str(old) else c for c in cmd]
    env = {**env, "MLPAY_STATE_DIR": tempfile.mkdtemp(), **dict(s.split("=", 1) for s in settings)}
    if "MLPAY_REDIS_URL" in env:  # a state of its own: a variant sharing another's would find its transactions late
        env["MLPAY_REDIS_URL"] = f"{env['MLPAY_REDIS_URL'].rsplit('/', 1)[0]}/{port - 8119}"
    return cmd, port, env, script, wenv


def cpu_s(pgid: int) -> float:
    "CPU seconds used so far by the processes of group `pgid`."
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try: f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        if int(f[2]) == pgid: total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=["bare", "default", "dlog"])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model")
    p.add_argument("--replay-days", type=int, default=30, help="days replayed: enough that no variant wraps round to retries (a fast one sends ~8k req/s)")
    a = p.parse_args()
    warm, replay, _ = S.replay_traffic(ROOT / "data" / "transactions.parquet", a.replay_days)
    redis = S.start_redis(8116) if any(n.split("+")[0] == "redis" for n in a.variants) else None
    v = variants(a.model, replay, warm, redis and redis[1])
    for port, name in enumerate((n for n in a.variants if n not in v), 8120): v[name] = with_settings(v, name, port)
    procs, res, start = {}, {n: [] for n in a.variants}, {}
    try:
        for n in a.variants: procs[n] = S.serve(*v[n][:3])
        for n in a.variants:  # warm-up; then each round replays from where the last one stopped
            start[n] = S.replay_start(S.wrk(v[n][1], v[n][3], 2, env={**v[n][4], "MLPAY_REPLAY_START": "0"}))
        for _ in range(a.rounds):
            for n in a.variants:
                c0 = cpu_s(procs[n].pid)
                r = S.wrk(v[n][1], v[n][3], a.seconds, env={**v[n][4], "MLPAY_REPLAY_START": str(start[n])})
                r["cpu_us"] = (cpu_s(procs[n].pid) - c0) / (r["requests_per_s"] * a.seconds) * 1e6
                start[n] += int(r["requests_per_s"] * a.seconds * 1.25) + 64
                res[n].append(r)
    finally:
        for proc in procs.values(): S.stop(proc)
        if redis: redis[0].terminate()
    mean = lambda n, k: sum(r[k] for r in res[n]) / a.rounds  # noqa: E731
    rows = [[n, f"{mean(n, 'requests_per_s'):,.0f}", f"{mean(n, 'requests_per_s') / mean(a.variants[0], 'requests_per_s'):.2f}x",
             f"{mean(n, 'p50_ms'):.2f}", f"{median(r['p99_ms'] for r in res[n]):.2f} / {max(r['p99_ms'] for r in res[n]):.2f}", f"{mean(n, 'cpu_us'):.0f}",
             int(sum(r["errors"] + r["non2xx"] for r in res[n]))] for n in a.variants]
    S.print_table(f"Interleaved, {a.rounds} rounds of {a.seconds} s, wrk 16 connections", ["variant", "req/s", f"x {a.variants[0]}", "p50 ms",
                  "p99 ms (median / worst round)", "server CPU µs/request", "errors"], rows)


if __name__ == "__main__":
    main()
