"""mlpay-serve over real HTTP: the in-process state survives a restart; Redis shares state between processes."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import polars as pl
import pytest
import redis

from conftest import BIN
from mlpay.decisions import read_decisions

KEY = "serve-test-" + "k" * 16
TX = {"transaction_id": 20_000_001, "tx_datetime": "2018-08-30T12:00:00", "customer_id": 7, "terminal_id": 11, "tx_amount": 42.0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def post(port, path, body, key=KEY):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=__import__("json").dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r: return r.status, r.read().decode()
    except urllib.error.HTTPError as e: return e.code, e.read().decode()


class Server:
    "mlpay-serve in a subprocess, ready when /health says so."
    def __init__(self, model, **env):
        self.port = free_port()
        self.proc = subprocess.Popen([str(BIN / "mlpay-serve"), "--model", str(model), "--port", str(self.port)],
                                     env={**os.environ, "MLPAY_API_KEY": KEY, **{k: str(v) for k, v in env.items()}},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for _ in range(240):
            assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200: return
            except OSError: pass
            time.sleep(0.5)
        raise AssertionError("server not ready")

    def stop(self):
        "SIGTERM (the worker snapshots its state), then SIGKILL whatever is left of the process group."
        os.killpg(self.proc.pid, signal.SIGTERM)
        try: self.proc.wait(30)
        except subprocess.TimeoutExpired: pass
        time.sleep(1)
        try: os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError: pass


def test_in_process_state_survives_a_restart(package, tmp_path):
    env = dict(MLPAY_STATE_DIR=tmp_path / "state", MLPAY_WARM_FROM=package / "history.parquet", MLPAY_SNAPSHOT_EVERY_S=3600)
    s = Server(package / "model", **env)
    try:
        assert post(s.port, "/predict", TX)[0] == 200
        assert post(s.port, "/predict", TX, key="wrong-key-" + "x" * 10)[0] == 401
    finally: s.stop()
    assert (tmp_path / "state" / "online-state.npz").exists()  # written on SIGTERM, not by the hourly timer
    s = Server(package / "model", **env)
    try:  # the restored state remembers the transaction: the same id with other contents is a conflict
        status, body = post(s.port, "/predict", {**TX, "tx_amount": 43.0})
        assert status == 409, body
        assert post(s.port, "/predict", TX)[0] == 200  # while a plain retry is scored again
    finally: s.stop()


@pytest.mark.parametrize("processes, first_id", [({"MLPAY_WORKERS": 2}, 30_000_000), ({"MLPAY_API_SERVERS": 2}, 31_000_000)],
                         ids=["two LitServe workers", "two HTTP processes scoring"])
def test_two_processes_share_state_through_redis(package, redis_url, processes, first_id):
    s = Server(package / "model", MLPAY_REDIS_URL=redis_url, MLPAY_WARM_FROM=package / "history.parquet", **processes)
    try:
        # the empty Redis was warmed at start: the history's last transaction is known, so other contents conflict
        last = pl.read_parquet(package / "history.parquet").sort("TX_DATETIME", "TRANSACTION_ID").row(-1, named=True)
        known = {k.lower(): last[k] for k in ("TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID")} | {
            "tx_datetime": last["TX_DATETIME"].isoformat(), "tx_amount": last["TX_AMOUNT"] + 1.0}
        assert post(s.port, "/predict", known)[0] == 409
        statuses = [post(s.port, "/predict", {**TX, "transaction_id": first_id + i})[0] for i in range(20)]
        assert statuses == [200] * 20
        # whichever process answers, the shared state knows every id: other contents under a known id conflict
        assert {post(s.port, "/predict", {**TX, "transaction_id": first_id + i, "tx_amount": 1.0})[0] for i in range(20)} == {409}
        assert post(s.port, "/feedback", {"labels": [{"transaction_id": first_id + 5, "fraud": True}]}) == (200, '{"accepted":1,"unknown":[]}')
    finally: s.stop()


@pytest.mark.parametrize("processes", [{"MLPAY_WORKERS": "2"}, {"MLPAY_API_SERVERS": "2"}])
def test_in_process_state_has_one_owner(package, processes):
    proc = subprocess.run([str(BIN / "mlpay-serve"), "--model", str(package / "model")], capture_output=True, text=True,
                          env={**os.environ, "MLPAY_API_KEY": KEY, **processes}, timeout=60)
    assert proc.returncode != 0 and "MLPAY_REDIS_URL" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_retention_shorter_than_the_windows_is_refused_before_serving(package):
    proc = subprocess.run([str(BIN / "mlpay-serve"), "--model", str(package / "model")], capture_output=True, text=True,
                          env={**os.environ, "MLPAY_API_KEY": KEY, "MLPAY_CARD_IDLE_DAYS": "2"}, timeout=60)
    assert proc.returncode != 0 and "card_idle_days" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_changed_package_is_refused_before_serving(package, tmp_path):
    shutil.copytree(package / "model", tmp_path / "model")
    with open(tmp_path / "model" / "model.onnx", "ab") as f: f.write(b"\0")
    proc = subprocess.run([str(BIN / "mlpay-serve"), "--model", str(tmp_path / "model")], capture_output=True, text=True,
                          env={**os.environ, "MLPAY_API_KEY": KEY}, timeout=60)
    assert proc.returncode != 0 and "model.onnx" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_no_api_key_no_server(package):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPAY_")}
    proc = subprocess.run([str(BIN / "mlpay-serve"), "--model", str(package / "model")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "MLPAY_API_KEY" in proc.stderr


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())


def test_the_edge_observes_each_slice_between_turns(package, tmp_path):
    "With the periodic observer asleep, the decision log gets each whole slice the edge scored, and nothing of a partial one until the stop."
    log = tmp_path / "log"
    s = Server(package / "model", MLPAY_STATE_DIR=tmp_path / "state", MLPAY_WARM_FROM=package / "history.parquet", MLPAY_DECISION_LOG_DIR=log,
               MLPAY_OBSERVE_EVERY_S=3600, MLPAY_OBSERVE_SLICE=4)
    ids = [TX["transaction_id"] + 100 + i for i in range(10)]
    try:
        for i, tid in enumerate(ids):  # one at a time: each its own turn
            assert post(s.port, "/predict", {**TX, "transaction_id": tid, "tx_datetime": f"2018-08-30T12:01:{i:02d}"})[0] == 200
        for _ in range(50):  # the writer writes once a second
            written = get(s.port, "/health")[1]["decision_log"]["written"]["decisions"]
            if written >= 8: break
            time.sleep(0.1)
        time.sleep(1.5)  # a flush more: the last two transactions wait for a slice of their own (or the stop)
        assert get(s.port, "/health")[1]["decision_log"]["written"]["decisions"] == 8
    finally: s.stop()
    assert read_decisions(log)["transaction_id"].to_list() == ids  # the stop observed the rest, in order


def test_redis_down_answers_with_stand_in_decisions_then_catches_up(package, redis_process):
    "Redis stopped while serving: every authorization still answered (stand-in, flagged), labels refused for a retry; Redis back: the state gets what was answered."
    s = Server(package / "model", MLPAY_REDIS_URL=redis_process.url, MLPAY_WARM_FROM=package / "history.parquet")
    card = f"mlpay:card:{TX['customer_id']}"
    try:
        assert json.loads(post(s.port, "/predict", TX)[1])["degraded"] is False
        before = redis.Redis(port=redis_process.port).zcard(card)
        redis_process.stop()  # saving its data set, as a Redis with persistence keeps it
        during = [{**TX, "transaction_id": 20_000_100 + i, "tx_datetime": f"2018-08-30T12:0{i + 1}:00"} for i in range(5)]
        answers = [post(s.port, "/predict", t) for t in during]
        assert [a[0] for a in answers] == [200] * 5, answers
        assert {(json.loads(b)["degraded"], json.loads(b)["reasons"][0]["code"], json.loads(b)["score"]) for _, b in answers} == {(True, "STATE_UNAVAILABLE", None)}
        health, ready = get(s.port, "/health"), get(s.port, "/ready")
        assert health[0] == 200 and health[1]["status"] == "degraded" and health[1]["state"]["backlog"] == 5, health
        assert ready[0] == 503 and ready[1]["ready"] is False, ready
        status, body = post(s.port, "/feedback", {"labels": [{"transaction_id": TX["transaction_id"], "fraud": True}]})
        assert status == 503 and "retry" in body, body
        redis_process.start()
        for _ in range(100):  # scoring resumes once Redis answers; the backlog is written behind it
            if get(s.port, "/ready")[0] == 200 and get(s.port, "/health")[1]["state"]["backlog"] == 0: break
            time.sleep(0.1)
        assert get(s.port, "/ready")[0] == 200 and get(s.port, "/health")[1]["state"]["backlog_written"] == 5
        assert redis.Redis(port=redis_process.port).zcard(card) == before + 5  # no velocity lost
        assert {post(s.port, "/predict", {**t, "tx_amount": 1.0})[0] for t in during} == {409}  # the state knows them
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics", timeout=10).read().decode()
        assert 'mlpay_standin_total{reason="STATE_UNAVAILABLE"} 5.0' in metrics, metrics[-2000:]
    finally: s.stop()
    log = s.proc.stdout.read()
    assert "stand-in decisions" in log and "available again" in log and "backlog written" in log, log[-3000:]  # logged, in and out


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no journal (before)"])
def test_a_crash_loses_no_answered_transaction(package, tmp_path, journal):
    "kill -9 after answering, then a restart: with the journal every answered transaction is in the state (a changed retry: 409)."
    env = dict(MLPAY_STATE_DIR=tmp_path / "state", MLPAY_WARM_FROM=package / "history.parquet", MLPAY_SNAPSHOT_EVERY_S=3600, MLPAY_JOURNAL=str(journal).lower())
    s = Server(package / "model", **env)
    txs = [{**TX, "transaction_id": 20_000_200 + i, "customer_id": 7 + i % 3, "tx_datetime": f"2018-08-30T13:{i:02d}:00"} for i in range(40)]
    try:
        assert [post(s.port, "/predict", t)[0] for t in txs[:10]] == [200] * 10
        assert post(s.port, "/predict", {"transactions": txs[10:]})[0] == 200
        assert post(s.port, "/feedback", {"labels": [{"transaction_id": txs[0]["transaction_id"], "fraud": True}]})[0] == 200
    finally:
        os.killpg(s.proc.pid, signal.SIGKILL); s.proc.wait(10)
    assert not (tmp_path / "state" / "online-state.npz").exists()  # no snapshot: only the journal can bring them back
    s = Server(package / "model", **env)
    try: statuses = [post(s.port, "/predict", {**t, "tx_amount": 1.0})[0] for t in txs]
    finally: s.stop()
    assert statuses == ([409] * 40 if journal else [200] * 40), statuses
