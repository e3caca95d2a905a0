"""mlpay-train as a user runs it: Hydra overrides, DDP on CPU with two processes, two torchrun nodes, clear config errors."""
import json
import os
import subprocess
import tempfile

import polars as pl
import pytest
import torch

from conftest import BIN, ROOT, run
from mlpay.train import torchrun_command
from test_serve import free_port


@pytest.fixture(scope="module")
def tiny_features(tiny_params, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "features.parquet"
    run("mlpay-features", "--params", tiny_params, "--data", tiny_data, "--out", out)
    return out


@pytest.mark.slow  # Lightning spawning its own processes; the fast suite trains DDP under torchrun on two nodes
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


# Two "nodes" on this machine: two torchrun launches meeting at a c10d rendezvous on loopback, one gloo process each.
# Dropout off: each rank would draw its own masks, for its own half batch. 6292 training rows (14 days, the last 3
# validating): even, so the two ranks' shares of every step are one process's batch exactly (no padding).
PARITY = ["debug=fast", "model=sequence", "model.history=4", "model.net.dropout=0", "trainer.max_epochs=2",
          "train.days=14", "train.val_days=3"]
# float32 rounding: the all-reduce sums the two half-batch gradients in another order than one process sums its batch.
# Measured 6e-7 (weights) and 1e-7 (scores) after 2 epochs; one row seen twice in the last step of an epoch (an odd
# row count, padded) moves them by 2e-3, another batch size by 4e-2 (nbs/23_train.ipynb, "Several nodes").
TOL = 1e-5


def nodes(*argvs, timeout=600):
    "Run one torchrun per argv at once, as separate nodes would; their (return code, output) once all have exited."
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}  # the nodes share the cores
    logs = [tempfile.TemporaryFile("w+") for _ in argvs]  # files, not pipes: a node blocked on a full pipe would stall the other
    procs = [subprocess.Popen(list(map(str, a)), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT) for a, f in zip(argvs, logs)]
    try:
        for p in procs: p.wait(timeout)
        for f in logs: f.seek(0)
        return [(p.returncode, f.read()) for p, f in zip(procs, logs)]
    finally:
        for p, f in zip(procs, logs):
            if p.poll() is None: p.kill(); p.wait()
            f.close()


def files(d): return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_two_nodes_train_the_model_one_process_trains(tiny_features, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run("mlpay-train", *PARITY, f"paths.features={tiny_features}", f"paths.train={one}", cwd=ROOT)
    argv = torchrun_command(2, 1, f"127.0.0.1:{free_port()}", *PARITY, f"paths.features={tiny_features}", f"paths.train={two}")
    (rc0, log0), (rc1, log1) = nodes(argv, argv)  # the same command on both: the rendezvous gives the ranks
    assert rc0 == rc1 == 0, (log0[-3000:], log1[-3000:])
    assert sorted(m for log in (log0, log1) for m in ("MEMBER: 1/2", "MEMBER: 2/2") if m in log) == ["MEMBER: 1/2", "MEMBER: 2/2"]
    assert (log0 + log1).count("trained ") == 1  # only global rank 0 reports and writes
    assert files(two) == files(one)  # the same files: model, predictions, checkpoint, DVCLive logs
    w1, w2 = (torch.load(d / "model.pt", weights_only=True) for d in (one, two))
    assert w1.keys() == w2.keys() and max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1) < TOL
    p1, p2 = (pl.read_parquet(d / "predictions.parquet") for d in (one, two))
    assert p1.drop("score").equals(p2.drop("score")) and (p1["score"] - p2["score"]).abs().max() < TOL
    s1, s2 = (json.loads((d / "model.json").read_text())["summary"] for d in (one, two))
    assert (s1["epochs"], s1["best_epoch"], s1["train_rows"]) == (s2["epochs"], s2["best_epoch"], s2["train_rows"])
    assert s1["val_ap"] == pytest.approx(s2["val_ap"], abs=TOL)  # synced over the ranks: early stopping agrees


def test_a_node_that_never_joins_times_out(tiny_features, tmp_path):
    argv = torchrun_command(2, 1, f"127.0.0.1:{free_port()}", *PARITY, f"paths.features={tiny_features}", f"paths.train={tmp_path}",
                            join_timeout=5)
    ((rc, log),) = nodes(argv)  # the second node never starts
    assert rc != 0 and "RendezvousTimeoutError" in log, log[-3000:]
    assert not any(tmp_path.iterdir())  # no training started, nothing written


def test_torchrun_and_lightning_must_agree_on_the_nodes(tiny_features, tmp_path):
    argv = torchrun_command(2, 1, f"127.0.0.1:{free_port()}", *PARITY, f"paths.features={tiny_features}", f"paths.train={tmp_path}")
    argv[argv.index("--nnodes=2")] = "--nnodes=1"  # one node launched where the trainer expects two
    ((rc, log),) = nodes(argv)
    assert rc != 0 and "does not match the world size (1)" in log, log[-3000:]
