"""Rollout benchmark: what a shadow model costs on the default serving path, and a hot swap of the champion under load.

1. Shadow cost: bench/serve.py's default configuration (mlpay-serve scoring in the HTTP process, a fresh warmed state,
   wrk with 16 connections), without a shadow and with MLPAY_SHADOW_MODEL=B, alternating, `--rounds` runs each; the
   medians and the throughput the shadow costs. Every request is a new transaction (bench/predict.lua,
   answers unread), from 16 connections (the issue's load: the server saturated, so latency is mostly queueing) and
   from one (what the shadow adds to one request's latency when nothing queues).
2. Hot swap: the same server with MLPAY_ADMIN_KEY, wrk 16 connections for `--swap-seconds` with every answer checked
   (bench/predict.lua with MLPAY_CHECK=1: statuses, the model_version of each answer) while a thread PUTs /admin/lineup once a
   second, the champion alternating between A and B; next to the same load without swaps.

A is --model; B is --b, else artifacts/challenger/model where a retraining wrote it, else a copy of A under another
path (the same version: the swap is exercised, the versions seen cannot tell the models apart). Prints the tables;
bench/results/rollout.json keeps them.

    python bench/rollout.py [--model artifacts/model] [--b DIR] [--duration 10] [--swap-seconds 20] [--rounds 2] [--loads fresh,single]
"""
import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from _common import print_table, save
from serve import BIN, KEY, serve, stop, wrk

ADMIN = "bench-admin-" + "a" * 20  # >= 16 characters, not the API key
PORT = 8111
CHALLENGER = Path("artifacts/challenger/model")


def wait_package(model: Path, seconds: float) -> dict:
    "The package's manifest once it is complete (it has the parity probe), waiting up to `seconds` for an export writing it."
    t0 = time.time()
    while True:
        try:
            m = json.loads((model / "manifest.json").read_text())
            if "probe" in m: return m
        except (OSError, ValueError): pass
        if time.time() - t0 >= seconds: raise SystemExit(f"{model}: no complete package (manifest.json with a parity probe) after {seconds:g} s")
        time.sleep(5)


def second_package(a: Path, b: Path | None, tmp: Path) -> tuple[Path, str]:
    "Package B and where it comes from."
    if b is not None: return b, "--b"
    if (CHALLENGER / "manifest.json").exists(): return CHALLENGER, "artifacts/challenger/model (retrained)"
    out = tmp / "b"
    shutil.copytree(a, out)
    return out, "a copy of A (same version)"


def request(port, method, path, body=None, key=KEY):
    "(status, parsed JSON or text) of one request."
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request(method, path, body=None if body is None else json.dumps(body),
              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    raw = r.read().decode()
    c.close()
    try: return r.status, json.loads(raw)
    except ValueError: return r.status, raw


def server(model: Path, tmp: Path, warm: str, **extra) -> subprocess.Popen:
    "bench/serve.py's default server (one HTTP process scoring, a fresh state warmed from `warm`), plus `extra` environment."
    env = {"MLPAY_API_KEY": KEY, "MLPAY_STATE_DIR": tempfile.mkdtemp(dir=tmp), "MLPAY_WARM_FROM": warm if Path(warm).exists() else "", **extra}
    return serve([str(BIN / "mlpay-serve"), "--model", str(model.resolve()), "--port", str(PORT)], PORT, env)


def lineup_of(port) -> dict:
    "The lineup /health says is served."
    return request(port, "GET", "/health")[1]["lineup"]


def wrk_versions(port, duration, connections=16, check=True) -> dict:
    "bench/serve.py's wrk with predict.lua: its RESULT line, and the versions and non-2xx statuses it counted (`check`: read every answer)."
    return wrk(port, "predict.lua", duration, connections, env={"MLPAY_KEY": KEY, "MLPAY_CHECK": "1" if check else "0"})


# the loads of the shadow-cost runs: new transactions (answers unread) from 16 connections or from one
LOADS = {"fresh": lambda port, d: wrk_versions(port, d, check=False), "single": lambda port, d: wrk_versions(port, d, connections=1, check=False)}


def shadow_cost(a, b, tmp, warm, duration, rounds, load_name) -> dict:
    "The default server without and with the shadow, alternating (the order flips each round); every run and the medians."
    runs, load_fn = {"none": [], "shadow": []}, LOADS[load_name]
    for r in range(rounds):
        for kind in (("none", "shadow") if r % 2 == 0 else ("shadow", "none")):
            proc = server(a, tmp, warm, **({"MLPAY_SHADOW_MODEL": str(b.resolve())} if kind == "shadow" else {}))
            try:
                lineup = lineup_of(PORT)
                if (lineup["shadow"] is not None) != (kind == "shadow"): raise RuntimeError(f"{kind} run serves lineup {lineup}")
                load_fn(PORT, 2)  # warm-up, as bench/serve.py does
                load = os.getloadavg()[0]
                res = load_fn(PORT, duration)
            finally: stop(proc)
            runs[kind].append({**res, "round": r, "loadavg_1m_before": load, "lineup": lineup})
            print(f"  shadow cost ({load_name} load), round {r + 1}, {kind}: {res['requests_per_s']:,.0f} req/s, p50 {res['p50_ms']:.2f} ms, "
                  f"p99 {res['p99_ms']:.2f} ms, errors {int(res['errors'] + res['non2xx'])} (load {load:.2f})", flush=True)
    med = {k: {q: statistics.median(x[q] for x in v) for q in ("requests_per_s", "p50_ms", "p99_ms")} for k, v in runs.items()}
    cost = 100 * (1 - med["shadow"]["requests_per_s"] / med["none"]["requests_per_s"])
    return {"runs": runs, "median": med, "throughput_cost_pct": cost}


def swapper(port, packages, n, t0, log, done: threading.Event):
    "PUT the champion at t0 + 0.5 s, + 1.5 s, ...: packages[1], packages[0], packages[1], ... (n swaps, fewer when the load ends first)."
    for i in range(n):
        target = packages[(i + 1) % 2]
        if done.wait(max(0.0, t0 + 0.5 + i - time.perf_counter())): break
        t = time.perf_counter()
        try: status, body = request(port, "PUT", "/admin/lineup", {"champion": str(target.resolve())}, key=ADMIN)
        except OSError as e: status, body = None, repr(e)
        log.append({"at_s": t - t0, "took_s": time.perf_counter() - t, "status": status, "to": str(target),
                    "champion": body["champion"]["version"] if status == 200 else None, **({} if status == 200 else {"answer": body})})


def swaps_metric(port) -> dict:
    "mlpay_swaps by outcome, as /metrics counts them."
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return {o: float(n) for o, n in re.findall(r'^mlpay_swaps_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def hot_swap(a, b, tmp, warm, seconds, swaps: bool) -> dict:
    "A fresh server with the admin endpoint under wrk for `seconds`, the champion swapped once a second when `swaps`."
    proc = server(a, tmp, warm, MLPAY_ADMIN_KEY=ADMIN)
    log, done = [], threading.Event()
    try:
        wrk_versions(PORT, 2)  # warm-up
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        th = threading.Thread(target=swapper, args=(PORT, (a, b), seconds if swaps else 0, t0, log, done))
        th.start()
        try: res = wrk_versions(PORT, seconds)
        finally: done.set(); th.join()
        final = request(PORT, "GET", "/admin/lineup", key=ADMIN)[1]
        counted = swaps_metric(PORT)
    finally: stop(proc)
    took = sorted(s["took_s"] for s in log)
    return {**res, "loadavg_1m_before": load, "swaps": log, "final_lineup": final, "swaps_metric": counted,
            "applied": sum(s["status"] == 200 for s in log), "refused": sum(s["status"] == 409 for s in log),
            "other": sum(s["status"] not in (200, 409) for s in log),
            "put_s": {"median": statistics.median(took), "max": took[-1]} if took else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/model", type=Path, help="package A: the champion")
    p.add_argument("--b", type=Path, help="package B: the shadow, and the champion swapped in (default: artifacts/challenger/model, else a copy of A)")
    p.add_argument("--duration", type=int, default=10, help="seconds of each shadow-cost run")
    p.add_argument("--rounds", type=int, default=2, help="runs of each shadow-cost configuration")
    p.add_argument("--swap-seconds", type=int, default=20, help="seconds of each hot-swap run (one swap a second)")
    p.add_argument("--warm", default="data/transactions.parquet")
    p.add_argument("--loads", default="fresh,single", help="the shadow-cost loads, comma-separated: fresh (new transactions, 16 connections), "
                   "single (the same from 1 connection)")
    p.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for package A to be complete (an export running)")
    a = p.parse_args()
    ma = wait_package(a.model, a.wait)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    try:
        b, b_from = second_package(a.model, a.b, tmp)
        mb = wait_package(b, 0)
        va, vb = ma["version"], mb["version"]
        print(f"A {a.model}: version {va}\nB {b} ({b_from}): version {vb}" + ("  (equal: the versions seen cannot tell A from B)" if va == vb else ""))
        print(f"load average before: {os.getloadavg()}", flush=True)
        loads = [x for x in a.loads.split(",") if x]
        if unknown := [x for x in loads if x not in LOADS]: raise SystemExit(f"--loads: unknown {unknown} (known: {list(LOADS)})")
        costs = {x: shadow_cost(a.model, b, tmp, a.warm, a.duration, a.rounds, x) for x in loads}
        base = hot_swap(a.model, b, tmp, a.warm, a.swap_seconds, swaps=False)
        print(f"  hot swap, no swaps: {base['requests_per_s']:,.0f} req/s, p99 {base['p99_ms']:.2f} ms", flush=True)
        swap = hot_swap(a.model, b, tmp, a.warm, a.swap_seconds, swaps=True)
        print(f"  hot swap, swaps: {swap['requests_per_s']:,.0f} req/s, p99 {swap['p99_ms']:.2f} ms, {swap['applied']} applied", flush=True)
    finally: shutil.rmtree(tmp, ignore_errors=True)

    name = {va: "A", vb: "B"} if va != vb else {va: "A=B"}
    def seen(r):
        return ", ".join(f"{name.get(v, v[:12])} {n:,}" for v, n in sorted(r["versions"].items())) or "none"
    label = {"fresh": "16 connections", "single": "1 connection"}
    rows = [[f"{label[x]}: {k_label}", f"{c['median'][k]['requests_per_s']:,.0f}", f"{c['median'][k]['p50_ms']:.2f}", f"{c['median'][k]['p99_ms']:.2f}",
             " / ".join(f"{r['requests_per_s']:,.0f}" for r in c["runs"][k]), sum(int(r["errors"] + r["non2xx"]) for r in c["runs"][k]),
             " / ".join(f"{r['loadavg_1m_before']:.1f}" for r in c["runs"][k]), "" if k == "none" else f"{c['throughput_cost_pct']:.1f} %"]
            for x, c in costs.items() for k, k_label in (("none", "no shadow"), ("shadow", "MLPAY_SHADOW_MODEL=B"))]
    print_table(f"Shadow cost: bench/serve.py's default server, wrk, new transactions, {a.duration} s, median of {a.rounds} alternating runs, {os.cpu_count()} cores",
                ["load: configuration", "req/s", "p50 ms", "p99 ms", "req/s of each run", "errors", "load avg (1 min) before", "throughput cost"], rows)
    rows = [[run, f"{int(r['requests']):,}", f"{r['requests_per_s']:,.0f}", int(r["non2xx"] + r["errors"]), int(r["unversioned"]),
             f"{r['applied']} / {r['refused']}" + (f" (+{r['other']} failed)" if r["other"] else ""), seen(r), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
             f"{r['loadavg_1m_before']:.1f}"]
            for run, r in (("no swaps", base), (f"champion swapped A <-> B once a second ({a.swap_seconds} asked)", swap))]
    print_table(f"Hot swap under load: wrk 16 connections, {a.swap_seconds} s, every answer checked",
                ["run", "requests", "req/s", "non-2xx + errors", "2xx without version", "swaps applied / refused", "versions seen", "p50 ms", "p99 ms",
                 "load avg before"], rows)
    ratio = swap["p99_ms"] / base["p99_ms"]
    targets = [t for x, c in costs.items() for t in (
                   [f"shadow ({label[x]}): throughput cost <= 35 %", f"{c['throughput_cost_pct']:.1f} %", c["throughput_cost_pct"] <= 35],
                   [f"shadow ({label[x]}): p99 <= 6 ms", f"{c['median']['shadow']['p99_ms']:.2f} ms", c["median"]["shadow"]["p99_ms"] <= 6])]
    targets += [["hot swap: 0 non-2xx", int(swap["non2xx"] + swap["errors"]), swap["non2xx"] + swap["errors"] == 0],
                ["hot swap: every answer carries a version", f"{int(swap['unversioned'])} without", swap["unversioned"] == 0],
                ["hot swap: p99 within 2x the no-swap run", f"{ratio:.2f}x", ratio <= 2]]
    print_table("Targets", ["target", "measured", "met"], [[t, m, "yes" if ok else "NO"] for t, m, ok in targets])
    if swap["put_s"]: print(f"\nPUT /admin/lineup took {swap['put_s']['median'] * 1e3:.0f} ms (median), {swap['put_s']['max'] * 1e3:.0f} ms (max); "
                            f"/metrics mlpay_swaps {swap['swaps_metric']}; B: {b_from}")
    save("rollout", {"a": {"path": str(a.model), "version": va}, "b": {"path": str(b), "version": vb, "from": b_from},
                     "duration": a.duration, "rounds": a.rounds, "swap_seconds": a.swap_seconds,
                     "shadow_cost": costs, "hot_swap": {"no_swaps": base, "swaps": swap, "p99_ratio": ratio},
                     "targets": {t: {"measured": m, "met": bool(ok)} for t, m, ok in targets}})


if __name__ == "__main__":
    main()
