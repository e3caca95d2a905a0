"""mlpay-mcp over real transports: the handshake and tool calls over stdio (the SDK's stdio client spawning the server),
streamable HTTP (a uvicorn subprocess, Bearer keys, 401 without one), an approved write reaching a real scoring server,
the package-backed tools (model card, what-if, gate report, monitoring), and `mlpay-mcp audit verify` as a command."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import httpx2
import mcp_types
import polars as pl
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from conftest import BIN
from mlpay.cases import CaseStore
from mlpay.decisions import DecisionLog
from mlpay.ledger import read_ledger, verify
from mlpay.mcpserver import McpSettings, build_server, new_key
from test_serve import free_port

MAIN = [str(BIN / "mlpay-mcp")]  # the console script, as installed
SCORING_KEY = "mcp-test-scoring-" + "k" * 16


def run(fn):
    "anyio.run(fn), raising the first error itself rather than the task groups' exception groups around it."
    try: return anyio.run(fn)
    except BaseExceptionGroup as g:
        e = g
        while isinstance(e, BaseExceptionGroup): e = e.exceptions[0]
        raise e from None


def write_log(directory: Path, rows: dict) -> None:
    "Decisions written through the real DecisionLog (finished files at once)."
    with DecisionLog(directory, max_file_age_s=0) as dl: dl.decisions(rows)


@pytest.fixture
def world(tmp_path):
    "A decision log (cards 7, 8, 9; two reviews), the transactions with their labels, a case store, two clients' keys."
    t = [datetime(2018, 8, 20, 9), datetime(2018, 8, 30, 12), datetime(2018, 9, 1, 10), datetime(2018, 9, 1, 11), datetime(2018, 9, 1, 13)]
    cols = {"transaction_id": [1, 2, 3, 4, 5], "tx_datetime": t, "customer_id": [7, 7, 7, 8, 9], "terminal_id": [3, 4, 3, 3, 3],
            "tx_amount": [35.0, 12.0, 480.0, 900.0, 20.0]}
    write_log(tmp_path / "log", {**cols, "score": [0.2, 0.1, 0.6, 0.5, 0.95], "probability": [0.02, 0.01, 0.4, 0.3, 0.9],
                                 "decision": ["approve", "approve", "review", "review", "decline"],
                                 "reasons": [[], [], ["AMOUNT", "TERMINAL_FRAUD"], ["AMOUNT"], ["AMOUNT"]],
                                 "reason_shares": [[], [], [0.6, 0.4], [1.0], [1.0]], "standin": [None] * 5, "model_version": ["v1"] * 5})
    pl.DataFrame({k.upper(): v for k, v in cols.items()} | {"TX_FRAUD": [1, 0, 1, 0, 1]}).write_parquet(tmp_path / "transactions.parquet")
    with CaseStore(tmp_path / "cases") as store: assert store.intake(tmp_path / "log") == 2
    (writer, w_entry), (reader, r_entry) = new_key("agent", "write"), new_key("viewer", "read")
    (tmp_path / "keys.json").write_text(json.dumps({**w_entry, **r_entry}))
    env = {"MLPAY_MCP_DECISION_LOG_DIR": str(tmp_path / "log"), "MLPAY_MCP_TRANSACTIONS": str(tmp_path / "transactions.parquet"),
           "MLPAY_MCP_LABEL_DELAY_DAYS": "7", "MLPAY_MCP_CASES_URL": str(tmp_path / "cases"),
           "MLPAY_MCP_AUDIT_LOG": str(tmp_path / "audit" / "mcp.jsonl"), "MLPAY_MCP_KEYS_FILE": str(tmp_path / "keys.json")}
    return {"dir": tmp_path, "env": env, "write_key": writer, "read_key": reader, "audit": tmp_path / "audit" / "mcp.jsonl"}


def stdio(world, key, **env):
    return StdioServerParameters(command=MAIN[0], args=MAIN[1:], env={**world["env"], "MLPAY_MCP_KEY": key, **env})


def approve(answer: bool):
    async def human(context, params):
        return mcp_types.ElicitResult(action="accept", content={"approve": answer})
    return human


def test_stdio_handshake_and_read_tools(world):
    async def go():
        async with Client(stdio(world, world["read_key"])) as c:  # the SDK's default: discover, else the initialize handshake
            assert c.server_info.name == "mlpay"
            names = {t.name for t in (await c.list_tools()).tools}
            assert "explain_decision" in names and "resolve_case" not in names  # a read-only server: no write tool at all
            r = await c.call_tool("explain_decision", {"transaction_id": 3})
            assert not r.is_error and r.structured_content["decision"] == "review"
            assert json.loads(r.content[0].text) == r.structured_content
            early = await c.call_tool("card_timeline", {"customer_id": 7, "as_of": "2018-08-25T00:00:00"})
            late = await c.call_tool("card_timeline", {"customer_id": 7, "as_of": "2018-09-01T10:00:00"})
            bad = await c.call_tool("card_timeline", {"customer_id": "seven", "as_of": "2018-09-01T10:00:00"})
            return early.structured_content, late.structured_content, bad
    early, late, bad = run(go)
    # point in time, through the tool: the fraud of 20 August is known 7 days later, not before
    assert [(x["transaction_id"], x["fraud"]) for x in early["transactions"]] == [(1, None)]
    assert [(x["transaction_id"], x["fraud"]) for x in late["transactions"]] == [(1, True), (2, None), (3, None)]
    assert bad.is_error and "customer_id\n  Input should be a valid integer" in bad.content[0].text
    recs = list(read_ledger(world["audit"]))
    assert [(r["client"], r["transport"], r["tool"], r["outcome"]) for r in recs] == [
        ("viewer", "stdio", "explain_decision", "ok"), ("viewer", "stdio", "card_timeline", "ok"), ("viewer", "stdio", "card_timeline", "ok"),
        ("viewer", "stdio", "card_timeline", "error")]
    assert verify(world["audit"]) == []


def test_stdio_write_asks_the_human_and_acts_only_on_approval(world):
    store = CaseStore(world["dir"] / "cases")
    case = store.queue()[0]
    answers, asked = [False, True], []
    async def human(context, params):  # the person at the client: refuses the first time, approves the second
        asked.append(params.message)
        return mcp_types.ElicitResult(action="accept", content={"approve": answers.pop(0)})
    async def go():
        # mode="legacy": the initialize handshake, and the question as a request within the call (the pre-2026 protocol)
        async with Client(stdio(world, world["write_key"], MLPAY_MCP_WRITES="true"), mode="legacy", elicitation_callback=human) as c:
            assert c.server_info.name == "mlpay" and not c.protocol_version.startswith("2026")
            assert {"resolve_case", "propose_thresholds"} <= {t.name for t in (await c.list_tools()).tools}
            refused = await c.call_tool("resolve_case", {"case_id": case.id, "fraud": True, "note": "checked with the card holder"})
            assert store.get(case.id).status == "open"
            done = await c.call_tool("resolve_case", {"case_id": case.id, "fraud": True, "note": "checked with the card holder"})
        return refused.structured_content, done.structured_content
    refused, done = run(go)
    assert (refused["resolved"], refused["approval"]) == (False, "declined")
    assert (done["resolved"], done["status"], done["resolved_by"]) == (True, "fraud", "mcp:agent:approved-by-human")
    assert len(asked) == 2 and f"resolve case {case.id} as FRAUD" in asked[0]
    assert store.get(case.id).status == "fraud"
    assert [(r["outcome"], r["approval"]) for r in read_ledger(world["audit"])] == [("ok", "declined"), ("acting", "approved"), ("ok", "approved")]
    store.close()


class McpHttp:
    "mlpay-mcp over streamable HTTP in a subprocess, ready when its port answers."
    def __init__(self, env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc = subprocess.Popen([*MAIN, "serve", "--transport", "http", "--port", str(self.port)], env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for _ in range(240):
            assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5): return
            except OSError: time.sleep(0.25)
        raise AssertionError("mlpay-mcp did not start")

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()


def test_streamable_http_with_bearer_keys(world):
    s = McpHttp({**world["env"], "MLPAY_MCP_WRITES": "true"})
    try:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                                                                "clientInfo": {"name": "t", "version": "0"}}}
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):  # no key, a wrong key: 401 before any MCP
            r = httpx2.post(s.url, json=init, headers={**headers, "Accept": "application/json, text/event-stream"})
            assert r.status_code == 401, r.text
        async def session(key, **kw):
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as h:
                async with Client(streamable_http_client(s.url, http_client=h), **kw) as c:
                    q = await c.call_tool("case_queue", {"status": "active"})
                    try: w = await c.call_tool("resolve_case", {"case_id": q.structured_content["cases"][0]["id"], "fraud": False})
                    except MCPError as e: w = e
                    return q, w
        q, refused = run(lambda: session(world["read_key"], elicitation_callback=approve(True)))
        assert q.structured_content["count"] == 2
        assert isinstance(refused, MCPError) and "'viewer' has the read scope" in str(refused)
        q, done = run(lambda: session(world["write_key"], elicitation_callback=approve(True)))  # modern protocol: an input_required round
        assert done.structured_content["resolved"] and done.structured_content["resolved_by"] == "mcp:agent:approved-by-human"
    finally: s.stop()
    recs = list(read_ledger(world["audit"]))
    assert {(r["client"], r["transport"]) for r in recs} == {("viewer", "http"), ("agent", "http")}
    assert [(r["client"], r["tool"], r["outcome"]) for r in recs if r["tool"] == "resolve_case"] == [
        ("viewer", "resolve_case", "refused"), ("agent", "resolve_case", "input_required"), ("agent", "resolve_case", "acting"), ("agent", "resolve_case", "ok")]
    assert verify(world["audit"]) == []


def test_audit_verify_command_catches_an_edited_and_a_deleted_record(world):
    srv = build_server(McpSettings(**{k.removeprefix("MLPAY_MCP_").lower(): v for k, v in world["env"].items()}, key=world["read_key"]))
    async def go():
        async with Client(srv) as c:
            for i in (3, 4, 99): await c.call_tool("explain_decision", {"transaction_id": i})
    run(go)
    audit, good = world["audit"], world["audit"].read_text()
    code, out = verify_command(audit)
    assert code == 0 and "intact: 3 record(s)" in out, out
    audit.write_text(good.replace('"transaction_id":4}', '"transaction_id":5}', 1))  # someone edits what was asked ...
    proc = subprocess.run([*MAIN, "audit", "verify", str(audit)], capture_output=True, text=True)  # (once as the real command)
    assert proc.returncode == 1 and "line 2 (seq 2): its hash does not match its contents: the record was edited" in proc.stdout, proc.stdout + proc.stderr
    lines = good.splitlines(keepends=True)
    audit.write_text(lines[0] + lines[2])  # ... or deletes a record
    code, out = verify_command(audit)
    assert code == 1 and "line 2 (seq 3): follows seq 1: seq 2 deleted" in out
    audit.write_text(good.replace('"transaction_id":4}', '"transaction_id":5}', 1))
    assert verify_command(audit)[0] == 1


def verify_command(path) -> tuple[int, str]:
    "`mlpay-mcp audit verify PATH` in this process: (exit code, output)."
    import contextlib
    import io
    from mlpay.mcpserver import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try: main(["audit", "verify", str(path)]); return 0, out.getvalue()
        except SystemExit as e: return e.code, out.getvalue()


class Scoring:
    "mlpay-serve in a subprocess (the real scoring server), ready when /health says so."
    def __init__(self, model):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(BIN / "mlpay-serve"), "--model", str(model), "--port", str(self.port)],
                                     env={**os.environ, "MLPAY_API_KEY": SCORING_KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        for _ in range(240):
            assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200: return
            except OSError: pass
            time.sleep(0.5)
        raise AssertionError("mlpay-serve did not start")

    def predict(self, tx):
        req = urllib.request.Request(self.url + "/predict", data=json.dumps(tx).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {SCORING_KEY}"})
        with urllib.request.urlopen(req, timeout=10) as r: return json.loads(r.read())

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try: self.proc.wait(30)
        except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()


def package_world(package, tmp_path):
    "Decisions of the package's model version over its transactions' last 14 days (probabilities from the labels), a case store, reports."
    from mlpay.package import load_package
    m = load_package(package / "model").manifest
    tx = pl.read_parquet(package / "transactions.parquet").sort("TX_DATETIME")
    end = tx["TX_DATETIME"].max()
    tx = tx.filter(pl.col("TX_DATETIME") > end - timedelta(days=14))
    p = (tx["TX_FRAUD"].cast(pl.Float64) * 0.6 + (tx["TX_AMOUNT"] / tx["TX_AMOUNT"].max()) * 0.3).clip(0, 1)
    th = m["thresholds"]
    decision = [("decline" if x >= th["decline"] else "review" if x >= th["review"] else "approve") for x in p]
    write_log(tmp_path / "log", {"transaction_id": tx["TRANSACTION_ID"].to_list(), "tx_datetime": tx["TX_DATETIME"].to_list(),
                                 "customer_id": tx["CUSTOMER_ID"].to_list(), "terminal_id": tx["TERMINAL_ID"].to_list(), "tx_amount": tx["TX_AMOUNT"].to_list(),
                                 "score": p.to_list(), "probability": p.to_list(), "decision": decision, "reasons": [["AMOUNT"]] * len(tx),
                                 "reason_shares": [[1.0]] * len(tx), "standin": [None] * len(tx), "model_version": [m["version"]] * len(tx)})
    (tmp_path / "reports" / "gate").mkdir(parents=True)
    (tmp_path / "reports" / "gate" / "report.json").write_text(json.dumps({"decision": "promote", "why": "test", "checks": []}))
    (tmp_path / "reports" / "monitor.json").write_text(json.dumps({"model_version": m["version"], "alarm_days": {"feature_drift": 0}}))
    return m, McpSettings(decision_log_dir=tmp_path / "log", transactions=package / "transactions.parquet", cases_url=str(tmp_path / "cases"),
                          model=package / "model", reports_dir=tmp_path / "reports", audit_log=tmp_path / "audit.jsonl")


def test_package_tools_model_card_whatif_gate_monitoring_and_a_proposal(package, tmp_path):
    m, settings = package_world(package, tmp_path)
    key, entry = new_key("agent", "write")
    (tmp_path / "keys.json").write_text(json.dumps(entry))
    srv = build_server(settings.model_copy(update={"writes": True, "keys_file": tmp_path / "keys.json", "key": key}))
    served = (package / "model" / "manifest.json").read_bytes()
    async def go():
        async with Client(srv, elicitation_callback=approve(True)) as c:
            r = {name: await c.call_tool(name, {}) for name in ("model_card", "gate_report", "monitoring_status")}
            r["whatif"] = await c.call_tool("threshold_whatif", {"review": 0.2, "decline": 0.8, "days": 14})
            r["crossed"] = await c.call_tool("threshold_whatif", {"review": 0.9, "decline": 0.2})
            r["out_of_range"] = await c.call_tool("threshold_whatif", {"review": 1.5, "decline": 0.2})
            r["proposal"] = await c.call_tool("propose_thresholds", {"review": 0.2, "decline": 0.8, "rationale": "fewer reviews, same catch"})
            return r
    r = run(go)
    card = r["model_card"].structured_content
    assert card["version"] == m["version"] and card["thresholds"]["review"] == m["thresholds"]["review"]
    assert card["label_delay_days"] == m["state"]["label_delay_days"] and {c["code"] for c in card["reasons"]["codes"]} >= {"AMOUNT"}
    assert r["gate_report"].structured_content["decision"] == "promote"
    assert r["monitoring_status"].structured_content["report"]["model_version"] == m["version"]
    w = r["whatif"].structured_content
    assert w["model_version"] == m["version"] and w["proposed"]["review"] == 0.2 and w["current"]["review"] == m["thresholds"]["review"]
    assert w["n_labelled"] > 0 and w["proposed"]["cost"] is not None  # labels older than the delay are known by the window's end
    assert r["crossed"].is_error and "review (0.9) must not exceed decline (0.2)" in r["crossed"].content[0].text
    assert r["out_of_range"].is_error and "review\n  Input should be less than or equal to 1" in r["out_of_range"].content[0].text
    prop = r["proposal"].structured_content
    assert (prop["recorded"], prop["applied"], prop["approval"]) == (True, False, "approved")
    written = json.loads(Path(prop["path"]).read_text())
    assert written["review"] == 0.2 and written["proposed_by"] == "mcp:agent" and written["whatif"]["proposed"]["review"] == 0.2
    assert Path(prop["path"]).parent == tmp_path / "proposals"
    assert (package / "model" / "manifest.json").read_bytes() == served  # the serving thresholds do not change


def test_approved_resolution_reaches_the_scoring_server(package, tmp_path):
    m, settings = package_world(package, tmp_path)
    scoring = Scoring(package / "model")
    try:
        # the scoring server scores a transaction (its state now knows it); the decision log says review: a case opens
        tid = 40_000_001
        tx = {"transaction_id": tid, "tx_datetime": "2018-09-30T12:00:00", "customer_id": 7, "terminal_id": 11, "tx_amount": 420.0}
        answer = scoring.predict(tx)
        write_log(tmp_path / "log", {"transaction_id": [tid], "tx_datetime": [datetime(2018, 9, 30, 12)], "customer_id": [7], "terminal_id": [11],
                                     "tx_amount": [420.0], "score": [answer.get("score")], "probability": [0.5], "decision": ["review"],
                                     "reasons": [["AMOUNT"]], "reason_shares": [[1.0]], "standin": [None], "model_version": [m["version"]]})
        with CaseStore(settings.cases_url) as store: store.intake(tmp_path / "log")
        key, entry = new_key("agent", "write")
        (tmp_path / "keys.json").write_text(json.dumps(entry))
        settings = settings.model_copy(update={"writes": True, "keys_file": tmp_path / "keys.json", "key": key, "scoring_url": scoring.url,
                                               "scoring_api_key": SCORING_KEY})
        store = CaseStore(settings.cases_url)
        case = store.find(tid)
        srv = build_server(settings)
        async def go():
            async with Client(srv, elicitation_callback=approve(True)) as c:
                live = await c.call_tool("monitoring_status", {})
                t0 = time.perf_counter()
                done = await c.call_tool("resolve_case", {"case_id": case.id, "fraud": True, "note": "confirmed"})
                return live.structured_content, done.structured_content, time.perf_counter() - t0
        live, done, seconds = run(go)
        assert live["live"]["ready"] is True
        assert (done["resolved"], done["label_sent"], done["labels_accepted"], done["send_error"]) == (True, True, 1, None), done
        assert store.get(case.id).feedback_at is not None
        assert seconds < 1.0, seconds
        store.close()
    finally: scoring.stop()
