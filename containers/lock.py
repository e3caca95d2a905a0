"""Lock the serving images' dependencies: every distribution pinned, with its sha256.

For each image (serve, serve-gpu), resolves containers/IMAGE/requirements.txt with pip (a dry run, no install),
constrained to the versions installed in this environment (what the tests ran), and writes
containers/IMAGE/requirements.lock, which the Dockerfile installs with `--require-hashes --no-deps`.
Resolved on Linux x86_64, CPython 3.11, glibc 2.36: the platform of python:3.11-slim-bookworm.

    python containers/lock.py        (make lock)
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name

from mlpay.files import atomic_path

HERE = Path(__file__).parent
IMAGES = ("serve", "serve-gpu")


def resolve(requirements: Path, constraints: Path) -> list[tuple[str, str, str]]:
    "(name, version, sha256) of every distribution pip would install for `requirements`, sorted by name."
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                        "-r", str(requirements), "-c", str(constraints)], check=True)
        found = json.loads(report.read_text())["install"]
    return sorted((canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"], i["download_info"]["archive_info"]["hashes"]["sha256"])
                  for i in found)


def main():
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True).stdout
        constraints.write("\n".join(line for line in frozen.splitlines() if "==" in line) + "\n"); constraints.flush()
        for image in IMAGES:
            lock = HERE / image / "requirements.lock"
            rows = resolve(HERE / image / "requirements.txt", Path(constraints.name))
            text = (f"# Every distribution of the {image} image, pinned with its hash (Linux x86_64, CPython 3.11, glibc 2.36).\n"
                    f"# Written by `make lock` (containers/lock.py) from requirements.txt; do not edit.\n"
                    + "".join(f"{n}=={v} --hash=sha256:{h}\n" for n, v, h in rows))
            with atomic_path(lock) as tmp: tmp.write_text(text)
            print(f"{lock.relative_to(HERE.parent)}: {len(rows)} distributions")


if __name__ == "__main__":
    main()
