"""The Open Inference Protocol (KServe v2 REST) served by a real mlpay-serve, called by a standard client: Triton's
`tritonclient.http`, as KServe and Triton users call their models. Its answers must be /predict's: the same
transactions go to /predict on a second server warmed and fed identically, and every field must match.

Then the KServe custom runtime (containers/k8s/kserve/), validated offline: its core objects and the pod KServe makes
strictly against the Kubernetes schemas, its custom resources against schemas written from KServe's documented
fields (unknown fields fail), and the InferenceService, the ServingRuntime and mlpay-serve's command line agree.
"""
import base64
import copy
import json
import math
import shutil

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from conftest import ROOT
from test_containers import K8S_VERSIONS, TEST_KEY, VERSION, build, entrypoint, validate
from test_rollout_k8s import _INT, _METADATA, _STR, _obj, one
from test_serve import KEY, Server, get, post


def auth():
    "The key's header, a new dict each call: tritonclient's infer writes Inference-Header-Content-Length into the dict it is given."
    return {"Authorization": f"Bearer {KEY}"}

TX = {"transaction_id": 40_000_001, "tx_datetime": "2018-08-30T12:00:00", "customer_id": 7, "terminal_id": 11, "tx_amount": 42.0}
FIELDS = ["transaction_id", "score", "probability", "decision", "reasons", "degraded", "model_version"]  # /predict's result, in order


def batch(first_id, card, n=5, minute=0):
    "n authorizations on one card, a minute apart, growing amounts (the later ones flagged, with reasons)."
    return [{**TX, "transaction_id": first_id + i, "customer_id": card, "tx_datetime": f"2018-08-30T13:{minute + i:02d}:00",
             "tx_amount": 15.0 + 300.0 * i} for i in range(n)]


def inputs(meta, txs, binary=True):
    "The client's input tensors for `txs`, named and typed as the model's metadata says (binary: tritonclient's default form)."
    out = []
    for spec in meta["inputs"]:
        arr = np.array([t[spec["name"]] for t in txs], dtype=triton_to_np_dtype(spec["datatype"]))
        tensor = triton.InferInput(spec["name"], list(arr.shape), spec["datatype"])
        tensor.set_data_from_numpy(arr, binary_data=binary)
        out.append(tensor)
    return out


def results(answer, names=FIELDS):
    "An InferResult's output tensors as /predict's results (NaN for a stand-in's null score, as numpy reads it; reasons parsed)."
    cols = {n: answer.as_numpy(n) for n in names}
    rows = []
    for i in range(len(cols[names[0]])):
        row = {n: cols[n][i].item() if hasattr(cols[n][i], "item") else cols[n][i] for n in names}
        for n in ("decision", "reasons", "model_version"):
            if n in row and isinstance(row[n], bytes): row[n] = row[n].decode()
        if "reasons" in row: row["reasons"] = json.loads(row["reasons"])
        if "score" in row and math.isnan(row["score"]): row["score"] = None
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def servers(package, tmp_path_factory):
    "Two servers, each with its own in-process state warmed from the same history: one called by tritonclient, one on /predict."
    made = [Server(package / "model", MLPAY_STATE_DIR=tmp_path_factory.mktemp(f"oip-state-{i}"), MLPAY_WARM_FROM=package / "history.parquet",
                   MLPAY_REASONS="all", MLPAY_MODEL_NAME="fraud") for i in range(2)]
    yield made
    for s in made: s.stop()


def test_tritonclient_gets_the_answers_predict_gives(servers):
    oip, rest = servers
    client = triton.InferenceServerClient(url=f"127.0.0.1:{oip.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fraud")
    assert not client.is_model_ready("mlpay")  # the name is MLPAY_MODEL_NAME's
    meta = client.get_model_metadata("fraud")
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("transaction_id", "INT64", [-1]), ("tx_datetime", "BYTES", [-1]), ("customer_id", "INT64", [-1]), ("terminal_id", "INT64", [-1]),
        ("tx_amount", "FP64", [-1])]
    assert [t["name"] for t in meta["outputs"]] == FIELDS
    version = meta["versions"][0]
    assert client.get_server_metadata()["name"] == "mlpay" and client.is_model_ready("fraud", version)

    # the same transactions, in the same order, to both servers: binary tensors (tritonclient's default), then JSON ones
    # asking for some outputs by name, then a version-addressed request; each answer must be /predict's
    first = batch(40_000_100, card=31)
    answer = client.infer("fraud", inputs(meta, first), headers=auth(), request_id="first")
    assert answer.get_response()["id"] == "first" and answer.get_response()["model_version"] == version
    status, body = post(rest.port, "/predict", {"transactions": first})
    assert status == 200, body
    got, expected = results(answer), json.loads(body)["results"]
    assert got == expected, (got, expected)
    assert {r["decision"] for r in got} != {"approve"} and any(r["reasons"] for r in got)  # flagged ones among them, explained

    second = batch(40_000_200, card=31, minute=10)  # the same card: its velocity features see the first batch on both servers
    asked = [triton.InferRequestedOutput(n, binary_data=False) for n in ("decision", "probability", "transaction_id")]
    answer = client.infer("fraud", inputs(meta, second, binary=False), outputs=asked, headers=auth())
    assert [o["name"] for o in answer.get_response()["outputs"]] == ["decision", "probability", "transaction_id"]
    status, body = post(rest.port, "/predict", {"transactions": second})
    assert results(answer, ["decision", "probability", "transaction_id"]) == [
        {k: r[k] for k in ("decision", "probability", "transaction_id")} for r in json.loads(body)["results"]]

    third = batch(40_000_300, card=32, n=1)
    answer = client.infer("fraud", inputs(meta, third), model_version=version, headers=auth())
    assert results(answer) == json.loads(post(rest.port, "/predict", {"transactions": third})[1])["results"]


def test_tritonclient_gets_the_protocols_errors(servers):
    oip, _ = servers
    client = triton.InferenceServerClient(url=f"127.0.0.1:{oip.port}")
    meta = client.get_model_metadata("fraud")
    txs = batch(40_000_400, card=33, n=2)

    def refusal(**kw):
        args = {"model_name": "fraud", "inputs": inputs(meta, txs), "headers": auth(), **kw}
        with pytest.raises(InferenceServerException) as e: client.infer(**args)
        return e.value.status(), e.value.message()

    status, message = refusal(headers={"Authorization": "Bearer wrong-key-" + "x" * 10})
    assert status == "401" and "API key" in message
    assert refusal(headers={})[0] == "401"
    assert refusal(model_name="other")[0] == "404"
    assert refusal(model_version="no-such-version")[0] == "404"
    with pytest.raises(InferenceServerException) as e: client.get_model_metadata("other")
    assert e.value.status() == "404"

    wrong = inputs(meta, txs)  # tx_amount as FP32: not the datatype the metadata gives
    amount = next(i for i, t in enumerate(wrong) if t.name() == "tx_amount")
    wrong[amount] = triton.InferInput("tx_amount", [2], "FP32")
    wrong[amount].set_data_from_numpy(np.array([1.0, 2.0], np.float32))
    status, message = refusal(inputs=wrong)
    assert status == "400" and "'tx_amount'" in message and "FP64" in message, message
    short = inputs(meta, txs)[:-1]  # no tx_amount
    status, message = refusal(inputs=short)
    assert status == "400" and "missing input 'tx_amount'" in message, message
    pan = [{**t, "customer_id": 4111111111111111} for t in txs]
    status, message = refusal(inputs=inputs(meta, pan))
    assert status == "400" and "customer_id" in message and "raw card number" in message and "4111" not in message, message
    negative = [{**t, "tx_amount": -1.0} for t in txs]
    status, message = refusal(inputs=inputs(meta, negative))
    assert status == "400" and "input 'tx_amount' element 0" in message, message
    # none of the refused requests was recorded: the transactions then score as new
    assert client.infer("fraud", inputs(meta, txs), headers=auth()).as_numpy("transaction_id").tolist() == [t["transaction_id"] for t in txs]


def test_a_degraded_server_answers_stand_ins_over_the_protocol(package, redis_process):
    "Redis down: infer answers the stand-in decisions /predict gives (flagged degraded, null score: NaN to numpy), and readiness says so."
    s = Server(package / "model", MLPAY_REDIS_URL=redis_process.url, MLPAY_WARM_FROM=package / "history.parquet")
    try:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{s.port}")
        meta = client.get_model_metadata("mlpay")
        assert client.is_server_ready()
        redis_process.stop()
        answer = results(client.infer("mlpay", inputs(meta, batch(40_000_500, card=34, n=2)), headers=auth()))
        predicted = json.loads(post(s.port, "/predict", {"transactions": batch(40_000_600, card=35, n=2)})[1])["results"]
        for got, expected in zip(answer, predicted):
            assert got["degraded"] is True and got["score"] is None and got["reasons"][0]["code"] == "STATE_UNAVAILABLE", got
            assert {k: v for k, v in got.items() if k != "transaction_id"} == {k: v for k, v in expected.items() if k != "transaction_id"}
        assert not client.is_server_ready() and not client.is_model_ready("mlpay") and client.is_server_live()
        assert get(s.port, "/v2/health/ready") == (503, {"ready": False})
    finally: s.stop()


# ---- KServe: the custom runtime's manifests (containers/k8s/kserve/), validated offline --------------------------

KSERVE = ROOT / "containers" / "k8s" / "kserve"
# KServe's documented fields (serving.kserve.io: ServingRuntime v1alpha1, InferenceService v1beta1; the Go types in
# pkg/apis/serving), the subset a manifest here may use; anything else is an error. Their Kubernetes-typed parts
# (containers, volumes, the predictor's pod fields) are checked by kubernetes-validate in the pod KServe makes.
_BOOL, _MAP = {"type": "boolean"}, {"type": "object", "additionalProperties": _STR}
_PROTOCOL = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}
_FORMAT_VERSION = {"type": "string", "pattern": r"^\d+(\.\d+){0,2}$"}  # "major", "major.minor" or "major.minor.patch"
SERVING_RUNTIME_SCHEMA = _obj({
    "apiVersion": {"const": "serving.kserve.io/v1alpha1"}, "kind": {"const": "ServingRuntime"}, "metadata": _METADATA,
    "spec": _obj({
        "supportedModelFormats": {"type": "array", "minItems": 1, "items": _obj(
            {"name": _STR, "version": _FORMAT_VERSION, "autoSelect": _BOOL, "priority": {"type": "integer", "minimum": 1}}, ["name"])},
        "multiModel": _BOOL, "disabled": _BOOL, "protocolVersions": {"type": "array", "minItems": 1, "items": _PROTOCOL},
        "containers": {"type": "array", "minItems": 1}, "volumes": {"type": "array"}, "nodeSelector": _MAP, "affinity": {"type": "object"},
        "tolerations": {"type": "array"}, "labels": _MAP, "annotations": _MAP, "imagePullSecrets": {"type": "array"}, "hostIPC": _BOOL,
        "replicas": {"type": "integer", "minimum": 0}, "storageHelper": _obj({"disabled": _BOOL}),
        "grpcEndpoint": _STR, "grpcDataEndpoint": _STR, "httpDataEndpoint": _STR}, ["containers"])},
    ["apiVersion", "kind", "metadata", "spec"])
POD_FIELDS = {"serviceAccountName", "automountServiceAccountToken", "securityContext", "nodeSelector", "tolerations", "affinity",
              "volumes", "imagePullSecrets", "priorityClassName", "topologySpreadConstraints", "terminationGracePeriodSeconds"}
_MODEL = _obj({"modelFormat": _obj({"name": _STR, "version": _FORMAT_VERSION}, ["name"]), "runtime": _STR, "protocolVersion": _PROTOCOL,
               "storageUri": {"type": "string", "pattern": r"^((s3|gs|hdfs|webhdfs|pvc|oci|hf)://|https?://|/)"}, "runtimeVersion": _STR,
               "args": {"type": "array", "items": _STR}, "env": {"type": "array"}, "resources": {"type": "object"}}, ["modelFormat"])
_COMPONENT = {"minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0}, "scaleTarget": _INT,
              "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]}, "containerConcurrency": {"type": "integer", "minimum": 0},
              "timeout": _INT, "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100}, "labels": _MAP, "annotations": _MAP,
              "deploymentStrategy": {"type": "object"}}
INFERENCE_SERVICE_SCHEMA = _obj({
    "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
    "metadata": {**_METADATA, "properties": {**_METADATA["properties"], "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}},
    "spec": _obj({"predictor": _obj({"model": _MODEL, **_COMPONENT, **{f: {} for f in POD_FIELDS}}, ["model"])}, ["predictor"])},
    ["apiVersion", "kind", "metadata", "spec"])
KSERVE_SCHEMAS = {"ServingRuntime": SERVING_RUNTIME_SCHEMA, "InferenceService": INFERENCE_SERVICE_SCHEMA}


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    "The objects `kubectl apply -k containers/k8s/kserve` sends (with a test API key: the real one is git-ignored)."
    work = tmp_path_factory.mktemp("kserve") / "kserve"
    shutil.copytree(KSERVE, work, ignore=shutil.ignore_patterns("api-key"))
    (work / "secrets" / "api-key").write_text(TEST_KEY)
    proc = build(work)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def predictor_pod(runtime, isvc):
    "The pod KServe makes of the runtime and the InferenceService, as far as Kubernetes' schemas check it: the runtime's containers and volumes, the predictor's pod fields."
    p = isvc["spec"]["predictor"]
    spec = {**{k: v for k, v in p.items() if k in POD_FIELDS}, "containers": runtime["spec"]["containers"],
            "volumes": runtime["spec"].get("volumes", []) + p.get("volumes", [])}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{isvc['metadata']['name']}-predictor"}, "spec": spec}


def check_kserve(obj):
    try: jsonschema.validate(obj, KSERVE_SCHEMAS[obj["kind"]])
    except jsonschema.ValidationError as e:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {'.'.join(map(str, e.absolute_path))}")


def test_the_kserve_manifests_validate(kserve):
    assert sorted(o["kind"] for o in kserve) == ["InferenceService", "Secret", "ServiceAccount", "ServingRuntime"]
    for obj in kserve:
        if obj["kind"] in KSERVE_SCHEMAS: check_kserve(obj)
        else: validate(obj)  # the core objects, strictly against the Kubernetes schemas
    validate(predictor_pod(one(kserve, "ServingRuntime"), one(kserve, "InferenceService")))
    # the schemas can fail: a misspelt field, a protocol KServe does not know, a name KServe refuses
    isvc = one(kserve, "InferenceService")
    for change in (lambda o: o["spec"]["predictor"].update(minReplica=1), lambda o: o["spec"]["predictor"]["model"].update(protocolVersion="v3"),
                   lambda o: o["metadata"].update(name="1fraud")):
        bad = copy.deepcopy(isvc); change(bad)
        with pytest.raises(jsonschema.ValidationError): jsonschema.validate(bad, INFERENCE_SERVICE_SCHEMA)
    bad = copy.deepcopy(one(kserve, "ServingRuntime")); bad["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolice"):
        kubernetes_validate.validate(predictor_pod(bad, isvc), K8S_VERSIONS[0], strict=True)


def test_the_kserve_runtime_runs_mlpay_serve_as_kserve_expects(kserve):
    from mlpay.serve import ServeSettings, build_app, cli
    runtime, isvc = one(kserve, "ServingRuntime"), one(kserve, "InferenceService")
    predictor, model = isvc["spec"]["predictor"], isvc["spec"]["predictor"]["model"]
    # the InferenceService picks this runtime, for its format and protocol
    assert model["runtime"] == runtime["metadata"]["name"]
    assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"]["version"], "autoSelect": True} in runtime["spec"]["supportedModelFormats"]
    assert model["protocolVersion"] == "v2" and runtime["spec"]["protocolVersions"] == ["v2"] and runtime["spec"]["multiModel"] is False
    assert model["storageUri"].startswith("s3://")
    # the serve image's mlpay-serve, its ENTRYPOINT with these args: the model where KServe's storage initializer puts it,
    # KServe's port 8080 (the container's first), the InferenceService's name as the OIP model name
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container" and c["image"] == f"mlpay-serve:{VERSION}"
    argv = entrypoint("serve")
    assert argv[0] == "mlpay-serve"
    a = cli().parse_args(argv[1:] + c["args"])
    port = c["ports"][0]["containerPort"]
    assert (a.model, a.host, a.port, a.model_name) == ("/mnt/models", "0.0.0.0", 8080, "{{.Name}}") and port == 8080
    name = a.model_name.replace("{{.Name}}", isvc["metadata"]["name"])  # as KServe fills it in
    settings = ServeSettings(api_key="k" * 20, model_name=name)
    routes = {r.path for r in build_app("unused", settings).routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == port and c[probe]["httpGet"]["path"] in routes, probe
    assert {"/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/infer"} <= routes
    # the API key: the generated Secret mounted as a file, named by MLPAY_API_KEY_FILE; never in env
    env = {e["name"]: e for e in c["env"]}
    assert "MLPAY_API_KEY" not in env
    key_dir, key_name = env["MLPAY_API_KEY_FILE"]["value"].rsplit("/", 1)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert mounts[key_dir]["readOnly"] is True
    secret_vol, secret = volumes[mounts[key_dir]["name"]]["secret"], one(kserve, "Secret")
    assert secret_vol["secretName"] == secret["metadata"]["name"] and secret["metadata"]["name"].startswith("mlpay-api-key-")  # the hashed name
    assert [i["path"] for i in secret_vol["items"]] == [key_name]
    assert base64.b64decode(secret["data"][secret_vol["items"][0]["key"]]).decode() == TEST_KEY
    # hardened as the base Deployment: non-root, read-only root filesystem, nothing to escalate, seccomp; /tmp the only writable path
    csc, psc = c["securityContext"], predictor["securityContext"]
    assert csc["runAsNonRoot"] and csc["readOnlyRootFilesystem"] and csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] != 0 and psc["fsGroup"] == csc["runAsGroup"] and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert predictor["automountServiceAccountToken"] is False
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]] and env["TMPDIR"]["value"] == "/tmp" and env["MLPAY_STATE_DIR"]["value"].startswith("/tmp/")
    assert one(kserve, "ServiceAccount", predictor["serviceAccountName"])
    # in-process state: one replica, unless the state is shared
    assert predictor["maxReplicas"] == 1 or "MLPAY_REDIS_URL" in env


def test_the_kserve_manifests_need_the_api_key_file(tmp_path):
    shutil.copytree(KSERVE, tmp_path / "kserve", ignore=shutil.ignore_patterns("api-key"))
    proc = build(tmp_path / "kserve")
    assert proc.returncode != 0 and "secrets/api-key" in proc.stderr
    assert (KSERVE / "secrets/.gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
