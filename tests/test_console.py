"""mlpay-console: login, CSRF and bad input through FastAPI's test client; then end to end in a real headless Chromium
against a real mlpay-serve: log in, open the top case, resolve it as fraud, see the label reach the scoring server."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from conftest import BIN
from mlpay.cases import CaseStore
from mlpay.console import ConsoleSettings, add_user, create_app
from mlpay.decisions import DecisionLog, read_labels
from test_serve import KEY, Server, free_port, post

PASSWORD = "correct horse battery"
SECRET = "console-test-secret-" + "s" * 32


def decision_log(d: Path, n: int = 30) -> Path:
    "A finished decision log of `n` transactions of 5 cards at 4 terminals, every third one reviewed."
    t0 = datetime(2018, 9, 1)
    rows = {"transaction_id": np.arange(1, n + 1), "tx_datetime": np.array([t0 + timedelta(hours=7 * i) for i in range(n)], "datetime64[us]"),
            "customer_id": np.arange(n) % 5, "terminal_id": np.arange(n) % 4, "tx_amount": np.round(10.0 + 7.5 * np.arange(n), 2),
            "score": np.linspace(-3, 3, n), "probability": np.linspace(0.01, 0.95, n),
            "decision": ["review" if i % 3 == 2 else "approve" for i in range(n)],
            "reasons": [["AMOUNT", "CARD_VELOCITY"]] * n, "reason_shares": [[0.7, 0.3]] * n, "standin": [None] * n, "model_version": ["tiny-1"] * n}
    with DecisionLog(d / "log", max_file_age_s=0) as log: log.decisions(rows)
    return d / "log"


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def login(client, name="ana", password=PASSWORD):
    r = client.get("/login")
    return client.post("/login", data={"csrf": csrf_of(r.text), "username": name, "password": password, "next": "/"}, follow_redirects=False)


def fresh_database(server_url: str) -> str:
    "A new, empty database on the PostgreSQL server of `server_url`; its URL."
    import sqlalchemy as sa
    name = f"console_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c: c.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def console(request, tmp_path):
    "A console on a small decision log, its cases taken in (SQLite, or a real PostgreSQL server), through FastAPI's test client (the lifespan runs: intake and label threads)."
    add_user(tmp_path / "users.json", "ana", PASSWORD, n=2**10)
    add_user(tmp_path / "users.json", "bob", PASSWORD, n=2**10)
    where = {"cases_dir": tmp_path / "cases"} if request.param == "sqlite" else {"cases_url": fresh_database(request.getfixturevalue("postgres_url"))}
    s = ConsoleSettings(**where, users_file=tmp_path / "users.json", session_secret=SECRET,
                        decision_log_dir=decision_log(tmp_path), intake_interval_s=0.1, login_max_failures=3)
    with TestClient(create_app(s)) as client:
        store = client.app.state.console.store
        for _ in range(100):
            if store.count() == 10: break
            time.sleep(0.05)
        assert store.count() == 10
        yield client, store


def top_case(client) -> int:
    return int(re.search(r'href="/cases/(\d+)"', client.get("/").text).group(1))


def test_a_wrong_password_is_refused_and_throttled(console):
    client, _ = console
    r = login(client, password="not the password")
    assert r.status_code == 401 and "Wrong name or password" in r.text
    assert client.get("/", follow_redirects=False).status_code == 303  # still not logged in
    assert login(client, name="nobody").status_code == 401  # an unknown name is refused alike
    for _ in range(2): login(client, password="not the password")
    r = login(client)  # 3 failures for ana: even the right password waits now, unchecked
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "too many failed logins" in r.text
    assert login(client, name="bob").status_code == 303  # another analyst is not locked out


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(console):
    client, store = console
    assert login(client).status_code == 303
    case = top_case(client)
    events = store.events(case_id=case)
    for data in ({"resolution": "fraud"}, {"resolution": "fraud", "csrf": "forged"}):
        r = client.post(f"/cases/{case}/resolve", data=data)
        assert r.status_code == 403 and "CSRF" in r.text
    assert client.post(f"/cases/{case}/claim", data={}).status_code == 403
    other = TestClient(client.app)  # a token from another session is no good either
    assert login(other, name="bob").status_code == 303
    assert client.post(f"/cases/{case}/resolve", data={"resolution": "fraud", "csrf": csrf_of(other.get("/").text)}).status_code == 403
    assert store.get(case).status == "open" and store.events(case_id=case) == events
    assert client.post("/logout", data={}).status_code == 403  # logging out needs the token too (no forced logout)


def test_a_resolved_case_cannot_be_resolved_again(console):
    client, store = console
    login(client)
    case = top_case(client)
    token = csrf_of(client.get(f"/cases/{case}").text)
    r = client.post(f"/cases/{case}/resolve", data={"csrf": token, "resolution": "fraud", "note": "card holder: not me"})
    assert r.status_code == 200 and "resolved as fraud" in r.text
    r = client.post(f"/cases/{case}/resolve", data={"csrf": token, "resolution": "legitimate"})
    assert r.status_code == 409 and "resolved" in r.text
    c = store.get(case)
    assert (c.status, c.resolved_by) == ("fraud", "ana")
    assert top_case(client) != case  # it left the queue


def test_every_action_is_attributed_to_the_analyst(console):
    client, store = console
    login(client, name="bob")
    case = top_case(client)
    token = csrf_of(client.get(f"/cases/{case}").text)
    client.post(f"/cases/{case}/claim", data={"csrf": token})
    client.post(f"/cases/{case}/notes", data={"csrf": token, "text": "called the merchant"})
    client.post(f"/cases/{case}/resolve", data={"csrf": token, "resolution": "legitimate"})
    c = store.get(case)
    assert (c.status, c.assignee, c.resolved_by, c.notes[-1]["author"]) == ("legitimate", "bob", "bob", "bob")
    actors = {e["actor"] for e in store.events(case_id=case) if e["action"] != "opened"}
    assert actors == {"bob"}, store.events(case_id=case)
    audit = client.get("/audit").text
    assert all(f"<td>bob</td><td>{a}</td>" in audit for a in ("claimed", "note", "resolved")), audit[-2000:]


def test_a_claimed_case_is_not_claimed_twice(console):
    client, store = console
    login(client)
    case = top_case(client)
    assert client.post(f"/cases/{case}/claim", data={"csrf": csrf_of(client.get(f"/cases/{case}").text)}).status_code == 200
    other = TestClient(client.app)
    login(other, name="bob")
    page = other.get(f"/cases/{case}").text
    assert "ana is working this case" in page and 'id="claim"' not in page
    r = other.post(f"/cases/{case}/claim", data={"csrf": csrf_of(page)})
    assert r.status_code == 409 and "ana" in r.text
    assert store.get(case).assignee == "ana"


@pytest.mark.parametrize("path, field", [("/?min_amount=lots", "min_amount"), ("/?card=12x", "card"), ("/?status=deleted", "status"),
                                         ("/?page=0", "page"), ("/cases/abc", "case_id"), ("/audit?case=-", "case"),
                                         ("/cases/99999999999999999999", "case_id"), ("/?terminal=99999999999999999999", "terminal")])
def test_bad_input_is_a_422_naming_the_field(console, path, field):
    client, _ = console
    login(client)
    r = client.get(path)
    assert r.status_code == 422 and field in r.text, (r.status_code, r.text[-500:])


def test_bad_forms_are_refused_with_the_field_named(console):
    client, store = console
    login(client)
    case = top_case(client)
    token = csrf_of(client.get(f"/cases/{case}").text)
    for data, field in (({"resolution": "maybe"}, "resolution"), ({"resolution": "fraud", "note": "x" * 3000}, "note"),
                        ({"resolution": "fraud", "note": "pan 4111 1111 1111 1111"}, "note")):
        r = client.post(f"/cases/{case}/resolve", data={"csrf": token, **data})
        assert r.status_code == 422 and field in r.text, r.text[-400:]
    r = client.post(f"/cases/{case}/notes", data={"csrf": token, "text": "4111-1111-1111-1111"})
    assert r.status_code == 422 and "card number" in r.text
    assert store.get(case).status == "open" and not store.get(case).notes
    assert client.get("/cases/987654").status_code == 404
    assert client.post("/cases/987654/resolve", data={"csrf": token, "resolution": "fraud"}).status_code == 404
    assert client.post(f"/cases/{case}/resolve", data={"csrf": token, "resolution": "fraud", "note": "x" * 70_000}).status_code == 413


def test_notes_are_shown_escaped(console):
    client, _ = console
    login(client)
    case = top_case(client)
    token = csrf_of(client.get(f"/cases/{case}").text)
    client.post(f"/cases/{case}/notes", data={"csrf": token, "text": "<script>alert('x')</script> ignore your rules"})
    html = client.get(f"/cases/{case}").text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html and "<script>alert" not in html


def test_login_redirects_stay_on_the_site_and_sessions_end(console, tmp_path):
    client, _ = console
    r = client.get("/login")
    r = client.post("/login", data={"csrf": csrf_of(r.text), "username": "ana", "password": PASSWORD, "next": "//evil.example/x"}, follow_redirects=False)
    assert r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    page = client.get("/")
    assert page.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert float(page.headers["server-timing"].split("dur=")[1]) > 0
    users = json.loads((tmp_path / "users.json").read_text())
    del users["ana"]
    (tmp_path / "users.json").write_text(json.dumps(users))
    assert client.get("/", follow_redirects=False).status_code == 303  # a removed analyst is logged out at once


def test_health(console):
    client, _ = console
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["active_cases"] == 10 and r.json()["database"] == "ok", r.json()


def test_cli(tmp_path):
    users = tmp_path / "users.json"
    cli = [sys.executable, "-c", "from mlpay.console import main; main()"]
    p = subprocess.run([*cli, "add-user", "carla", "--users-file", users], input="a long enough password\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "carla" in json.loads(users.read_text()), p.stderr
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    p = subprocess.run([*cli, "add-user", "dan", "--users-file", users], input="short\n", capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "at least 12 characters" in p.stderr and "Traceback" not in p.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPAY_CONSOLE_")}
    p = subprocess.run([*cli, "serve"], capture_output=True, text=True, timeout=60, env={**env, "MLPAY_CONSOLE_CASES_DIR": str(tmp_path / "c")})
    assert p.returncode != 0 and "MLPAY_CONSOLE_SESSION_SECRET" in p.stderr and "Traceback" not in p.stderr, p.stderr


# -- end to end: a real mlpay-serve, a real mlpay-console, a real Chromium ---------------------------------------------------

class Console:
    "mlpay-console in a subprocess on a free port, ready when /health answers."
    def __init__(self, env: dict, log: Path):
        self.port, self.log = free_port(), open(log, "w")
        self.proc = subprocess.Popen([str(BIN / "mlpay-console"), "serve", "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **{k: str(v) for k, v in env.items()}})
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(120):
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r: self.health = json.loads(r.read())
                return
            except OSError: time.sleep(0.25)
        raise AssertionError("console not ready")

    def get_health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r: return json.loads(r.read())

    def stop(self):
        self.proc.terminate()
        try: self.proc.wait(15)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.log.close()


def until(check, timeout_s: float, what: str, every_s: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if (v := check()): return v
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def scored_reviews(server, package) -> int:
    "Send the package's test period to the server; how many it reviewed."
    tx = pl.read_parquet(package / "transactions.parquet").filter(pl.col("TX_TIME_DAYS") >= 150).sort("TX_DATETIME", "TRANSACTION_ID").head(6000)
    body = [{"transaction_id": r["TRANSACTION_ID"], "tx_datetime": r["TX_DATETIME"].isoformat(), "customer_id": r["CUSTOMER_ID"],
             "terminal_id": r["TERMINAL_ID"], "tx_amount": r["TX_AMOUNT"]} for r in tx.iter_rows(named=True)]
    reviews = 0
    for i in range(0, len(body), 1000):
        status, answer = post(server.port, "/predict", {"transactions": body[i:i + 1000]})
        assert status == 200, answer
        reviews += sum(a["decision"] == "review" for a in json.loads(answer)["results"])
    return reviews


def test_end_to_end_in_chromium(package, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists(): pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    shots = os.environ.get("MLPAY_SCREENSHOTS")
    log_dir = tmp_path / "log"
    server = Server(package / "model", MLPAY_WARM_FROM=package / "history.parquet", MLPAY_DECISION_LOG_DIR=log_dir,
                    MLPAY_DECISION_LOG_FILE_AGE_S=1, MLPAY_OBSERVE_EVERY_S=0.1)
    console = None
    try:
        reviews = scored_reviews(server, package)
        assert reviews > 0
        add_user(tmp_path / "users.json", "ana", PASSWORD, n=2**10)
        console = Console({"MLPAY_CONSOLE_CASES_DIR": tmp_path / "cases", "MLPAY_CONSOLE_DECISION_LOG_DIR": log_dir,
                           "MLPAY_CONSOLE_MODEL": package / "model", "MLPAY_CONSOLE_TRANSACTIONS": package / "transactions.parquet",
                           "MLPAY_CONSOLE_SCORING_URL": f"http://127.0.0.1:{server.port}", "MLPAY_CONSOLE_API_KEY": KEY,
                           "MLPAY_CONSOLE_USERS_FILE": tmp_path / "users.json", "MLPAY_CONSOLE_SESSION_SECRET": SECRET,
                           "MLPAY_CONSOLE_INTAKE_INTERVAL_S": 0.5}, tmp_path / "console.log")
        # every review becomes a case once its log file is finished and taken in: wait for all, so the top case stays the top
        until(lambda: console.get_health()["active_cases"] == reviews and console.get_health()["evidence"] == "loaded", 60, "the console's intake")
        store = CaseStore(tmp_path / "cases")
        top = store.queue(limit=1)[0]
        problems = []
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"], headless=True)
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(f"{console.url}/")
            assert "/login" in page.url
            page.fill("input[name=username]", "ana")
            page.fill("input[name=password]", PASSWORD)
            page.click("button:has-text('Log in')")
            page.wait_for_selector("table.cases")
            assert page.locator("#case-count").inner_text() == f"{store.count():,}"
            if shots: page.screenshot(path=f"{shots}/console-queue.png", full_page=True)
            # a filter change fetches the table alone (htmx) and puts the filters in the address
            page.select_option("select[name=status]", "all")
            page.wait_for_url(re.compile(r"status=all"))
            assert page.locator("#case-count").inner_text() == f"{store.count(status=()):,}"
            page.select_option("select[name=status]", "active")
            page.wait_for_url(re.compile(r"status=active"))
            page.locator("a.case-link").first.click()
            page.wait_for_selector("#reasons-chart")
            assert page.url.endswith(f"/cases/{top.id}")
            # the charts were drawn (Chart.js registers each canvas), with the script the CSP allows
            drawn = page.evaluate("() => ['reasons-chart', 'timeline-chart'].map(id => !!Chart.getChart(document.getElementById(id)))")
            assert drawn == [True, True]
            if shots: page.screenshot(path=f"{shots}/console-case.png", full_page=True)
            page.fill("form#resolve textarea[name=note]", "card holder confirmed it was not them")
            t0 = time.monotonic()
            page.click("button:has-text('Resolve as fraud')")
            page.wait_for_selector("#case-status.fraud")
            case = until(lambda: (c := store.get(top.id)).feedback_at and c, 5, "the label accepted by the scoring server")
            reached_s = time.monotonic() - t0
            page.reload()
            assert "accepted by the scoring server" in page.locator("#label-state").inner_text()
            browser.close()
        assert not problems, problems  # no script error, no CSP violation
        assert (case.status, case.resolved_by, case.notes[-1]["text"]) == ("fraud", "ana", "card holder confirmed it was not them")
        assert reached_s < 5, reached_s
        # the scoring server logged the label (in its next finished label file) ...
        def logged():
            lb = read_labels(log_dir).filter(pl.col("transaction_id") == top.transaction_id)
            return lb.row(0, named=True) if lb.height else None
        mine = until(logged, 15, "the label in the server's decision log")
        assert mine["fraud"] is True
        # ... and knows the transaction in its state: the same label again is accepted, an unknown id is not
        status, answer = post(server.port, "/feedback", {"labels": [{"transaction_id": top.transaction_id, "fraud": True}, {"transaction_id": 999_999_999, "fraud": True}]})
        assert (status, json.loads(answer)) == (200, {"accepted": 1, "unknown": [999_999_999]})
    finally:
        if console: console.stop()
        server.stop()
