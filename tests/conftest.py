"""Shared fixtures: the repository root, a tiny composed configuration, a tiny model package, a real Redis server."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts (mlpay-*, dvc)

# One grid point per model and two epochs keep the tiny benchmark to seconds.
SMALL_GRIDS = ["trainer.max_epochs=2", "benchmark.models.logreg.grid={C:[1.0]}",
               "benchmark.models.xgboost.grid={max_depth:[3]}",
               "benchmark.models.xgboost_rich.grid={max_depth:[3]}"]
ALL_MODELS = {"logreg", "xgboost", "xgboost_rich", "mlp", "mlp_unweighted", "mlp_sampled", "sequence", "hybrid", "informed_ceiling"}


def run(*args, cwd=None, check=True):
    "Run a console script of the venv; return the completed process (stdout/stderr captured)."
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # DVC stages call mlpay-* too
    proc = subprocess.run(list(map(str, args)), cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory):
    "params.yaml composed with data=tiny and one grid point per model."
    d = tmp_path_factory.mktemp("params")
    run("mlpay-params", "--out", d / "params.yaml", "data=tiny", *SMALL_GRIDS, cwd=ROOT)
    return d / "params.yaml"


@pytest.fixture(scope="session")
def tiny_data(tiny_params, tmp_path_factory):
    "The tiny simulated dataset, written by mlpay-simulate."
    out = tmp_path_factory.mktemp("data") / "transactions.parquet"
    run("mlpay-simulate", "--params", tiny_params, "--out", out)
    return out


class RedisProcess:
    "A redis-server of a test's own on a free loopback port, to stop, pause and start again (persistence: an RDB file on stop)."
    def __init__(self, directory: Path):
        self.exe, self.dir = shutil.which("redis-server"), directory
        if self.exe is None: pytest.skip("redis-server is not installed (make system-deps installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.proc = f"redis://127.0.0.1:{self.port}/0", None
        self.start()

    def start(self):
        import redis
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try: client.ping(); client.close(); return self
            except redis.ConnectionError: time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        "Shut down, saving the data set (as a Redis with persistence would keep it), like `redis-cli shutdown save`."
        import redis
        try: redis.Redis(port=self.port).shutdown(save=True)
        except redis.ConnectionError: pass
        self.proc.wait(10)

    def pause(self): os.kill(self.proc.pid, signal.SIGSTOP)
    def resume(self): os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.resume(); self.proc.kill(); self.proc.wait()


@pytest.fixture
def redis_process(tmp_path):
    "A redis-server for one test, which the test may stop, pause and restart."
    r = RedisProcess(tmp_path)
    yield r
    r.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    "A throw-away redis-server on a free loopback port, no persistence, killed at teardown; its URL."
    exe = shutil.which("redis-server")
    if exe is None: pytest.skip("redis-server is not installed (make system-deps installs it); the Redis paths are untested")
    import redis
    d = tmp_path_factory.mktemp("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(d / "redis.log", "w")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                             "--appendonly", "no", "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None: raise RuntimeError(f"redis-server exited: {(d / 'redis.log').read_text()}")
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


class LocalRedisCluster:
    "A Redis Cluster of three masters (no replicas) on free loopback ports, each node in a directory of its own; a node may be paused."
    def __init__(self, directory: Path, masters: int = 3):
        self.exe, self.cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if self.exe is None or self.cli is None: pytest.skip("redis-server or redis-cli is not installed (make system-deps installs them); the Redis Cluster paths are untested")
        from test_serve import free_port
        self.ports, self.procs, self.logs = [free_port() for _ in range(masters)], {}, []
        for port in self.ports:
            d = directory / str(port)
            d.mkdir()
            self.logs.append(open(d / "redis.log", "w"))
            # the cluster bus on a free port of its own: its default, port + 10000, may be taken or past 65535
            self.procs[port] = subprocess.Popen([self.exe, "--port", str(port), "--cluster-port", str(free_port()), "--bind", "127.0.0.1",
                                                 "--dir", str(d), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                                 "--save", "", "--appendonly", "no"], stdout=self.logs[-1], stderr=subprocess.STDOUT)
        import redis
        try:
            for port in self.ports: self._wait(lambda: redis.Redis(port=port).ping(), f"node {port} did not start")
            subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            for port in self.ports:  # every node must see the whole cluster before a client may rely on its slot map
                self._wait(lambda: redis.Redis(port=port).cluster("info")["cluster_state"] == "ok", f"the cluster did not become ok on {port}")
        except BaseException:
            self.kill()
            raise
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"

    def _wait(self, ok, what: str, tries: int = 200):
        import redis
        for _ in range(tries):
            try:
                if ok(): return
            except redis.RedisError: pass
            if any(p.poll() is not None for p in self.procs.values()): break
            time.sleep(0.05)
        logs = "\n".join(Path(log.name).read_text() for log in self.logs)
        raise RuntimeError(f"{what}:\n{logs}")

    def port_of(self, key: str) -> int:
        "The port of the master that serves `key`'s hash slot."
        import redis
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0]).get_node_from_key(key).port

    def pause(self, port: int): os.kill(self.procs[port].pid, signal.SIGSTOP)
    def resume(self, port: int): os.kill(self.procs[port].pid, signal.SIGCONT)

    def kill(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT); proc.kill(); proc.wait()
        for log in self.logs: log.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    "A real three-master Redis Cluster on loopback (Debian's redis-server, `redis-cli --cluster create`), killed at teardown."
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.kill()


@pytest.fixture
def redis_cluster_url(redis_cluster):
    "The cluster's URL (any node's: the client finds the others), every master emptied for each test."
    import redis
    for port in redis_cluster.ports: redis.Redis(port=port).flushall()
    return redis_cluster.url


@pytest.fixture
def redis_url(redis_server):
    "The Redis server's URL, with an empty database for each test."
    import redis
    redis.Redis.from_url(redis_server).flushdb()
    return redis_server


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    "A tiny trained, evaluated and exported model package (model/), its transactions, and the days to warm the state from (history)."
    from mlpay.config import compose
    from mlpay.evaluation import main as evaluate
    from mlpay.export import write_package
    from mlpay.features import compute_features
    from mlpay.registry import FeatureRegistry
    from mlpay.simulate import simulate
    from mlpay.train import train
    d = tmp_path_factory.mktemp("pkg")
    cfg = compose(["debug=fast", "model=mlp", "trainer.max_epochs=1", f"paths.train={d}/train"])
    tx = simulate(cfg.data, progress=False)
    feats = compute_features(tx, FeatureRegistry.from_cfg(cfg))
    train(cfg, feats)
    evaluate(["--predictions", f"{d}/train/predictions.parquet", "--out-dir", f"{d}/eval", "--package", f"{d}/train", "data=tiny"])
    write_package(d / "train", d / "model", feats, compose(["debug=fast", "export.variants=[]", "reasons.faithfulness.min_rate=0"]))
    import polars as pl
    tx.write_parquet(d / "transactions.parquet")
    tx.filter(pl.col("TX_TIME_DAYS") < 150).write_parquet(d / "history.parquet")
    feats.write_parquet(d / "features.parquet")
    return d


@pytest.fixture(scope="session")
def challenger(package):
    "A second package on the same data and registry: the tiny model trained with another seed (another version)."
    from mlpay.config import compose
    from mlpay.evaluation import main as evaluate
    from mlpay.export import write_package
    from mlpay.train import train
    import polars as pl
    d = package / "challenger"
    feats = pl.read_parquet(package / "features.parquet")
    train(compose(["debug=fast", "model=mlp", "trainer.max_epochs=1", "train.seed=1", f"paths.train={d}/train"]), feats)
    evaluate(["--predictions", f"{d}/train/predictions.parquet", "--out-dir", f"{d}/eval", "--package", f"{d}/train", "data=tiny"])
    write_package(d / "train", d / "model", feats, compose(["debug=fast", "export.variants=[]", "reasons.faithfulness.min_rate=0"]))
    return d / "model"


PG_BIN = Path(os.environ.get("MLPAY_PG_BIN", "/usr/lib/postgresql/15/bin"))  # Debian's postgresql-15 server binaries


@pytest.fixture(scope="session")
def postgres_url():
    "A PostgreSQL 15 server of the tests' own (initdb into a temporary directory, a free loopback port, its socket in that directory), stopped at teardown; its SQLAlchemy URL."
    import tempfile
    pg_ctl, initdb = PG_BIN / "pg_ctl", PG_BIN / "initdb"
    if not (pg_ctl.exists() and initdb.exists()):
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (apt-get install postgresql-15, or set MLPAY_PG_BIN): the PostgreSQL paths are untested")
    d = Path(tempfile.mkdtemp(prefix="mlpay-pg-"))  # under /tmp: the postgres user must reach it (pytest's own tmp dirs are root's, 0700)
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(d, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = d / "data", d / "server.log"
    def pg(*args, check=True):
        proc = subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)
        if check and proc.returncode: raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log.read_text() if log.exists() else ''}")
        return proc
    pg(initdb, "-D", data, "-U", "mlpay", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
    opts = f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    pg(pg_ctl, "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start")
    try:
        yield f"postgresql+psycopg://mlpay@127.0.0.1:{port}/postgres"
    finally:
        pg(pg_ctl, "-D", data, "-m", "fast", "-w", "-t", "30", "stop", check=False)
        shutil.rmtree(d, ignore_errors=True)


class S3Server:
    "moto's S3 API in server mode (a real HTTP server, as in DVC's own S3 tests) on a free loopback port, checking credentials."
    def __init__(self, directory: Path):
        from test_serve import free_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(directory / "moto.log", "w")
        # moto checks signatures against its IAM users after the first 3 requests: those make a user, its policy and its key
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
        try: self._setup(directory)
        except BaseException:
            self.stop()
            raise

    def _setup(self, directory: Path):
        for _ in range(200):
            if self.proc.poll() is not None: raise RuntimeError(f"moto_server exited: {(directory / 'moto.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5): break
            except OSError: time.sleep(0.05)
        else: raise RuntimeError("moto_server did not start")
        import json
        import boto3
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="mlpay")
        iam.put_user_policy(UserName="mlpay", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="mlpay")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, **overrides) -> dict[str, str]:
        "The process environment for a client of this server: no AWS_* variable of the caller's, the endpoint, the key, no instance metadata."
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**env, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **overrides}

    def client(self):
        "A boto3 S3 client with the valid key."
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    "A real S3 API (moto's server) on a free 127.0.0.1 port with an IAM user allowed everything, stopped at teardown; `endpoint`, `env()`, `client()`."
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try: yield server
    finally: server.stop()
