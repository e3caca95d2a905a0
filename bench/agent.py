"""The investigating agent (mlpay.agent): the replay evaluation on the default data's test period, and the time the
deterministic agent takes to investigate a case over a real stdio mlpay-mcp.

1. Replay. Every review case of the decision log (artifacts/decisions: the package's test period replayed through
   mlpay-serve) is opened in a fresh case store and investigated by the deterministic agent as of the end of its day
   (a daily queue worked the next morning), through the MCP server's own tool functions in process (governed and
   audited like the server's). Assumptions: the data's labels (TX_FRAUD) are known label_delay_days (7) after each
   transaction; simulated analysts resolve each day's cases with their true label by the end of the next day
   (agent.replay.resolve_after_days), and a resolution is a label from then on. The rule's weights
   (conf/agent/default.yaml) were fitted on the first agent.replay.validation_days (10) days only; the report is on the rest,
   with the rule refitted on the validation days beside it (it should match the configured one).
2. Latency. One `mlpay-mcp serve --transport stdio` spawned by the agent (JSON-RPC over pipes, the server's audit log
   on), then --cases cases of the test days investigated one after the other (4 tool calls each: get_case,
   explain_decision, card_timeline, terminal_timeline): median and p95 per case; and the single read-only calls.

    python bench/agent.py [--log artifacts/decisions] [--data data/transactions.parquet] [--model artifacts/model] [--cases 50]
"""
import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime, time as dtime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from _common import print_table, save

from mlpay.agent import AgentSettings, DeterministicPlanner, agent_config, connect, investigate, replay_evaluation, split_days


def pct(x): return f"{100 * x:.1f}%"


async def stdio_latency(env: dict, cases: list[tuple[int, datetime, int, int]], cfg) -> dict:
    "Investigate `cases` (case id, as_of, transaction id, card) over one spawned stdio server; timings in ms."
    planner = DeterministicPlanner(cfg.deterministic)
    t0 = time.perf_counter()
    async with connect(AgentSettings(), env=env) as tools:
        ready = time.perf_counter() - t0
        await investigate(cases[0][0], tools, planner, as_of=cases[0][1])  # the first call of each tool warms its caches
        per_case, explain, card = [], [], []
        for cid, as_of, tid, customer in cases:
            t = time.perf_counter()
            await investigate(cid, tools, planner, as_of=as_of)
            per_case.append(1000 * (time.perf_counter() - t))
        for _, as_of, tid, customer in cases:
            t = time.perf_counter(); await tools.call("explain_decision", {"transaction_id": tid}); explain.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter(); await tools.call("card_timeline", {"customer_id": customer, "as_of": as_of.isoformat(), "days": 30})
            card.append(1000 * (time.perf_counter() - t))
    q = lambda v: {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)), "max": float(np.max(v))}
    return {"server_ready_s": ready, "cases": len(per_case), "investigate_ms": q(per_case), "explain_decision_ms": q(explain), "card_timeline_30d_ms": q(card)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", default="artifacts/decisions", type=Path)
    p.add_argument("--data", default="data/transactions.parquet", type=Path)
    p.add_argument("--model", default="artifacts/model", type=Path)
    p.add_argument("--cases", type=int, default=50, help="cases investigated over stdio for the latency")
    a = p.parse_args()
    cfg = agent_config()
    work = Path(tempfile.mkdtemp(prefix="mlpay-agent-bench-"))
    t0 = time.perf_counter()
    frame, rep = replay_evaluation(a.log, a.data, a.model, work / "replay", cfg)
    replay_s = time.perf_counter() - t0
    val, test = split_days(frame, cfg.replay.validation_days)

    rows = []
    for name, part, r in [("validation (first 10 days: the rule's weights were fitted here)", val, rep["validation"]), ("test (the rest)", test, rep["test"]),
                          ("test, rule refitted on validation", test, rep["refit"]["test"])]:
        rows.append([name, f"{part['day'].min()}..{part['day'].max()}", r["cases"], pct(r["fraud_share"]), pct(r["agreement"]),
                     pct(r["baseline_always_legitimate"]), pct(r["baseline_model_probability"])])
    print_table("Agreement of the deterministic agent's recommendation with the true label, review cases",
                ["days", "dates", "cases", "fraud share", "agent", "always legitimate", "model probability >= 0.5"], rows)
    rows = []
    for k, r in rep["test"]["top_k"].items():
        rows.append([k, r["cases"], r["agent_priority"], r["score"], r["queue_priority"]])
    print_table(f"Fraud among each day's first k cases, test days ({rep['test']['days']} days, {rep['test']['cases']} cases)",
                ["k", "cases in the first k", "by the agent's priority", "by the score alone", "by the queue's priority (expected loss)"], rows)
    tx = pl.read_parquet(a.data, columns=["TRANSACTION_ID", "TX_FRAUD_SCENARIO"]) if "TX_FRAUD_SCENARIO" in pl.read_parquet_schema(a.data) else None
    scenario = {}
    if tx is not None:
        t = test.join(tx, left_on="transaction_id", right_on="TRANSACTION_ID").with_columns(ok=(pl.col("recommendation") == "fraud") == pl.col("fraud"))
        g = t.group_by("TX_FRAUD_SCENARIO").agg(pl.len().alias("n"), pl.col("ok").mean().alias("agree")).sort("TX_FRAUD_SCENARIO")
        scenario = {str(s): {"cases": n, "agreement": float(x)} for s, n, x in g.iter_rows()}
        names = {0: "genuine", 1: "fraud: amount > 220", 2: "fraud: compromised terminal", 3: "fraud: compromised card"}
        print_table("Test days by the simulator's scenario", ["scenario", "cases", "agreement"],
                    [[names.get(int(s), s), v["cases"], pct(v["agreement"])] for s, v in scenario.items()])
    print(f"\nconfigured rule: bias {rep['settings']['rule']['bias']}, weights {json.dumps(rep['settings']['rule']['weights'])}")
    print(f"refitted on the validation days: bias {rep['refit']['bias']}, weights {json.dumps(rep['refit']['weights'])}")
    print(f"replay: {len(frame)} cases in {replay_s:.0f} s; in process {1000 * rep['seconds_per_case']['median']:.0f} ms median, "
          f"{1000 * rep['seconds_per_case']['p95']:.0f} ms p95 per case")

    ids = test.sort("tx_datetime")
    pick = np.linspace(0, len(ids) - 1, min(a.cases, len(ids))).round().astype(int)
    cases = [(int(r["case_id"]), datetime.combine(r["day"], dtime()) + timedelta(days=1), int(r["transaction_id"]), None) for r in ids[pick.tolist()].iter_rows(named=True)]
    dec = pl.read_parquet(a.data, columns=["TRANSACTION_ID", "CUSTOMER_ID"]).filter(pl.col("TRANSACTION_ID").is_in([c[2] for c in cases]))
    card = dict(zip(dec["TRANSACTION_ID"].to_list(), dec["CUSTOMER_ID"].to_list()))
    cases = [(c, at, tid, int(card[tid])) for c, at, tid, _ in cases]
    env = {"MLPAY_MCP_DECISION_LOG_DIR": str(a.log.resolve()), "MLPAY_MCP_TRANSACTIONS": str(a.data.resolve()),
           "MLPAY_MCP_CASES_URL": str(work / "replay" / "cases"), "MLPAY_MCP_MODEL": str(a.model.resolve()),
           "MLPAY_MCP_AUDIT_LOG": str(work / "audit-stdio.jsonl"), "MLPAY_MCP_RATE_PER_MINUTE": "100000", "MLPAY_MCP_RATE_BURST": "100000"}
    lat = asyncio.run(stdio_latency(env, cases, cfg))
    f = lambda d: f"{d['median']:.1f} / {d['p95']:.1f} / {d['max']:.1f}"
    print_table(f"Over a real stdio mlpay-mcp (spawned once: ready in {lat['server_ready_s']:.1f} s), {lat['cases']} cases of the test days",
                ["what", "median / p95 / max ms", "target"],
                [["investigate a case (deterministic, 4 tool calls)", f(lat["investigate_ms"]), "<= 1000 ms"],
                 ["explain_decision", f(lat["explain_decision_ms"]), "<= 50 ms median"],
                 ["card_timeline, 30 days", f(lat["card_timeline_30d_ms"]), "<= 50 ms median"]])
    save("agent", {"replay": rep, "replay_seconds": replay_s, "by_scenario": scenario, "stdio": lat})


if __name__ == "__main__":
    main()
