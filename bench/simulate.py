"""Simulator speed on the default (Handbook-sized) config: target <= 20 s on 2 cores."""
from _common import best_of, print_table, save

from mlpay.config import compose
from mlpay.simulate import simulate

cfg = compose().data
seconds, tx = best_of(lambda: simulate(cfg, progress=False))
frauds = tx.group_by("TX_FRAUD_SCENARIO").len().sort("TX_FRAUD_SCENARIO")["len"].to_list()
published = {"transactions": 1_754_155, "frauds": 14_681, "scenario 1": 973, "scenario 2": 9_077, "scenario 3": 4_631}
ours = {"transactions": len(tx), "frauds": int(tx["TX_FRAUD"].sum()), **{f"scenario {i}": n for i, n in enumerate(frauds) if i}}
print_table("Simulator, default size (best of 3)", ["what", "published Handbook", "mlpay"],
            [[k, f"{published[k]:,}", f"{ours[k]:,}"] for k in published] + [["seconds", "", f"{seconds:.2f}"]])
save("simulate", {"seconds": seconds, "counts": ours, "published": published})
