"""A real Prometheus scraping a running mlpay-serve: the generated alert rules fire on drifting traffic, not before.

The rules are mlpay.alerts's, rendered from conf/monitor with test-sized thresholds (the tiny data's few hundred
transactions a day, no `for` delay); the traffic is the tiny data replayed over HTTP (mlpay.replay), then the
same days again with every amount twenty times larger.
"""
from datetime import timedelta

import polars as pl
import pytest
import yaml

from mlpay.alerts import alert_rules
from mlpay.config import compose
from mlpay.replay import Client, replay, serving
from prometheus import PROMETHEUS, Prometheus

KEY = "monitoring-test-" + "k" * 16
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (make system-deps)")


@pytest.fixture
def rules(tmp_path):
    cfg = compose(["monitor.alarms.for=0s", "monitor.alarms.min_transactions=100", "monitor.alarms.psi=1.0", "monitor.alarms.ks=0.5"])
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(alert_rules(cfg.monitor), sort_keys=False))
    return path


def model_alerts(prom):
    return sorted({a["labels"]["alertname"] for a in prom.firing() if a["labels"]["alertname"].startswith(("MlpayFeature", "MlpayScore"))})


def test_prometheus_alerts_on_drift_from_a_running_server(package, rules, tmp_path):
    tx = pl.read_parquet(package / "transactions.parquet")
    days = tx.filter(pl.col("TX_TIME_DAYS").is_between(150, 151))
    with serving(package / "model", KEY, MLPAY_WARM_FROM=package / "history.parquet", MLPAY_STATE_DIR=tmp_path / "state") as url, \
         Prometheus([url.removeprefix("http://")], rule_files=[rules]) as prom:
        client = Client(url, KEY)
        replay(client, days, 7)  # two ordinary days: the day window fills
        prom.wait_for(lambda: prom.query('mlpay_feature_psi{feature="TX_AMOUNT",window="1d"}'), what="the PSI gauge scraped")
        assert prom.value('mlpay_window_transactions{window="1d"}') >= 100
        assert model_alerts(prom) == [], prom.firing()
        # the same two days a week later with every amount x20: the amount features drift, and so does the score
        later = days.with_columns(pl.col("TRANSACTION_ID") + 10_000_000, pl.col("TX_DATETIME") + timedelta(days=7),
                                  pl.col("TX_TIME_DAYS") + 7, pl.col("TX_AMOUNT") * 20)
        replay(client, later, 7)
        firing = prom.wait_for(lambda: prom.firing("MlpayFeatureDriftPSI"), timeout=30, what="MlpayFeatureDriftPSI firing")
        assert "TX_AMOUNT" in {a["labels"]["feature"] for a in firing}, firing
        assert all(a["labels"]["model_version"] for a in firing) and "customer_id" not in str(firing)
        assert prom.firing("MlpayHighErrorRate") == []
