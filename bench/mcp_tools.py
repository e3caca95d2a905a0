"""MCP: read-only tool calls over real stdio, against the real-sized decision log (the test period's 389k decisions).

`mlpay-mcp` is started as a subprocess by the official SDK's stdio client (the default protocol negotiation, as an MCP
host would), with the decision log, the default data's transactions (labels known after the model's delay) and the
model package; every call goes through the governance (rate limit, card-number guard, a hash-chained audit record
fsynced to disk). Timed from the client: `call_tool` until its result is parsed.

- explain_decision: a different reviewed transaction each call;
- card_timeline: the card of a different reviewed transaction each call, as of that transaction, 30 days back.

For comparison, the same calls in process without a transport: through the SDK's in-memory client (the MCP
machinery, no pipes) and through `tool_functions` (the tools with their governance, no MCP).

    python bench/mcp_tools.py [--calls 200] [--log artifacts/decisions] [--data data/transactions.parquet] [--model artifacts/model]
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import polars as pl
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from _common import print_table, save
from mlpay.decisions import read_decisions
from mlpay.ledger import verify
from mlpay.mcpserver import McpSettings, build_server, tool_functions

ROOT = Path(__file__).resolve().parents[1]


def stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"n": len(s), "median_ms": round(statistics.median(s), 3), "p95_ms": round(s[int(0.95 * (len(s) - 1))], 3),
            "max_ms": round(s[-1], 3), "mean_ms": round(statistics.fmean(s), 3)}


def calls(reviews: pl.DataFrame) -> list[tuple[str, dict]]:
    "The calls, interleaved: explain each review, and its card's 30-day timeline as of it."
    out = []
    for r in reviews.iter_rows(named=True):
        out.append(("explain_decision", {"transaction_id": r["transaction_id"]}))
        out.append(("card_timeline", {"customer_id": r["customer_id"], "as_of": r["tx_datetime"].isoformat(), "days": 30}))
    return out


async def over_client(client: Client, todo) -> tuple[dict, dict]:
    times, sizes = {"explain_decision": [], "card_timeline": []}, []
    for name, args in todo[:10]: await client.call_tool(name, args)  # warm-up (not timed)
    for name, args in todo:
        t0 = time.perf_counter()
        r = await client.call_tool(name, args)
        times[name].append((time.perf_counter() - t0) * 1000)
        assert not r.is_error, r.content[0].text
        if name == "card_timeline": sizes.append(r.structured_content["n"])
    return times, {"timeline_rows_mean": round(statistics.fmean(sizes), 1), "timeline_rows_max": max(sizes)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200, help="calls of each tool")
    p.add_argument("--log", default=str(ROOT / "artifacts" / "decisions"))
    p.add_argument("--data", default=str(ROOT / "data" / "transactions.parquet"))
    p.add_argument("--model", default=str(ROOT / "artifacts" / "model"))
    a = p.parse_args(argv)
    reviews = read_decisions(a.log).filter(pl.col("decision") == "review").select("transaction_id", "customer_id", "tx_datetime")
    random.seed(0)
    pick = reviews.sample(min(a.calls, len(reviews)), seed=0, shuffle=True)
    todo = calls(pick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-mcp-"))
    env = {"MLPAY_MCP_DECISION_LOG_DIR": a.log, "MLPAY_MCP_TRANSACTIONS": a.data, "MLPAY_MCP_MODEL": a.model,
           "MLPAY_MCP_AUDIT_LOG": str(tmp / "stdio-audit.jsonl"), "MLPAY_MCP_RATE_PER_MINUTE": "100000", "MLPAY_MCP_RATE_BURST": "100000"}
    params = StdioServerParameters(command=sys.executable, args=["-c", "from mlpay.mcpserver import main; main()"], env=env, cwd=ROOT)

    async def stdio():
        t0 = time.perf_counter()
        async with Client(params) as c:
            started = time.perf_counter() - t0
            times, sizes = await over_client(c, todo)
            return started, c.protocol_version, times, sizes
    started, version, stdio_times, sizes = anyio.run(stdio)
    assert verify(tmp / "stdio-audit.jsonl") == []

    settings = McpSettings(decision_log_dir=Path(a.log), transactions=Path(a.data), model=Path(a.model), audit_log=tmp / "inproc-audit.jsonl",
                           rate_per_minute=100_000, rate_burst=100_000)
    srv = build_server(settings)
    async def memory():
        async with Client(srv) as c: return await over_client(c, todo)
    mem_times, _ = anyio.run(memory)
    fns = tool_functions(settings, client="bench")
    fn_times = {"explain_decision": [], "card_timeline": []}
    for name, args in todo[:10]: fns[name](**args)  # warm-up (not timed)
    for name, args in todo:
        t0 = time.perf_counter(); fns[name](**args); fn_times[name].append((time.perf_counter() - t0) * 1000)

    load = [round(x, 2) for x in os.getloadavg()]
    rows, payload = [], {"load_avg_1_5_15": load, "decisions": len(read_decisions(a.log)), "reviews": len(reviews), "calls_per_tool": len(pick),
                         "server_start_s": round(started, 2), "protocol": version, **sizes, "results": {}}
    for path, times in (("stdio (subprocess, SDK client)", stdio_times), ("in-memory SDK client", mem_times), ("tool_functions (no MCP)", fn_times)):
        for name, ms in times.items():
            s = stats(ms)
            payload["results"][f"{path} / {name}"] = s
            rows.append([path, name, s["n"], s["median_ms"], s["p95_ms"], s["max_ms"]])
    print(f"{payload['decisions']:,} decisions, {len(reviews):,} reviews; server start (spawn + handshake) {started:.1f} s; protocol {version}; "
          f"card timelines: {sizes['timeline_rows_mean']} transactions on average (max {sizes['timeline_rows_max']}) over 30 days; "
          f"load average {load[0]} on {os.cpu_count()} cores")
    print_table("Read-only MCP tool calls (target: median <= 50 ms over stdio)", ["path", "tool", "calls", "median ms", "p95 ms", "max ms"], rows)
    save("mcp", payload)


if __name__ == "__main__":
    main()
