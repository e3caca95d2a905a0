"""Artifacts in object storage, through a real S3 API on loopback (moto's server, credentials checked); GCS and Azure Blob emulators (slow).

DVC: `dvc push` of the data and the model package, then `dvc pull` into a fresh `git clone`, whose package the server
serves with the original's answers. Packages: `mlpay-publish` and `mlpay-fetch` (the init container's command), with a
tampered object, wrong or missing credentials, a missing bucket and an unreachable endpoint refused in one line.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import BIN, ROOT
from test_serve import TX, Server, free_port, post

GIT = ["git", "-c", "user.name=ci", "-c", "user.email=ci@mlpay.invalid"]


def cli(*args, env, cwd=None, check=True) -> subprocess.CompletedProcess:
    "Run a command (a console script of the venv: `env` puts it first on PATH) with `env`; its completed process."
    proc = subprocess.run(list(map(str, args)), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def make_remote(repo: Path, env: dict, check=True) -> subprocess.CompletedProcess:
    "`make remote` in `repo`, which has no .venv of its own: the install stamp is taken as made (`-o`), the venv's dvc is on PATH."
    stamp = hashlib.md5((repo / "settings.ini").read_bytes() + (repo / "setup.py").read_bytes()).hexdigest()[:12]
    return cli("make", "--no-print-directory", "-o", f".venv/.installed-{stamp}", "remote", env=env, cwd=repo, check=check)


def scored(port: int) -> tuple[int, dict]:
    "The server's answer to TX: status and body, less the latency it measured."
    status, body = post(port, "/predict", TX)
    return status, {k: v for k, v in json.loads(body).items() if k != "latency_ms"}


def files_of(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def committed_remote() -> str:
    "The url of the default remote in the committed .dvc/config."
    (url,) = re.findall(r"^\s*url = (\S+)$", (ROOT / ".dvc" / "config").read_text(), re.M)
    return url


@pytest.fixture(scope="module")
def bucket(s3_server):
    "The bucket of the committed remote's url, made on the S3 server: a fresh clone needs nothing but the environment."
    name = urlsplit(committed_remote()).netloc
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def answer(package):
    "What the server started from the original package answers to TX: status and body."
    s = Server(package / "model")
    try: return scored(s.port)
    finally: s.stop()


def test_the_committed_remote_is_s3_with_no_endpoint_and_no_secret():
    "The default remote is committed; the endpoint and the credentials are per machine (.dvc/config.local, the environment)."
    config = (ROOT / ".dvc" / "config").read_text()
    assert "remote = storage" in config and "['remote \"storage\"']" in config and "url = s3://" in config, config
    for word in ("endpointurl", "127.0.0.1", "localhost", "access_key", "secret", "credentialpath"):
        assert word not in config, f".dvc/config holds {word!r}: put it in .dvc/config.local (`make remote`) or the environment"
    assert "/config.local" in (ROOT / ".dvc" / ".gitignore").read_text()


def test_make_remote_needs_a_url(tmp_path):
    "Without MLPAY_DVC_REMOTE_URL, `make remote` says so and writes nothing."
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for f in ("Makefile", "settings.ini", "setup.py"): shutil.copy(ROOT / f, tmp_path / f)
    env = {k: v for k, v in os.environ.items() if k != "MLPAY_DVC_REMOTE_URL"} | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = make_remote(tmp_path, env, check=False)
    assert proc.returncode != 0 and "set MLPAY_DVC_REMOTE_URL" in proc.stderr, proc.stderr
    assert not (tmp_path / ".dvc" / "config.local").exists()


@pytest.fixture(scope="module")
def project(package, tmp_path_factory):
    "A git repository of the project's files (as a clone has them) with the tiny data and package where data.dvc and the export stage put them, committed to DVC."
    dst = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(".dvc/config.local"):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cli(*GIT, "init", "-q", env=env, cwd=dst)
    # the export stage's inputs and output, made by the `package` fixture (the pipeline itself is tests/test_pipeline.py's)
    (dst / "data").mkdir(exist_ok=True)
    shutil.copy(package / "transactions.parquet", dst / "data" / "transactions.parquet")
    shutil.copytree(package / "model", dst / "artifacts" / "model")
    for f in ("model.pt", "model.json", "predictions.parquet", "decision.json"):
        (dst / "artifacts" / "train").mkdir(parents=True, exist_ok=True)
        shutil.copy(package / "train" / f, dst / "artifacts" / "train" / f)
    shutil.copy(package / "features.parquet", dst / "artifacts" / "features.parquet")
    (dst / "reports" / "evaluate").mkdir(parents=True, exist_ok=True)
    shutil.copy(package / "eval" / "metrics.json", dst / "reports" / "evaluate" / "metrics.json")
    cli("dvc", "add", "--quiet", "data", env=env, cwd=dst)  # data.dvc: the tiny data's hash
    cli("dvc", "commit", "--force", "--quiet", "export", env=env, cwd=dst)  # dvc.lock: the package's hash
    for cmd in (["add", "-A"], ["commit", "-qm", "tiny data and package"]): cli(*GIT, *cmd, env=env, cwd=dst)
    return dst


def test_dvc_push_then_pull_into_a_fresh_clone_serves_the_same_answers(project, package, s3_server, bucket, answer, tmp_path):
    "Pushed from a checkout configured by `make remote` (.dvc/config.local), pulled into a fresh clone configured by nothing but the environment."
    env = {**s3_server.env(), "MLPAY_DVC_REMOTE_URL": committed_remote()}
    make_remote(project, env)
    local = (project / ".dvc" / "config.local").read_text()
    assert f"url = {committed_remote()}" in local and f"endpointurl = {s3_server.endpoint}" in local, local
    without = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}
    pushed = cli("dvc", "push", "data.dvc", "export", env=without, cwd=project)  # the endpoint from config.local
    assert "6 files pushed" in pushed.stdout, pushed.stdout  # the data file, the package's 3, and the two directories' listings
    prefix = urlsplit(committed_remote()).path.strip("/") + "/"
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert len(keys) == 6 and all(k.startswith(f"{prefix}files/md5/") for k in keys), keys

    clone = tmp_path / "clone"
    cli("git", "clone", "-q", project, clone, env=env)
    assert not (clone / ".dvc" / "config.local").exists() and not (clone / "artifacts").exists()
    pulled = cli("dvc", "pull", "data.dvc", "export", env=env, cwd=clone)  # the endpoint and credentials from the environment only
    assert "6 files fetched" in pulled.stdout, pulled.stdout
    assert files_of(clone / "artifacts" / "model") == files_of(package / "model")
    assert (clone / "data" / "transactions.parquet").read_bytes() == (package / "transactions.parquet").read_bytes()

    s = Server(clone / "artifacts" / "model")
    try: got = scored(s.port)
    finally: s.stop()
    assert got == answer and answer[0] == 200, (got, answer)


def test_a_published_package_fetched_through_s3_serves(package, s3_server, bucket, answer, tmp_path):
    env = s3_server.env()
    version = json.loads((package / "model" / "manifest.json").read_text())["version"]
    out = cli("mlpay-publish", "--package", package / "model", "--dest", f"s3://{bucket}/models/{{version}}/", env=env).stdout
    url = f"s3://{bucket}/models/{version}/"
    assert out == f"{url}: {version} published\n", out
    keys = sorted(o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"models/{version}/")["Contents"])
    assert keys == [f"models/{version}/{n}" for n in ("decision.json", "manifest.json", "model.onnx")], keys
    assert cli("mlpay-publish", "--package", package / "model", "--dest", url, env=env).returncode == 0  # again: a no-op

    # the init container's command: the URL from the environment, /models an empty directory, TMPDIR its own
    (tmp_path / "models").mkdir(); (tmp_path / "tmp").mkdir()
    init = {**env, "MLPAY_MODEL_URL": url, "TMPDIR": str(tmp_path / "tmp")}
    out = cli("mlpay-fetch", "--dest", tmp_path / "models" / "store", env=init).stdout
    assert f"{version} from {url}" in out and "every sha256 verified" in out, out
    assert files_of(tmp_path / "models" / "store") == files_of(package / "model")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["store"]
    cli("mlpay-fetch", "--dest", tmp_path / "models" / "store", env=init)  # a restarted init container: left as is

    s = Server(tmp_path / "models" / "store")
    try: got = scored(s.port)
    finally: s.stop()
    assert got == answer, (got, answer)


def test_a_tampered_object_fails_the_fetch_naming_it(package, s3_server, bucket, tmp_path):
    env, url = s3_server.env(), f"s3://{bucket}/tampered/v1"
    cli("mlpay-publish", "--package", package / "model", "--dest", url, env=env)
    graph = (package / "model" / "model.onnx").read_bytes()
    s3_server.client().put_object(Bucket=bucket, Key="tampered/v1/model.onnx", Body=graph + b"\0")
    (tmp_path / "models").mkdir()
    proc = cli("mlpay-fetch", "--source", url, "--dest", tmp_path / "models" / "store", env=env, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.startswith(f"mlpay-fetch: error: {url}/model.onnx: sha256 mismatch") and proc.stderr.count("\n") == 1, proc.stderr
    assert list((tmp_path / "models").iterdir()) == []  # no dest, and no temporary beside it


def test_credentials_from_a_mounted_file(package, published, s3_server, bucket, tmp_path):
    "The credentials of a mounted secret (AWS_SHARED_CREDENTIALS_FILE), none in the environment."
    env = s3_server.env()
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {s3_server.key_id}\naws_secret_access_key = {s3_server.secret}\n")
    mounted = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    mounted |= {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(tmp_path / "no-config")}
    cli("mlpay-fetch", "--source", f"s3://{bucket}/models/v1", "--dest", tmp_path / "store", env=mounted)
    assert files_of(tmp_path / "store") == files_of(package / "model")


@pytest.fixture(scope="module")
def published(package, s3_server, bucket):
    "The package published at s3://BUCKET/models/v1."
    cli("mlpay-publish", "--package", package / "model", "--dest", f"s3://{bucket}/models/v1", env=s3_server.env())


ERRORS = [  # (case, environment changes, source: a URL or a prefix in the bucket, the error)
    ("wrong secret", {"AWS_SECRET_ACCESS_KEY": "wrong-secret-000000"}, "models/v1", "models/v1/manifest.json: access denied: check the credentials"),
    ("unknown key", {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"}, "models/v1", "models/v1/manifest.json: access denied"),
    ("no credentials", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                        "AWS_CONFIG_FILE": "/nonexistent/config"}, "models/v1", "NoCredentialsError: Unable to locate credentials"),
    ("no bucket", {}, "s3://no-such-bucket-mlpay/models/v1", "s3://no-such-bucket-mlpay/models/v1/manifest.json: not found"),
    ("nothing published", {}, "empty/v1", "empty/v1/manifest.json: not found: no package is published there"),
    ("unreachable endpoint", {"AWS_ENDPOINT_URL": "closed", "AWS_MAX_ATTEMPTS": "1"}, "models/v1", "EndpointConnectionError: Could not connect to the endpoint URL"),
    ("bad URL", {}, "s4://bucket/models", "s4://bucket/models: not a storage URL"),
]


@pytest.mark.parametrize("case, change, source, error", ERRORS, ids=[e[0] for e in ERRORS])
def test_store_errors_are_one_clear_line(published, s3_server, bucket, tmp_path, case, change, source, error):
    env = s3_server.env()
    if change.get("AWS_ENDPOINT_URL") == "closed": change = {**change, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    env = {k: v for k, v in {**env, **change}.items() if v is not None}
    url = source if "://" in source else f"s3://{bucket}/{source}"
    proc = cli("mlpay-fetch", "--source", url, "--dest", tmp_path / "store", env=env, check=False)
    assert proc.returncode == 2 and error in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and s3_server.secret not in proc.stderr + proc.stdout
    assert not (tmp_path / "store").exists()


def test_publish_errors_are_one_clear_line(package, s3_server, bucket, tmp_path):
    env = s3_server.env()
    proc = cli("mlpay-publish", "--package", package / "model", "--dest", "s3://no-such-bucket-mlpay/m", env=env, check=False)
    assert proc.returncode == 2 and "s3://no-such-bucket-mlpay/m/" in proc.stderr and "The specified bucket does not exist" in proc.stderr, proc.stderr
    cli("mlpay-publish", "--package", package / "model", "--dest", f"s3://{bucket}/taken", env=env)
    other = shutil.copytree(package / "model", tmp_path / "other")  # another valid package: another decision.json, another version
    (other / "decision.json").write_text((other / "decision.json").read_text().replace("{", '{"note": "other", ', 1))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["decision.json"] = hashlib.sha256((other / "decision.json").read_bytes()).hexdigest()
    manifest["version"] += "-other"
    (other / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("mlpay-publish", "--package", other, "--dest", f"s3://{bucket}/taken", env=env, check=False)
    assert proc.returncode == 2 and f"s3://{bucket}/taken: already holds another package" in proc.stderr, proc.stderr
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-000000"}
    proc = cli("mlpay-publish", "--package", package / "model", "--dest", f"s3://{bucket}/denied", env=bad, check=False)
    assert proc.returncode == 2 and "access denied" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# GCS and Azure Blob through their emulators: the same commands, the endpoint and credentials from each library's own variables.

def emulator(args: list, port: int, log: Path) -> subprocess.Popen:
    "Start an emulator on loopback; the process once its port accepts connections."
    with open(log, "w") as out: proc = subprocess.Popen(list(map(str, args)), stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(400):
            if proc.poll() is not None: raise RuntimeError(f"{args[0]} exited: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5): return proc
            except OSError: time.sleep(0.05)
        raise RuntimeError(f"{args[0]} did not start: {log.read_text()}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen):
    proc.terminate()
    try: proc.wait(10)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def round_trip(package: Path, tmp_path: Path, url: str, env: dict, tamper) -> None:
    "Publish, fetch (the same files), then a tampered object refused naming it, with no dest left behind."
    cli("mlpay-publish", "--package", package / "model", "--dest", url, env=env)
    cli("mlpay-fetch", "--source", url, "--dest", tmp_path / "store", env=env)
    assert files_of(tmp_path / "store") == files_of(package / "model")
    tamper("model.onnx", (package / "model" / "model.onnx").read_bytes() + b"\0")
    proc = cli("mlpay-fetch", "--source", url, "--dest", tmp_path / "fresh", env=env, check=False)
    assert proc.returncode == 2 and f"{url}/model.onnx: sha256 mismatch" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow  # an emulator of its own
def test_publish_and_fetch_through_the_gcs_emulator(package, tmp_path):
    "gs:// through gcsfs against gcp-storage-emulator (PyPI), found through STORAGE_EMULATOR_HOST."
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed (pip install gcp-storage-emulator==2026.7.19): gs:// is untested")
    port = free_port()
    proc = emulator([BIN / "gcp-storage-emulator", "start", "--host", "127.0.0.1", "--port", port, "--in-memory"], port, tmp_path / "gcs.log")
    closed = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_"))}
    env |= {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,  # google-auth never asks 169.254.169.254
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # the emulator has no storage-control API to ask a bucket's layout
    try:
        import fsspec
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items(): mp.setenv(k, v)
            gs = fsspec.filesystem("gs", skip_instance_cache=True)
            gs.mkdir("mlpay-models")
            round_trip(package, tmp_path, "gs://mlpay-models/models/v1", env, lambda name, data: gs.pipe_file(f"mlpay-models/models/v1/{name}", data))
    finally: stop(proc)


AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's published development account


@pytest.mark.slow  # an emulator of its own (Node.js)
def test_publish_and_fetch_through_azurite(package, tmp_path):
    "az:// through adlfs against Azurite (npm), the account and endpoint in AZURE_STORAGE_CONNECTION_STRING as a mounted secret would give it."
    exe = os.environ.get("MLPAY_AZURITE_BLOB") or shutil.which("azurite-blob")
    if not exe: pytest.skip("azurite-blob is not on PATH (npm install azurite@3.37.0, or set MLPAY_AZURITE_BLOB): az:// is untested")
    port = free_port()
    (tmp_path / "azurite").mkdir()
    proc = emulator([exe, "--blobHost", "127.0.0.1", "--blobPort", port, "--location", tmp_path / "azurite", "--silent", "--skipApiVersionCheck"],
                    port, tmp_path / "azurite.log")
    conn = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    env |= {"AZURE_STORAGE_CONNECTION_STRING": conn.format(key=AZURITE_KEY), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        import fsspec
        az = fsspec.filesystem("az", connection_string=env["AZURE_STORAGE_CONNECTION_STRING"], skip_instance_cache=True)
        az.mkdir("mlpay-models")
        round_trip(package, tmp_path, "az://mlpay-models/models/v1", env, lambda name, data: az.pipe_file(f"mlpay-models/models/v1/{name}", data))
        wrong = {**env, "AZURE_STORAGE_CONNECTION_STRING": conn.format(key="d3Jvbmcga2V5")}
        proc_ = cli("mlpay-fetch", "--source", "az://mlpay-models/models/v1", "--dest", tmp_path / "denied", env=wrong, check=False)
        assert proc_.returncode == 2 and "manifest.json: access denied" in proc_.stderr and proc_.stderr.count("\n") == 1, proc_.stderr
        assert "d3Jvbmcga2V5" not in proc_.stderr
    finally: stop(proc)
