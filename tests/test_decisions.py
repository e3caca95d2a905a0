"""The decision log under real faults: a full disk (a small tmpfs, or a file-size limit in a child process), a
read-only file system, a process that dies without closing, several processes and threads writing at once."""
import json
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import ROOT
from mlpay.decisions import LABEL_COLUMNS, DecisionLog, join_labels, read_decisions, read_labels

FEATURES = [f"f.F{i}" for i in range(23)]


def rows(ids, t0=datetime(2018, 8, 1), features=FEATURES):
    "Decision rows for `ids`, in the server's shape."
    ids = np.asarray(ids, np.int64)
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    score = rng.random(len(ids)).astype(np.float32)
    decision = np.where(score > 0.95, "decline", np.where(score > 0.9, "review", "approve"))
    return {"transaction_id": ids, "tx_datetime": np.datetime64(t0, "us") + (ids * 8_640_000).astype("timedelta64[us]"),
            "customer_id": ids % 1000, "terminal_id": ids % 100, "tx_amount": rng.random(len(ids)) * 100,
            **{f: rng.random(len(ids)) for f in features}, "score": score, "probability": score.astype(np.float64),
            "decision": decision, "reasons": [["amount"] if d != "approve" else [] for d in decision],
            "model_version": ["v1"] * len(ids)}


def fill(disk: Path) -> Path:
    "Fill the file system of `disk` to the last byte with a filler file."
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True: f.write(b"\0" * size)
            except OSError: pass
    return filler


def child(code: str, *args) -> dict:
    "Run `code` in a fresh Python with the repository's mlpay; the JSON it prints last."
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture
def tmpfs(tmp_path):
    "A 1 MiB tmpfs (skipped where this sandbox refuses to mount)."
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_disk_tmpfs(tmpfs):
    "No space left: rows wait or are dropped and counted, nothing raises, the log resumes once space returns, no file has a hole."
    log = DecisionLog(tmpfs / "log", flush_every_s=3600, name="t")
    log.decisions(rows(range(100))); log.flush()
    assert log.written["decisions"] == 100 and log.last_error is None
    filler = fill(tmpfs)
    log.decisions(rows(range(100, 200))); log.labels(list(range(10)), [True] * 10)
    log.flush()                                            # the row groups cannot be written: they wait in memory
    assert "No space left on device" in log.last_error, log.last_error
    assert log.written == {"decisions": 100, "labels": 0}
    log.decisions(rows(range(200, 250))); log.labels(99, False)
    log.flush()                                            # still full: these are dropped
    assert log.dropped == {"queue_full": 0, "write_error": 51}
    assert "No space left on device" in log.last_error
    filler.unlink()
    log.flush()                                            # space again: what waited is written, without new rows
    assert log.written == {"decisions": 200, "labels": 10} and log.last_error is None
    log.decisions(rows(range(250, 300))); log.flush()
    log.close()
    got = read_decisions(tmpfs / "log")
    assert got["transaction_id"].to_list() == list(range(200)) + list(range(250, 300))
    assert len(got) == log.written["decisions"]
    assert read_labels(tmpfs / "log")["transaction_id"].to_list() == list(range(10))
    assert not list((tmpfs / "log").glob("*.open"))


def test_full_disk_at_close(tmpfs):
    "A file that cannot be finished at close (the disk still full) is removed and its rows counted as lost; close does not raise."
    drops = []
    log = DecisionLog(tmpfs / "log", flush_every_s=3600, name="t", on_drop=lambda r, n: drops.append((r, n)))
    log.decisions(rows(range(50))); log.flush(); log.rotate()   # one finished file
    log.decisions(rows(range(50, 100))); log.flush()            # and an open one
    fill(tmpfs)
    log.decisions(rows(range(100, 120))); log.flush()
    log.close()
    assert log.dropped["write_error"] == 70 and drops == [("write_error", 70)]
    assert "could not finish" in log.last_error
    assert not list((tmpfs / "log").glob("*.open"))
    assert read_decisions(tmpfs / "log")["transaction_id"].to_list() == list(range(50))


def test_read_only_file_system(tmpfs):
    "An unwritable directory: counted write errors, then writes again once it is writable."
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    log = DecisionLog(tmpfs / "log", flush_every_s=3600)
    assert "Read-only file system" in log.last_error
    log.decisions(rows(range(10))); log.flush()
    assert log.dropped["write_error"] == 10 and "Read-only file system" in log.last_error
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    log.decisions(rows(range(10, 20))); log.close()
    assert log.last_error is None and read_decisions(tmpfs / "log")["transaction_id"].to_list() == list(range(10, 20))


def test_file_size_limit(tmp_path):
    "Writes failing with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored) in a child process: the same accounting, and recovery."
    out = child("""
        import json, resource, signal, sys
        from pathlib import Path
        sys.path.insert(0, "tests")
        from test_decisions import rows
        from mlpay.decisions import DecisionLog, read_decisions
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        log = DecisionLog(sys.argv[1], flush_every_s=3600, max_file_bytes=1 << 30)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, hard))
        n, states = 0, []
        for i in range(12):                                # ~9 kB per 50 rows: the file reaches the limit
            log.decisions(rows(range(n, n + 50))); n += 50; log.flush()
            states.append([log.written["decisions"], log.dropped["write_error"], log.last_error])
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        log.flush(); recovered = [log.written["decisions"], log.last_error]
        log.decisions(rows(range(n, n + 50))); n += 50
        log.close()
        got = read_decisions(sys.argv[1])["transaction_id"].to_list()
        print(json.dumps({"states": states, "recovered": recovered, "written": log.written["decisions"],
                          "dropped": log.dropped["write_error"], "logged": n, "got": got}))
    """, tmp_path / "log")
    errors = [s for s in out["states"] if s[2]]
    assert errors and all("File too large" in s[2] for s in errors), out["states"]
    assert out["states"][-1][1] > 0                                 # rows were dropped while the file could not grow
    assert out["recovered"][1] is None and out["recovered"][0] > out["states"][-1][0]
    assert out["written"] + out["dropped"] == out["logged"]         # every row either written or counted as lost
    assert len(out["got"]) == out["written"] == len(set(out["got"]))


def test_directory_is_a_file(tmp_path):
    "The configured directory is a file: no exception anywhere, every record counted as a write error."
    p = tmp_path / "log"
    p.write_text("x")
    with DecisionLog(p, flush_every_s=0.01) as log:
        log.decisions(rows(range(5))); log.labels([1, 2], [True, False])
        time.sleep(0.1)
    assert log.dropped == {"queue_full": 0, "write_error": 7} and log.written == {"decisions": 0, "labels": 0}
    assert log.last_error and ("Not a directory" in log.last_error or "File exists" in log.last_error), log.last_error


def test_crash_and_other_processes(tmp_path):
    "Three processes share a directory; one dies without closing: its open file is lost, its finished files and the others' are read."
    d = tmp_path / "log"
    code = """
        import json, os, sys
        sys.path.insert(0, "tests")
        from test_decisions import rows
        from mlpay.decisions import DecisionLog
        k, crash = int(sys.argv[2]), sys.argv[3] == "crash"
        log = DecisionLog(sys.argv[1], flush_every_s=3600)
        log.decisions(rows(range(k * 100, k * 100 + 50))); log.labels(k * 100, True); log.flush(); log.rotate()
        log.decisions(rows(range(k * 100 + 50, k * 100 + 100))); log.flush()
        print(json.dumps({"pid": os.getpid()}), flush=True)
        if crash: os._exit(1)                              # no close, no atexit
        # no close either: the atexit hook finishes the open file
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(d), str(k), "crash" if k == 1 else "ok"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True) for k in range(3)]
    for p in procs: p.wait(timeout=120)
    got = read_decisions(d)["transaction_id"].to_list()
    assert sorted(got) == list(range(100)) + list(range(100, 150)) + list(range(200, 300))
    assert len(list(d.glob("decisions-*.parquet.open"))) == 1     # the crashed process's, ignored
    pids = [json.loads(p.stdout.read())["pid"] for p in procs]
    names = [n.name for n in d.glob("decisions-*.parquet")]
    assert all(sum(f"-{pid}-" in n for pid in pids) == 1 for n in names)  # each file one process's (host-pid prefix)
    assert all(any(f"-{pid}-" in n for n in names) for pid in pids)
    assert sorted(read_labels(d)["transaction_id"].to_list()) == [0, 100, 200]


def test_threads():
    "Many request threads logging at once: every row written once, none lost."
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        log = DecisionLog(d, flush_every_s=0.01, max_file_bytes=200_000)
        def worker(k):
            for i in range(500): log.decisions(rows([k * 1000 + i]))
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in ts: t.start()
        for t in ts: t.join()
        log.close()
        got = read_decisions(d)["transaction_id"]
        assert log.written["decisions"] == 4000 and sum(log.dropped.values()) == 0
        assert sorted(got.to_list()) == sorted(k * 1000 + i for k in range(8) for i in range(500))
        assert len(list(Path(d).glob("decisions-*.parquet"))) > 1  # rotated by size on the way


def test_callbacks_failing():
    "A metrics callback that raises does not stop the log."
    import tempfile
    def boom(*a): raise RuntimeError("metrics down")
    with tempfile.TemporaryDirectory() as d:
        with DecisionLog(d, flush_every_s=3600, max_queue=10, on_write=boom, on_drop=boom) as log:
            log.decisions(rows(range(20))); log.decisions(rows(range(5)))
        assert log.written["decisions"] == 5 and log.dropped["queue_full"] == 20
        assert len(read_decisions(d)) == 5


def test_day_through_the_log(tmp_path):
    "A day of the default data's size: 10k decisions (23 features) logged request by request, 10k labels; the join in well under a second."
    n = 10_000
    batches = [rows([i, i + 1]) for i in range(0, n, 2)]
    with DecisionLog(tmp_path, flush_every_s=0.05) as log:
        t0 = time.perf_counter()
        for b in batches: log.decisions(b)
        enqueue = (time.perf_counter() - t0) / len(batches)
        received = datetime.now(timezone.utc)
        for i in range(n): log.labels(i, i % 50 == 0, labelled_at=received - timedelta(hours=24 * (i % 3 == 0)))
    assert enqueue < 200e-6, enqueue                        # per call, generous for a busy machine (~5 µs here)
    dec, lab = read_decisions(tmp_path), read_labels(tmp_path)
    assert (len(dec), len(lab), lab.schema) == (n, n, pl.Schema(LABEL_COLUMNS))
    t0 = time.perf_counter()
    j = join_labels(dec, lab, received - timedelta(hours=1))
    took = time.perf_counter() - t0
    assert took < 1.0, took
    assert len(j) == n and j["fraud"].null_count() == n - len(range(0, n, 3))
