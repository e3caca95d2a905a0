"""Build the container images with a real engine, offline from image registries (`make images`).

    python containers/images.py                 # the base (once), then every image of images.toml
    python containers/images.py mlpay-serve     # the base if missing, then these images
    python containers/images.py --sizes         # the images' sizes

The engine is podman (Debian's, with runc) or docker.io's daemon: $MLPAY_ENGINE, else the first on PATH. No image
registry is reachable here, so the base every Dockerfile starts FROM (PYTHON_IMAGE) is made locally from the
Debian archive with debootstrap (as root) and imported into the engine; set MLPAY_PYTHON_IMAGE to use another
(python:3.11-slim-bookworm where a registry is reachable). Builds never pull (`--pull=never`).
"""
import argparse
import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "containers/images.toml").read_text())


def version() -> str:
    "settings.ini's version: every image's tag."
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]["version"]


def engine() -> str:
    "The container engine's command: $MLPAY_ENGINE, else podman or docker, whichever is on PATH first."
    name = os.environ.get("MLPAY_ENGINE") or next((e for e in ("podman", "docker") if shutil.which(e)), None)
    if not name or not shutil.which(name):
        raise SystemExit(f"no container engine: install podman (apt-get install podman runc) or set MLPAY_ENGINE (got {name!r})")
    return name


def engine_cmd(*args: str) -> list[str]:
    "An engine command line with the runtime and rlimits of images.toml's [engine] (podman; docker takes the rlimits)."
    name, eng = engine(), CONFIG["engine"]
    head = [name, "--runtime", eng["runtime"]] if Path(name).name == "podman" else [name]
    limits = [f"--ulimit={u}" for u in eng["ulimits"]] if args[0] in ("build", "run", "create") else []
    return [*head, args[0], *limits, *args[1:]]


def image_exists(ref: str) -> bool:
    return subprocess.run(engine_cmd("image", "inspect", ref), capture_output=True).returncode == 0


def ca_bundle() -> Path | None:
    "The CA bundle the builds' pip trusts ($MLPAY_BUILD_CA, else the first of images.toml's that exists)."
    if env := os.environ.get("MLPAY_BUILD_CA"):
        if not Path(env).is_file(): raise SystemExit(f"MLPAY_BUILD_CA={env}: no such file")
        return Path(env)
    return next((Path(p) for p in CONFIG["engine"]["ca_bundles"] if Path(p).is_file()), None)


def make_base() -> str:
    "The base image (images.toml [base]), debootstrapped and imported unless the engine has it; its name."
    base = CONFIG["base"]
    if image_exists(base["name"]): return base["name"]
    if os.geteuid() != 0: raise SystemExit("debootstrap needs root: run `make images` as root, or set MLPAY_PYTHON_IMAGE")
    if not shutil.which("debootstrap"): raise SystemExit("debootstrap is missing: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        rootfs = Path(d) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(base['packages'])}", base["suite"],
                        rootfs, base["mirror"]], check=True, stdout=subprocess.DEVNULL)
        (rootfs / "etc/apt/sources.list").write_text("\n".join(base["sources"]) + "\n")
        # What a slim image leaves out: the downloaded packages, apt's lists, manuals, translations, and the
        # documentation except each package's copyright file (its licence, which a published image carries).
        for junk in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/man/*", "usr/share/locale/*",
                     "usr/share/doc/*/*"):
            for p in rootfs.glob(junk):
                if p.name == "copyright" or p.name == "partial": continue
                if p.is_dir() and not p.is_symlink(): shutil.rmtree(p)
                else: p.unlink()
        shutil.rmtree(rootfs / "debootstrap", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(engine_cmd("import", "--change", 'CMD ["/bin/bash"]', "--change", "ENV LANG=C.UTF-8", "-",
                                  base["name"]), stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        if tar.wait(): raise SystemExit("tar of the base root filesystem failed")
    return base["name"]


def python_image() -> str:
    "What the Dockerfiles build FROM: $MLPAY_PYTHON_IMAGE, else the local base (made on first use)."
    return os.environ.get("MLPAY_PYTHON_IMAGE") or make_base()


def build(name: str,              # an image of images.toml [images]
          context: Path = ROOT,   # the build context (the repository root, or a copy holding another model)
          tag: str | None = None, # default: settings.ini's version
          ) -> str:
    "Build one image with the engine, offline; its reference."
    dockerfile = ROOT / CONFIG["images"][name]
    ref = f"{name}:{tag or version()}"
    args = ["build", "-f", str(dockerfile), "-t", ref, "--build-arg", f"PYTHON_IMAGE={python_image()}"]
    if (ignore := dockerfile.with_name("Dockerfile.dockerignore")).exists() and Path(engine()).name == "podman":
        args += ["--ignorefile", str(ignore)]  # docker's BuildKit finds <Dockerfile>.dockerignore by itself
    if Path(engine()).name == "podman": args += ["--pull=never", "--format", "docker"]  # docker format: HEALTHCHECK
    if ca := ca_bundle(): args += ["--secret", f"id=ca,src={ca}"]
    subprocess.run(engine_cmd(*args, str(context)), check=True)
    return ref


def model_context(model: Path, # a model package directory
                  dest: Path,  # an empty directory: the build context
                  ) -> Path:
    "A build context for the serving images holding `model` as artifacts/model: what their allowlists name, copied."
    allowed = {line[1:].rstrip("/") for name, f in CONFIG["images"].items() if "serve" in name
               for line in (ROOT / f).with_name("Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")}
    for rel in sorted(allowed - {"artifacts/model"}):
        src, dst = ROOT / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir(): shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else: shutil.copy2(src, dst)
    shutil.copytree(model, dest / "artifacts/model")
    return dest


def size(ref: str) -> int:
    "An image's size in bytes, as the engine reports it."
    out = subprocess.run(engine_cmd("image", "inspect", "--format", "{{.Size}}", ref), capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def sizes(names) -> str:
    "A Markdown table of the images' sizes."
    rows = [f"| `{n}:{version()}` | {size(f'{n}:{version()}') / 2**20:,.0f} MiB |" for n in names]
    return "\n".join(["| image | size |", "|---|---|", *rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="*", help=f"images to build (default: all of {', '.join(CONFIG['images'])})")
    p.add_argument("--model", type=Path, help="the serving images' model package (default: artifacts/model)")
    p.add_argument("--sizes", action="store_true", help="print the images' sizes instead of building")
    a = p.parse_args(argv)
    if unknown := set(a.images) - set(CONFIG["images"]): p.error(f"unknown images {sorted(unknown)}: images.toml has {list(CONFIG['images'])}")
    names = a.images or list(CONFIG["images"])
    if a.sizes:
        print(sizes(names)); return
    model = a.model or ROOT / "artifacts/model"
    if not (model / "manifest.json").exists() and any("serve" in n for n in names):
        raise SystemExit(f"{model}/ has no model package (manifest.json): run `make pipeline` (or `dvc pull`) first")
    with tempfile.TemporaryDirectory() as d:
        context = model_context(model, Path(d)) if a.model else ROOT
        for n in names:
            t0 = time.perf_counter()
            ref = build(n, context if "serve" in n else ROOT)
            print(f"{ref}: built in {time.perf_counter() - t0:.0f} s, {size(ref) / 2**20:,.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
