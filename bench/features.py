"""Feature speed: mlpay's polars pass vs the idiomatic pandas groupby-rolling, same features, same data.

Targets: the Handbook's baseline features on the default data (~1.75M rows) in <= 3 s on 2 cores, >= 5x pandas,
and agreement to 1e-9.
"""
import sys
from dataclasses import replace
from pathlib import Path

from _common import best_of, print_table, save

import polars as pl
from mlpay.config import compose
from mlpay.features import compute_features
from mlpay.registry import FeatureRegistry
from mlpay.simulate import simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import max_abs_difference, pandas_features  # noqa: E402  (the pandas oracle lives with the tests)

data = Path("data/transactions.parquet")
tx = pl.read_parquet(data) if data.exists() else simulate(compose().data, progress=False)
pdf = tx.to_pandas()
rows, payload = [], {"rows": len(tx)}
registry = FeatureRegistry.from_cfg(compose())
for label, spec in (("baseline (15)", replace(registry, rich=False)), (f"rich ({len(registry.names)})", registry)):
    t_pl, ours = best_of(lambda: compute_features(tx, spec))
    t_pd, ref = best_of(lambda: pandas_features(pdf, spec))
    diff = max_abs_difference(ours, ref, spec.names)
    rows.append([label, f"{t_pl:.2f}", f"{t_pd:.2f}", f"{t_pd / t_pl:.1f}x", f"{len(tx) / t_pl / 1e6:.2f}M", f"{diff:.1e}"])
    payload[label] = {"polars_s": t_pl, "pandas_s": t_pd, "speedup": t_pd / t_pl, "max_abs_diff": diff}
print_table(f"Features on {len(tx):,} transactions (best of 3 each)",
            ["feature set", "mlpay polars s", "pandas s", "speed-up", "rows/s", "max abs diff"], rows)
save("features", payload)
