"""params.yaml, the file every stage reads, must be what conf/ composes to."""
from omegaconf import OmegaConf

from mlpay.config import compose, load_params

from conftest import ROOT


def test_params_yaml_matches_conf():
    committed = OmegaConf.to_container(load_params(ROOT / "params.yaml"))
    assert committed == OmegaConf.to_container(compose(conf_dir=ROOT / "conf"), resolve=True), \
        "params.yaml is stale: run `make params` and commit it"


def test_unknown_config_group_is_a_clear_error(tmp_path):
    from conftest import run
    proc = run("mlpay-params", "--out", tmp_path / "p.yaml", "model=nonexistent", cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "model" in proc.stderr and not (tmp_path / "p.yaml").exists()


def test_group_choice_with_params_file_is_a_clear_error(tmp_path):
    "`--params params.yaml model=mlp` would replace the composed `model` mapping by a string: refused, pointing at conf/."
    from conftest import run
    out = tmp_path / "features.parquet"
    proc = run("mlpay-features", "--params", ROOT / "params.yaml", "--out", out, "model=mlp", cwd=tmp_path, check=False)
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.startswith("error: `model=mlp` would replace the whole `model` mapping"), proc.stderr
    assert "conf/" in proc.stderr and "dvc exp run -S model=mlp" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
