"""The model registry (mlpay.stages, `mlpay-registry`) with real components: a git repository with DVC tracking a trained
model package, GTO's tags, a DVC remote that a fresh clone downloads from, and a running `mlpay-serve` that a stage
is deployed to through its admin endpoint.

The notebook (nbs/67_stages.ipynb) tests the registry's rules on a stand-in package; here the package is the
session's tiny trained one (conftest.py `package`).
"""
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import BIN, run
from mlpay.package import load_package
from mlpay.stages import RegistryError, assign, current, deploy, fetch, history, put_lineup, register, stages, versions, write_config

API_KEY, ADMIN_KEY = "test-api-key-not-a-secret", "test-admin-key-not-a-secret"
GATE_PROMOTE = {"decision": "promote", "why": ["challenger AP 0.61 >= champion AP 0.42 + margin on days 174..180"],
                "challenger_ap": 0.61, "champion_ap": 0.42}
GATE_REFUSE = {"decision": "refuse", "why": ["challenger AP 0.03: no better than chance (labels shuffled?)"], "challenger_ap": 0.03}


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *map(str, args)], check=True, capture_output=True, text=True).stdout


def dvc(repo, *args):
    return run(BIN / "dvc", *args, cwd=repo).stdout


def registry(*args, check=True):
    "`mlpay-registry ARGS`: the console script once settings.ini declares it, else the same `main` through Python."
    exe = BIN / "mlpay-registry"
    argv = [exe] if exe.exists() else [sys.executable, "-c", "import sys; from mlpay.stages import main; main(sys.argv[1:])"]
    return run(*argv, *args, check=check)


def commit_package(repo, src, message):
    "Copy the package `src` into the repository's artifacts/model, track it with DVC, commit."
    dst = repo / "artifacts" / "model"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    dvc(repo, "add", "-q", "artifacts/model")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)


@pytest.fixture
def repo(tmp_path, package):
    "A git + DVC repository declaring the artifact as dvc.yaml does, with .gto, a local DVC remote, and one committed package."
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "ml@mlpay.invalid")
    git(repo, "config", "user.name", "ml")
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "-d", "store", tmp_path / "dvc-remote")
    (repo / "dvc.yaml").write_text("artifacts:\n  fraud-model:\n    path: artifacts/model\n    type: model\n"
                                   "    desc: The fraud-scoring model package served by mlpay-serve\n")
    write_config(repo)
    commit_package(repo, package / "model", "the pipeline's model")
    return repo


def write_report(path, report):
    path.write_text(json.dumps(report))
    return path


def test_versions_stages_and_a_fresh_clone(repo, tmp_path, package):
    v1 = register(repo, message="champion: trained 2018-07-25 + 28 days")
    # the retrained package: the same files here (one trained package per session); a new commit, a new version
    (repo / "RETRAINED").write_text("as of day 174\n")
    git(repo, "add", "RETRAINED")
    git(repo, "commit", "-qm", "retrain")
    v2 = register(repo, bump="minor", message="challenger: retrained on matured labels as of day 174")
    assert (v1, v2) == ("v0.0.1", "v0.1.0") and list(versions(repo)) == [v1, v2]
    promote, refuse = write_report(tmp_path / "promote.json", GATE_PROMOTE), write_report(tmp_path / "refuse.json", GATE_REFUSE)
    assert assign(repo, v1, "prod", report=promote)["prod"] == v1
    assert assign(repo, v2, "shadow")["shadow"] == v2
    # the shuffled-labels variant is refused by the gate: prod does not take it, and nothing is tagged
    tags = git(repo, "tag", "-l")
    with pytest.raises(RegistryError, match=r"v0.1.0 cannot go to prod: the gate report .* says 'refuse': challenger AP 0.03"):
        assign(repo, v2, "prod", report=refuse)
    with pytest.raises(RegistryError, match="without the promotion gate's report"):
        assign(repo, v2, "prod")
    assert git(repo, "tag", "-l") == tags
    assert stages(repo) == {"shadow": v2, "prod": v1, "archived": None}
    # promotion: the previous champion is archived, the shadow slot is empty (its version is now prod)
    assert assign(repo, v2, "prod", report=promote) == {"shadow": None, "prod": v2, "archived": v1}
    promoted = [e for e in history(repo) if e["event"] == "assignment" and e["stage"] == "prod"][-1]
    assert promoted["version"] == v2 and promoted["gate"]["decision"] == "promote" and promoted["gate"]["challenger_ap"] == 0.61
    assert promoted["message"].startswith("gate promote: challenger AP 0.61")
    # GTO's own CLI reads the same tags
    shown = run(BIN / "gto", "show", "fraud-model", "--json", cwd=repo).stdout
    assert {v["version"] for v in json.loads(shown)} >= {v1, v2}

    # the package of a version, downloaded by DVC: identical to what was committed, and verifiable
    root = tmp_path / "packages"
    p1 = fetch(repo, v1, root)
    assert p1 == root / v1 and load_package(p1).manifest == load_package(package / "model").manifest
    # a fresh clone (a deployment host) has no DVC cache: fetch downloads from the default remote once pushed
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", repo, clone)
    with pytest.raises(RegistryError, match=r"v0.1.0 \(commit [0-9a-f]{12}\): DVC could not download fraud-model"):
        fetch(clone, v2, tmp_path / "clone-packages")
    dvc(repo, "push", "-q")
    p2 = fetch(clone, current(clone, "prod"), tmp_path / "clone-packages")
    assert p2.name == v2 and load_package(p2).manifest["version"] == load_package(package / "model").manifest["version"]
    assert stages(clone) == stages(repo)  # the registry travels with the tags


def test_console_script(repo, tmp_path):
    out = json.loads(registry("--repo", repo, "register", "-m", "first").stdout)
    assert out == {"version": "v0.0.1"}
    refuse = write_report(tmp_path / "refuse.json", GATE_REFUSE)
    proc = registry("--repo", repo, "assign", "v0.0.1", "prod", "--report", refuse, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("mlpay-registry: error: v0.0.1 cannot go to prod")
    promote = write_report(tmp_path / "promote.json", GATE_PROMOTE)
    assert json.loads(registry("--repo", repo, "assign", "v0.0.1", "prod", "--report", promote).stdout)["stages"]["prod"] == "v0.0.1"
    shown = json.loads(registry("--repo", repo, "show").stdout)
    assert shown["stages"] == {"shadow": None, "prod": "v0.0.1", "archived": None} and list(shown["versions"]) == ["v0.0.1"]
    events = json.loads(registry("--repo", repo, "show", "--history").stdout)["history"]
    assert [e["event"] for e in events] == ["registration", "assignment"] and events[-1]["gate"]["decision"] == "promote"
    proc = registry("--repo", repo, "assign", "v0.0.1", "staging", check=False)
    assert proc.returncode == 2 and "invalid choice: 'staging'" in proc.stderr


def admin_lineup(url, key=ADMIN_KEY):
    "(status, body) of GET /admin/lineup."
    req = urllib.request.Request(f"{url}/admin/lineup", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_deploy_to_a_running_server(repo, tmp_path, package):
    from mlpay.replay import serving
    register(repo)
    (repo / "RETRAINED").write_text("as of day 174\n")
    git(repo, "add", "RETRAINED")
    git(repo, "commit", "-qm", "retrain")
    register(repo)
    promote = write_report(tmp_path / "promote.json", GATE_PROMOTE)
    assign(repo, "v0.0.1", "prod", report=promote)
    assign(repo, "v0.0.2", "shadow")
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    root = tmp_path / "packages"
    with serving(package / "model", API_KEY, MLPAY_ADMIN_KEY=ADMIN_KEY, MLPAY_STATE_DIR=tmp_path / "state") as url:
        status, body = admin_lineup(url)
        if status == 404:
            pytest.skip("the server has no GET /admin/lineup yet (nbs/52_serve): the deploy contract is untested against it")
        assert status == 200, body
        assert admin_lineup(url, "wrong-key")[0] == 401
        # the shadow: the version in shadow, through the console script
        proc = registry("--repo", repo, "deploy", "--stage", "shadow", "--server", url, "--admin-key-file", key_file,
                        "--package-root", root)
        out = json.loads(proc.stdout)
        assert out["version"] == "v0.0.2" and out["path"] == str((root / "v0.0.2").resolve())
        status, lineup = admin_lineup(url)
        assert status == 200 and lineup["shadow"]["path"] == out["path"]
        # the champion: the version in prod
        out = deploy(repo, "prod", url, ADMIN_KEY, root)
        assert out["version"] == "v0.0.1" and admin_lineup(url)[1]["champion"]["path"] == str((root / "v0.0.1").resolve())
        # refusals: a wrong admin key (401); a package that fails verification (409), the old one serving on
        with pytest.raises(RegistryError, match="HTTP 401"):
            deploy(repo, "prod", url, "wrong-key", root)
        broken = tmp_path / "broken"
        shutil.copytree(root / "v0.0.1", broken)
        (broken / "model.onnx").write_bytes(b"not the model the manifest hashes")
        before = admin_lineup(url)[1]
        with pytest.raises(RegistryError, match="HTTP 409: the server refused the package"):
            put_lineup(url, ADMIN_KEY, {"champion": str(broken)})
        assert admin_lineup(url)[1]["champion"] == before["champion"]
        with pytest.raises(RegistryError, match="HTTP 422"):
            put_lineup(url, ADMIN_KEY, {"challenger_share": 1.5})
        # the shadow withdrawn: shadow null
        assert put_lineup(url, ADMIN_KEY, {"shadow": None})["shadow"] is None


def test_deploy_needs_a_reachable_server(repo, tmp_path):
    register(repo)
    assign(repo, "v0.0.1", "prod", report=write_report(tmp_path / "promote.json", GATE_PROMOTE))
    from prometheus import free_port
    with pytest.raises(RegistryError, match="cannot reach the server"):
        deploy(repo, "prod", f"http://127.0.0.1:{free_port()}", ADMIN_KEY, tmp_path / "packages", timeout=5)
    assert os.listdir(tmp_path / "packages") == ["v0.0.1"]  # fetched and verified before the server was asked
