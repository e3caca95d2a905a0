"""Two models in one mlpay-serve over real HTTP: a shadow, a challenger on a share of cards, the guard, hot swap and rollback."""
import json
import shutil
import urllib.request

import numpy as np
import polars as pl
import pytest

from mlpay.decisions import read_decisions
from mlpay.lineup import card_share
from mlpay.replay import Client, batches, serving

KEY, ADMIN = "rollout-api-" + "k" * 16, "rollout-admin-" + "a" * 16


def version(pkg):
    return json.loads((pkg / "manifest.json").read_text())["version"]


def admin(url, method="GET", body=None, key=ADMIN):
    "An /admin/lineup request: (status, JSON body)."
    req = urllib.request.Request(f"{url}/admin/lineup", method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())


def metric(url, name):
    "{labels: value} of a metric on /metrics."
    from prometheus_client.parser import text_string_to_metric_families
    status, body = Client(url, KEY).request("GET", "/metrics")
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples if s.name == name}


def observed(url, name, total, seconds=10):
    "`metric` once its values add up to `total` (answers reach the metrics off the request's path, every MLPAY_OBSERVE_EVERY_S)."
    import time
    for _ in range(int(seconds * 10)):
        if sum((m := metric(url, name)).values()) >= total: return m
        time.sleep(0.1)
    return m


def send(url, package, days=(150, 152)):
    "Score two days of the tiny data in batches of 64; the answers."
    tx = pl.read_parquet(package / "transactions.parquet").filter(pl.col("TX_TIME_DAYS").is_between(*days, closed="left"))
    client = Client(url, KEY)
    return tx, [r for _, rows in batches(tx, 64) for r in client.post("/predict", {"transactions": rows})["results"]]


@pytest.fixture
def env(package, tmp_path):
    return {"MLPAY_WARM_FROM": package / "history.parquet", "MLPAY_STATE_DIR": tmp_path / "state", "MLPAY_DECISION_LOG_DIR": tmp_path / "log"}


def test_a_shadow_is_scored_on_every_transaction_and_never_answers(package, challenger, env, tmp_path):
    with serving(package / "model", KEY, MLPAY_SHADOW_MODEL=challenger, MLPAY_ADMIN_KEY=ADMIN, **env) as url:
        tx, answers = send(url, package)
        assert {a["model_version"] for a in answers} == {version(package / "model")}
        pairs = observed(url, "mlpay_shadow_decisions_total", len(tx))
        assert sum(pairs.values()) == len(tx)  # every transaction scored by both
        n = metric(url, "mlpay_shadow_score_moments_total")[(("moment", "n"),)]
        assert n == len(tx)
        info = metric(url, "mlpay_model_info")
        assert info[(("role", "shadow"), ("version", version(challenger)))] == 1
        assert sum(metric(url, "mlpay_shadow_seconds_count").values()) > 0
        health = json.loads(Client(url, KEY).request("GET", "/health")[1])
        assert health["lineup"]["shadow"]["version"] == version(challenger) and health["lineup"]["challenger_share"] == 0
    log = read_decisions(tmp_path / "log")
    assert len(log) == len(tx) and set(log["decided_by"]) == {"champion"} and set(log["shadow_version"]) == {version(challenger)}
    assert log["shadow_score"].is_not_null().all() and (log["score"] != log["shadow_score"]).any()  # another model's scores
    agree = (log["decision"] == log["shadow_decision"]).mean()
    assert 0.9 < agree <= 1.0, agree


def test_a_challenger_decides_its_share_of_cards(package, challenger, env, tmp_path):
    with serving(package / "model", KEY, MLPAY_SHADOW_MODEL=challenger, MLPAY_CHALLENGER_SHARE=0.3, **env) as url:
        tx, answers = send(url, package)
        by = dict(zip(tx["TRANSACTION_ID"].to_list(), tx["CUSTOMER_ID"].to_list()))
        cards = np.array([by[a["transaction_id"]] for a in answers])
        want = np.where(card_share(cards) < 0.3, version(challenger), version(package / "model"))
        assert [a["model_version"] for a in answers] == want.tolist()  # sticky by card token
        roles = observed(url, "mlpay_decisions_total", len(tx))
        assert sum(v for k, v in roles.items() if ("role", "challenger") in k) == (card_share(cards) < 0.3).sum()
    log = read_decisions(tmp_path / "log")
    assert (log["decided_by"] == "challenger").sum() == (card_share(cards) < 0.3).sum()
    ch = log.filter(pl.col("decided_by") == "challenger")
    assert set(ch["model_version"]) == {version(challenger)} and set(ch["shadow_version"]) == {version(package / "model")}


def tampered(pkg, tmp_path):
    "A copy of `pkg` with one byte of its graph changed."
    d = tmp_path / "tampered"
    shutil.copytree(pkg, d)
    b = bytearray((d / "model.onnx").read_bytes()); b[len(b) // 2] ^= 1
    (d / "model.onnx").write_bytes(bytes(b))
    return d


def test_hot_swap_and_rollback_keep_the_state_and_refuse_bad_changes(package, challenger, env, tmp_path):
    champion = package / "model"
    with serving(champion, KEY, MLPAY_ADMIN_KEY=ADMIN, **env) as url:
        client = Client(url, KEY)
        first = {"transaction_id": 90_000_001, "tx_datetime": "2018-08-30T12:00:00", "customer_id": 7, "terminal_id": 11, "tx_amount": 42.0}
        assert client.post("/predict", first)["model_version"] == version(champion)
        # refused, each with a clear message, and nothing changes
        for body, key, status, says in [({"champion": str(challenger)}, None, 401, "admin key"), ({"champion": str(challenger)}, KEY, 401, "admin key"),
                                        ({"challenger_share": 1.5}, ADMIN, 422, "challenger_share"), ({"champion": None}, ADMIN, 409, "always has one"),
                                        ({"challenger_share": 0.2}, ADMIN, 409, "needs a shadow"),
                                        ({"champion": str(tampered(challenger, tmp_path))}, ADMIN, 409, "sha256 mismatch"),
                                        ({"shadow": str(tmp_path / "nowhere")}, ADMIN, 409, "not a directory"), ({"model": "x"}, ADMIN, 422, "model")]:
            got, answer = admin(url, "PUT", body, key)
            assert got == status and says in json.dumps(answer), (body, got, answer)
        assert admin(url)[1] == {"champion": {"version": version(champion), "path": str(champion)}, "shadow": None, "challenger_share": 0.0}
        assert admin(url, key=KEY)[0] == 401
        # the swap: the next answers are the new champion's, on the same online state
        status, lineup = admin(url, "PUT", {"champion": str(challenger), "shadow": str(champion)})
        assert status == 200 and lineup["champion"]["version"] == version(challenger) and lineup["shadow"]["version"] == version(champion)
        second = {**first, "transaction_id": 90_000_002, "tx_datetime": "2018-08-30T12:05:00"}
        assert client.post("/predict", second)["model_version"] == version(challenger)
        status, body = client.request("POST", "/predict", {**first, "tx_amount": 43.0})
        assert status == 409  # the state kept the first transaction across the swap
        # the rollback
        status, lineup = admin(url, "PUT", {"champion": str(champion), "shadow": None})
        assert status == 200 and lineup["shadow"] is None
        assert client.post("/predict", {**first, "transaction_id": 90_000_003, "tx_datetime": "2018-08-30T12:06:00"})["model_version"] == version(champion)
        swaps = metric(url, "mlpay_swaps_total")
        assert swaps[(("outcome", "applied"),)] == 2 and swaps[(("outcome", "refused"),)] == 4


def test_the_guard_switches_a_challenger_that_declines_too_much_back_to_shadow(package, challenger, env, tmp_path):
    eager = tmp_path / "eager"  # the challenger with a policy that declines far more (a real, verified package: thresholds live in its manifest)
    shutil.copytree(challenger, eager)
    m = json.loads((eager / "manifest.json").read_text())
    m["thresholds"] = {"review": 0.0, "decline": 0.0}
    (eager / "manifest.json").write_text(json.dumps(m))
    with serving(package / "model", KEY, MLPAY_SHADOW_MODEL=eager, MLPAY_CHALLENGER_SHARE=0.5, MLPAY_ADMIN_KEY=ADMIN,
                 MLPAY_GUARD_WINDOW=500, MLPAY_GUARD_MIN_FLAGS=10, **env) as url:
        tx, answers = send(url, package)
        assert metric(url, "mlpay_challenger_demotions_total")[(("rate", "decline"),)] == 1
        status, lineup = admin(url)
        assert lineup["challenger_share"] == 0 and lineup["shadow"]["version"] == version(eager)
        assert metric(url, "mlpay_challenger_share")[()] == 0
        late = answers[-64:]  # after the switch the champion decides every card again
        assert {a["model_version"] for a in late} == {version(package / "model")}
        assert sum(a["decision"] == "decline" for a in answers) < len(answers) / 2


def test_a_shadow_the_state_cannot_serve_or_a_tampered_one_stops_the_start(package, challenger, tmp_path):
    from conftest import BIN
    import subprocess
    bad = tampered(challenger, tmp_path)
    out = subprocess.run([str(BIN / "mlpay-serve"), "--model", str(package / "model")], capture_output=True, text=True, timeout=60,
                         env={"PATH": str(BIN), "MLPAY_API_KEY": KEY, "MLPAY_SHADOW_MODEL": str(bad)})
    assert out.returncode != 0 and "sha256 mismatch" in out.stderr, out.stderr[-2000:]
    out = subprocess.run([str(BIN / "mlpay-serve"), "--model", str(package / "model")], capture_output=True, text=True, timeout=60,
                         env={"PATH": str(BIN), "MLPAY_API_KEY": KEY, "MLPAY_ADMIN_KEY": KEY})
    assert out.returncode != 0 and "must differ from the API key" in out.stderr


def test_the_shadow_is_measured_without_monitoring_or_a_decision_log(package, challenger, tmp_path):
    bare = tmp_path / "bare"  # the champion without its reference profile: the server's monitoring is off
    shutil.copytree(package / "model", bare)
    m = json.loads((bare / "manifest.json").read_text())
    del m["monitoring"]
    (bare / "manifest.json").write_text(json.dumps(m))
    with serving(bare, KEY, MLPAY_SHADOW_MODEL=challenger, MLPAY_WARM_FROM=package / "history.parquet", MLPAY_STATE_DIR=tmp_path / "state") as url:
        assert json.loads(Client(url, KEY).request("GET", "/health")[1])["monitoring"].startswith("off")
        tx, _ = send(url, package, days=(150, 151))
        assert sum(observed(url, "mlpay_shadow_decisions_total", len(tx)).values()) == len(tx)
