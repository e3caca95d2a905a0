"""The contract fuzzed at length: tests/test_fuzz.py (schemathesis against the real server) with many examples.

MLPAY_FUZZ_EXAMPLES examples per operation and mode (positive, negative; /health and /ready take no input and have
one case each); prints the answers by operation, mode and status, and fails on any 5xx or contract breach.

    python bench/fuzz.py [--examples 1300]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table, save

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1300)
    a = p.parse_args()
    report = Path(tempfile.mkdtemp()) / "fuzz.json"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          env={**os.environ, "MLPAY_FUZZ_EXAMPLES": str(a.examples), "MLPAY_FUZZ_REPORT": str(report)},
                          capture_output=True, text=True)
    seen = json.loads(report.read_text()) if report.exists() else {}
    rows = [k.rsplit(" ", 2) + [v] for k, v in seen.items()]
    total, fivexx = sum(seen.values()), sum(v for k, v in seen.items() if k.rsplit(" ", 1)[1].startswith("5"))
    print_table(f"schemathesis over /openapi.json: {total:,} cases in {time.time() - t0:,.0f} s, {fivexx} answered 5xx "
                f"({a.examples} examples per operation and mode)", ["operation", "mode", "status", "cases"], rows)
    print(proc.stdout[-1500:] if proc.returncode else proc.stdout.strip().splitlines()[-1])
    save("fuzz", {"examples": a.examples, "cases": total, "5xx": fivexx, "by_status": seen, "passed": proc.returncode == 0})
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
