"""Features at scale: the polars pass vs the Spark executor (local[2]) at 1.78M and 17.8M transactions.

Each engine runs as `mlpay-features --engine E` in a process of its own; the table gives its wall time and the peak
memory of its whole process tree (Spark: the Python driver, the JVM and its Python workers), sampled every 0.1 s.
Parity: every feature of the Spark output against the polars output, row for row (target <= 1e-9).
Sizes: the default data (data/transactions.parquet, else simulated) and `data=large` (10x the cards and terminals),
simulated once into artifacts/bench/large/. MLPAY_SPARK_BENCH_SIZES=default skips the large one.
"""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
from _common import print_table, save

from mlpay.config import compose
from mlpay.registry import FeatureRegistry

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK = ROOT / "artifacts" / "bench" / "spark"


def dataset(name):
    "The transactions file of a size, simulated once."
    path = ROOT / "data" / "transactions.parquet" if name == "default" else ROOT / "artifacts" / "bench" / name / "transactions.parquet"
    if not path.exists():
        subprocess.run([BIN / "mlpay-simulate", "--out", path, *([] if name == "default" else [f"data={name}"])], check=True, cwd=ROOT)
    return path


def measured(argv):
    "Run argv; (wall seconds, peak RSS of its process tree in GiB)."
    peak, done = [0], threading.Event()
    t0 = time.perf_counter()
    proc = psutil.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while not done.is_set():
            try: rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
            except psutil.Error: rss = 0
            peak[0] = max(peak[0], rss)
            time.sleep(0.1)
    threading.Thread(target=sample, daemon=True).start()
    out = proc.communicate()[0]
    wall = time.perf_counter() - t0
    done.set()
    if proc.returncode: raise SystemExit(f"{argv} failed:\n{out[-3000:]}")
    return wall, peak[0] / 2**30


def max_diff(a, b, names):
    "The largest absolute difference of any feature, column by column (each column read on its own)."
    keys = ["TX_DATETIME", "TRANSACTION_ID"]
    if not pl.read_parquet(a, columns=keys).equals(pl.read_parquet(b, columns=keys)): return float("inf")
    return max(float(np.abs(pl.read_parquet(a, columns=[n])[n].to_numpy() - pl.read_parquet(b, columns=[n])[n].to_numpy()).max()) for n in names)


sizes = os.environ.get("MLPAY_SPARK_BENCH_SIZES", "default,large").split(",")
names = FeatureRegistry.from_cfg(compose()).names
WORK.mkdir(parents=True, exist_ok=True)
rows, payload = [], {"spark": "local[2]"}
for size in sizes:
    data = dataset(size)
    n = pl.scan_parquet(data).select(pl.len()).collect().item()
    result = {}
    for engine in ("polars", "spark"):
        out = WORK / f"{size}-{engine}.parquet"
        wall, gib = measured([BIN / "mlpay-features", "--engine", engine, "--data", data, "--out", out, "spark.master='local[2]'"])
        result[engine] = {"seconds": wall, "peak_gib": gib, "rows_per_s": n / wall}
    diff = max_diff(WORK / f"{size}-polars.parquet", WORK / f"{size}-spark.parquet", names)
    payload[size] = {"rows": n, **result, "max_abs_diff": diff}
    rows.append([f"{size} ({n / 1e6:.2f}M)", f"{result['polars']['seconds']:.1f}", f"{result['polars']['peak_gib']:.1f}",
                 f"{result['spark']['seconds']:.1f}", f"{result['spark']['peak_gib']:.1f}", f"{diff:.1e}"])
    for engine in ("polars", "spark"): (WORK / f"{size}-{engine}.parquet").unlink()
print_table(f"Features ({len(names)}): polars vs Spark local[2], one process each, {os.cpu_count()} cores",
            ["data", "polars s", "polars peak GiB", "Spark s", "Spark peak GiB", "max abs diff"], rows)
save("spark", payload)
