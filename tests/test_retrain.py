"""mlpay-retrain end to end on the tiny data: a challenger trained on the labels known as of a day, served like the champion."""
import json
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from mlpay.config import compose, write_params
from mlpay.decisions import DecisionLog
from mlpay.features import compute_features
from mlpay.package import load_package
from mlpay.registry import FeatureRegistry
from mlpay.retrain import main, retrain, retraining_window, RetrainSettings
from mlpay.labels import label_store
from mlpay.train import model_inputs

# One epoch of the MLP, no variants: training and export take seconds. Faithfulness is not this test's subject.
SMALL = ["debug=fast", "model=mlp", "trainer.max_epochs=1", "export.variants=[]", "reasons.faithfulness.min_rate=0"]
AS_OF = "2018-09-22"  # day 174: the window is days 139..166, validation 160..166


@pytest.fixture(scope="module")
def tiny(tiny_data, tmp_path_factory):
    "params.yaml, transactions, features (file and frame) of the tiny data."
    d = tmp_path_factory.mktemp("retrain")
    cfg = write_params(d / "params.yaml", SMALL)
    tx = pl.read_parquet(tiny_data)
    feats = compute_features(tx, FeatureRegistry.from_cfg(cfg))
    feats.write_parquet(d / "features.parquet")
    return {"dir": d, "cfg": cfg, "params": d / "params.yaml", "data": tiny_data, "features": d / "features.parquet", "tx": tx, "feats": feats}


def _args(t, out, *extra):
    return ["--params", str(t["params"]), "--out", str(out), "--features", str(t["features"]), "--data", str(t["data"]), *extra]


def test_challenger_learns_labels_known_by_its_day(tiny, tmp_path, capsys, monkeypatch):
    "Feedback known by T changes a training label, feedback known after T does not; the package loads and scores."
    monkeypatch.chdir(tmp_path)  # params.yaml names artifacts/train/... : a checkpoint not moved under --out would land here
    tx, feats = tiny["tx"], tiny["feats"]
    w = retraining_window(feats, AS_OF, RetrainSettings.from_cfg(tiny["cfg"].retrain), 7)
    fit_ids = feats[w.fit_rows]["TRANSACTION_ID"]
    early, late = int(fit_ids[10]), int(fit_ids[20])
    fraud = dict(zip(*tx.filter(pl.col("TRANSACTION_ID").is_in([early, late])).select("TRANSACTION_ID", "TX_FRAUD").to_numpy().T))
    with DecisionLog(tmp_path / "log", flush_every_s=3600) as log:  # corrections, as the server's /feedback writes them
        log.labels(early, not fraud[early], labelled_at=datetime(2018, 9, 21, 23))
        log.labels(late, not fraud[late], labelled_at=datetime(2018, 9, 22, 0, 0, 1))
    out = tmp_path / "challenger"
    main(_args(tiny, out, "--as-of", AS_OF, "--decision-log", str(tmp_path / "log")))
    assert "challenger mlp-" in capsys.readouterr().out

    summary = json.loads((out / "retrain.json").read_text())
    assert summary["as_of"] == AS_OF and summary["scheduled"]
    assert summary["window"] == {"first_day": "2018-08-18", "last_day": "2018-09-14", "val_first_day": "2018-09-08"}
    assert summary["labels"]["feedback"] == 1 and summary["labels"]["differ_from_data"] == 1 and not summary["labels"]["shuffled"]
    assert summary["rows"]["fit"] + summary["rows"]["val"] == summary["labels"]["data"] + 1
    assert summary["val"]["ap"] > 0.2, summary

    learnt = pl.read_parquet(out / "train/labels.parquet")
    got = dict(zip(*learnt.filter(pl.col("TRANSACTION_ID").is_in([early, late])).select("TRANSACTION_ID", "TX_FRAUD").to_numpy().T))
    assert got == {early: 1 - fraud[early], late: fraud[late]}
    days = feats.join(learnt.select("TRANSACTION_ID"), on="TRANSACTION_ID")["TX_TIME_DAYS"]
    assert (days.min(), days.max()) == (139, 166)  # nothing from the last label_delay_days before T, nothing after it
    preds = pl.read_parquet(out / "train/predictions.parquet")
    assert preds.filter(pl.col("split") == "test")["TRANSACTION_ID"].to_list() == preds.filter(pl.col("split") == "val")["TRANSACTION_ID"].to_list()
    assert (out / "train/checkpoints/best.ckpt").is_file() and (out / "train/dvclive/metrics.json").is_file()
    assert not (tmp_path / "artifacts").exists()  # the champion's train directory is never touched

    pkg = load_package(out / "model")
    m = pkg.manifest
    assert m["training"]["window"]["test_start"] == "2018-09-22 00:00:00" and m["test_rows"] == summary["rows"]["val"]
    assert m["training"]["summary"]["labels"]["feedback"] == 1 and m["state"]["label_delay_days"] == 7
    rows = np.flatnonzero((feats["TX_TIME_DAYS"] >= 174).to_numpy())[:500]  # the days it will shadow
    x = model_inputs(feats, rows, m["columns"], FeatureRegistry.from_cfg(m["registry"]))
    scores = pkg.session().run(None, {"features": x["features"]})[0].ravel()
    assert scores.shape == (500,) and np.isfinite(scores).all() and 0 <= scores.min() and scores.max() <= 1 and scores.std() > 0


def test_default_day_and_shuffled_labels(tiny, tmp_path):
    "With no day given, the latest scheduled day the gate can still judge (gate.window_days of data after it); shuffled labels are a named, recorded test of the gate."
    cfg = compose(SMALL[:-1])  # the reasons' faithfulness floor as configured: a test of the gate lifts it itself
    store = label_store(tiny["tx"], 7)
    r = retrain(cfg, tiny["feats"], store, tmp_path / "c", shuffle_labels=True)
    assert r["as_of"] == "2018-09-22" and r["labels"]["shuffled"]  # the data ends on 09-30: 09-29 would leave the gate no matured day and r["labels"]["differ_from_data"] > 0
    learnt = pl.read_parquet(tmp_path / "c/train/labels.parquet")
    assert learnt["TX_FRAUD"].sum() == learnt["DATA_TX_FRAUD"].sum()  # a permutation: as many frauds, on the wrong rows
    m = load_package(tmp_path / "c/model").manifest
    assert m["training"]["summary"]["labels"]["shuffled"] is True and m["reasons"]["faithfulness"]["min_rate"] == 0


def _refused(tiny, out, capsys, *extra):
    with pytest.raises(SystemExit) as e: main(_args(tiny, out, *extra))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["retrain.min_frauds=100000"], "window 2018-08-18..2018-09-14 (as of 2018-09-22): 470 known frauds (354 in 11,985 fit rows, 116 in 3,919 validation rows), below retrain.min_frauds = 100000"),
    (["--decision-log", "/nonexistent/log"], "/nonexistent/log: no such decision log directory"),
    (["--as-of", "2018-04-20"], "of a retraining as of 2018-04-20 starts before the data (2018-04-01)"),
    (["--as-of", "2018-11-01"], "ends after the data (2018-09-30)"),
    (["--as-of", "22/09/2018"], "--as-of must be a day (YYYY-MM-DD), got '22/09/2018'"),
    (["retrain.val_days=28"], "retrain.val_days (28) must be below retrain.window_days (28)"),
])
def test_refusals_write_nothing(tiny, tmp_path, capsys, extra, message):
    "Bad input: one error line naming the window, file or setting, exit status 2, no output directory."
    opts, over = [x for x in extra if not x.startswith("retrain.")], [x for x in extra if x.startswith("retrain.")]
    err = _refused(tiny, tmp_path / "out", capsys, *([] if "--as-of" in opts else ["--as-of", AS_OF]), *opts, *over)
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_refuses_feedback_of_other_transactions(tiny, tmp_path, capsys):
    "A decision log of another dataset is counted and refused; `retrain.unknown_labels=drop` drops it, with a warning."
    with DecisionLog(tmp_path / "log", flush_every_s=3600) as log: log.labels([10**9, 10**9 + 1], [True, False], labelled_at=datetime(2018, 9, 1))
    err = _refused(tiny, tmp_path / "out", capsys, "--as-of", AS_OF, "--decision-log", str(tmp_path / "log"), "retrain.min_frauds=100000")
    assert "2 label(s) of 2 transaction(s) not in the transactions" in err, err
    with pytest.warns(UserWarning, match=r"2 label\(s\) of 2 transaction\(s\) not in the transactions.*dropped"):
        err = _refused(tiny, tmp_path / "out", capsys, "--as-of", AS_OF, "--decision-log", str(tmp_path / "log"), "retrain.min_frauds=100000",
                       "retrain.unknown_labels=drop")
    assert "below retrain.min_frauds" in err, err  # past the label store, dropped: refused for the next reason
    assert "missing.parquet: no such file" in _refused(tiny, tmp_path / "o", capsys, "--features", str(tmp_path / "missing.parquet"))
