"""Write-ahead journal: appending batches of transactions (fsync off and on), and replaying a million records.

Appends: batches of 1, 16 and 256 transactions through `Journal.transactions` (the record array, one `os.write`,
with fsync an `fdatasync`): µs per batch (median / p99) and records/s, up to a number of batches or 3 s each.
Replay: one segment of 1M records (990k transactions of 5,000 cards and 10,000 terminals over 100 days in arrival
order, and 10k labels of recent ones, interleaved as the server writes them), read and decoded only (into a store
that accepts everything: the journal's own cost), and replayed into a fresh `MemoryStore` with the server's
default retention (what a restart costs).

    python bench/journal.py [--dir DIR]   # DIR: a directory on the disk to measure (default: a temporary one)
"""
import argparse
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from _common import print_table, save
from mlpay.config import compose
from mlpay.journal import Journal, read_segment
from mlpay.online import OnlineFeatures, Tx
from mlpay.registry import FeatureRegistry

T0, DAYS, N_REPLAY, LABEL_EVERY = datetime(2018, 4, 1), 100, 1_000_000, 100


def transactions(n: int, seed: int = 0) -> list[Tx]:
    "`n` transactions in arrival order over `DAYS` days."
    rng = np.random.default_rng(seed)
    t = np.datetime64(T0, "us").astype(np.int64) + np.sort(rng.integers(0, DAYS * 86_400 * 10**6, n))
    when = t.astype("datetime64[us]").tolist()
    cols = (np.arange(n).tolist(), t.tolist(), rng.integers(0, 5_000, n).tolist(), rng.integers(0, 10_000, n).tolist(),
            np.round(rng.gamma(2, 30, n), 2).tolist(), when)
    return [Tx(*r) for r in zip(*cols)]


def appends(root: Path, size: int, fsync: bool, txs: list[Tx], most: int) -> dict:
    "Append batches of `size` transactions: per-batch latency and throughput."
    d = Path(tempfile.mkdtemp(prefix="journal-", dir=root))
    batches = [txs[i:i + size] for i in range(0, most * size, size)]
    lat = []
    try:
        with Journal(d, fsync=fsync) as j:
            stop = time.perf_counter() + 3
            for b in batches:
                t = time.perf_counter_ns(); j.transactions(b); lat.append(time.perf_counter_ns() - t)
                if time.perf_counter() > stop: break
    finally: shutil.rmtree(d, ignore_errors=True)
    lat = np.array(lat) / 1e3
    return {"batches": len(lat), "median_us": float(np.median(lat)), "p99_us": float(np.percentile(lat, 99)),
            "records_per_s": size * len(lat) / (lat.sum() / 1e6)}


class _Accept:
    "A store that accepts every record: what replaying costs the journal itself."
    def record(self, x): return None
    def label(self, transaction_id, fraud): return True


def replay(root: Path) -> dict:
    "Write a segment of `N_REPLAY` records, then replay it: decoding only, and into a MemoryStore."
    n_tx = N_REPLAY - N_REPLAY // LABEL_EVERY
    txs = transactions(n_tx, 1)
    rng = np.random.default_rng(2)
    d = Path(tempfile.mkdtemp(prefix="journal-", dir=root))
    try:
        with Journal(d) as j:
            step = LABEL_EVERY - 1
            for lo in range(0, n_tx, step):  # a batch of transactions, then a label of one of the last few hundred
                j.transactions(txs[lo:lo + step])
                j.labels([int(rng.integers(max(lo - 500, 0), lo + 1))], [bool(rng.random() < 0.1)])
            written, path = j.written, j.path
        mib = path.stat().st_size / 2**20
        t = time.perf_counter(); rec, torn = read_segment(path); read_s = time.perf_counter() - t
        assert len(rec) == written == N_REPLAY and torn == 0, (len(rec), written, torn)
        r = Journal(d)
        t = time.perf_counter(); c = r.replay(type("O", (), {"store": _Accept()})()); decode_s = time.perf_counter() - t
        assert c["transactions"] + c["labels"] == N_REPLAY, c
        online = OnlineFeatures(FeatureRegistry.from_cfg(compose()), 8, max_lateness_s=86_400, card_idle_days=None)  # the server's defaults
        t = time.perf_counter(); c = r.replay(online); store_s = time.perf_counter() - t
        r.close()
        assert c["skipped"] <= N_REPLAY // LABEL_EVERY, c  # only labels of evicted ids may be refused
    finally: shutil.rmtree(d, ignore_errors=True)
    return {"records": N_REPLAY, "mib": mib, "read_s": read_s, "decode_s": decode_s, "store_s": store_s, "counts": c,
            "state": online.store.size()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None)
    a = p.parse_args()
    root = a.dir or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    txs = transactions(256 * 2_000)
    with tempfile.TemporaryDirectory(dir=root) as d, Journal(d) as j: j.transactions(txs[:16])  # warm-up
    rows, payload = [], {"dir": str(root), "appends": {}}
    for fsync in (False, True):
        for size, most in ((1, 20_000), (16, 10_000), (256, 2_000)):
            r = appends(root, size, fsync, txs, most)
            payload["appends"][f"{size}_{'fsync' if fsync else 'nofsync'}"] = r
            rows.append([f"append {size}", "on" if fsync else "off", f"{r['batches']:,}", f"{r['median_us']:.1f} / {r['p99_us']:.1f}",
                         f"{r['records_per_s']:,.0f}"])
            print(rows[-1], flush=True)
    r = replay(root)
    payload["replay"] = r
    n = r["records"]
    rows.append([f"read {n:,} records ({r['mib']:.0f} MiB)", "", "1", f"{r['read_s'] * 1e6:,.0f}", f"{n / r['read_s']:,.0f}"])
    rows.append(["replay, decode only", "", "1", f"{r['decode_s'] * 1e6:,.0f}", f"{n / r['decode_s']:,.0f}"])
    rows.append(["replay into MemoryStore", "", "1", f"{r['store_s'] * 1e6:,.0f}", f"{n / r['store_s']:,.0f}"])
    print(r["counts"], r["state"])
    print_table(f"Journal in {root}: appends of transaction batches, and replaying {n:,} records",
                ["operation", "fsync", "batches", "µs per batch (median / p99)", "records/s"], rows)
    save("journal", payload)


if __name__ == "__main__":
    main()
