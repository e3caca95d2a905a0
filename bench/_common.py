"""Helpers shared by the benchmark scripts: timing, the default dataset, result tables."""
import json
import os
import platform
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def best_of(fn, repeat=3):
    "Run fn `repeat` times; return (min wall seconds, last result)."
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def print_table(title, header, rows):
    "Print a Markdown table."
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows: print("| " + " | ".join(str(c) for c in r) + " |")


def save(name, payload):
    "Write the full numbers with the machine they were measured on to bench/results/NAME.json."
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version()}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **payload}, indent=2) + "\n")


def start_redis(port):
    "A throw-away redis-server on `port` (no persistence), ready, and its URL; None where redis-server is not installed."
    if not shutil.which("redis-server"): return None
    import redis
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try: client.ping(); break
        except redis.ConnectionError: time.sleep(0.05)
    else: proc.kill(); raise RuntimeError(f"redis-server on port {port} did not answer")
    return proc, f"redis://127.0.0.1:{port}/0"

