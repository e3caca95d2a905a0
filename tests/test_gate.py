"""The promotion gate on real tiny packages: the model against itself, against one trained on shuffled labels, a tampered
package, too few labels, labels from a decision log, the latency budget, and the sequence model's inputs."""
import json
import shutil
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from mlpay.config import compose
from mlpay.gate import GateError, gate, main, package_inputs, window_rows

GENEROUS = ["data=tiny", "gate.latency_p99_ms=1000"]  # the latency budget is measured, never asserted in a test


def gate_cli(capsys, *args):
    "mlpay-gate in-process: (exit code, stdout, stderr)."
    try:
        main([str(a) for a in args]); code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def feats(package):
    "The features the tiny package was trained on (conftest writes them; rebuilt the same way otherwise)."
    path = package / "features.parquet"
    if not path.is_file():
        from mlpay.features import compute_features
        from mlpay.registry import FeatureRegistry
        cfg = compose(["debug=fast", "model=mlp"])
        compute_features(pl.read_parquet(package / "transactions.parquet"), FeatureRegistry.from_cfg(cfg)).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def shuffled(package, feats, tmp_path_factory):
    "A package whose scores are garbage, built honestly: the tiny model trained and exported on shuffled labels."
    from mlpay.evaluation import main as evaluate
    from mlpay.export import write_package
    from mlpay.train import train
    d = tmp_path_factory.mktemp("shuffled")
    f = pl.read_parquet(feats).with_columns(pl.col("TX_FRAUD").shuffle(seed=0))
    train(compose(["debug=fast", "model=mlp", "trainer.max_epochs=1", f"paths.train={d}/train"]), f)
    evaluate(["--predictions", f"{d}/train/predictions.parquet", "--out-dir", f"{d}/eval", "--package", f"{d}/train", "data=tiny"])
    write_package(d / "train", d / "model", f, compose(["debug=fast", "export.variants=[]", "reasons.faithfulness.min_rate=0"]))
    return d / "model"


def test_against_itself_promoted(package, feats, tmp_path, capsys):
    out = tmp_path / "gate"
    code, stdout, _ = gate_cli(capsys, "--champion", package / "model", "--challenger", package / "model", "--features", feats, "--out", out, *GENEROUS)
    assert code == 0, stdout
    r = json.loads((out / "report.json").read_text())
    assert r["decision"] == "promote" and "PROMOTE" in stdout and r["why"].startswith("Promote")
    assert all(c["passed"] for c in r["checks"]), r["checks"]
    assert [c["name"] for c in r["checks"]] == ["labels", "out_of_sample", "cost", "ap", "parity", "calibration", "latency", "contract"]
    for q, v in r["metrics"]["difference"].items(): assert v["low"] <= 0 <= v["high"], (q, v)  # identical: no difference
    assert r["window"]["days"] == list(range(169, 176))  # as of the midnight ending the data (day 183), labels due by day 176
    assert len(r["per_day"]) == 7 and r["models"]["champion"]["scenario_recall"]
    assert (out / "report.md").read_text().startswith("# Promotion gate: PROMOTE")


def test_a_window_the_models_were_trained_on_is_refused(package, feats, tmp_path, capsys):
    "The tiny model was trained on 2018-07-25..08-21: a gate on 08-18..08-24 would judge it on its own training days."
    out = tmp_path / "gate"
    code, stdout, err = gate_cli(capsys, "--champion", package / "model", "--challenger", package / "model", "--features", feats,
                                 "--out", out, "--as-of", "2018-09-01", *GENEROUS, "gate.min_frauds=10")
    assert code == 1, (stdout, err)
    r = json.loads((out / "report.json").read_text())
    (check,) = [c for c in r["checks"] if c["name"] == "out_of_sample"]
    assert not check["passed"] and "trained until 2018-08-22" in check["detail"] and r["decision"] == "refuse"
    code, stdout, _ = gate_cli(capsys, "--champion", package / "model", "--challenger", package / "model", "--features", feats,
                               "--out", out, "--as-of", "2018-09-01", "--report-only", *GENEROUS, "gate.min_frauds=10")
    assert code == 0 and "REFUSE" in stdout  # the DVC stage records a refusal instead of failing


def test_garbage_challenger_refused(package, feats, shuffled, tmp_path, capsys):
    out = tmp_path / "gate"
    code, stdout, _ = gate_cli(capsys, "--champion", package / "model", "--challenger", shuffled, "--features", feats, "--out", out, *GENEROUS)
    assert code == 1, stdout
    r = json.loads((out / "report.json").read_text())
    failed = {c["name"] for c in r["checks"] if not c["passed"]}
    assert r["decision"] == "refuse" and {"cost", "ap"} <= failed, r["checks"]
    assert "cost:" in r["why"] and "ap:" in r["why"] and "REFUSE" in stdout
    d = r["metrics"]["difference"]
    assert d["cost_per_transaction"]["low"] > 0 and d["ap"]["high"] < 0, d


def test_tampered_challenger_is_bad_input(package, feats, tmp_path, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(package / "model", bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    code, _, err = gate_cli(capsys, "--champion", package / "model", "--challenger", bad, "--features", feats, "--out", tmp_path / "gate", *GENEROUS)
    assert code == 2 and "the challenger package" in err and "model.onnx" in err and "sha256 mismatch" in err, err
    assert not (tmp_path / "gate").exists()  # nothing decided, nothing written


def test_too_few_labels_is_bad_input(package, feats, tmp_path, capsys):
    code, _, err = gate_cli(capsys, "--champion", package / "model", "--challenger", package / "model", "--features", feats,
                            "--out", tmp_path / "gate", *GENEROUS, "gate.window_days=1")
    assert code == 2 and "not enough matured labels" in err and "gate.min_transactions 2,000" in err, err
    assert not (tmp_path / "gate").exists()
    code, _, err = gate_cli(capsys, "--champion", package / "model", "--challenger", package / "model", "--features", feats,
                            "--out", tmp_path / "gate", "--as-of", "2018-04-10", *GENEROUS)
    assert code == 2 and "does not cover" in err, err


def test_labels_from_decision_log(package, feats, tmp_path, capsys):
    "Labels read from a decision log give the report that the features' own due labels give."
    from mlpay.decisions import DecisionLog
    f = pl.read_parquet(feats, columns=["TRANSACTION_ID", "TX_DATETIME", "TX_TIME_DAYS", "TX_FRAUD"]).filter(pl.col("TX_TIME_DAYS") >= 150)
    with DecisionLog(tmp_path / "log") as log:
        log.labels(f["TRANSACTION_ID"].to_list(), (f["TX_FRAUD"] == 1).to_list(), (f["TX_DATETIME"] + timedelta(days=7)).to_list())
    code, _, err = gate_cli(capsys, "--champion", package / "model", "--challenger", package / "model", "--features", feats,
                            "--labels-from", tmp_path / "log", "--out", tmp_path / "from_log", *GENEROUS)
    assert code == 0, err
    cfg = compose(GENEROUS)
    default = gate(package / "model", package / "model", feats, cfg)
    logged = json.loads((tmp_path / "from_log" / "report.json").read_text())
    assert logged["labels"] == "label store" and logged["metrics"] == default["metrics"]
    code, _, err = gate_cli(capsys, "--challenger", package / "model", "--champion", package / "model", "--features", feats,
                            "--labels-from", tmp_path / "nowhere", "--out", tmp_path / "x", *GENEROUS)
    assert code == 2 and "no such decision log" in err


def test_latency_budget_refuses(package, feats):
    r = gate(package / "model", package / "model", feats, compose(["data=tiny", "gate.latency_p99_ms=1e-6"]))
    assert r["decision"] == "refuse" and [c["name"] for c in r["checks"] if not c["passed"]] == ["latency"]
    assert r["why"].startswith("Refuse: latency: the challenger's model call p99")


def test_sequence_inputs_match_training(feats):
    "A sequence model's history steps are built as mlpay.train.model_inputs builds them for training."
    from mlpay.registry import FeatureRegistry
    from mlpay.sequences import history_index
    from mlpay.train import model_inputs
    f = pl.read_parquet(feats)
    cfg = compose(["debug=fast"])
    registry = FeatureRegistry.from_cfg(cfg)
    cols = registry.columns("rich")
    manifest = {"columns": cols, "registry": registry.to_dict(), "history": {"steps": 6}}
    rows, _, _ = window_rows(f, "2018-10-01", 7, 7, 7)
    got, want = package_inputs(f, rows, manifest), model_inputs(f, rows, cols, registry, history_index(f, 6))
    assert set(got) == {"features", "history"} and got["history"].shape == (len(rows), 6, len(registry.steps))
    for k in got: np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(GateError, match="the features lack the columns"): package_inputs(f.drop(cols[0]), rows, manifest)
