"""The console scripts end to end on tiny data: simulate -> ingest -> features -> benchmark."""
import json

import polars as pl
import pytest

from conftest import ALL_MODELS, run


def test_simulate_is_deterministic(tiny_params, tiny_data, tmp_path):
    again = tmp_path / "again.parquet"
    run("mlpay-simulate", "--params", tiny_params, "--out", again)
    assert again.read_bytes() == tiny_data.read_bytes()  # data.dvc relies on byte-identical output
    other = tmp_path / "other.parquet"
    run("mlpay-simulate", "--params", tiny_params, "--out", other, "data.seed=1")
    assert other.read_bytes() != tiny_data.read_bytes()


@pytest.mark.slow  # every model on every fold (~2 min); the fast suite runs the benchmark on one model below
def test_benchmark_on_handbook_style_csv(tiny_params, tiny_data, tmp_path):
    # The published Handbook files carry IDs and day/second columns as strings and an index column.
    csv = tmp_path / "handbook.csv"
    (pl.read_parquet(tiny_data).with_row_index("Unnamed: 0")
       .with_columns(pl.col("CUSTOMER_ID", "TERMINAL_ID", "TX_TIME_SECONDS", "TX_TIME_DAYS").cast(pl.Utf8),
                     pl.col("TX_DATETIME").dt.strftime("%Y-%m-%d %H:%M:%S"))
       .write_csv(csv))
    out = tmp_path / "bench.json"
    proc = run("mlpay-benchmark", "--params", tiny_params, "--data", csv, "--out", out)
    result = json.loads(out.read_text())
    assert set(result["models"]) == ALL_MODELS
    for r in result["models"].values():  # the informed ceiling included
        for m in ("auc", "ap", "cp100"):
            assert set(r[m]) >= {"mean", "std", "folds"} and len(r[m]["folds"]) == 4
    assert result["protocol"]["fold_starts"] == ["2018-07-25", "2018-08-01", "2018-08-08", "2018-08-15"]
    assert "| xgboost |" in proc.stdout and (tmp_path / "bench.md").read_text().startswith("| model")


def test_features_stage_feeds_benchmark(tiny_params, tiny_data, tmp_path):
    feats = tmp_path / "features.parquet"
    run("mlpay-features", "--params", tiny_params, "--data", tiny_data, "--out", feats)
    assert pl.read_parquet(feats).height == pl.read_parquet(tiny_data).height
    out = tmp_path / "b.json"
    run("mlpay-benchmark", "--params", tiny_params, "--data", tiny_data, "--features", feats, "--models", "xgboost", "--out", out)
    assert list(json.loads(out.read_text())["models"]) == ["xgboost", "informed_ceiling"]
    val = tmp_path / "val.json"  # the same, reported on the validation folds (to choose on)
    run("mlpay-benchmark", "--params", tiny_params, "--data", tiny_data, "--features", feats, "--models", "xgboost", "--folds", "validation", "--out", val)
    test, valid = json.loads(out.read_text()), json.loads(val.read_text())
    assert (test["protocol"]["folds"], valid["protocol"]["folds"]) == ("test", "validation")
    assert test["models"]["xgboost"]["ap"]["folds"] != valid["models"]["xgboost"]["ap"]["folds"]


def test_benchmark_errors_are_clear(tiny_params, tiny_data, tmp_path):
    proc = run("mlpay-benchmark", "--params", tiny_params, "--data", tmp_path / "missing.parquet", check=False)
    assert proc.returncode != 0 and "missing.parquet" in proc.stderr
    proc = run("mlpay-benchmark", "--params", tiny_params, "--data", tiny_data, "--models", "forest", check=False)
    assert proc.returncode != 0 and "forest" in proc.stderr
    proc = run("mlpay-benchmark", "--params", tiny_params, "--data", tiny_data, "--folds", "train", check=False)
    assert proc.returncode == 2 and "--folds" in proc.stderr and "'train'" in proc.stderr
