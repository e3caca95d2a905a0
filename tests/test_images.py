"""The container images built and run with a real engine (`make test-images`; CI runs it after `make test`).

The images are built here by containers/images.py, as `make images` builds them (the local Debian base, no
registry, the build CA as a secret), with the tests' tiny model package in place of artifacts/model and the tag
`test`. Then they are run as Kubernetes runs them: the image's non-root user, a read-only root filesystem with a
/tmp tmpfs, no capabilities. Marked `images` (not in the default run): a machine with no usable engine skips them,
saying why.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from test_serve import KEY, TX, Server, free_port, post

sys.path.insert(0, str(ROOT / "containers"))
import images  # noqa: E402  (containers/images.py: what `make images` runs)

pytestmark = pytest.mark.images
TAG = "test"
UID = 10001  # the images' USER
CUDA_PROVIDER = "libonnxruntime_providers_cuda.so"


def engine_problem() -> str | None:
    "Why no image can be built or run here, or None."
    try: name = images.engine()
    except SystemExit as e: return str(e)
    proc = subprocess.run(images.engine_cmd("info"), capture_output=True, text=True)
    return None if proc.returncode == 0 else f"`{name} info` failed: {proc.stderr.strip()[-500:]}"


@pytest.fixture(scope="session")
def engine():
    if problem := engine_problem(): pytest.skip(f"no usable container engine: {problem}")
    return images.engine()


def run(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(images.engine_cmd(*args), capture_output=True, text=True, timeout=timeout)
    if check: assert proc.returncode == 0, f"{' '.join(args[:3])}...: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


class Built(dict):
    "image -> reference, each image of images.toml built on first use, with the tests' package as the serving model."
    def __init__(self, context):
        super().__init__(); self.context = context

    def __missing__(self, name):
        self[name] = images.build(name, self.context if "serve" in name else ROOT, tag=TAG)
        return self[name]


@pytest.fixture(scope="session")
def built(engine, package, tmp_path_factory):
    return Built(images.model_context(package / "model", tmp_path_factory.mktemp("context")))


class Container:
    "A serving image started detached on a loopback port, hardened as in Kubernetes; the API key mounted as a file."
    def __init__(self, ref, tmp_path, state):
        self.port, self.name = free_port(), f"mlpay-test-{uuid.uuid4().hex[:8]}"
        keys = tmp_path / "keys"
        keys.mkdir(exist_ok=True)
        (keys / "api-key").write_text(KEY)
        run("run", "-d", "--name", self.name, "--no-healthcheck", "--read-only", "--tmpfs", "/tmp:rw,size=256m,mode=1777",
            "--cap-drop=ALL", "--security-opt=no-new-privileges", "-p", f"127.0.0.1:{self.port}:8000",
            "-v", f"{keys}:/var/run/secrets/mlpay:ro", "-v", f"{state}:/state:rw",
            "-e", "MLPAY_API_KEY_FILE=/var/run/secrets/mlpay/api-key", "-e", "MLPAY_STATE_DIR=/state", ref)
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200: return
            except OSError: pass
            if run("inspect", "--format", "{{.State.Running}}", self.name, check=False).stdout.strip() != "true":
                pytest.fail(f"{ref} exited: {self.logs()}")
            time.sleep(0.5)
        pytest.fail(f"{ref}: /health not ready in 120 s: {self.logs()}")

    def logs(self) -> str:
        p = run("logs", self.name, check=False)
        return (p.stdout + p.stderr)[-3000:]

    def exec(self, *argv, check=True):
        return run("exec", self.name, *argv, check=check)

    def stop(self) -> int:
        "SIGTERM (the server snapshots its state), up to 30 s; the exit code."
        run("stop", "-t", "30", self.name)
        code = int(run("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())
        run("rm", "-f", self.name, check=False)
        return code

    def remove(self):
        run("rm", "-f", self.name, check=False)


def state_dir(tmp_path, name="state"):
    "A host directory the image's user may write (the state volume)."
    d = tmp_path / name
    d.mkdir()
    os.chown(d, UID, UID)
    return d


def without_latency(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "latency_ms"}


def host_answer(package, tmp_path) -> dict:
    "What `mlpay-serve` on this machine (as `make serve` runs it) answers to TX with the same package and no state."
    s = Server(package / "model", MLPAY_STATE_DIR=tmp_path / "host-state")
    try:
        status, body = post(s.port, "/predict", TX)
    finally: s.stop()
    assert status == 200, body
    return json.loads(body)


@pytest.mark.parametrize("image", ["mlpay-serve", "mlpay-serve-gpu"])
def test_serving_image_scores_hardened_and_snapshots_on_sigterm(built, package, tmp_path, image):
    state = state_dir(tmp_path)
    c = Container(built[image], tmp_path, state)
    try:
        # Non-root, and nothing outside /tmp is writable.
        assert run("image", "inspect", "--format", "{{.Config.User}}", built[image]).stdout.strip() == f"{UID}:{UID}"
        assert c.exec("id", "-u").stdout.strip() == str(UID)
        denied = c.exec("sh", "-c", "touch /models/fraud/x || touch /srv/mlpay/x || touch /x", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        assert c.exec("touch", "/tmp/x").returncode == 0
        # The same answer as the server on this machine, from the same package, for the same first request.
        status, body = post(c.port, "/predict", TX)
        assert status == 200, body
        assert without_latency(json.loads(body)) == without_latency(host_answer(package, tmp_path))
        assert post(c.port, "/predict", TX, key="wrong-key-" + "x" * 10)[0] == 401
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'mlpay_requests_total{path="/predict",status="200"} 1.0' in metrics
        assert "mlpay_decisions_total" in metrics
        # SIGTERM: a clean exit that snapshots the online state to the volume.
        assert c.stop() == 0
    finally: c.remove()
    assert (state / "online-state.npz").exists()
    # Started again on that state, the server remembers the transaction: the same id with another amount conflicts.
    c = Container(built[image], tmp_path, state)
    try:
        status, body = post(c.port, "/predict", {**TX, "tx_amount": TX["tx_amount"] + 1})
        assert status == 409, body
    finally: c.remove()


def test_gpu_image_carries_cuda_for_onnxruntime(built):
    # No GPU here: the image serves on the CPU provider (above); what a GPU node needs of the image is checked here.
    ref = built["mlpay-serve-gpu"]
    providers = run("run", "--rm", "--entrypoint", "python", ref, "-c",
                    "import onnxruntime as o; print(','.join(o.get_available_providers()))").stdout.strip().split(",")
    assert "CUDAExecutionProvider" in providers and "CPUExecutionProvider" in providers
    # Every library the CUDA provider links is in the image, except the driver's libcuda, which the NVIDIA container
    # toolkit mounts from the host.
    ldd = run("run", "--rm", "--entrypoint", "sh", ref, "-c",
              f"ldd $(python -c 'import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__).parent / \"capi\" / \"{CUDA_PROVIDER}\")')").stdout
    missing = sorted({line.split()[0] for line in ldd.splitlines() if "not found" in line})
    assert missing == ["libcuda.so.1"], ldd
    assert "libcublas" in ldd
    # cuDNN is opened when a session starts, through the dynamic linker's cache the image configured.
    assert "libcudnn.so.9" in run("run", "--rm", "--entrypoint", "ldconfig", ref, "-p").stdout


def test_train_image_runs_mlpay_train(built):
    # The training image as a Job runs it: simulate tiny data, features, then `mlpay-train debug=fast` (CPU here).
    proc = run("run", "--rm", "--tmpfs", "/tmp:rw,size=1g", built["mlpay-train"], "sh", "-c",
               "mlpay-params debug=fast && mlpay-simulate --params params.yaml && mlpay-features --params params.yaml"
               " && mlpay-train debug=fast && ls artifacts/train", timeout=900)
    assert "val AP" in proc.stdout and "predictions.parquet" in proc.stdout.split(), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert run("image", "inspect", "--format", "{{.Config.User}}", built["mlpay-train"]).stdout.strip() == f"{UID}:{UID}"


def test_build_ca_is_not_baked_into_the_images(built):
    # The builds trust the host's CA bundle through the build secret `ca`; the images keep Debian's own store.
    ca = images.ca_bundle()
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))  # a host's own CAs (update-ca-certificates)
    if ca is None or not extra: pytest.skip("this machine's builds use no extra CA certificate")
    pem = extra[0].read_text().strip().splitlines()[1]  # a line of the first extra certificate's body
    for ref in (built[name] for name in images.CONFIG["images"]):
        store = run("run", "--rm", "--entrypoint", "cat", ref, "/etc/ssl/certs/ca-certificates.crt").stdout
        assert store and pem not in store, f"{ref} holds {extra[0]}"
        assert run("run", "--rm", "--entrypoint", "sh", ref, "-c", "test ! -e /run/secrets/ca").returncode == 0


def test_unknown_image_and_missing_model_are_refused(tmp_path):
    # No engine needed: the CLI refuses before building.
    for argv, message in ((["mlpay-nope"], "unknown images"), (["mlpay-serve", "--model", str(tmp_path)], "no model package")):
        proc = subprocess.run([sys.executable, ROOT / "containers/images.py", *argv], capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
