"""The Spark executor of the features (mlpay.spark) as the pipeline and a cluster run it.

`mlpay-features --engine spark` and `spark-submit containers/spark/features_job.py` on the tiny simulated data, in local mode with the
machine's Java 17, against the polars pass; bad input through the command; the SparkApplication manifest that runs
the same file on Kubernetes, checked offline (its CRD is the Spark operator's, which kubernetes-validate has no
schema for: its structure is checked here).
"""
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyspark
import pytest
import yaml

from conftest import BIN, ROOT, run
from mlpay.config import compose
from mlpay.features import compute_features
from mlpay.registry import FeatureRegistry
from mlpay.transactions import SORT_KEY, read_transactions

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17 (make system-deps installs it)")
REGISTRY = FeatureRegistry.from_cfg(compose())
MANIFEST = ROOT / "containers" / "k8s" / "spark" / "features.yaml"
LOCAL = ["spark.master='local[2]'", "spark.shuffle_partitions=4"]  # tiny data: a few partitions


@pytest.fixture(scope="module")
def polars_features(tiny_data):
    return compute_features(read_transactions(tiny_data), REGISTRY)


def assert_same_features(got: pl.DataFrame, want: pl.DataFrame):
    assert got.schema == want.schema  # the same columns, types and order
    assert got.select(SORT_KEY).equals(want.select(SORT_KEY))  # the same rows, in the canonical order
    assert got.drop(REGISTRY.names).equals(want.drop(REGISTRY.names))  # the other columns carried through unchanged
    diff = np.abs(got.select(REGISTRY.names).to_numpy() - want.select(REGISTRY.names).to_numpy())
    assert diff.max() <= 1e-9, {n: float(d) for n, d in zip(REGISTRY.names, diff.max(axis=0)) if d > 1e-9}


def test_the_command_with_spark_is_the_polars_pass(tiny_data, polars_features, tmp_path):
    out = tmp_path / "features.parquet"
    p = run("mlpay-features", "--engine", "spark", "--data", tiny_data, "--out", out, *LOCAL, cwd=ROOT)
    assert f"{len(polars_features):,} transactions, {len(REGISTRY.names)} features -> {out} (spark)" in p.stdout
    assert_same_features(pl.read_parquet(out), polars_features)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["features.parquet"]  # the parts went away with the temporary


@pytest.mark.slow  # a JVM of its own; nbs/13_spark writes a dataset in its session
def test_spark_submit_writes_a_dataset(tiny_data, polars_features, tmp_path):
    # What the SparkApplication runs, started by spark-submit (which then owns the master): a dataset directory.
    out = tmp_path / "features"
    script = ROOT / "containers" / "spark" / "features_job.py"
    # What a Spark image sets: where Spark is (pip's pyspark carries it) and the Python with mlpay.
    env = {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent), "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    proc = subprocess.run([BIN / "spark-submit", "--master", "local[2]", "--driver-memory", "2g", script,
                           "--data", tiny_data, "--out", out, LOCAL[1]], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "_SUCCESS").exists()
    assert_same_features(pl.read_parquet(out / "*.parquet").sort(SORT_KEY), polars_features)


@pytest.mark.slow  # a JVM of its own; nbs/13_spark checks every refusal (path, column, type, null, duplicate, time zone) in one session
def test_bad_input_names_the_column_and_writes_nothing(tiny_data, tmp_path):
    bad = tmp_path / "bad.parquet"
    pl.read_parquet(tiny_data).with_columns(CUSTOMER_ID=pl.when(pl.col("TRANSACTION_ID") < 5).then(None).otherwise(pl.col("CUSTOMER_ID"))).write_parquet(bad)
    out = tmp_path / "features.parquet"
    p = run("mlpay-features", "--engine", "spark", "--data", bad, "--out", out, *LOCAL, cwd=ROOT, check=False)
    assert p.returncode != 0 and "null values in {'CUSTOMER_ID': 5}" in p.stderr, p.stderr[-2000:]
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["bad.parquet"]


def test_spark_application():
    (app,) = yaml.safe_load_all(MANIFEST.read_text())
    assert (app["apiVersion"], app["kind"]) == ("sparkoperator.k8s.io/v1beta2", "SparkApplication")
    spec = app["spec"]
    assert (spec["type"], spec["mode"], spec["pythonVersion"]) == ("Python", "cluster", "3")
    assert spec["sparkVersion"] == md.version("pyspark")  # the Spark of the pinned pyspark
    # The driver runs this repository's containers/spark/features_job.py (the checkout in the image is /opt/mlpay), whose arguments
    # are mlpay-features's: data and a dataset out, on object storage; Hydra overrides name real config keys.
    assert spec["mainApplicationFile"] == "local:///opt/mlpay/containers/spark/features_job.py"
    args = spec["arguments"]
    data, out = args[args.index("--data") + 1], args[args.index("--out") + 1]
    assert data.startswith("s3a://") and out.startswith("s3a://") and not out.endswith(".parquet")
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    cfg = compose(overrides)
    assert all(cfg.spark[k.removeprefix("spark.")] is not None for k in (o.split("=")[0] for o in overrides))
    assert spec["sparkConf"]["spark.sql.session.timeZone"] == "UTC"
    assert spec["restartPolicy"]["type"] in {"Never", "OnFailure", "Always"}
    # The fields of the operator's SparkPodSpec this manifest uses; anything else is a typo the operator would drop.
    pod = {"cores", "memory", "memoryOverhead", "serviceAccount", "labels", "envFrom", "securityContext"}
    assert set(spec["driver"]) <= pod and set(spec["executor"]) <= pod | {"instances"}
    for role in ("driver", "executor"):
        s = spec[role]
        assert isinstance(s["cores"], int) and s["memory"].endswith("g")
        assert s["securityContext"]["runAsNonRoot"] is True and s["securityContext"]["allowPrivilegeEscalation"] is False
        assert s["envFrom"] == [{"secretRef": {"name": "mlpay-s3"}}]  # credentials from a secret, never in the manifest
    assert spec["executor"]["instances"] >= 1
