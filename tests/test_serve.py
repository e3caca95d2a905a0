"""mlpay-serve over real HTTP: the in-process state survives a restart; Redis shares state between processes."""
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import polars as pl
import pytest

from conftest import BIN

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
