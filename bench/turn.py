"""A scoring turn's cost by its size: what one event-loop turn of the server spends on k requests, without HTTP.

The server scores every request that arrived during the previous turn in one model call, so a turn's fixed cost
(the model call's own overhead, the calibration, decisions and answers' numpy calls) is shared by however many
requests it holds: 16 closed-loop clients fill a turn of one process more than they fill each of two (the Redis
row of bench/serve.py). Here the package in artifacts/model scores the data's last days (new transactions, in time
order, each request one transaction) on a state warmed with the days before, in the calling process as the edge
does (`decode_request`, `predict`, `encode_response`), with the monitor and the decision log off the measurement
(their queue is emptied unobserved). Per turn size: µs per request, the best of 3 passes of 0.6 s; then the fit
`fixed / k + per request`.

    python bench/turn.py [--model artifacts/model] [--sizes 1,2,4,8,16]
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import print_table, save
from serve import KEY, replay_traffic
from mlpay.serve import FraudAPI, PredictRequest, ServeSettings

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "model")
    p.add_argument("--sizes", default="1,2,4,8,16")
    p.add_argument("--replay-days", type=int, default=30, help="days scored: enough new transactions for every pass")
    a = p.parse_args()
    sizes = [int(k) for k in a.sizes.split(",")]
    warm, replay, n = replay_traffic(ROOT / "data" / "transactions.parquet", a.replay_days)
    api = FraudAPI(a.model, ServeSettings(api_key=KEY, state_dir=Path(tempfile.mkdtemp()), warm_from=warm, journal=False))
    api.setup("cpu")
    requests = [PredictRequest.model_validate_json(b) for b in replay.read_bytes().splitlines()]
    api.observing.acquire()  # the periodic observer stays out: the turn alone is measured
    at, rows, per_request = 0, [], {}
    for k in sizes:
        best = []
        for _ in range(3):
            t0, turns = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.6:
                if at + k > len(requests): raise SystemExit(f"{n:,} transactions are not enough for these passes: raise --replay-days")
                items = [api.decode_request(r) for r in requests[at:at + k]]
                at += k
                api.predict(items)
                for i in items: api.encode_response(i)
                api.pending.clear()
                turns += 1
            best.append((time.perf_counter() - t0) / (turns * k) * 1e6)
        per_request[k] = min(best)
        rows.append([k, f"{per_request[k]:.1f}"])
    # us per request = fixed / k + marginal: least squares over the sizes measured
    fixed, marginal = np.linalg.lstsq(np.column_stack([1 / np.array(sizes), np.ones(len(sizes))]), np.array(list(per_request.values())), rcond=None)[0]
    print_table(f"A scoring turn (decode, features, model, decision, answer) by the requests it holds; fit: {fixed:.0f} µs a turn + {marginal:.0f} µs a request",
                ["requests in the turn", "µs per request"], rows)
    save("turn", {"us_per_request": per_request, "fixed_us_per_turn": fixed, "us_per_request_marginal": marginal, "transactions": at})


if __name__ == "__main__":
    main()
