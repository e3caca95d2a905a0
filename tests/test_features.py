"""The batch executor against the pandas oracle: same registry, same numbers (to 1e-9)."""
from dataclasses import replace
from pathlib import Path

import pytest

from mlpay.config import compose
from mlpay.features import compute_features
from mlpay.registry import FeatureRegistry
from mlpay.simulate import simulate
from oracle import max_abs_difference, pandas_features

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return simulate(compose(["data=tiny"], conf_dir=ROOT / "conf").data, progress=False)


@pytest.mark.parametrize("overrides", [[], ["features=handbook"], ["label_delay_days=3"]])
def test_batch_executor_matches_pandas(tiny, overrides):
    registry = FeatureRegistry.from_cfg(compose(overrides, conf_dir=ROOT / "conf"))
    ours = compute_features(tiny, registry)
    ref = pandas_features(tiny.to_pandas(), registry)
    assert list(ref.columns) == registry.names
    assert max_abs_difference(ours, ref, registry.names) <= 1e-9


def test_oracle_sees_a_changed_definition(tiny):
    "The comparison can fail: another night definition gives other numbers."
    registry = FeatureRegistry.from_cfg(compose(conf_dir=ROOT / "conf"))
    ours = compute_features(tiny, registry)
    ref = pandas_features(tiny.to_pandas(), replace(registry, night_end_hour=3))
    assert max_abs_difference(ours, ref, ["TX_DURING_NIGHT"]) == 1.0
