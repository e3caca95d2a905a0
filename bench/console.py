"""Analyst console: the queue page with 10,000 open cases, and a resolve reaching the scoring server's state.

1. queue: a SQLite case store holding `--cases` open cases (synthetic reviews with the real model's reason codes),
   mlpay-console served by uvicorn in a subprocess (real HTTP, a logged-in session); GET / (the first page of 50 and
   the count) `--requests` times after 5 warm-ups. "server ms" is the console's own time for the request (its
   Server-Timing header: routing, the session, the database queries, the template), "client ms" the round trip.
   Also: a filtered queue (min amount and decision), the htmx fragment a filter change fetches, a later page.
2. resolve: mlpay-serve with artifacts/model, its state warmed from data/transactions.parquet's 42 days before
   2018-09-01, scoring that day's transactions with its decision log on; mlpay-console takes the reviews in as cases;
   `--resolves` cases are resolved by POSTing the resolve form, one at a time; the time from the POST until the case's
   label was accepted by the scoring server (its feedback_at set: the server answered `accepted` for it, a known
   transaction of its state).

    python bench/console.py [--cases 10000] [--requests 50] [--resolves 20] [--skip-resolve]
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import polars as pl

from _common import print_table, save

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL, DATA = ROOT / "artifacts" / "model", ROOT / "data" / "transactions.parquet"
PASSWORD, SECRET, KEY = "bench console password", "bench-console-secret-" + "x" * 32, "bench-console-key-" + "k" * 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 600):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None: raise RuntimeError(f"{what} exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500: return
        except httpx.HTTPError: pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout_s} s")


def synthetic_reviews(n: int, reason_codes: list[str]) -> pl.DataFrame:
    "n review decisions in read_decisions' columns, a day's worth every 46, with 3 reasons each."
    rng = np.random.default_rng(0)
    t = np.datetime64("2018-09-01T00:00:00", "us") + np.sort(rng.integers(0, 86_400_000_000 * max(1, n // 46), n)).astype("timedelta64[us]")
    k = len(reason_codes)
    reasons = [[reason_codes[j] for j in rng.choice(k, 3, replace=False)] for _ in range(n)]
    shares = [sorted((rng.dirichlet(np.ones(3))).tolist(), reverse=True) for _ in range(n)]
    return pl.DataFrame({"transaction_id": np.arange(n, dtype=np.int64) + 10_000_000, "tx_datetime": t,
                         "customer_id": rng.integers(0, 5000, n), "terminal_id": rng.integers(0, 10_000, n),
                         "tx_amount": np.round(rng.gamma(2, 40, n), 2), "score": rng.normal(0, 1, n),
                         "probability": rng.uniform(0.065, 0.78, n), "decision": ["review"] * n, "reasons": reasons,
                         "reason_shares": shares, "standin": [None] * n, "model_version": ["sequencenet-gru-94d44b1b64a4"] * n})


class ConsoleProc:
    "mlpay-console in a subprocess, logged in as one analyst."
    def __init__(self, d: Path, **env):
        from mlpay.console import add_user
        add_user(d / "users.json", "bench", PASSWORD, n=2**14)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(d / "console.log", "w")
        env = {**os.environ, "MLPAY_CONSOLE_USERS_FILE": str(d / "users.json"), "MLPAY_CONSOLE_SESSION_SECRET": SECRET,
               **{f"MLPAY_CONSOLE_{k.upper()}": str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen([str(BIN / "mlpay-console"), "serve", "--port", str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/health", self.proc, "mlpay-console")
        self.http = httpx.Client(base_url=self.url, timeout=30)
        token = self.csrf(self.http.get("/login").text)
        r = self.http.post("/login", data={"csrf": token, "username": "bench", "password": PASSWORD, "next": "/"})
        assert r.status_code == 303, r.text[:300]

    @staticmethod
    def csrf(html: str) -> str: return re.search(r'name="csrf" value="([^"]+)"', html).group(1)

    def stop(self):
        self.http.close(); self.proc.terminate()
        try: self.proc.wait(15)
        except subprocess.TimeoutExpired: self.proc.kill()
        self.log.close()


def timings(http: httpx.Client, path: str, n: int, headers=None) -> dict:
    "Server and client milliseconds of n GETs of `path` (after 5 warm-ups)."
    for _ in range(5): assert http.get(path, headers=headers).status_code == 200
    server, client = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.get(path, headers=headers)
        client.append((time.perf_counter() - t0) * 1e3)
        assert r.status_code == 200, r.status_code
        server.append(float(r.headers["server-timing"].split("dur=")[1]))
    q = lambda v, p: float(np.percentile(v, p))
    return {"server_ms_median": statistics.median(server), "server_ms_p95": q(server, 95), "client_ms_median": statistics.median(client),
            "client_ms_p95": q(client, 95), "bytes": len(r.content)}


def bench_queue(d: Path, cases: int, requests: int) -> dict:
    from mlpay.cases import CaseStore, reason_text
    texts = reason_text(MODEL) if MODEL.exists() else {c: c for c in ("AMOUNT", "CARD_VELOCITY", "TERMINAL_FRAUD", "TIME_OF_DAY")}
    store = CaseStore(d / "cases")
    t0 = time.perf_counter()
    opened = store.open_cases(synthetic_reviews(cases, list(texts)), reason_text=texts)
    print(f"opened {opened:,} cases in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    assert store.count() == cases
    c = ConsoleProc(d, cases_dir=d / "cases")
    try:
        assert f"{cases:,}</strong> cases" in c.http.get("/").text
        out = {"queue": timings(c.http, "/", requests),
               "filtered": timings(c.http, "/?min_amount=100&decision=review", requests),
               "fragment": timings(c.http, "/?min_amount=100", requests, headers={"HX-Request": "true"}),
               "page 100": timings(c.http, "/?page=100", requests)}
    finally: c.stop()
    return out


def bench_resolve(d: Path, resolves: int) -> dict:
    from mlpay.cases import CaseStore
    day = datetime(2018, 9, 1)
    tx = pl.scan_parquet(DATA)
    tx.filter((pl.col("TX_DATETIME") >= day - timedelta(days=42)) & (pl.col("TX_DATETIME") < day)).collect().write_parquet(d / "history.parquet")
    today = tx.filter((pl.col("TX_DATETIME") >= day) & (pl.col("TX_DATETIME") < day + timedelta(days=1))).sort("TX_DATETIME", "TRANSACTION_ID").collect()
    port, log_dir = free_port(), d / "log"
    serve_log = open(d / "serve.log", "w")
    server = subprocess.Popen([str(BIN / "mlpay-serve"), "--model", str(MODEL), "--port", str(port)], stdout=serve_log, stderr=subprocess.STDOUT,
                              env={**os.environ, "MLPAY_API_KEY": KEY, "MLPAY_WARM_FROM": str(d / "history.parquet"),
                                   "MLPAY_DECISION_LOG_DIR": str(log_dir), "MLPAY_DECISION_LOG_FILE_AGE_S": "2", "MLPAY_DEADLINE_MS": "60000"})
    console = None
    try:
        t0 = time.perf_counter()
        wait_http(f"http://127.0.0.1:{port}/health", server, "mlpay-serve")
        print(f"mlpay-serve warmed and ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        body = [{"transaction_id": r["TRANSACTION_ID"], "tx_datetime": r["TX_DATETIME"].isoformat(), "customer_id": r["CUSTOMER_ID"],
                 "terminal_id": r["TERMINAL_ID"], "tx_amount": r["TX_AMOUNT"]} for r in today.iter_rows(named=True)]
        reviews = 0
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as h:
            for i in range(0, len(body), 1000):
                r = h.post(f"http://127.0.0.1:{port}/predict", json={"transactions": body[i:i + 1000]})
                r.raise_for_status()
                reviews += sum(a["decision"] == "review" for a in r.json()["results"])
        print(f"scored {len(body):,} transactions of {day:%Y-%m-%d}: {reviews} reviews", file=sys.stderr)
        console = ConsoleProc(d, cases_dir=d / "cases", decision_log_dir=log_dir, model=MODEL, scoring_url=f"http://127.0.0.1:{port}",
                              api_key=KEY, intake_interval_s=0.5)
        store = CaseStore(d / "cases")
        t0 = time.monotonic()
        while store.count() < min(reviews, resolves) and time.monotonic() - t0 < 60: time.sleep(0.2)
        cases = store.queue(limit=resolves)
        assert len(cases) == min(reviews, resolves), (len(cases), reviews)
        times = []
        for i, c in enumerate(cases):
            token = console.csrf(console.http.get(f"/cases/{c.id}").text)
            fraud = i % 2 == 0
            t0 = time.perf_counter()
            r = console.http.post(f"/cases/{c.id}/resolve", data={"csrf": token, "resolution": "fraud" if fraud else "legitimate", "note": "bench"})
            assert r.status_code == 303, r.text[:300]
            while (got := store.get(c.id)).feedback_at is None:
                if time.perf_counter() - t0 > 10: raise RuntimeError(f"case {c.id}: the label did not reach the scoring server in 10 s")
                time.sleep(0.002)
            times.append((time.perf_counter() - t0) * 1e3)
            sent = [e for e in store.events(case_id=c.id) if e["action"] == "label_sent"]
            assert sent and sent[0]["detail"]["unknown"] is False, sent  # accepted: a transaction the server's state knows
            assert got.status == ("fraud" if fraud else "legitimate")
        return {"day": f"{day:%Y-%m-%d}", "transactions": len(body), "reviews": reviews, "resolves": len(times),
                "ms_median": statistics.median(times), "ms_p95": float(np.percentile(times, 95)), "ms_max": max(times)}
    finally:
        if console: console.stop()
        server.terminate()
        try: server.wait(30)
        except subprocess.TimeoutExpired: server.kill()
        serve_log.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--resolves", type=int, default=20)
    p.add_argument("--skip-resolve", action="store_true", help="only the queue (no model package or data needed)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "queue").mkdir()
        q = bench_queue(Path(d) / "queue", a.cases, a.requests)
        print_table(f"Queue page, {a.cases:,} open cases in SQLite, {a.requests} requests (target: server <= 300 ms)",
                    ["request", "server ms median", "server ms p95", "client ms median", "client ms p95", "KiB"],
                    [[k, f"{v['server_ms_median']:.1f}", f"{v['server_ms_p95']:.1f}", f"{v['client_ms_median']:.1f}", f"{v['client_ms_p95']:.1f}",
                      f"{v['bytes'] / 1024:.0f}"] for k, v in q.items()])
        r = None
        if not a.skip_resolve:
            (Path(d) / "resolve").mkdir()
            r = bench_resolve(Path(d) / "resolve", a.resolves)
            print_table(f"Resolve to the scoring server's state ({r['resolves']} cases of {r['day']}: {r['reviews']} reviews of {r['transactions']:,} "
                        "transactions; target <= 1 s)", ["ms median", "ms p95", "ms max"],
                        [[f"{r['ms_median']:.1f}", f"{r['ms_p95']:.1f}", f"{r['ms_max']:.1f}"]])
    save("console", {"queue": q, "resolve": r, "cases": a.cases, "requests": a.requests})
    print(json.dumps({"queue_server_ms_median": q["queue"]["server_ms_median"], "resolve_ms_median": r and r["ms_median"]}))


if __name__ == "__main__":
    main()
