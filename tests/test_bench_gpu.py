"""bench/gpu.py keeps working: its CPU half runs here, and it imports only what the offline GPU machine has."""
import ast
import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu.py"
# What the GPU machine has besides the standard library (torch, lightning, onnx, onnxruntime preinstalled; numpy and
# torchmetrics come with them), and the mlpay modules whose own imports stay inside that set.
ALLOWED = {"numpy", "torch", "lightning", "torchmetrics", "onnx", "onnxruntime"}
ALLOWED_MLPAY = {"mlpay", "mlpay.models", "mlpay.variants", "mlpay.package", "mlpay.policy"}
# Installed here but not there: the run below fails if the script (or the mlpay modules it uses) reaches for any of them. (Only
# modules no library imports optionally: torchmetrics, say, imports matplotlib whenever its metadata is installed.)
BLOCKED = ["polars", "pyarrow", "pandas", "onnxscript", "xgboost", "litserve", "dvclive", "mlpay.export", "hydra", "omegaconf", "sklearn",
           "mlpay.evaluation", "mlpay.train", "mlpay.features", "mlpay.sequences", "mlpay.config"]


def imports(path, module_level_only=True):
    "(line, module) of every import in `path`; with `module_level_only`, skip those inside functions."
    found = []
    def visit(node):
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)): continue
            if isinstance(child, ast.Import): found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level: found.append((child.lineno, "." * child.level + (child.module or "")))
                else: found.append((child.lineno, child.module))
            visit(child)
    visit(ast.parse(path.read_text()))
    return found


def allowed(module):
    if module.startswith(".") and not module.startswith(".."): module = "mlpay" + module  # a relative import inside mlpay
    top = module.split(".")[0]
    if top == "mlpay": return module in ALLOWED_MLPAY
    return top in ALLOWED or top in sys.stdlib_module_names


def test_imports_only_what_the_gpu_machine_has():
    bad = [(line, m) for line, m in imports(SCRIPT) if not allowed(m)]
    assert not bad, f"bench/gpu.py imports at module level what the offline GPU machine lacks: {bad}"
    lazy = [(line, m) for line, m in imports(SCRIPT, module_level_only=False) if not allowed(m)]
    assert not lazy, f"bench/gpu.py imports (lazily) what the offline GPU machine lacks: {lazy}"
    for module in ("models", "variants", "package", "policy"):
        bad = [(line, m) for line, m in imports(ROOT / "mlpay" / f"{module}.py", module_level_only=False) if not (allowed(m) or m.startswith("__future__"))]
        assert not bad, f"mlpay/{module}.py now imports {bad}: bench/gpu.py would no longer run on the GPU machine"


def test_cpu_half_runs_and_reports(tmp_path):
    out = tmp_path / "gpu.json"
    block = f"import sys; [sys.modules.__setitem__(m, None) for m in {BLOCKED!r}]"  # `import polars` -> ImportError
    launcher = f"{block}; import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", launcher, str(SCRIPT), "--cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu" and res["env"]["torch"] and res["env"]["onnxruntime"]

    o = res["onnxruntime"]
    assert "CPUExecutionProvider" in o["providers"]
    for kind in ("mlp", "sequence"):
        m = o["models"][kind]
        assert m["parity"]["torch_vs_ort_cpu"] < 1e-4, m["parity"]
        cpu = m["engines"]["ort_cpu"]
        assert cpu["latency_b1"]["p50_ms"] > 0 and cpu["latency_b1"]["p99_ms"] >= cpu["latency_b1"]["p50_ms"]
        assert cpu["throughput"]["1024"]["rows_per_s"] > 0
        fp16 = m["engines"]["ort_cpu_fp16"]
        assert "error" not in fp16, fp16
        assert fp16["nan"] == 0 and fp16["max_abs_diff_vs_fp32"] < 1e-3, fp16  # raw seconds (~3e6) stay float32 (naive: ~2e-2)
        t = res["torch"]["models"][kind]
        assert t["parity"]["torch_cpu_vs_torch_cpu"] < 1e-4 and t["engines"]["eager"]["throughput"]["1024"]["rows_per_s"] > 0

    for kind in ("mlp", "sequence"):
        tr = res["training"][kind]
        assert "error" not in tr, tr
        assert tr["samples_per_s"] > 0 and tr["epochs"] >= 1 and tr["precision"] == "bf16-mixed"

    assert "| part | engine | model | measure | value |" in proc.stdout, proc.stdout[-3000:]
    assert "CPU (" in proc.stdout and "samples/s batch 512" in proc.stdout and "rows/s batch 1,024" in proc.stdout
    assert "torch: " in proc.stdout and "onnxruntime: " in proc.stdout  # the environment, at the top
