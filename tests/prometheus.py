"""A throw-away Prometheus server for tests: Debian's `prometheus` binary (`make system-deps`) on a free loopback port.

    with Prometheus(["127.0.0.1:8000"], rule_files=[ROOT / "containers/monitoring/rules.yml"]) as prom:
        prom.wait_for(lambda: prom.query('up{job="mlpay-serve"}'))
        prom.query("mlpay_window_transactions")   # the instant vector: [{"metric": {...}, "value": [t, "v"]}, ...]
        prom.alerts()                             # GET /api/v1/alerts: [{"labels", "annotations", "state", ...}, ...]

Everything lives in a temporary directory (the configuration, the TSDB, the server's log); the server is stopped and
the directory removed on exit. Scrapes and rule evaluations run every `interval` (1s by default) so that a test sees
an alert fire in seconds; `for:` clauses of real rules still take their full time.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import yaml

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def free_port() -> int:
    "A loopback TCP port nobody listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusError(RuntimeError):
    "The server did not start, exited, or answered an API call with an error."


class Prometheus:
    "A Prometheus server scraping `targets` (host:port) as one job, evaluating `rule_files`; a context manager."

    def __init__(self,
                 targets: Sequence[str], # host:port of each /metrics endpoint to scrape
                 rule_files: Sequence[Path | str] = (), # rule files to evaluate (read where they are)
                 interval: str = "1s", # the scrape and the rule evaluation interval
                 port: int | None = None, # the port to listen on (a free one by default; pass one to scrape itself)
                 job: str = "mlpay-serve", # the job label of the targets (the ServiceMonitor's: the Service's name)
                 metrics_path: str = "/metrics",
                 exe: str | None = None, # the prometheus binary (default: `prometheus` on PATH)
                 startup_timeout: float = 30.0, # seconds to wait for /-/ready
                ):
        self.exe = exe or PROMETHEUS
        if self.exe is None: raise PrometheusError("prometheus is not installed (`make system-deps` installs Debian's)")
        self.targets, self.rule_files, self.interval = list(targets), [Path(f).resolve() for f in rule_files], interval
        self.port, self.job, self.metrics_path, self.startup_timeout = port or free_port(), job, metrics_path, startup_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        "The prometheus.yml the server runs with."
        return {"global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                           "scrape_timeout": self.interval},
                "rule_files": [str(f) for f in self.rule_files],
                "scrape_configs": [{"job_name": self.job, "metrics_path": self.metrics_path,
                                    "static_configs": [{"targets": self.targets}]}]}

    def start(self) -> "Prometheus":
        "Write the configuration, start the server and wait until it is ready."
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self._log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [self.exe, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                msg = f"prometheus exited with status {self.proc.returncode}:\n{self.log()}"
                self.stop()
                raise PrometheusError(msg)
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200: return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                msg = f"prometheus not ready after {self.startup_timeout}s:\n{self.log()}"
                self.stop()
                raise PrometheusError(msg)
            time.sleep(0.1)

    def stop(self):
        "Stop the server and remove its directory."
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        if getattr(self, "_log", None): self._log.close()
        if self.dir is not None: shutil.rmtree(self.dir, ignore_errors=True)
        self.proc, self.dir = None, None

    def __enter__(self) -> "Prometheus": return self.start()

    def __exit__(self, *exc): self.stop()

    def log(self) -> str:
        "What the server logged so far."
        return (self.dir / "prometheus.log").read_text() if self.dir and (self.dir / "prometheus.log").exists() else ""

    def api(self, path: str, **params) -> dict | list:
        "GET /api/v1/`path` with `params`: its `data`, or a PrometheusError with the server's message."
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r: body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise PrometheusError(f"GET {url}: {e.code} {body.get('errorType')}: {body.get('error')}") from None
        if body.get("status") != "success": raise PrometheusError(f"GET {url}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        "The instant vector of `expr` now: [{'metric': {label: value}, 'value': [time, 'value']}, ...]."
        data = self.api("query", query=expr)
        if data["resultType"] != "vector": raise PrometheusError(f"{expr!r} is a {data['resultType']}, not a vector")
        return data["result"]

    def value(self, expr: str) -> float | None:
        "The value of a one-series `expr` now (None when it has no series)."
        result = self.query(expr)
        if len(result) > 1: raise PrometheusError(f"{expr!r} has {len(result)} series: {[r['metric'] for r in result]}")
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> list[dict]:
        "The alerts pending or firing now (GET /api/v1/alerts)."
        return self.api("alerts")["alerts"]

    def firing(self, name: str | None = None) -> list[dict]:
        "The firing alerts (named `name`)."
        return [a for a in self.alerts() if a["state"] == "firing" and name in (None, a["labels"]["alertname"])]

    def targets_up(self) -> list[dict]:
        "The active targets that the last scrape reached."
        return [t for t in self.api("targets")["activeTargets"] if t["health"] == "up"]

    def wait_for(self, check: Callable[[], object], # returns something truthy once the awaited state holds
                 timeout: float = 30.0, what: str = "the condition"):
        "Poll `check` until it returns something truthy (returned) or `timeout` seconds pass (PrometheusError)."
        deadline = time.monotonic() + timeout
        while True:
            got = check()
            if got: return got
            if time.monotonic() > deadline: raise PrometheusError(f"{what} did not hold within {timeout}s:\n{self.log()}")
            time.sleep(0.2)
