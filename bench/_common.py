"""Helpers shared by the benchmark scripts: timing, the default dataset, result tables."""
import json
import os
import platform
import shutil
import subprocess
import tempfile
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


def start_redis_cluster(ports):
    "A throw-away Redis Cluster, one master per port (no replicas, no persistence), ready, and its URL; None where redis-server is not installed."
    if not (shutil.which("redis-server") and shutil.which("redis-cli")): return None
    import redis
    d = tempfile.mkdtemp(prefix="mlpay-bench-cluster-")
    procs = [subprocess.Popen(["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--dir", d, "--cluster-enabled", "yes",
                               "--cluster-config-file", f"nodes-{p}.conf", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
             for p in ports]
    def ready(ok):
        for _ in range(200):
            try:
                if ok(): return True
            except redis.RedisError: pass
            time.sleep(0.05)
        for proc in procs: proc.kill()
        raise RuntimeError(f"the Redis Cluster on ports {ports} did not come up")
    for p in ports: ready(lambda: redis.Redis(port=p).ping())
    subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"], check=True, capture_output=True)
    for p in ports: ready(lambda: redis.Redis(port=p).cluster("info")["cluster_state"] == "ok")
    return procs, f"redis://127.0.0.1:{ports[0]}/0"
