"""The DVC pipeline end to end, as a user runs it, on tiny data in a scratch copy of the repository.

`dvc exp run -S ...` composes conf/ into params.yaml through DVC's Hydra integration, then runs every stage;
afterwards `dvc status` must say the pipeline is up to date and the metrics must be recorded.
"""
import json
import shutil
import subprocess

import pytest

from conftest import ALL_MODELS, ROOT, SMALL_GRIDS, run


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    "A git repository holding the project's files (as a clone would), with tiny simulated data added to DVC."
    dst = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@mlpay.invalid"]
    run(*git, "init", "-q", cwd=dst)
    run("mlpay-params", "data=tiny", *SMALL_GRIDS, cwd=dst)
    run("mlpay-simulate", "--params", "params.yaml", cwd=dst)  # the tiny data: without --params it composes conf/ (handbook size)
    run("dvc", "add", "--quiet", "data", cwd=dst)
    for cmd in (["add", "-A"], ["commit", "-qm", "tiny"]): run(*git, *cmd, cwd=dst)
    return dst


def test_exp_run_composes_hydra_and_runs_every_stage(repo):
    proc = run("dvc", "exp", "run", "-S", "data=tiny", *(f"-S={o}" for o in SMALL_GRIDS), cwd=repo)
    assert "Running stage 'features'" in proc.stdout and "Running stage 'benchmark'" in proc.stdout
    metrics = json.loads((repo / "reports" / "benchmark.json").read_text())
    assert set(metrics["models"]) == ALL_MODELS
    shown = json.loads(run("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    assert "reports/benchmark.json" in json.dumps(shown)


def test_pipeline_is_up_to_date_afterwards(repo):
    status = run("dvc", "status", cwd=repo).stdout
    assert "up to date" in status, status
    again = run("dvc", "repro", cwd=repo).stdout
    assert "Running stage" not in again, again


def test_evaluation_plots_render(repo):
    "dvc.yaml's plot entries for mlpay-evaluate's CSVs load, with the x and y columns they name."
    shown = json.loads(run("dvc", "plots", "show", "--json", cwd=repo).stdout)
    ours = {"roc", "precision_recall", "reliability", "score_distribution"}
    errors = [e for e in shown.get("errors", []) if e.get("name") in ours or "reports/evaluate" in str(e.get("source"))]
    assert not errors, errors
    for name in ours:
        (plot,) = shown["data"][name]
        enc, values = plot["content"]["encoding"], plot["content"]["data"]["values"]
        assert values, name
        for axis in ("x", "y"):
            assert all(enc[axis]["field"] in v for v in values), (name, axis, enc[axis], values[0])


def test_changed_param_reruns_only_what_depends_on_it(repo):
    params = (repo / "params.yaml").read_text().replace("top_k: 100", "top_k: 50")
    (repo / "params.yaml").write_text(params)
    status = run("dvc", "status", cwd=repo).stdout
    assert "benchmark" in status and "features:" not in status, status
