"""Serving benchmark: mlpay's full /predict path next to the bare FastAPI floor and LitServe's defaults.

Each server runs alone on this machine (loopback), loaded by wrk with 16 connections (with Redis state too where
redis-server is installed); then the batch path (256 transactions per request) and onnxruntime in-process.
Prints one table; bench/results/serve.json keeps it.

    python bench/serve.py [--model artifacts/model] [--duration 10] [--warm data/transactions.parquet]
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from _common import print_table, save, start_redis

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
KEY = "bench-" + "k" * 24


def wait_healthy(port, proc, seconds=120):
    "Poll /health until 200 (or the server dies)."
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc.poll() is not None: raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not healthy after {seconds} s")


RUNS = iter(range(1, 1000))


def wrk(port, script, duration, connections=16, env=None):
    "Run wrk; return its RESULT line as a dict. Each run sends transaction ids of its own (no retries of earlier runs)."
    # < 10^12: ids never look like card numbers; a second's deadline: this measures capacity (bench/resilience.py: shedding)
    env = {"MLPAY_DEADLINE_MS": "1000", **(env or {}), "MLPAY_ID_BASE": str(next(RUNS) * 10**9)}
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(HERE / script),
                          f"http://127.0.0.1:{port}/predict"], capture_output=True, text=True, env={**os.environ, **(env or {})})
    m = re.search(r"RESULT (.*)", out.stdout)
    if not m: raise RuntimeError(out.stdout + out.stderr)
    r = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    # with MLPAY_CHECK=1 predict.lua also counts the answers' versions and non-2xx statuses (bench/rollout.py)
    r["versions"] = {v: int(n) for v, n in re.findall(r"^VERSION (\S+) (\d+)$", out.stdout, re.M)}
    r["statuses"] = {c: int(n) for c, n in re.findall(r"^STATUS (\d+) (\d+)$", out.stdout, re.M)}
    return r


def serve(cmd, port, env=None):
    "Start a server process in its own process group."
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    try: wait_healthy(port, proc)
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


def run_all(runs, duration, env_feat, results, rows):
    "Each server alone: start it, warm it up for 2 s, measure, stop it."
    for name, cmd, port, script, env, wenv in runs:
        proc = serve(cmd, port, env)
        try:
            wrk(port, script, 2, env={**env_feat, **wenv})  # warm-up
            r = wrk(port, script, duration, env={**env_feat, **wenv})
        finally: stop(proc)
        results[name] = r
        rows.append([name, f"{r['requests_per_s']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", int(r["errors"] + r["non2xx"])])


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


def unmonitored(model_dir):
    "A copy of the package without its reference profile: the server then neither monitors nor keeps windows."
    import shutil
    out = Path(tempfile.mkdtemp()) / "unmonitored"
    shutil.copytree(model_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    m.pop("monitoring", None)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="artifacts/model", type=Path)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warm", default="data/transactions.parquet")
    p.add_argument("--baseline", type=Path, help="another mlpay checkout (e.g. `git worktree add /tmp/prev HEAD~1`) whose default server "
                   "runs beside this one, on --baseline-model: a change measured against its predecessor in one run")
    p.add_argument("--baseline-model", type=Path, help="the model package the baseline checkout exported (its own package format)")
    p.add_argument("--only-default", action="store_true", help="measure the default server (and the baseline) only")
    a = p.parse_args()
    rows, results = [], {}
    body = Path(tempfile.mkdtemp()) / "body.json"
    body.write_text(json.dumps(feature_body(a.model)))
    env_feat = {"MLPAY_BODY_FILE": str(body)}

    runs = [
        ("bare FastAPI + onnxruntime (client features)", [sys.executable, str(HERE / "bare_server.py"), str(a.model), "8101"], 8101, "features.lua", {}, {}),
        ("LitServe defaults (client features)", [sys.executable, str(HERE / "litserve_default.py"), str(a.model), "8102"], 8102, "features.lua", {}, {}),
    ]
    def mlpay_env():  # each server starts from the same warm state, not from another run's snapshot
        return {"MLPAY_API_KEY": KEY, "MLPAY_STATE_DIR": tempfile.mkdtemp(), "MLPAY_WARM_FROM": a.warm if Path(a.warm).exists() else ""}
    if a.only_default: runs = []
    if a.baseline:  # the same server command, importing mlpay from the other checkout
        cmd = [sys.executable, "-P", "-c", "from mlpay.serve import main; main()", "--model", str(a.baseline_model), "--port", "8107"]
        runs.append((f"baseline {a.baseline.name}: mlpay, full path, default", cmd, 8107, "predict.lua",
                     {**mlpay_env(), "PYTHONPATH": str(a.baseline.resolve())}, {"MLPAY_KEY": KEY}))
    bare = unmonitored(a.model)
    runs.append(("mlpay, full path, default, without monitoring or decision log", [str(BIN / "mlpay-serve"), "--model", str(bare), "--port", "8108"], 8108,
                 "predict.lua", mlpay_env(), {"MLPAY_KEY": KEY}))
    for name, extra in (("mlpay, full path, LitServe worker: 2 API servers, batch 64 / 1 ms", {"MLPAY_WORKERS": "1", "MLPAY_API_SERVERS": "2"}),
                        ("mlpay, full path, scoring in the HTTP process (default: monitoring on)", {}),
                        ("mlpay, full path, default, monitoring and decision log (MLPAY_DECISION_LOG_DIR)", {"MLPAY_DECISION_LOG_DIR": tempfile.mkdtemp()}),
                        ("mlpay, full path, default, reasons for every transaction (MLPAY_REASONS=all)", {"MLPAY_REASONS": "all"})):
        if a.only_default and "MLPAY_WORKERS" in extra: continue
        runs.append((name, [str(BIN / "mlpay-serve"), "--model", str(a.model), "--port", "8103"], 8103, "predict.lua", {**mlpay_env(), **extra}, {"MLPAY_KEY": KEY}))
    redis = start_redis(8106) if not a.only_default else None
    if redis:
        runs.append(("mlpay, full path, 2 HTTP processes scoring, state in Redis", [str(BIN / "mlpay-serve"), "--model", str(a.model), "--port", "8105"], 8105,
                     "predict.lua", {**mlpay_env(), "MLPAY_REDIS_URL": redis[1], "MLPAY_API_SERVERS": "2"}, {"MLPAY_KEY": KEY}))
    try: run_all(runs, a.duration, env_feat, results, rows)
    finally:
        if redis: redis[0].terminate()

    if a.only_default:
        print_table(f"Serving on {os.cpu_count()} cores, loopback, wrk 16 connections, {a.duration} s each", ["server", "req/s", "p50 ms", "p99 ms", "errors"], rows)
        return save("serve-default", results)
    proc = serve([str(BIN / "mlpay-serve"), "--model", str(a.model), "--port", "8104"], 8104, mlpay_env())
    try: r = wrk(8104, "predict.lua", a.duration, connections=4, env={"MLPAY_KEY": KEY, "MLPAY_BATCH": "256"})
    finally: stop(proc)
    results["batch 256"] = {**r, "transactions_per_s": r["requests_per_s"] * 256}
    rows.append(["mlpay, 256 transactions per request (4 clients)", f"{r['requests_per_s'] * 256:,.0f} tx/s", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", int(r["errors"] + r["non2xx"])])

    ort = ort_rows_per_s(a.model)
    results["onnxruntime"] = ort
    rows.append(["onnxruntime in-process, batch 1", f"{ort[1]:,.0f} rows/s", "", "", 0])
    rows.append(["onnxruntime in-process, batch 1,024", f"{ort[1024]:,.0f} rows/s", "", "", 0])
    print_table(f"Serving on {os.cpu_count()} cores, loopback, wrk 16 connections, {a.duration} s each", ["server", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    save("serve", results)


if __name__ == "__main__":
    main()
