"""mlpay-train as a user runs it: Hydra overrides, DDP on CPU with two processes, clear config errors."""
import json

import pytest
import torch

from conftest import ROOT, run


@pytest.fixture(scope="module")
def tiny_features(tiny_params, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "features.parquet"
    run("mlpay-features", "--params", tiny_params, "--data", tiny_data, "--out", out)
    return out


def test_ddp_on_cpu_with_two_processes(tiny_features, tmp_path):
    proc = run("mlpay-train", "debug=fast", "trainer=ddp", "trainer.devices=2", f"paths.features={tiny_features}",
               f"paths.train={tmp_path}", cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, log[-3000:]  # two processes joined the process group
    assert log.count("trained ") == 1  # only rank 0 reports and writes
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(k.startswith("body.") for k in state)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["summary"]["epochs"] >= 1 and (tmp_path / "predictions.parquet").exists()
    assert (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_sequence_model_trains_from_the_command_line(tiny_features, tmp_path):
    run("mlpay-train", "debug=fast", "model=sequence", "model.history=4", "trainer.max_epochs=1",
        f"paths.features={tiny_features}", f"paths.train={tmp_path}", cwd=ROOT)
    assert json.loads((tmp_path / "model.json").read_text())["history"] == 4


def test_unknown_config_names_get_hydras_message(tmp_path):
    proc = run("mlpay-train", "model=transformer", cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "Could not find 'model/transformer'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run("mlpay-train", "trainer.devicez=2", cwd=ROOT, check=False)
    assert proc.returncode != 0 and "devicez" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
