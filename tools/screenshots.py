"""Screenshots of the analyst console for the README: the queue and a case page, from the real decision log.

mlpay-console is started in a subprocess on the default data's decision log (artifacts/decisions: the test period's
review decisions become cases), with the model (artifacts/model) and the transactions (data/transactions.parquet:
their labels, known label_delay_days after each transaction, mark the card's timeline); a few cases are claimed by
analysts, so the queue looks worked, and the agent (mlpay-agent, deterministic planner) investigates the top one; headless Chromium (Debian's) logs in and takes the pictures.

    python tools/screenshots.py [--out nbs/images] [--decisions artifacts/decisions] [--model artifacts/model] [--transactions data/transactions.parquet]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PASSWORD = "screenshot password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r: return json.loads(r.read())
    except OSError: return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "nbs" / "images")
    p.add_argument("--decisions", type=Path, default=ROOT / "artifacts" / "decisions")
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model")
    p.add_argument("--transactions", type=Path, default=ROOT / "data" / "transactions.parquet")
    p.add_argument("--no-agent", action="store_true", help="no agent investigation on the case page")
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from mlpay.cases import CaseStore
    from mlpay.console import add_user
    from mlpay.files import atomic_path
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name in ("ana", "ben", "chloe"): add_user(d / "users.json", name, PASSWORD, n=2**14)
        port, log = free_port(), open(d / "console.log", "w")
        env = {**os.environ, "MLPAY_CONSOLE_CASES_DIR": str(d / "cases"), "MLPAY_CONSOLE_DECISION_LOG_DIR": str(a.decisions),
               "MLPAY_CONSOLE_MODEL": str(a.model), "MLPAY_CONSOLE_TRANSACTIONS": str(a.transactions),
               "MLPAY_CONSOLE_USERS_FILE": str(d / "users.json"), "MLPAY_CONSOLE_SESSION_SECRET": "screenshots-" + "s" * 32}
        proc = subprocess.Popen([str(BIN / "mlpay-console"), "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            t0 = time.monotonic()
            while not ((h := health(url)) and h["active_cases"] and h["evidence"] == "loaded"):
                if proc.poll() is not None or time.monotonic() - t0 > 300: raise SystemExit(f"console not ready: {(d / 'console.log').read_text()[-2000:]}")
                time.sleep(0.5)
            store = CaseStore(d / "cases")
            queue = store.queue(limit=12)
            for c, who in zip(queue[3:12:4], ("ben", "chloe", "ben")): store.claim(c.id, who)  # a worked queue: some cases taken
            top = queue[0]
            store.add_note(top.id, "ben", "Card holder unreachable by phone; SMS sent. Same terminal flagged yesterday.")
            if not a.no_agent:  # the agent's investigation of the top case, over real stdio MCP (read-only tools)
                agent_env = {**os.environ, "MLPAY_MCP_DECISION_LOG_DIR": str(a.decisions), "MLPAY_MCP_TRANSACTIONS": str(a.transactions),
                             "MLPAY_MCP_MODEL": str(a.model), "MLPAY_MCP_CASES_URL": str(d / "cases"), "MLPAY_MCP_AUDIT_LOG": str(d / "audit.jsonl")}
                r = subprocess.run([str(BIN / "mlpay-agent"), "investigate", str(top.id)], env=agent_env, capture_output=True, text=True, timeout=600)
                if r.returncode: print(f"warning: no investigation on the case page: mlpay-agent exited {r.returncode}: {r.stderr[-500:]}", file=sys.stderr)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"], headless=True)
                page = browser.new_page(viewport={"width": 1360, "height": 980}, device_scale_factor=1)
                page.goto(f"{url}/login")
                page.fill("input[name=username]", "ana")
                page.fill("input[name=password]", PASSWORD)
                page.click("button:has-text('Log in')")
                page.wait_for_selector("table.cases")
                a.out.mkdir(parents=True, exist_ok=True)
                with atomic_path(a.out / "console-queue.png") as tmp: page.screenshot(path=str(tmp), type="png")
                page.goto(f"{url}/cases/{top.id}")
                page.wait_for_selector("#timeline-chart")
                page.wait_for_function("() => !!Chart.getChart(document.getElementById('timeline-chart'))")
                with atomic_path(a.out / "console-case.png") as tmp: page.screenshot(path=str(tmp), type="png", full_page=True)
                browser.close()
            print(f"wrote {a.out / 'console-queue.png'} and {a.out / 'console-case.png'} ({store.count():,} open cases, case #{top.id})")
        finally:
            proc.terminate()
            try: proc.wait(15)
            except subprocess.TimeoutExpired: proc.kill()
            log.close()


if __name__ == "__main__":
    main()
