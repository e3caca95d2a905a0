"""Monitoring benchmark: each drift scenario replayed through the real server, and what its monitors said when.

For the default data and each drift scenario of conf/data/drift/ (full Handbook size, drift from day 160), the
transactions after the model's validation days are sent over HTTP to mlpay-serve (warmed with the days before, a
decision log on), in time order, with each label once it is a label delay old; the server's gauges are scraped
every simulated hour, and the alarm rules of conf/monitor (`mlpay.report.alarms`, the same thresholds as the
Prometheus rules) applied to its 24-hour window. Then mlpay-monitor reads the decision log for the realized
performance. Prints, per scenario, when each alarm first fired relative to the drift's start, the false alarms
before it, and on the default data the weekly estimated vs realized precision at the review threshold.

    python bench/monitoring.py [--model artifacts/model] [--scenarios none card_testing ...] [--from-day 143] [--full-default]

--full-default also replays the whole 183 default days from day 0 and counts its alarms (false alarms per month).
"""
import argparse
import json
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from _common import print_table, save
from mlpay.config import compose
from mlpay.decisions import join_labels, read_decisions, read_labels
from mlpay.monitoring import performance, performance_sums
from mlpay.replay import first_alarms, replay_scenario
from mlpay.simulate import simulate


def weekly_precision(log, manifest, as_of):
    "Per ISO week of mature days: estimated and realized precision at the review threshold."
    joined = join_labels(read_decisions(log), read_labels(log, as_of), as_of)
    delay = manifest["state"]["label_delay_days"]
    joined = joined.filter(pl.col("tx_datetime") < as_of - timedelta(days=delay + 1))
    rows = []
    for (week,), w in joined.group_by(pl.col("tx_datetime").dt.truncate("1w"), maintain_order=True):
        p, amount = w["probability"].to_numpy(), w["tx_amount"].to_numpy()
        y = w["fraud"].fill_null(False).cast(pl.Int8).to_numpy()
        est = performance(performance_sums(p, p, amount, manifest["thresholds"], manifest["costs"]))["precision"]
        real = performance(performance_sums(y, p, amount, manifest["thresholds"], manifest["costs"]))["precision"]
        rows.append({"week": str(week.date()), "n": len(w), "flagged": int((p >= manifest["thresholds"]["review"]).sum()), "estimated": est, "realized": real})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/model", type=Path)
    p.add_argument("--scenarios", nargs="*", default=["none", "card_testing", "population_shift", "habits_shift", "breach_wave"])
    p.add_argument("--from-day", type=int, default=None, help="first day replayed (default: the day after the package's validation days)")
    p.add_argument("--full-default", action="store_true", help="also replay all 183 default days from day 0 (false alarms per month)")
    a = p.parse_args()
    manifest = json.loads((a.model / "manifest.json").read_text())
    if "monitoring" not in manifest: raise SystemExit(f"{a.model}: no reference profile: export the model again (dvc repro export)")
    cfg = compose()
    day0 = datetime.fromisoformat(str(cfg.data.start_date))
    first_day = a.from_day if a.from_day is not None else (datetime.fromisoformat(manifest["training"]["window"]["test_start"]) - day0).days - cfg.label_delay_days
    root, results, rows = Path(tempfile.mkdtemp()), {}, []
    runs = [(s, s, first_day) for s in a.scenarios] + ([("none, all 183 days", "none", 0)] if a.full_default else [])
    for name, scenario, start in runs:
        overrides = [] if scenario == "none" else [f"data/drift={scenario}"]
        data_cfg = compose(overrides).data
        drift_day = int(data_cfg.drift.start_day) if scenario != "none" else None
        tx = simulate(data_cfg, progress=False)
        work = root / name.replace(" ", "_").replace(",", "")
        t0 = time.perf_counter()
        seen, days, summary = replay_scenario(a.model, tx, start, cfg, work)
        seconds, n = time.perf_counter() - t0, summary["transactions"]
        drift_start = day0 + timedelta(days=drift_day) if drift_day is not None else datetime.max
        fired, before = first_alarms(seen, days, drift_start, manifest["state"]["label_delay_days"])
        n_days = days.height
        results[name] = {"transactions": n, "seconds": seconds, "days": n_days, "first_fired_hours_after_drift": fired,
                         "alarms_before_drift": before, "alarm_days": summary["alarm_days"], "report": summary}
        if scenario == "none":
            false = {k: v for k, v in summary["alarm_days"].items() if v}
            hourly = {k: v for k, v in before.items() if v}
            results[name]["false_alarm_days_per_month"] = {k: v * 30 / n_days for k, v in summary["alarm_days"].items()}
            rows.append([name, f"{n:,}", f"{n / seconds:,.0f}", "(no drift)", json.dumps(hourly) if hourly else "none", json.dumps(false) if false else "none"])
            results[name]["weekly_precision"] = wp = weekly_precision(work / "log", manifest, read_decisions(work / "log")["tx_datetime"].max())
            print_table(f"{name}: estimated vs realized precision at the review threshold, per week of mature labels",
                        ["week", "transactions", "flagged", "estimated", "realized", "|diff|"],
                        [[w["week"], f"{w['n']:,}", w["flagged"], f"{w['estimated']:.3f}", f"{w['realized']:.3f}", f"{abs(w['estimated'] - w['realized']):.3f}"] for w in wp])
        else:
            when = ", ".join(f"{k} +{v:.0f} h" for k, v in fired.items() if v is not None) or "none"
            early = {k: v for k, v in before.items() if v}
            rows.append([name, f"{n:,}", f"{n / seconds:,.0f}", when, json.dumps(early) if early else "none", json.dumps({k: v for k, v in summary["alarm_days"].items() if v})])
    print_table("Drift scenarios replayed through mlpay-serve (HTTP, 256 transactions per request, hourly scrapes)",
                ["scenario", "transactions", "tx/s", "first firing after the drift's start", "alarms before the drift (hourly scrapes)", "alarm days (mlpay-monitor)"], rows)
    save("monitoring", results)


if __name__ == "__main__":
    main()
