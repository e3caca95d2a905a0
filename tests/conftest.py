"""Shared fixtures: the repository root and a tiny composed configuration."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts (mlpay-*, dvc)

# One grid point per model and two epochs keep the tiny benchmark to seconds.
SMALL_GRIDS = ["trainer.max_epochs=2", "benchmark.models.logreg.grid={C:[1.0]}",
               "benchmark.models.xgboost.grid={max_depth:[3]}",
               "benchmark.models.xgboost_rich.grid={max_depth:[3]}"]
ALL_MODELS = {"logreg", "xgboost", "xgboost_rich", "mlp", "mlp_unweighted", "mlp_sampled", "sequence", "informed_ceiling"}


def run(*args, cwd=None, check=True):
    "Run a console script of the venv; return the completed process (stdout/stderr captured)."
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # DVC stages call mlpay-* too
    proc = subprocess.run(list(map(str, args)), cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory):
    "params.yaml composed with data=tiny and one grid point per model."
    d = tmp_path_factory.mktemp("params")
    run("mlpay-params", "--out", d / "params.yaml", "data=tiny", *SMALL_GRIDS, cwd=ROOT)
    return d / "params.yaml"


@pytest.fixture(scope="session")
def tiny_data(tiny_params, tmp_path_factory):
    "The tiny simulated dataset, written by mlpay-simulate."
    out = tmp_path_factory.mktemp("data") / "transactions.parquet"
    run("mlpay-simulate", "--params", tiny_params, "--out", out)
    return out
