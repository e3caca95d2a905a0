"""Decision log: the hot path, the writer, and reading and joining a day and 30 days of logged decisions.

Synthetic decisions of the default data's size: ~10k a day, each with the server's columns and 23 features, logged
one request (one row) at a time as the server does, and as many labels. Two layouts of the files:
- busy: one process writing a row group per 1,000 requests (a busy server's 1-second flush), 64 MiB files;
- quiet: the default 5-minute rotation at ~7 requests a minute, a file per 5 minutes (288 a day), each compacted to
  one row group when finished. The first day is written a flush per request (a 1-row row group each, as 1-second
  flushes give at that rate); the remaining days a flush per file, which leaves the same files (compacted).
"writer µs/row" is the writer thread's time (conversion, Parquet, disk, rotation, compaction) per decision row,
label rows included in the time.

    python bench/decisions.py [--days 30]
"""
import argparse
import shutil
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from _common import print_table, save
from mlpay.decisions import DecisionLog, join_labels, read_decisions, read_labels

PER_DAY, FEATURES, T0 = 10_000, [f"f.F{i}" for i in range(23)], datetime(2018, 8, 1)


def day_columns(day: int, rng) -> dict:
    "A day of decision columns (numpy arrays and lists), sorted by time."
    n = PER_DAY
    ids = day * PER_DAY + np.arange(n, dtype=np.int64)
    t = np.datetime64(T0 + timedelta(days=day), "us") + np.sort(rng.integers(0, 86_400_000_000, n)).astype("timedelta64[us]")
    score = rng.random(n).astype(np.float32)
    decision = np.where(score > 0.99, "decline", np.where(score > 0.98, "review", "approve"))
    return {"transaction_id": ids, "tx_datetime": t, "customer_id": rng.integers(0, 5000, n), "terminal_id": rng.integers(0, 10_000, n),
            "tx_amount": rng.gamma(2, 30, n), **{f: rng.random(n) for f in FEATURES}, "score": score,
            "probability": score.astype(np.float64), "decision": decision,
            "reasons": [["TX_AMOUNT", "TERMINAL_ID_RISK_7DAY_WINDOW"] if d != "approve" else [] for d in decision],
            "model_version": ["20260101-abcdef"] * n}


def requests(cols: dict, lo: int, hi: int):
    "Rows lo..hi as one-row batches (views of the day's arrays), as the server logs them."
    for i in range(lo, hi): yield {k: v[i:i + 1] for k, v in cols.items()}


def write(directory: Path, days: int, layout: str) -> dict:
    "Log `days` days of decisions and labels into `directory`; timings."
    rng = np.random.default_rng(0)
    log = DecisionLog(directory, flush_every_s=3600, name="bench")  # flushed here, not by the thread
    enqueue, flush_s, label_s, rows, flushes = [], 0.0, [], 0, 0
    per_file = PER_DAY * 300 // 86_400  # requests in 5 minutes
    for day in range(days):
        cols = day_columns(day, rng)
        step = 1000 if layout == "busy" else per_file
        for lo in range(0, PER_DAY, step):
            for r in requests(cols, lo, min(lo + step, PER_DAY)):
                t = time.perf_counter_ns(); log.decisions(r); enqueue.append(time.perf_counter_ns() - t)
                if layout == "quiet" and day == 0:  # a flush per request: a 1-row row group each, as 1-second flushes give
                    t = time.perf_counter(); log.flush(); flush_s += time.perf_counter() - t; flushes += 1
            t = time.perf_counter(); log.flush(); flush_s += time.perf_counter() - t; flushes += 1
            if layout == "quiet":
                t = time.perf_counter(); log.rotate(); flush_s += time.perf_counter() - t
            rows += min(lo + step, PER_DAY) - lo
        ids = rng.choice(cols["transaction_id"], PER_DAY)  # a day's labels, some of them twice
        known = cols["tx_datetime"][ids - day * PER_DAY] + np.timedelta64(7, "D")
        for i, k in zip(ids.tolist(), known.tolist()):
            t = time.perf_counter_ns(); log.labels(i, bool(i % 30 == 0), labelled_at=k); label_s.append(time.perf_counter_ns() - t)
    t = time.perf_counter(); log.close(); flush_s += time.perf_counter() - t
    assert log.written == {"decisions": rows, "labels": days * PER_DAY} and not any(log.dropped.values()), (log.written, log.dropped)
    files = list(directory.glob("*.parquet"))
    return {"rows": rows, "files": len(files), "mib": sum(f.stat().st_size for f in files) / 2**20, "flush_s": flush_s, "flushes": flushes,
            "enqueue_us": float(np.median(enqueue) / 1e3), "enqueue_p99_us": float(np.percentile(enqueue, 99) / 1e3),
            "label_us": float(np.median(label_s) / 1e3)}


def read(directory: Path, days: int) -> dict:
    "Read everything, read the last day alone, read the labels, join: timings."
    t = time.perf_counter(); dec = read_decisions(directory); read_s = time.perf_counter() - t
    last = T0 + timedelta(days=days - 1)
    t = time.perf_counter(); day = read_decisions(directory, last, last + timedelta(days=1)); day_s = time.perf_counter() - t
    t = time.perf_counter(); lab = read_labels(directory); labels_s = time.perf_counter() - t
    as_of = T0 + timedelta(days=days + 7)
    join = []
    for _ in range(3):
        t = time.perf_counter(); j = join_labels(dec, lab, as_of); join.append(time.perf_counter() - t)
    assert len(dec) == days * PER_DAY and len(day) == PER_DAY and len(j) == len(dec), (len(dec), len(day), len(j))
    return {"read_s": read_s, "read_last_day_s": day_s, "read_labels_s": labels_s, "join_s": min(join), "labelled": int(j["fraud"].is_not_null().sum())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=int, default=30)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d, DecisionLog(d) as log:  # warm-up: pyarrow's first conversions import what they need
        log.decisions(next(requests(day_columns(0, np.random.default_rng(1)), 0, 1))); log.labels(1, True)
    rows, payload = [], {"per_day": PER_DAY, "features": len(FEATURES)}
    for layout in ("busy", "quiet"):
        for days in sorted({1, a.days}):
            d = Path(tempfile.mkdtemp(prefix="mlpay-decisions-"))
            try:
                w = write(d, days, layout); r = read(d, days)
            finally: shutil.rmtree(d, ignore_errors=True)
            payload[f"{layout}_{days}d"] = {**w, **r}
            n = w["rows"]
            rows.append([layout, days, f"{n:,}", f"{w['files']:,}", f"{w['mib']:.1f}", f"{w['enqueue_us']:.1f} / {w['enqueue_p99_us']:.1f}",
                         f"{w['label_us']:.1f}", f"{w['flush_s'] / n * 1e6:.0f} ({w['flushes']:,} flushes)", f"{r['read_s']:.2f} ({n / r['read_s']:,.0f}/s)",
                         f"{r['read_last_day_s']:.2f}", f"{r['read_labels_s']:.2f}", f"{r['join_s'] * 1e3:.0f} ({n / r['join_s']:,.0f}/s)"])
            print(rows[-1], flush=True)
    print_table(f"Decision log: {PER_DAY:,} decisions a day ({len(FEATURES)} features), one request each, and {PER_DAY:,} labels a day",
                ["layout", "days", "decisions", "files", "MiB", "enqueue µs median / p99", "label µs", "writer µs/row",
                 "read all s (rows/s)", "read last day s", "read labels s", "join ms (rows/s)"], rows)
    save("decisions", payload)


if __name__ == "__main__":
    main()
