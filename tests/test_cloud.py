"""The EKS and GKE overlays (containers/k8s/overlays/{eks,eks-gpu,gke,gke-gpu}) and the components they are made of
(containers/k8s/components/), checked offline: nothing here was deployed to a real cloud.

kubectl's kustomize renders every overlay; kubernetes-validate checks the core objects strictly (unknown fields
fail) on the oldest and newest Kubernetes the manifests are for; GKE's BackendConfig, a custom resource no registry
package has a schema for, is checked against a JSON schema written here from its documented fields (ingress-gce's
pkg/apis/backendconfig/v1/types.go), unknown fields failing. The load balancers' annotations are checked against the
controllers' documented keys and value forms (a misspelt key is silently ignored by a controller: here it fails).
Then the wiring: the init container runs the `mlpay-fetch` contract with the serving image, the server gets the
fetched package (through the real `mlpay-serve` command line), the volumes are shared and read-only where they must
be, the pods' identity is the cloud's, the ingress leads to the Service's port and checks /health, GPUs are selected
only in the GPU variants, and the resources agree with the HPA's arithmetic. The account's values are placeholders
in one file per cloud: set them and no placeholder is left; leave one out and the build fails, naming it.
"""
import base64
import json
import math
import os
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from conftest import BIN
from mlpay.remote import publish
from test_containers import K8S, TEST_KEY, VERSION, entrypoint, k8s_copy, kustomize, one, render_overlays, validate  # noqa: F401
from test_rollout_k8s import _INT, _METADATA, _STR, _obj

CLOUD = {"eks": "aws", "eks-gpu": "aws", "gke": "gcp", "gke-gpu": "gcp"}  # overlay -> cloud
GPU = {"eks-gpu", "gke-gpu"}
ACCOUNT = {"aws": K8S / "overlays/eks/account", "gcp": K8S / "overlays/gke/project"}  # the one file to edit per cloud
SETTINGS = {"aws": "mlpay-aws", "gcp": "mlpay-gcp"}  # their local ConfigMap, read by components/eks|gke
PLACEHOLDERS = {"aws": {"ACCOUNT_ID", "REGION", "BUCKET", "VERSION", "CERTIFICATE_ID"},
                "gcp": {"PROJECT_ID", "REGION", "BUCKET", "VERSION"}}
REAL = {"ACCOUNT_ID": "123456789012", "CERTIFICATE_ID": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", "BUCKET": "acme-fraud-models",
        "VERSION": "2026-12-01", "PROJECT_ID": "acme-fraud"}  # what an account would set (REGION: per cloud, below)
REAL_REGION = {"aws": "eu-west-1", "gcp": "europe-west1"}
FETCH_ARGV = ["mlpay-fetch", "--source", "$(MLPAY_MODEL_URL)", "--dest", "/models/store"]  # the init container's contract
SERVE_PORT = int(entrypoint("serve")[entrypoint("serve").index("--port") + 1])


@pytest.fixture(scope="session")
def cloud(k8s_copy):  # noqa: F811 (the fixture imported above)
    return render_overlays(k8s_copy, CLOUD)


def copy_k8s(tmp_path):
    "A writable copy of containers/k8s with the test API key (for the tests that change a file)."
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work, ignore=shutil.ignore_patterns("api-key"))
    (work / "base/secrets/api-key").write_text(TEST_KEY)
    return work


def render(k8s_dir, overlay):
    proc = kustomize(k8s_dir, overlay)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def pod(objs):
    return one(objs, "Deployment", "mlpay-serve")["spec"]["template"]


def container(spec, name, init=False):
    (c,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return c


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def mounts(c):
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def last_value(argv, flag):
    "The value argparse keeps for a flag given several times: the last one's."
    return argv[len(argv) - argv[::-1].index(flag)]


def expand(arg, env):
    "Kubernetes' expansion of $(VAR) in a container's command and args ($$ escapes; an unknown name stays as written)."
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), arg)


# ---- the values each cloud's account file sets, in their documented forms (placeholder or real) ---------------------

_AWS_REGION = r"(?:[a-z]{2}(?:-[a-z]+)+-\d|REGION)"
_AWS_ACCOUNT = r"(?:\d{12}|ACCOUNT_ID)"
_GCP_PROJECT = r"(?:[a-z][a-z0-9-]{4,28}[a-z0-9]|PROJECT_ID)"
_GCP_REGION = r"(?:[a-z]+-[a-z]+\d+|REGION)"
_DNS = r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+"
FORMS = {
    "aws": {
        "MLPAY_MODEL_URL": r"s3://(?:[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]|BUCKET)/models/[\w.-]+/?",
        "REGISTRY": rf"{_AWS_ACCOUNT}\.dkr\.ecr\.{_AWS_REGION}\.amazonaws\.com(/[a-z0-9._-]+)*",
        "ROLE_ARN": rf"arn:aws:iam::{_AWS_ACCOUNT}:role/[\w+=,.@/-]{{1,64}}",
        "CERTIFICATE_ARN": rf"arn:aws:acm:{_AWS_REGION}:{_AWS_ACCOUNT}:certificate/(?:[0-9a-f-]{{36}}|CERTIFICATE_ID)",
        "HOST": _DNS,
    },
    "gcp": {
        "MLPAY_MODEL_URL": r"gs://(?:[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]|BUCKET)/models/[\w.-]+/?",
        "REGISTRY": rf"{_GCP_REGION}-docker\.pkg\.dev/{_GCP_PROJECT}(/[a-z0-9._-]+)+",
        "GCP_SERVICE_ACCOUNT": rf"[a-z][a-z0-9-]{{4,28}}[a-z0-9]@{_GCP_PROJECT}\.iam\.gserviceaccount\.com",
        "SSL_CERTIFICATE": r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
        "HOST": _DNS,
    },
}


def value_problems(cloud, values):
    "What is wrong with an account's values: a key missing or unknown, a value not of its documented form."
    forms = FORMS[cloud]
    out = [f"{k}: missing" for k in forms if k not in values] + [f"{k}: not a setting" for k in values if k not in forms]
    return out + [f"{k}={v!r} is not of the form {forms[k]}" for k, v in values.items()
                  if k in forms and not re.fullmatch(forms[k], v)]


def account_values(cloud):
    "The values the account file sets (its two generators' literals)."
    k = yaml.safe_load((ACCOUNT[cloud] / "kustomization.yaml").read_text())
    gens = {g["name"]: dict(lit.split("=", 1) for lit in g["literals"]) for g in k["configMapGenerator"]}
    assert k["kind"] == "Component" and set(gens) == {"mlpay-model-source", SETTINGS[cloud]}
    return {**gens["mlpay-model-source"], **gens[SETTINGS[cloud]]}


@pytest.mark.parametrize("cloud_name", sorted(ACCOUNT))
def test_account_values_have_their_forms(cloud_name):
    # The repository's placeholders pass, and so do real values in their place; what a user sets is checked the same.
    values = account_values(cloud_name)
    assert value_problems(cloud_name, values) == []
    real = {k: substitute(v, cloud_name) for k, v in values.items()}
    assert value_problems(cloud_name, real) == [] and real != values
    # A role that is not a role, a 5-digit account, a bucket URL of another cloud, a service account of another
    # domain, an unknown key, a missing one: each is named.
    bad = {"aws": {"ROLE_ARN": "arn:aws:iam::123456789012:user/mlpay", "REGISTRY": "12345.dkr.ecr.eu-west-1.amazonaws.com",
                   "MLPAY_MODEL_URL": "gs://acme/models/1"},
           "gcp": {"GCP_SERVICE_ACCOUNT": "mlpay@acme-fraud.iam.gserviceaccount.com.example.org",
                   "MLPAY_MODEL_URL": "s3://acme/models/1", "SSL_CERTIFICATE": "Mlpay_Cert"}}[cloud_name]
    problems = value_problems(cloud_name, {**real, **bad, "ROLE": "x"})
    for key in bad: assert any(p.startswith(f"{key}=") for p in problems), (key, problems)
    assert "ROLE: not a setting" in problems
    missing = dict(real); missing.pop("HOST")
    assert value_problems(cloud_name, missing) == ["HOST: missing"]


def substitute(text, cloud_name):
    "`text` with every placeholder of the cloud replaced by a real-looking value."
    real = {**REAL, "REGION": REAL_REGION[cloud_name]}
    return re.sub(r"\b(" + "|".join(sorted(PLACEHOLDERS[cloud_name])) + r")\b", lambda m: real[m[1]], text)


@pytest.mark.parametrize("overlay", sorted(CLOUD))
def test_placeholders_are_set_in_one_file(tmp_path, cloud, overlay):
    # As shipped, every placeholder shows in what would be deployed (nothing silently defaults to a guess); with the
    # account file's values set, not one is left anywhere: it is the one place to edit.
    cloud_name = CLOUD[overlay]
    text = yaml.safe_dump_all(cloud[overlay])
    words = set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", text))
    assert PLACEHOLDERS[cloud_name] <= words, PLACEHOLDERS[cloud_name] - words
    work = copy_k8s(tmp_path)
    account = work / ACCOUNT[cloud_name].relative_to(K8S) / "kustomization.yaml"
    account.write_text(substitute(account.read_text(), cloud_name))
    proc = kustomize(work, overlay)
    assert proc.returncode == 0, proc.stderr
    left = set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", proc.stdout)) & set().union(*PLACEHOLDERS.values())
    assert not left, f"{overlay}: placeholders left once the account file is set: {left}"
    assert REAL["BUCKET"] in proc.stdout and REAL_REGION[cloud_name] in proc.stdout


# ---- rendering and schemas ---------------------------------------------------------------------------------------

# GKE's BackendConfig (cloud.google.com/v1), every documented field (ingress-gce pkg/apis/backendconfig/v1/types.go;
# cloud.google.com/kubernetes-engine/docs/how-to/ingress-configuration); anything else fails, as strict mode does.
_BOOL, _NUM = {"type": "boolean"}, {"type": "number"}
_POS = {"type": "integer", "minimum": 1}
_STRS = {"type": "array", "items": _STR}
BACKENDCONFIG_SCHEMA = _obj({
    "apiVersion": {"const": "cloud.google.com/v1"}, "kind": {"const": "BackendConfig"}, "metadata": _METADATA,
    "spec": _obj({
        "iap": _obj({"enabled": _BOOL, "oauthclientCredentials": _obj({"secretName": _STR, "clientID": _STR, "clientSecret": _STR},
                                                                     ["secretName"])}, ["enabled"]),
        "cdn": _obj({"enabled": _BOOL, "bypassCacheOnRequestHeaders": {"type": "array", "items": _obj({"headerName": _STR})},
                     "cachePolicy": _obj({"includeHost": _BOOL, "includeProtocol": _BOOL, "includeQueryString": _BOOL,
                                          "queryStringBlacklist": _STRS, "queryStringWhitelist": _STRS}),
                     "cacheMode": {"enum": ["CACHE_ALL_STATIC", "USE_ORIGIN_HEADERS", "FORCE_CACHE_ALL"]},
                     "clientTtl": _INT, "defaultTtl": _INT, "maxTtl": _INT, "negativeCaching": _BOOL,
                     "negativeCachingPolicy": {"type": "array", "items": _obj({"code": _INT, "ttl": _INT})},
                     "requestCoalescing": _BOOL, "serveWhileStale": _INT, "signedUrlCacheMaxAgeSec": _INT,
                     "signedUrlKeys": {"type": "array", "items": _obj({"keyName": _STR, "keyValue": _STR, "secretName": _STR})}},
                    ["enabled"]),
        "securityPolicy": _obj({"name": _STR}, ["name"]),
        "timeoutSec": _POS,
        "connectionDraining": _obj({"drainingTimeoutSec": {"type": "integer", "minimum": 0, "maximum": 3600}}),
        "sessionAffinity": _obj({"affinityType": {"enum": ["NONE", "CLIENT_IP", "GENERATED_COOKIE"]}, "affinityCookieTtlSec": _INT}),
        "customRequestHeaders": _obj({"headers": _STRS}),
        "customResponseHeaders": _obj({"headers": _STRS}),
        "healthCheck": _obj({"checkIntervalSec": _POS, "timeoutSec": _POS, "healthyThreshold": _POS, "unhealthyThreshold": _POS,
                             "type": {"enum": ["HTTP", "HTTPS", "HTTP2"]}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                             "requestPath": {"type": "string", "pattern": "^/"}}),
        "logging": _obj({"enable": _BOOL, "sampleRate": {**_NUM, "minimum": 0, "maximum": 1}})})},
    ["apiVersion", "kind", "metadata", "spec"])
CRD_SCHEMAS = {"BackendConfig": BACKENDCONFIG_SCHEMA}


def check_crd(obj):
    try: jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
    except jsonschema.ValidationError as e:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {'.'.join(map(str, e.absolute_path))}")


KINDS = ["ConfigMap", "ConfigMap", "Secret", "ServiceAccount", "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
         "PodDisruptionBudget", "StatefulSet", "NetworkPolicy", "Ingress"]


@pytest.mark.parametrize("overlay", sorted(CLOUD))
def test_cloud_overlay_renders_and_validates(cloud, overlay):
    objs = cloud[overlay]
    extra = ["BackendConfig"] if CLOUD[overlay] == "gcp" else []
    assert sorted(o["kind"] for o in objs) == sorted(KINDS + extra)
    for obj in objs:
        if obj["kind"] in CRD_SCHEMAS: check_crd(obj)
        else: validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mlpay", f"{obj['kind']}/{obj['metadata']['name']}"
    # The account's settings are read at build time and never deployed.
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(SETTINGS[CLOUD[overlay]])] == []
    assert not any("config.kubernetes.io/local-config" in (o["metadata"].get("annotations") or {}) for o in objs)


def test_backendconfig_schema_refuses_unknown_and_bad_fields(cloud):
    good = one(cloud["gke"], "BackendConfig")
    jsonschema.validate(good, BACKENDCONFIG_SCHEMA)
    for path, value in [(("spec", "healthCheck", "path"), "/health"),  # the field is requestPath
                        (("spec", "healthCheck", "type"), "TCP"), (("spec", "healthCheck", "port"), "http"),
                        (("spec", "timeoutSec"), 0), (("spec", "logging", "sampleRate"), 2), (("spec", "drain"), 30)]:
        bad = json.loads(json.dumps(good))
        node = bad
        for k in path[:-1]: node = node.setdefault(k, {})
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError): jsonschema.validate(bad, BACKENDCONFIG_SCHEMA)


# ---- the model from the object store -------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", sorted(CLOUD))
def test_model_from_store_wiring(cloud, overlay):
    objs = cloud[overlay]
    tmpl = pod(objs)
    spec = tmpl["spec"]
    serve, fetch = container(spec, "serve"), container(spec, "fetch-model", init=True)
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-model"]
    # The init container: the serving image itself, running the mlpay-fetch contract, hardened as the server is.
    assert fetch["image"] == serve["image"]
    assert fetch["command"] == FETCH_ARGV and "args" not in fetch
    for k in ("runAsNonRoot", "readOnlyRootFilesystem", "allowPrivilegeEscalation", "capabilities", "privileged"):
        assert fetch["securityContext"][k] == serve["securityContext"][k], k
    assert fetch["securityContext"]["readOnlyRootFilesystem"] and spec["securityContext"]["runAsUser"] != 0
    # MLPAY_MODEL_URL from the generated ConfigMap: the cloud's object store, also on the pods as an annotation.
    ref = env_of(fetch)["MLPAY_MODEL_URL"]["valueFrom"]["configMapKeyRef"]
    cm = one(objs, "ConfigMap", ref["name"])
    assert cm["metadata"]["name"].startswith("mlpay-model-source-")  # hashed: a new URL is a new pod template
    url = cm["data"][ref["key"]]
    assert re.fullmatch(FORMS[CLOUD[overlay]]["MLPAY_MODEL_URL"], url)
    assert tmpl["metadata"]["annotations"]["mlpay/model-url"] == url
    # /models: an emptyDir written by the init container, read-only in the server, which serves /models/store: the
    # image's ENTRYPOINT plus the container's args, the last --model winning.
    volumes = {v["name"]: v for v in spec["volumes"]}
    dest = FETCH_ARGV[FETCH_ARGV.index("--dest") + 1]
    (fm,) = [m for p, m in mounts(fetch).items() if dest.startswith(p.rstrip("/") + "/")]
    (sm,) = [m for p, m in mounts(serve).items() if m["name"] == fm["name"]]
    assert "emptyDir" in volumes[fm["name"]] and not fm.get("readOnly") and sm["readOnly"] is True
    assert sm["mountPath"] == fm["mountPath"]
    assert "command" not in serve and last_value(entrypoint("serve") + serve["args"], "--model") == dest
    # TMPDIR=/tmp on an emptyDir of the init container's own; the server's /tmp stays its own too.
    assert env_of(fetch)["TMPDIR"]["value"] == "/tmp" and "emptyDir" in volumes[mounts(fetch)["/tmp"]["name"]]
    assert mounts(fetch)["/tmp"]["name"] != mounts(serve)["/tmp"]["name"]
    # The server never sees the store's identity settings, only the package.
    assert "MLPAY_MODEL_URL" not in env_of(serve)


def test_server_serves_the_fetched_package(cloud):
    # The real command line: the image's ENTRYPOINT with the Deployment's args loads /models/store, not /models/fraud
    # (here there is none: the server says so, naming the path it was given).
    serve = container(pod(cloud["eks"])["spec"], "serve")
    argv = entrypoint("serve") + serve["args"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLPAY_API_KEY": TEST_KEY}
    env.pop("MLPAY_API_KEY_FILE", None)
    proc = subprocess.run([BIN / argv[0], *argv[1:]], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "/models/store" in proc.stderr and "/models/fraud" not in proc.stderr, proc.stderr


def test_init_container_command_fetches_a_package(cloud, package, tmp_path):
    # The init container's command, as the kubelet runs it ($(MLPAY_MODEL_URL) expanded from the ConfigMap), against a
    # package published to a local prefix, with the pod's /models volume at a temporary directory.
    objs = cloud["eks"]
    fetch = container(pod(objs)["spec"], "fetch-model", init=True)
    store = tmp_path / "bucket/models/v1"
    publish(package / "model", f"file://{store}")
    root = tmp_path / "pod"
    env = {"MLPAY_MODEL_URL": f"file://{store}", "TMPDIR": str(root / "tmp")}
    (root / "tmp").mkdir(parents=True)
    argv = [expand(a, env) for a in fetch["command"]]
    models = mounts(fetch)["/models"]["mountPath"]
    argv = [str(root) + a if a.startswith(models + "/") else a for a in argv]
    proc = subprocess.run([BIN / argv[0], *argv[1:]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    got = root / "models/store"
    assert json.loads((got / "manifest.json").read_text()) == json.loads((package / "model/manifest.json").read_text())


# ---- identity ------------------------------------------------------------------------------------------------------

IDENTITY = {"aws": ("eks.amazonaws.com/role-arn", "ROLE_ARN"), "gcp": ("iam.gke.io/gcp-service-account", "GCP_SERVICE_ACCOUNT")}


@pytest.mark.parametrize("overlay", sorted(CLOUD))
def test_workload_identity(cloud, overlay):
    objs, cloud_name = cloud[overlay], CLOUD[overlay]
    spec = pod(objs)["spec"]
    sa = one(objs, "ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    # No Kubernetes API token anywhere: IRSA's webhook projects a token volume of its own, GKE's metadata server mints
    # the token itself (components/eks, components/gke); neither reads the automounted one.
    assert spec["automountServiceAccountToken"] is False and sa["automountServiceAccountToken"] is False
    key, setting = IDENTITY[cloud_name]
    ann = sa["metadata"]["annotations"]
    assert set(ann) == {key}, ann
    assert re.fullmatch(FORMS[cloud_name][setting], ann[key]) and ann[key] == account_values(cloud_name)[setting]
    # The other cloud's identity is nowhere; GKE's pods go to nodes that run its metadata server.
    other = IDENTITY["gcp" if cloud_name == "aws" else "aws"][0]
    assert other not in yaml.safe_dump_all(objs)
    selector = spec.get("nodeSelector", {})
    assert (selector.get("iam.gke.io/gke-metadata-server-enabled") == "true") == (cloud_name == "gcp")
    # Images from the cloud's registry, both containers, pinned by the package version.
    registry = account_values(cloud_name)["REGISTRY"]
    name = "mlpay-serve-gpu" if overlay in GPU else "mlpay-serve"
    for c in spec["containers"] + spec["initContainers"]:
        assert c["image"] == f"{registry}/{name}:{VERSION}", c["image"]


# ---- the ingress -----------------------------------------------------------------------------------------------------

# AWS Load Balancer Controller's Ingress annotations (kubernetes-sigs.github.io/aws-load-balancer-controller,
# guide/ingress/annotations): the documented keys the overlay may use and their value forms. The controller ignores a
# key it does not know, so a misspelt one would silently drop a setting: here any other alb.* key is an error.
_KV = r"[\w.]+=[\w.-]+(,[\w.]+=[\w.-]+)*"
ALB = {"scheme": r"internal", "target-type": r"ip", "listen-ports": r"\[.*\]", "certificate-arn": FORMS["aws"]["CERTIFICATE_ARN"],
       "ssl-policy": r"ELBSecurityPolicy-(TLS13-1-[23]|FS-1-2|TLS-1-2)[\w-]*", "backend-protocol": r"HTTPS?",
       "healthcheck-protocol": r"HTTPS?", "healthcheck-port": r"traffic-port|\d+", "healthcheck-path": r"/[\w/.-]*",
       "healthcheck-interval-seconds": r"\d+", "healthcheck-timeout-seconds": r"\d+", "healthy-threshold-count": r"\d+",
       "unhealthy-threshold-count": r"\d+", "success-codes": r"\d{3}([,-]\d{3})*", "target-group-attributes": _KV,
       "load-balancer-attributes": _KV}
# GKE Ingress (cloud.google.com/kubernetes-engine/docs/concepts/ingress, how-to/internal-load-balance-ingress).
GCE = {"kubernetes.io/ingress.class": r"gce-internal", "kubernetes.io/ingress.allow-http": r"false",
       "ingress.gcp.kubernetes.io/pre-shared-cert": FORMS["gcp"]["SSL_CERTIFICATE"],
       "kubernetes.io/ingress.regional-static-ip-name": r"[a-z]([-a-z0-9]*[a-z0-9])?"}


def alb_problems(ing):
    "Why an Ingress is not the internal, TLS-only ALB in front of /health-checked pods that the EKS overlay means."
    ann, out = ing["metadata"].get("annotations", {}), []
    prefix = "alb.ingress.kubernetes.io/"
    for k, v in ann.items():
        short = k.removeprefix(prefix)
        if k.startswith(prefix) and short not in ALB: out.append(f"{k}: not an annotation of the controller")
        elif k.startswith(prefix) and not re.fullmatch(ALB[short], v): out.append(f"{k}={v!r}: not of the form {ALB[short]}")
    for short in ("scheme", "target-type", "listen-ports", "certificate-arn", "healthcheck-path", "ssl-policy"):
        if prefix + short not in ann: out.append(f"{prefix}{short}: missing")
    try: listeners = json.loads(ann.get(prefix + "listen-ports", "[]"))
    except json.JSONDecodeError: listeners = None
    if listeners is None or any(set(x) != {"HTTPS"} for x in listeners) or not listeners:
        out.append(f"{prefix}listen-ports: HTTPS listeners only (TLS where the ALB terminates)")
    interval, timeout = ann.get(prefix + "healthcheck-interval-seconds"), ann.get(prefix + "healthcheck-timeout-seconds")
    if interval and timeout and int(timeout) >= int(interval): out.append("the health check times out after its interval")
    if ing["spec"].get("ingressClassName") != "alb": out.append("spec.ingressClassName: not alb")
    hosts = {r.get("host") for r in ing["spec"]["rules"]}
    if {h for t in ing["spec"].get("tls", []) for h in t["hosts"]} != hosts: out.append("spec.tls: not every rule's host")
    return out


def gce_problems(ing):
    "Why an Ingress is not the internal, HTTPS-only GKE load balancer the GKE overlay means."
    ann, out = ing["metadata"].get("annotations", {}), []
    for k, v in ann.items():
        gke = k.startswith(("ingress.gcp.kubernetes.io/", "kubernetes.io/ingress.", "networking.gke.io/"))
        if gke and k not in GCE: out.append(f"{k}: not an annotation of GKE's Ingress")
        elif gke and not re.fullmatch(GCE[k], v): out.append(f"{k}={v!r}: not of the form {GCE[k]}")
    for k in ("kubernetes.io/ingress.class", "kubernetes.io/ingress.allow-http", "ingress.gcp.kubernetes.io/pre-shared-cert"):
        if k not in ann: out.append(f"{k}: missing")
    if "ingressClassName" in ing["spec"]: out.append("spec.ingressClassName: GKE reads the class from the annotation")
    return out


def backends(ing):
    return [p["backend"]["service"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]


@pytest.mark.parametrize("overlay", sorted(CLOUD))
def test_ingress(cloud, overlay):
    objs = cloud[overlay]
    ing, svc = one(objs, "Ingress"), one(objs, "Service", "mlpay-serve")
    serve = container(pod(objs)["spec"], "serve")
    probe_path = serve["readinessProbe"]["httpGet"]["path"]
    # The backend is the scoring Service's port, which leads to the container's named port.
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for b in backends(ing):
        assert b["name"] == svc["metadata"]["name"] and b["port"]["name"] in ports
        target = ports[b["port"]["name"]]["targetPort"]
        assert target in {p["name"] for p in serve["ports"]}
    hosts = [r["host"] for r in ing["spec"]["rules"]]
    assert hosts == [account_values(CLOUD[overlay])["HOST"]]
    if CLOUD[overlay] == "aws":
        assert alb_problems(ing) == []
        ann = ing["metadata"]["annotations"]
        assert ann["alb.ingress.kubernetes.io/healthcheck-path"] == probe_path == "/health"
        assert ann["alb.ingress.kubernetes.io/certificate-arn"] == account_values("aws")["CERTIFICATE_ARN"]
    else:
        assert gce_problems(ing) == []
        assert ing["metadata"]["annotations"]["ingress.gcp.kubernetes.io/pre-shared-cert"] == account_values("gcp")["SSL_CERTIFICATE"]
        # Container-native load balancing with the BackendConfig: its health check is the pods' /health on their port.
        sann = svc["metadata"]["annotations"]
        assert json.loads(sann["cloud.google.com/neg"]) == {"ingress": True}
        bc_name = json.loads(sann["cloud.google.com/backend-config"])["default"]
        hc = one(objs, "BackendConfig", bc_name)["spec"]["healthCheck"]
        assert hc["requestPath"] == probe_path == "/health" and hc["type"] == "HTTP"
        assert hc["port"] == SERVE_PORT == next(p["containerPort"] for p in serve["ports"] if p["name"] == "http")
        assert hc["timeoutSec"] < hc["checkIntervalSec"]
        # Draining ends within the pods' termination grace.
        assert one(objs, "BackendConfig")["spec"]["connectionDraining"]["drainingTimeoutSec"] < pod(objs)["spec"]["terminationGracePeriodSeconds"]


def test_a_bad_ingress_is_caught(cloud):
    alb = one(cloud["eks"], "Ingress")
    def changed(ing, **ann):
        out = json.loads(json.dumps(ing))
        for k, v in ann.items():
            if v is None: out["metadata"]["annotations"].pop(k)
            else: out["metadata"]["annotations"][k] = v
        return out
    p = "alb.ingress.kubernetes.io/"
    cases = {f"{p}healthcheck-paths": {f"{p}healthcheck-paths": "/health"},  # misspelt: the controller would ignore it
             f"{p}scheme": {f"{p}scheme": "internet-facing"},  # an authorization scorer is not public
             f"{p}listen-ports": {f"{p}listen-ports": '[{"HTTP": 80}, {"HTTPS": 443}]'},  # plain HTTP
             f"{p}certificate-arn": {f"{p}certificate-arn": None},
             "times out": {f"{p}healthcheck-timeout-seconds": "10"}}
    for needle, ann in cases.items():
        problems = alb_problems(changed(alb, **ann))
        assert any(needle in x for x in problems), (needle, problems)
    gce = one(cloud["gke"], "Ingress")
    for needle, ann in {"kubernetes.io/ingress.allow-http": {"kubernetes.io/ingress.allow-http": "true"},
                        "kubernetes.io/ingress.class": {"kubernetes.io/ingress.class": "gce"},  # external
                        "ingress.gcp.kubernetes.io/pre-shared-certs": {"ingress.gcp.kubernetes.io/pre-shared-certs": "x"}}.items():
        problems = gce_problems(changed(gce, **ann))
        assert any(needle in x for x in problems), (needle, problems)
    with_class = json.loads(json.dumps(gce)); with_class["spec"]["ingressClassName"] = "gce-internal"
    assert gce_problems(with_class) == ["spec.ingressClassName: GKE reads the class from the annotation"]


# ---- GPUs ------------------------------------------------------------------------------------------------------------

def gpu_selection(spec):
    "The GPU-specific parts of a pod spec: GPUs asked for, tolerations of the GPU taint, and GPU node selection."
    serve = container(spec, "serve")
    terms = (spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
             .get("nodeSelectorTerms", []))
    return {"gpus": serve["resources"]["limits"].get("nvidia.com/gpu"),
            "tolerations": [t for t in spec.get("tolerations", []) if t["key"] == "nvidia.com/gpu"],
            "accelerator": spec.get("nodeSelector", {}).get("cloud.google.com/gke-accelerator"),
            "instance_types": [v for t in terms for e in t["matchExpressions"] if e["key"] == "node.kubernetes.io/instance-type"
                               for v in e["values"]]}


@pytest.mark.parametrize("overlay", sorted(CLOUD))
def test_gpu_selection_only_in_gpu_variants(cloud, overlay):
    spec = pod(cloud[overlay])["spec"]
    got = gpu_selection(spec)
    if overlay not in GPU:
        assert got == {"gpus": None, "tolerations": [], "accelerator": None, "instance_types": []}
        assert "affinity" not in spec and "tolerations" not in spec
        return
    assert got["gpus"] == 1 and got["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if CLOUD[overlay] == "aws":  # single-GPU EC2 instance types; no GKE label
        assert got["accelerator"] is None and got["instance_types"]
        assert all(re.fullmatch(r"(g4dn|g5|g6|g6e)\.xlarge", t) for t in got["instance_types"]), got["instance_types"]
    else:  # GKE's accelerator label; no EC2 instance types
        assert got["instance_types"] == [] and re.fullmatch(r"nvidia-[\w-]+", got["accelerator"])
    # The same pods as the CPU variant otherwise: the GPU image and its resources, the rest alike.
    cpu = pod(cloud[overlay.removesuffix("-gpu")])["spec"]
    strip = lambda s: {k: v for k, v in s.items() if k not in ("affinity", "tolerations", "nodeSelector", "containers", "initContainers")}
    assert strip(spec) == strip(cpu)


# ---- capacity --------------------------------------------------------------------------------------------------------

def replicas_for(peak_rps, pod_rps, target_pct):
    "Pods that carry `peak_rps` with each at the HPA's CPU target, plus one for a pod lost or starting."
    return math.ceil(peak_rps / (pod_rps * target_pct / 100)) + 1


def qos(spec):
    "The pod's QoS class, by Kubernetes' rule: Guaranteed when every container has CPU and memory limits = requests."
    cs = spec["containers"] + spec.get("initContainers", [])
    res = [(c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {})) for c in cs]
    if all(lim.get(r) and req.get(r, lim.get(r)) == lim.get(r) for req, lim in res for r in ("cpu", "memory")): return "Guaranteed"
    return "Burstable" if any(req or lim for req, lim in res) else "BestEffort"


def test_replica_arithmetic():
    assert replicas_for(20_000, 5_500, 70) == 7  # 20,000 / 3,850 = 5.2 -> 6, + 1
    assert replicas_for(3_850, 5_500, 70) == 2 and replicas_for(3_851, 5_500, 70) == 3
    assert qos({"containers": [{"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}}]}) == "Guaranteed"
    assert qos({"containers": [{"resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}}]}) == "Burstable"
    assert qos({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}) == "Guaranteed"  # requests default to limits
    assert qos({"containers": [{}]}) == "BestEffort"


@pytest.mark.parametrize("overlay", sorted(CLOUD))
def test_resources_match_the_hpa(cloud, overlay):
    objs = cloud[overlay]
    dep, hpa, pdb = one(objs, "Deployment"), one(objs, "HorizontalPodAutoscaler"), one(objs, "PodDisruptionBudget")
    spec = dep["spec"]["template"]["spec"]
    serve = container(spec, "serve")
    # One scoring process per pod, one whole core: requests = limits = 1 CPU, and the pod is Guaranteed.
    env = env_of(serve)
    assert env["MLPAY_WORKERS"]["value"] == "0" and env["MLPAY_API_SERVERS"]["value"] == "1"
    res = serve["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == "1"
    assert qos(spec) == "Guaranteed", [c["resources"] for c in spec["containers"] + spec["initContainers"]]
    # The HPA on that request: its bounds are the arithmetic of its annotations (components/capacity).
    (m,) = hpa["spec"]["metrics"]
    assert m["resource"]["name"] == "cpu" and m["resource"]["target"]["type"] == "Utilization"
    target = m["resource"]["target"]["averageUtilization"]
    assert 0 < target < 100
    ann = hpa["metadata"]["annotations"]
    peak, per_pod = int(ann["mlpay/peak-rps"]), int(ann["mlpay/pod-rps"])
    assert hpa["spec"]["maxReplicas"] == replicas_for(peak, per_pod, target)
    assert 3 <= hpa["spec"]["minReplicas"] == dep["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    # The measured figure the sizing starts from (README, Serving: one process, 5,516 req/s on the faster machine).
    assert per_pod <= 5_516
    # Zones: spread over them, and drained one pod at a time.
    zone = [t for t in spec["topologySpreadConstraints"] if t["topologyKey"] == "topology.kubernetes.io/zone"]
    assert len(zone) == 1 and zone[0]["labelSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}


# ---- what fails to build ---------------------------------------------------------------------------------------------

def edit_account(work, cloud_name, fn):
    path = work / ACCOUNT[cloud_name].relative_to(K8S) / "kustomization.yaml"
    k = yaml.safe_load(path.read_text())
    fn(k)
    path.write_text(yaml.safe_dump(k))


@pytest.mark.parametrize("overlay", ["eks", "gke"])
def test_a_missing_setting_fails_the_build(tmp_path, overlay):
    cloud_name = CLOUD[overlay]
    work = copy_k8s(tmp_path)
    # No model URL: the build fails naming the ConfigMap (no pod would start without it).
    edit_account(work, cloud_name, lambda k: k.update(configMapGenerator=[g for g in k["configMapGenerator"] if g["name"] != "mlpay-model-source"]))
    proc = kustomize(work, overlay)
    assert proc.returncode != 0 and "mlpay-model-source" in proc.stderr, proc.stderr
    # A setting left out: the build fails naming it.
    work = copy_k8s(tmp_path / "b")
    key = IDENTITY[cloud_name][1]
    def drop(k):
        (g,) = [g for g in k["configMapGenerator"] if g["name"] == SETTINGS[cloud_name]]
        g["literals"] = [x for x in g["literals"] if not x.startswith(key + "=")]
    edit_account(work, cloud_name, drop)
    proc = kustomize(work, overlay)
    assert proc.returncode != 0 and key in proc.stderr, proc.stderr
    # The cloud's settings left out: the build fails naming them.
    work = copy_k8s(tmp_path / "c")
    edit_account(work, cloud_name, lambda k: k.update(configMapGenerator=[g for g in k["configMapGenerator"] if g["name"] != SETTINGS[cloud_name]]))
    proc = kustomize(work, overlay)
    assert proc.returncode != 0 and SETTINGS[cloud_name] in proc.stderr, proc.stderr


# ---- credentials from a mounted file (clusters without a workload identity) -------------------------------------------

CREDENTIALS = {"aws-credentials-file": ("secrets/credentials", "AWS_SHARED_CREDENTIALS_FILE", "[default]\naws_access_key_id = test\n"),
               "gcp-credentials-file": ("secrets/key.json", "GOOGLE_APPLICATION_CREDENTIALS", '{"type": "service_account"}\n')}


def file_overlay(work, component, url):
    "An overlay of the CPU deployment with the model from the store and credentials from a file: overlays/<component>."
    d = work / "overlays" / component
    d.mkdir()
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../cpu"],
        "components": ["../../components/model-from-store", f"../../components/{component}"],
        "configMapGenerator": [{"name": "mlpay-model-source", "literals": [f"MLPAY_MODEL_URL={url}",
                                                                           "AWS_ENDPOINT_URL_S3=https://s3.example.internal"]}]}))


@pytest.mark.parametrize("component", sorted(CREDENTIALS))
def test_credentials_file_component(tmp_path, component):
    rel, var, content = CREDENTIALS[component]
    work = copy_k8s(tmp_path)
    file_overlay(work, component, "s3://acme/models/1" if component.startswith("aws") else "gs://acme/models/1")
    # Without the file the build fails, naming it: no placeholder credentials are ever deployed.
    proc = kustomize(work, component)
    assert proc.returncode != 0 and rel in proc.stderr, proc.stderr
    assert (K8S / "components" / component / "secrets/.gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
    (work / "components" / component / rel).write_text(content)
    objs = render(work, component)
    for obj in objs: validate(obj)
    spec = pod(objs)["spec"]
    fetch, serve = container(spec, "fetch-model", init=True), container(spec, "serve")
    # The init container reads the file named by the variable, from the generated Secret, read-only; the server has
    # neither the file nor the variable.
    path = env_of(fetch)[var]["value"]
    mount_dir, name = path.rsplit("/", 1)
    m = mounts(fetch)[mount_dir]
    assert m["readOnly"] is True
    secret_vol = {v["name"]: v for v in spec["volumes"]}[m["name"]]["secret"]
    secret = one(objs, "Secret", secret_vol["secretName"])
    assert [i["path"] for i in secret_vol["items"]] == [name] and secret_vol["defaultMode"] == 0o440
    assert base64.b64decode(secret["data"][secret_vol["items"][0]["key"]]).decode() == content
    assert var not in env_of(serve) and m["name"] not in {x["name"] for x in serve["volumeMounts"]}
    if component.startswith("aws"):  # an S3-compatible endpoint from the model source's ConfigMap, when it has one
        ref = env_of(fetch)["AWS_ENDPOINT_URL_S3"]["valueFrom"]["configMapKeyRef"]
        assert ref["optional"] is True and one(objs, "ConfigMap", ref["name"])["data"][ref["key"]].startswith("https://")


def test_cpu_and_gpu_overlays_share_the_gpu_component():
    # One definition of a GPU pod: overlays/gpu and the clouds' GPU variants all take components/gpu.
    for overlay in ("gpu", "eks-gpu", "gke-gpu"):
        k = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert "../../components/gpu" in k["components"], overlay
        comps = k["components"]
        assert overlay == "gpu" or comps.index("../../components/model-from-store") < comps.index("../../components/gpu")

