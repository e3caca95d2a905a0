"""The pandas reference of the feature registry: each kind written the idiomatic pandas way (sort,
`groupby().rolling()` with time windows, `merge_asof`), independently of the executors' aggregates.

A test and benchmark oracle only (tests/test_features.py, bench/features.py): the library never imports it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from mlpay.registry import DAY_S, FEATURE_INPUTS, KEYS, FeatureRegistry


def pandas_features(tx: pd.DataFrame, registry: FeatureRegistry) -> pd.DataFrame:
    "The registry's computed features of `tx` (canonical schema), as a frame indexed like `tx`."
    df = tx[FEATURE_INPUTS].copy()
    out = pd.DataFrame(index=df.index)
    d = registry.label_delay_days
    for f in registry.computed:
        col = KEYS.get(f.key)
        if f.kind == "amount": out[f.name] = df.TX_AMOUNT.astype(float)
        elif f.kind == "weekend": out[f.name] = (df.TX_DATETIME.dt.day_of_week >= 5).astype(float)
        elif f.kind == "night": out[f.name] = (df.TX_DATETIME.dt.hour <= registry.night_end_hour).astype(float)
        elif f.kind == "seconds_since_prev":
            s = df.sort_values([col, "TX_DATETIME", "TRANSACTION_ID"])
            gap = s.groupby(col, sort=False).TX_DATETIME.diff().dt.total_seconds()
            out.loc[s.index, f.name] = gap.fillna(np.inf).clip(upper=f.window_days * DAY_S)
        elif f.kind == "seconds_since_fraud":
            frauds = df.loc[df.TX_FRAUD == 1, [col, "TX_DATETIME"]].rename(columns={"TX_DATETIME": "FRAUD_TIME"})
            asked = df[[col, "TX_DATETIME"]].assign(KNOWN_AT=df.TX_DATETIME - pd.Timedelta(days=d))
            last = pd.merge_asof(asked.reset_index().sort_values("KNOWN_AT"), frauds.sort_values("FRAUD_TIME"),
                                 left_on="KNOWN_AT", right_on="FRAUD_TIME", by=col).set_index("index")
            since = (last.TX_DATETIME - last.FRAUD_TIME).dt.total_seconds().fillna(np.inf)
            out[f.name] = since.clip(upper=(f.window_days + d) * DAY_S)
        elif not f.delayed:  # card windows (t - w, t] in arrival order, the transaction included
            s = df.sort_values([col, "TX_DATETIME", "TRANSACTION_ID"])
            roll = s.groupby(col, sort=False).rolling(f"{f.window_days}D", on="TX_DATETIME")["TX_AMOUNT"]
            n, total = roll.count().to_numpy(), roll.sum().to_numpy()
            mean = total / n
            amount = s.TX_AMOUNT.to_numpy()
            v = {"count": n, "mean_amount": mean,
                 "amount_ratio": np.where(mean > 0, amount / np.where(mean > 0, mean, 1), 1.0)}[f.kind]
            out.loc[s.index, f.name] = v
        else:  # terminal windows (t - d - w, t - d]: all of (t - d - w, t] less the not-yet-known (t - d, t]
            s = df.sort_values([col, "TX_DATETIME", "TRANSACTION_ID"])
            g = s.groupby(col, sort=False)
            recent = g.rolling(f"{d}D", on="TX_DATETIME")["TX_FRAUD"]
            roll = g.rolling(f"{d + f.window_days}D", on="TX_DATETIME")["TX_FRAUD"]
            n = roll.count().to_numpy() - recent.count().to_numpy()
            fr = roll.sum().to_numpy() - recent.sum().to_numpy()
            v = {"count": n, "fraud_count": fr, "fraud_rate": np.where(n > 0, fr / np.where(n > 0, n, 1), 0.0)}[f.kind]
            out.loc[s.index, f.name] = v
    return out[registry.names].astype(float)


def max_abs_difference(a, b: pd.DataFrame, names: list[str]) -> float:
    "The largest absolute difference between the `names` columns of two feature frames in the same row order."
    return max(float(np.max(np.abs(np.asarray(a[n]) - b[n].to_numpy()), initial=0.0)) for n in names)
