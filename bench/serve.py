"""Serving benchmark: mlpay's full /predict path next to the bare FastAPI floor and its peers (LitServe's defaults,
KServe's ModelServer, BentoML), all on the same ONNX model.

Each server runs alone on this machine (loopback), loaded by wrk with 16 connections (with Redis state too where
redis-server is installed); then the batch path (256 transactions per request) and onnxruntime in-process. The peers
score client-supplied features only; mlpay does the full path with online features and reasons. "x bare" is each
row's req/s over the bare FastAPI endpoint's in the same run: measured first and again last (a full run takes minutes,
and a 2-core virtual machine has slow spells), the mean of the two. mlpay is sent real authorizations by default: the last
days of the data replayed in time order (bench/replay.lua) to a state warmed with the days before, so the cards'
velocity and the share of flagged transactions (whose reasons cost a second model call) are the data's; `--traffic
random` sends predict.lua's random cards and amounts instead, where every card is a velocity attack. KServe and BentoML run in venvs of their own
(`make bench-peers`: their pins conflict with mlpay's); without one their rows say so. A server that does not start
(or a setting this mlpay lacks) is a "failed: ..." row, not the end of the run. Prints one table; bench/results/serve.json
keeps it.

    python bench/serve.py [--model artifacts/model] [--duration 10] [--warm data/transactions.parquet] [--only NAME_SUBSTRING]
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import orjson

from _common import print_table, save, start_redis

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
PEERS = HERE.parent / ".venv" / "peers"  # `make bench-peers`: a venv per peer, from bench/peers/NAME.txt
KEY = "bench-" + "k" * 24
BARE = "bare FastAPI + onnxruntime (client features)"
BARE_LAST = "bare FastAPI + onnxruntime (client features), again, last"  # the yardstick at both ends: a drift between them shows
IN_PROCESS = "mlpay, full path, scoring in the HTTP process (default: monitoring on)"
REDIS = "mlpay, full path, 2 HTTP processes scoring, state in Redis"


def wait_healthy(port, proc, seconds=120, path="/health"):
    "Poll `path` until 200 (or the server dies)."
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc.poll() is not None: raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not healthy after {seconds} s")


RUNS = iter(range(1, 1000))


def wrk(port, script, duration, connections=16, env=None, path="/predict"):
    "Run wrk; return its RESULT line as a dict. Each run sends transaction ids of its own (no retries of earlier runs)."
    # < 10^12: ids never look like card numbers; a second's deadline: this measures capacity (bench/resilience.py: shedding)
    env = {"MLPAY_DEADLINE_MS": "1000", **(env or {}), "MLPAY_ID_BASE": str(next(RUNS) * 10**9)}
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(HERE / script),
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, env={**os.environ, **(env or {})})
    m = re.search(r"RESULT (.*)", out.stdout)
    if not m: raise RuntimeError(out.stdout + out.stderr)
    r = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    # with MLPAY_CHECK=1 predict.lua also counts the answers' versions and non-2xx statuses (bench/rollout.py)
    r["versions"] = {v: int(n) for v, n in re.findall(r"^VERSION (\S+) (\d+)$", out.stdout, re.M)}
    r["statuses"] = {c: int(n) for c, n in re.findall(r"^STATUS (\d+) (\d+)$", out.stdout, re.M)}
    return r


def serve(cmd, port, env=None, health="/health"):
    "Start a server process in its own process group."
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    try: wait_healthy(port, proc, path=health)
    except RuntimeError:
        stop(proc); log.seek(0); print(log.read()[-3000:]); raise
    return proc


def stop(proc):
    "SIGTERM to the server's process group, then SIGKILL whatever is left of it (workers, API servers)."
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try: os.killpg(proc.pid, sig)
        except ProcessLookupError: return
        try: proc.wait(wait)
        except subprocess.TimeoutExpired: pass
        time.sleep(1)  # let the group's other members exit before the next signal


@dataclass
class Run:
    "One server to measure: its command and environment, wrk's script, environment and URL path, its liveness path."
    name: str
    cmd: list | None  # None: not runnable here, `missing` says why
    port: int
    script: str = "predict.lua"
    env: dict = field(default_factory=dict)
    wenv: dict = field(default_factory=dict)
    path: str = "/predict"
    health: str = "/health"
    missing: str | None = None


def run_all(runs, duration, env_feat, results, rows):
    "Each server alone: start it, warm it up for 2 s, measure, stop it. One that cannot run or start is a row saying why."
    for run in runs:
        if run.cmd is None:
            results[run.name] = {"skipped": run.missing}
            rows.append([run.name, run.missing, "", "", "", ""])
            continue
        wenv = {**env_feat, **run.wenv}
        try:
            proc = serve(run.cmd, run.port, run.env, health=run.health)
            try:
                warm = wrk(run.port, run.script, 2, env={**wenv, "MLPAY_REPLAY_START": "0"}, path=run.path)
                r = wrk(run.port, run.script, duration, env={**wenv, "MLPAY_REPLAY_START": str(replay_start(warm))}, path=run.path)
            finally: stop(proc)
        except (RuntimeError, OSError) as e:
            why = f"failed: {(str(e).strip().splitlines() or [type(e).__name__])[-1][:100]}"
            results[run.name] = {"failed": str(e)[-2000:]}
            rows.append([run.name, why, "", "", "", ""])
            continue
        results[run.name] = r
        rows.append([run.name, f"{r['requests_per_s']:,.0f}", r["requests_per_s"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", int(r["errors"] + r["non2xx"])])


def with_ratios(rows, results):
    "Fill the 'x bare' column: each server's req/s over the bare endpoint's in this run, the mean of its first and last rows (blank where missing)."
    ends = [results[n]["requests_per_s"] for n in (BARE, BARE_LAST) if "requests_per_s" in results.get(n, {})]
    bare = sum(ends) / len(ends) if ends else None
    for row in rows:
        rps = row[2]
        if isinstance(rps, float):
            row[2] = f"{rps / bare:.2f}x" if bare else ""
            if bare: results[row[0]]["x_bare"] = rps / bare
    return rows


def feature_body(model_dir):
    "A JSON row of model inputs for the client-supplied-features servers."
    from mlpay.package import onnx_session
    s = onnx_session(model_dir / "model.onnx")
    return {i.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape][1:]).round(4).tolist() for i in s.get_inputs()}


def ort_rows_per_s(model_dir):
    "onnxruntime in-process: calls/s at batch 1 and rows/s at batch 1,024 (1 thread)."
    from mlpay.package import onnx_session
    s = onnx_session(model_dir / "model.onnx", threads=1)
    out = {}
    for batch in (1, 1024):
        inputs = {i.name: np.random.default_rng(0).random([batch] + [d if isinstance(d, int) else 1 for d in i.shape][1:]).astype(np.float32) for i in s.get_inputs()}
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2: s.run(None, inputs); n += 1
        out[batch] = n * batch / (time.perf_counter() - t0)
    return out


def replay_start(warm: dict) -> int:
    "The replay line the measured run starts from: just past what the 2 s warm-up sent (its answers, those in flight, wrk's overrun)."
    # not far past: a jump in transaction time would make the state's first sweep expire hours of data at once
    return int(warm["requests_per_s"] * 2.5) + 64


def replay_traffic(source: Path, days: int):
    "The transactions of `source` but its last `days` days (the state to warm from, Parquet) and those days as /predict bodies, one per line, in time order."
    import polars as pl
    tx = pl.read_parquet(source).sort("TX_DATETIME", "TRANSACTION_ID")
    cut = tx["TX_DATETIME"].max().date() - timedelta(days=days - 1)
    day = pl.col("TX_DATETIME").dt.date()
    out = Path(tempfile.mkdtemp())
    tx.filter(day < cut).write_parquet(out / "warm.parquet")
    later = tx.filter(day >= cut).select(transaction_id="TRANSACTION_ID", tx_datetime=pl.col("TX_DATETIME").dt.strftime("%Y-%m-%dT%H:%M:%S"),
                                        customer_id="CUSTOMER_ID", terminal_id="TERMINAL_ID", tx_amount="TX_AMOUNT")
    (out / "replay.jsonl").write_bytes(b"\n".join(map(orjson.dumps, later.to_dicts())) + b"\n")
    return out / "warm.parquet", out / "replay.jsonl", later.height


def unmonitored(model_dir):
    "A copy of the package without its reference profile: the server then neither monitors nor keeps windows."
    out = Path(tempfile.mkdtemp()) / "unmonitored"
    shutil.copytree(model_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    m.pop("monitoring", None)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def peer(name):
    "A peer's pinned version (bench/peers/NAME.txt) and its venv's bin/, None until `make bench-peers` has made it."
    version = re.search(rf"^{name}==(\S+)", (HERE / "peers" / f"{name}.txt").read_text(), re.M).group(1)
    env = PEERS / name
    return version, (env / "bin" if (env / ".installed").exists() else None)


def peer_runs(model_dir):
    "KServe's ModelServer (per-request logging on, its default, and off) and BentoML, each in its own venv."
    missing, model_dir = "not installed: make bench-peers", model_dir.resolve()  # `bentoml serve --working-dir` changes directory
    (kv, kbin), (bv, bbin) = peer("kserve"), peer("bentoml")
    kserve = [str(kbin / "python"), str(HERE / "kserve_server.py"), str(model_dir), "8109"] if kbin else None
    kserve_run = dict(port=8109, script="features.lua", path="/v1/models/model:predict", health="/v1/models/model", missing=missing)
    bento_env = {"MLPAY_BENCH_MODEL": str(model_dir), "BENTOML_HOME": tempfile.mkdtemp(), "BENTOML_DO_NOT_TRACK": "True"}  # no usage reports
    return [
        Run(f"KServe {kv} ModelServer (client features), its per-request logging on (default)", kserve, **kserve_run),
        Run(f"KServe {kv} ModelServer (client features), per-request logging off (kserve_server.py --quiet)",
            kserve and kserve + ["--quiet"], **kserve_run),
        Run(f"BentoML {bv} (client features)", [str(bbin / "bentoml"), "serve", "bentoml_service:Scorer", "--working-dir", str(HERE),
            "--host", "127.0.0.1", "--port", "8110"] if bbin else None, 8110, "features.lua", bento_env, health="/readyz", missing=missing),
    ]


def has_setting(name):
    "Whether this mlpay's server reads MLPAY_<NAME> (pydantic-settings ignores the variables it does not know)."
    from mlpay.serve import ServeSettings
    return name in ServeSettings.model_fields


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="artifacts/model", type=Path)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warm", default="data/transactions.parquet")
    p.add_argument("--baseline", type=Path, help="another mlpay checkout (e.g. `git worktree add /tmp/prev HEAD~1`) whose default server "
                   "runs beside this one, on --baseline-model: a change measured against its predecessor in one run")
    p.add_argument("--baseline-model", type=Path, help="the model package the baseline checkout exported (its own package format)")
    p.add_argument("--only-default", action="store_true", help="measure the default server (and the baseline) only, beside the bare endpoint")
    p.add_argument("--traffic", choices=("replay", "random"), default="replay",
                   help="what mlpay is sent: the last --replay-days of --warm replayed (its state warmed with the days before: the data's velocity "
                        "and flagged share), or random cards, terminals and amounts (predict.lua: every card a velocity attack, ~30%% flagged)")
    p.add_argument("--replay-days", type=int, default=12)
    p.add_argument("--only", metavar="NAME_SUBSTRING", help="measure only the rows whose name contains this (case-insensitive), and the bare endpoint")
    a = p.parse_args()
    rows, results = [], {}
    body = Path(tempfile.mkdtemp()) / "body.json"
    body.write_text(json.dumps(feature_body(a.model)))
    env_feat = {"MLPAY_BODY_FILE": str(body)}
    chosen = lambda name: a.only is None or a.only.lower() in name.lower() or name == BARE  # noqa: E731

    warm, script, traffic = (a.warm if Path(a.warm).exists() else ""), "predict.lua", {}
    if a.traffic == "replay":
        if not warm: raise SystemExit(f"--traffic replay needs the transactions to replay: {a.warm} is missing (make data), or use --traffic random")
        warm, replay, n = replay_traffic(Path(a.warm), a.replay_days)
        script, traffic = "replay.lua", {"MLPAY_REPLAY_FILE": str(replay)}
        print(f"replaying the last {a.replay_days} days of {a.warm} ({n:,} transactions) to a state warmed with the days before")

    def mlpay_env():  # each server starts from the same warm state, not from another run's snapshot
        return {"MLPAY_API_KEY": KEY, "MLPAY_STATE_DIR": tempfile.mkdtemp(), "MLPAY_WARM_FROM": str(warm)}

    def mlpay(name, model, port, extra=None, needs=None):
        if needs and not has_setting(needs):
            return Run(name, None, port, missing=f"failed: this mlpay has no MLPAY_{needs.upper()} setting (yet)")
        return Run(name, [str(BIN / "mlpay-serve"), "--model", str(model), "--port", str(port)], port, script, env={**mlpay_env(), **(extra or {})},
                   wenv={"MLPAY_KEY": KEY, **traffic})

    runs = [Run(BARE, [sys.executable, str(HERE / "bare_server.py"), str(a.model), "8101"], 8101, "features.lua")]  # every run's yardstick
    if not a.only_default:
        runs.append(Run("LitServe defaults (client features)", [sys.executable, str(HERE / "litserve_default.py"), str(a.model), "8102"],
                        8102, "features.lua"))
        runs += peer_runs(a.model)
    if a.baseline:  # the same server command, importing mlpay from the other checkout
        cmd = [sys.executable, "-P", "-c", "from mlpay.serve import main; main()", "--model", str(a.baseline_model), "--port", "8107"]
        runs.append(Run(f"baseline {a.baseline.name}: mlpay, full path, default", cmd, 8107, script,
                        env={**mlpay_env(), "PYTHONPATH": str(a.baseline.resolve())}, wenv={"MLPAY_KEY": KEY, **traffic}))
    if not a.only_default: runs.append(mlpay("mlpay, full path, default, without monitoring or decision log", unmonitored(a.model), 8108))
    shadow = Path(tempfile.mkdtemp()) / "shadow"
    shutil.copytree(a.model, shadow)  # a shadow of itself costs what a challenger of the same architecture would
    full = {"MLPAY_DECISION_LOG_DIR": tempfile.mkdtemp()}  # monitoring is on by default, reasons for the flagged ones
    for name, extra, needs in (
            ("mlpay, full path, LitServe worker: 2 API servers, batch 64 / 1 ms", {"MLPAY_WORKERS": "1", "MLPAY_API_SERVERS": "2"}, None),
            (IN_PROCESS, {}, None),
            ("mlpay, full path, every operating feature on (monitoring, decision log, reasons)", full, None),
            ("mlpay, full path, every operating feature on, and a shadow model (MLPAY_SHADOW_MODEL)",
             {**full, "MLPAY_DECISION_LOG_DIR": tempfile.mkdtemp(), "MLPAY_SHADOW_MODEL": str(shadow)}, "shadow_model"),
            ("mlpay, full path, every operating feature on, served by granian (MLPAY_HTTP=granian)",
             {**full, "MLPAY_DECISION_LOG_DIR": tempfile.mkdtemp(), "MLPAY_HTTP": "granian"}, "http"),
            ("mlpay, full path, default, reasons for every transaction (MLPAY_REASONS=all)", {"MLPAY_REASONS": "all"}, None)):
        if a.only_default and name != IN_PROCESS: continue
        runs.append(mlpay(name, a.model, 8103, extra, needs))
    redis = start_redis(8106) if not a.only_default and chosen(REDIS) else None
    if redis:
        runs.append(mlpay(REDIS, a.model, 8105, {"MLPAY_REDIS_URL": redis[1], "MLPAY_API_SERVERS": "2"}))
    if len([r for r in runs if chosen(r.name)]) > 2: runs.append(replace(runs[0], name=BARE_LAST))  # a long run: the floor again at its end
    try: run_all([r for r in runs if chosen(r.name)], a.duration, env_feat, results, rows)
    finally:
        if redis: redis[0].terminate()

    header = ["server", "req/s", "x bare", "p50 ms", "p99 ms", "errors"]
    title = f"Serving on {os.cpu_count()} cores, loopback, wrk 16 connections, {a.duration} s each"
    if a.only_default:
        print_table(title, header, with_ratios(rows, results))
        return save("serve-default", results)
    batch = "mlpay, 256 transactions per request (4 clients)"
    if chosen(batch):
        proc = serve([str(BIN / "mlpay-serve"), "--model", str(a.model), "--port", "8104"], 8104, mlpay_env())
        try: r = wrk(8104, "predict.lua", a.duration, connections=4, env={"MLPAY_KEY": KEY, "MLPAY_BATCH": "256"})
        finally: stop(proc)
        results["batch 256"] = {**r, "transactions_per_s": r["requests_per_s"] * 256}
        rows.append([batch, f"{r['requests_per_s'] * 256:,.0f} tx/s", "", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", int(r["errors"] + r["non2xx"])])
    if chosen("onnxruntime in-process"):
        ort = ort_rows_per_s(a.model)
        results["onnxruntime"] = ort
        rows.append(["onnxruntime in-process, batch 1", f"{ort[1]:,.0f} rows/s", "", "", "", 0])
        rows.append(["onnxruntime in-process, batch 1,024", f"{ort[1024]:,.0f} rows/s", "", "", "", 0])
    print_table(title, header, with_ratios(rows, results))
    first, last = (results.get(n, {}).get("requests_per_s") for n in (BARE, BARE_LAST))
    if first and last: print(f"\nThe bare endpoint: {first:,.0f} req/s first, {last:,.0f} last ({last / first - 1:+.0%}); 'x bare' is over their mean.")
    in_process, redis_rps = (results.get(n, {}).get("requests_per_s") for n in (IN_PROCESS, REDIS))
    if in_process and redis_rps:
        results["redis_x_in_process"] = redis_rps / in_process
        print(f"\nRedis state, 2 HTTP processes: {redis_rps / in_process:.2f}x the in-process default row's req/s (target: >= 0.85x).")
    save("serve" if a.only is None else "serve-only", results)  # a partial run leaves the full one's numbers alone


if __name__ == "__main__":
    main()
