"""mlpay's GPU path: onnxruntime on CUDA (parity, latency, throughput, fp16), torch on CUDA, Lightning training speed.

Run on a GPU machine (one H200: about 2-3 minutes, well under 8):

    python bench/gpu.py                      # writes bench/results/gpu.json
    python bench/gpu.py --cpu --quick        # the CPU half, as tests/test_bench_gpu.py runs it

It needs no network and imports only the standard library, numpy, torch, lightning, torchmetrics, onnx, onnxruntime
and mlpay's modules that need nothing more (taken from this checkout when the mlpay wheel is not installed): the
score and its ONNX graph are `mlpay.models`' (as the exporter writes them), the sessions `mlpay.package`'s (as the
server opens them), the float16 graph `mlpay.variants`'.
Inputs are synthetic (23 engineered features; a history of 8 steps x 3 values whose last value flags a real step);
the networks are freshly initialised, with their preprocessing fitted on the synthetic rows.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import lightning as L
import onnx
import onnxruntime as ort
import torchmetrics

try:
    import mlpay  # noqa: F401
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlpay.models import MLP, FraudModule, Scorer, SequenceNet, onnx_graph
from mlpay.package import onnx_session
from mlpay.variants import float32_nodes, named, to_fp16 as variants_fp16

N_FEATURES, N_STEPS, STEP_VALUES = 23, 8, 3
LOG_COLUMNS = 12  # the first 12 synthetic features are non-negative and heavy-tailed: log1p, as conf/model's log1p patterns
OPSET = 20  # conf/export/default.yaml's opset (this script reads no Hydra config)
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# Only the launching process prints and writes; Lightning's DDP launcher re-runs this script with LOCAL_RANK >= 1.
CHILD = os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"
T0 = time.perf_counter()


def say(*args):
    if not CHILD: print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def guarded(fn, *args, **kwargs) -> dict:
    "fn's result, or {'error': ...} when it raises: one failed measurement must not lose the others."
    try: return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - recorded and reported
        say(f"  failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}


# ---------------------------------------------------------------- synthetic data and networks
def synthetic(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    "Raw inputs like the features stage's: counts, amounts, seconds up to ~1e6 (beyond float16), flags; and labels."
    rng = np.random.default_rng(seed)
    f = np.empty((n, N_FEATURES), np.float32)
    f[:, 0:4] = rng.poisson([1, 5, 20, 60], (n, 4))  # transaction counts over windows
    f[:, 4:8] = rng.lognormal(4, 1, (n, 4))  # average amounts
    f[:, 8:10] = np.minimum(rng.lognormal(10, 2, (n, 2)), 3e6)  # seconds since the card's / terminal's last use
    f[:, 10:12] = rng.lognormal(0, 1, (n, 2))  # ratios
    f[:, 12] = rng.lognormal(3.5, 1, n)  # TX_AMOUNT, linear
    f[:, 13:18] = rng.standard_normal((n, 5))
    f[:, 18:23] = rng.random((n, 5)) < 0.2  # flags
    h = np.zeros((n, N_STEPS, STEP_VALUES), np.float32)
    real = np.arange(N_STEPS) < rng.integers(1, N_STEPS + 1, n)[:, None]  # step 0, the transaction itself, is real
    h[..., 0] = np.maximum(rng.normal(4, 1, (n, N_STEPS)), 0)  # log amount
    h[..., 1] = np.maximum(rng.normal(3, 2, (n, N_STEPS)), 0) * (np.arange(N_STEPS) > 0)  # log hours before
    h[..., 2] = 1.0  # the real-step flag
    h = np.where(real[..., None], h, 0).astype(np.float32)
    return {"features": f, "history": h, "y": (rng.random(n) < 0.02).astype(np.float32)}


def make_net(kind: str, fit_on: dict[str, np.ndarray]) -> torch.nn.Module:
    "MLP or SequenceNet as conf/model/{mlp,sequence}.yaml build them, preprocessing fitted on `fit_on`."
    if kind == "mlp": net = MLP(N_FEATURES, hidden=(128, 64), dropout=0.1)
    else: net = SequenceNet(N_FEATURES, N_STEPS, STEP_VALUES, encoder="gru", hidden=32, head=(64,), dropout=0.1)
    net.pre.fit(fit_on["features"], [i < LOG_COLUMNS for i in range(N_FEATURES)])
    if kind != "mlp":
        h = fit_on["history"]
        net.step_pre.fit(h[h[..., -1] > 0][:, :-1])  # real steps, flag aside
    return net.eval()


def inputs_of(kind: str, data: dict[str, np.ndarray], rows: int | slice) -> dict[str, np.ndarray]:
    "The network's named inputs (no labels), first `rows` rows."
    sl = slice(0, rows) if isinstance(rows, int) else rows
    names = ["features"] if kind == "mlp" else ["features", "history"]
    return {k: np.ascontiguousarray(data[k][sl]) for k in names}


# ---------------------------------------------------------------- ONNX: export, sessions, fp16 (mlpay.variants)
def export_onnx(net: torch.nn.Module, example: dict[str, np.ndarray]) -> bytes:
    "The score graph with a dynamic batch axis, as mlpay's exporter writes it (TorchScript exporter: no onnxscript needed)."
    graph = onnx_graph(Scorer(net).eval(), tuple(torch.as_tensor(v[:4]) for v in example.values()), list(example), OPSET, dynamo=False)
    return graph.SerializeToString()


def session(model: bytes, provider: str, threads: int = 1) -> ort.InferenceSession:
    "An onnxruntime session as the server opens it (mlpay.package.onnx_session: TF32 off on CUDA)."
    return onnx_session(model, [provider] if provider == CPU else [CUDA, CPU], threads)


def run_scores(sess: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return sess.run(["score"], inputs)[0]


def to_fp16(model: bytes) -> bytes:
    "mlpay.export.convert_fp16 without its value-range check: float16 except the raw-input preprocessing; float32 I/O."
    m = named(onnx.load_from_string(model))
    return variants_fp16(m, float32_nodes(m)).SerializeToString()


# ---------------------------------------------------------------- timing
def latency(fn, calls: int, warmup: int) -> dict:
    "p50 / p99 / mean milliseconds of single calls, after `warmup` calls."
    for _ in range(warmup): fn()
    t = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter_ns(); fn(); t[i] = time.perf_counter_ns() - t0
    return {"p50_ms": float(np.percentile(t, 50)) / 1e6, "p99_ms": float(np.percentile(t, 99)) / 1e6,
            "mean_ms": float(t.mean()) / 1e6, "calls": calls}


def throughput(fn, rows: int, min_calls: int, min_s: float, warmup: int) -> dict:
    "Rows per second of back-to-back calls of `rows` rows (at least `min_calls` calls and `min_s` seconds)."
    for _ in range(warmup): fn()
    n, t0 = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < min_s: fn(); n += 1
    dt = time.perf_counter() - t0
    return {"rows_per_s": rows * n / dt, "ms_per_call": dt / n * 1e3, "calls": n, "batch": rows}


def speed(cfg, make_fn, data: dict[str, np.ndarray]) -> dict:
    "Latency at batch 1 and throughput at cfg.batches of fn = make_fn(inputs)."
    out = {"latency_b1": guarded(latency, make_fn(data_rows(data, 1)), cfg.calls, cfg.warmup), "throughput": {}}
    for b in cfg.batches:
        out["throughput"][str(b)] = guarded(throughput, make_fn(data_rows(data, b)), b, cfg.min_calls, cfg.min_s, max(3, cfg.warmup // 20))
    return out


def data_rows(data: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[:n]) for k, v in data.items()}


# ---------------------------------------------------------------- 1. onnxruntime
def bench_onnxruntime(cfg, nets: dict, data: dict) -> dict:
    providers = ort.get_available_providers()
    res = {"providers": providers, "device": ort.get_device(), "cuda_listed": CUDA in providers, "cuda_error": None,
           "cuda": False, "models": {}}
    want_cuda = cfg.gpu and CUDA in providers
    if cfg.gpu and not want_cuda: res["cuda_error"] = f"{CUDA} missing (onnxruntime {ort.__version__} offers {providers})"
    for kind, net in nets.items():
        say(f"onnxruntime {kind}: export")
        inp = inputs_of(kind, data, len(data["features"]))
        model = export_onnx(net, inp)
        with torch.no_grad(): ref = torch.sigmoid(net(**{k: torch.as_tensor(v) for k, v in inp.items()})).numpy()
        cpu = session(model, CPU)
        base = run_scores(cpu, inp)
        r = res["models"][kind] = {"onnx_bytes": len(model), "parity": {"torch_vs_ort_cpu": float(np.abs(base - ref).max())}, "engines": {}}
        say(f"onnxruntime {kind}: CPU EP (1 thread)")
        r["engines"]["ort_cpu"] = speed(cfg, lambda x: functools.partial(run_scores, cpu, x), inp)
        main, main_name = cpu, "ort_cpu"
        if want_cuda:
            gpu, on = cuda_session(model)
            if on != CUDA:
                res["cuda_error"] = f"{CUDA} is listed but unusable: {on}"
                want_cuda = False
            else:
                res["cuda"] = True
                say(f"onnxruntime {kind}: CUDA EP")
                r["parity"]["cuda_vs_cpu"] = float(np.abs(run_scores(gpu, inp) - base).max())
                r["engines"]["ort_cuda"] = speed(cfg, lambda x: functools.partial(run_scores, gpu, x), inp)
                main, main_name = gpu, "ort_cuda"
        say(f"onnxruntime {kind}: fp16 on {main_name}")
        r["engines"][main_name + "_fp16"] = guarded(fp16_speed, cfg, model, CUDA if main_name == "ort_cuda" else CPU, inp,
                                                    run_scores(main, inp))
    return res


def cuda_session(model: bytes) -> tuple[ort.InferenceSession | None, str]:
    "(session, CUDA) on the CUDA EP, or (None, why not): onnxruntime falls back to CPU when CUDA/cuDNN do not load."
    for attempt in range(2):
        try:
            s = session(model, CUDA)
            if s.get_providers()[0] == CUDA: return s, CUDA
            why = f"the session runs on {s.get_providers()}: CUDA/cuDNN libraries not loadable (see onnxruntime's log above)"
        except Exception as e:  # noqa: BLE001 - reported
            why = f"{type(e).__name__}: {e}"
        if attempt or not hasattr(ort, "preload_dlls"): break
        guarded(ort.preload_dlls)  # the CUDA/cuDNN of the nvidia-* pip packages torch brings, then try again
    return None, why


def fp16_speed(cfg, model: bytes, provider: str, inp: dict, base: np.ndarray) -> dict:
    half = to_fp16(model)
    s = session(half, provider)
    if s.get_providers()[0] != provider: raise RuntimeError(f"the fp16 session runs on {s.get_providers()}")
    scores = run_scores(s, inp)
    out = {"max_abs_diff_vs_fp32": float(np.abs(scores.astype(np.float64) - base).max()), "onnx_bytes": len(half),
           "nan": int(np.isnan(scores).sum()), "throughput": {}}
    for b in cfg.batches:
        out["throughput"][str(b)] = guarded(throughput, functools.partial(run_scores, s, data_rows(inp, b)), b,
                                            cfg.min_calls, cfg.min_s, max(3, cfg.warmup // 20))
    return out


# ---------------------------------------------------------------- torch inference (the path when ORT has no CUDA)
def bench_torch(cfg, nets: dict, data: dict, compile_: bool) -> dict:
    dev = torch.device("cuda" if cfg.gpu else "cpu")
    res = {"device": str(dev), "models": {}}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # score as the CPU does
    res["threads"] = torch.get_num_threads()
    try:
        for kind, net in nets.items():
            inp = inputs_of(kind, data, len(data["features"]))
            scorer = Scorer(net).eval()
            with torch.no_grad(): ref = scorer(*map(torch.as_tensor, inp.values())).numpy()
            mod = Scorer(copy.deepcopy(net)).to(dev).eval()
            r = res["models"][kind] = {"engines": {}}
            say(f"torch {kind}: eager on {dev}")
            r["parity"] = {f"torch_{dev.type}_vs_torch_cpu": float(np.abs(eager(mod, dev)(inp)().astype(np.float64) - ref).max())}
            r["engines"]["eager"] = speed(cfg, eager(mod, dev), inp)
            if cfg.gpu:
                say(f"torch {kind}: CUDA graphs")
                r["engines"]["cuda_graphs"] = guarded(speed, cfg, functools.partial(cuda_graph, mod, dev), inp)
            else: r["engines"]["cuda_graphs"] = {"skipped": "needs CUDA"}
            if compile_:
                say(f"torch {kind}: torch.compile")
                r["engines"]["compile"] = guarded(compiled_speed, cfg, mod, dev, inp)
            else: r["engines"]["compile"] = {"skipped": "onnxruntime has CUDA (pass --compile)" if cfg.gpu else "on CPU only with --compile"}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return res


def eager(mod, dev):
    "make_fn: numpy rows in, numpy scores out, through `mod` on `dev` (copies included, as a server pays them)."
    def make(x):
        def fn():
            with torch.no_grad(): return mod(*(torch.from_numpy(v).to(dev) for v in x.values())).cpu().numpy()
        return fn
    return make


def cuda_graph(mod, dev, x):
    "fn replaying one captured CUDA graph of `mod` on static buffers (a graph per batch size)."
    static = [torch.from_numpy(v).to(dev) for v in x.values()]
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3): mod(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g): out = mod(*static)
    def fn():
        for st, v in zip(static, x.values()): st.copy_(torch.from_numpy(v))
        g.replay()
        return out.cpu().numpy()
    return fn


def compiled_speed(cfg, mod, dev, inp):
    c = torch.compile(mod)
    t0 = time.perf_counter(); eager(c, dev)(data_rows(inp, 2))(); first = time.perf_counter() - t0
    return {"first_call_s": first, **speed(cfg, eager(c, dev), inp)}


# ---------------------------------------------------------------- 2. training
class _Rows(torch.utils.data.Dataset):
    "In-memory rows; a batch is one fancy index (as mlpay.train.ArrayDataset)."
    def __init__(self, arrays): self.arrays = {k: torch.as_tensor(v) for k, v in arrays.items()}; self.n = len(arrays["y"])
    def __len__(self): return self.n
    def __getitem__(self, i): return {k: v[i] for k, v in self.arrays.items()}
    def __getitems__(self, idx): return {k: v[torch.as_tensor(idx)] for k, v in self.arrays.items()}


def _as_batch(b): return b


class _Speed(L.Callback):
    "Training rows per second after the first `skip` batches (warm-up, cuDNN autotuning)."
    def __init__(self, skip: int): self.skip, self.seen, self.rows, self.t0, self.t1 = skip, 0, 0, None, None
    def _sync(self, module):
        if module.device.type == "cuda": torch.cuda.synchronize(module.device)
    def on_train_batch_start(self, trainer, module, batch, i):
        if self.seen == self.skip: self._sync(module); self.t0 = time.perf_counter()
    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        self.seen += 1
        if self.seen > self.skip: self.rows += len(batch["y"])
    def on_train_end(self, trainer, module): self._sync(module); self.t1 = time.perf_counter()


def train_speed(cfg, kind: str, data: dict, batch: int) -> dict:
    L.seed_everything(0, verbose=False)
    arrays = {**inputs_of(kind, data, cfg.train_rows), "y": data["y"][:cfg.train_rows]}
    net = make_net(kind, arrays).train()
    module = FraudModule(net, functools.partial(torch.optim.AdamW, lr=0.002, weight_decay=0.0001), pos_weight=5.0)
    devices = cfg.devices
    steps = cfg.epochs * -(-cfg.train_rows // (batch * devices))
    cb = _Speed(skip=min(20, steps // 4))
    trainer = L.Trainer(accelerator="gpu" if cfg.gpu else "cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        precision=cfg.precision, max_epochs=cfg.epochs, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb])
    dl = torch.utils.data.DataLoader(_Rows(arrays), batch_size=batch, shuffle=True, collate_fn=_as_batch, pin_memory=cfg.gpu)
    t0 = time.perf_counter()
    trainer.fit(module, dl)
    wall = time.perf_counter() - t0
    world = trainer.world_size
    return {"samples_per_s": cb.rows * world / (cb.t1 - cb.t0), "batch_size": batch, "rows": cfg.train_rows,
            "epochs": trainer.current_epoch, "steps_per_rank": cb.seen, "timed_steps": cb.seen - cb.skip,
            "world_size": world, "precision": cfg.precision, "strategy": type(trainer.strategy).__name__,
            "fit_wall_s": wall, "fit_samples_per_s": cfg.train_rows * cfg.epochs / wall,
            "final_loss": float(trainer.callback_metrics["train/loss"]) if "train/loss" in trainer.callback_metrics else None}


def bench_training(cfg, data: dict) -> dict:
    res = {}
    for kind in ("mlp", "sequence"):
        runs = {}
        for b in cfg.train_batches:
            say(f"training {kind}: batch {b}, {cfg.train_rows:,} rows x {cfg.epochs} epoch(s), {cfg.precision}, {cfg.devices} device(s)")
            runs[str(b)] = guarded(train_speed, cfg, kind, data, b)
        first = runs[str(cfg.train_batches[0])]
        res[kind] = {**first, "by_batch": runs}
    return res


# ---------------------------------------------------------------- report
def environment(cfg) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "lightning": L.__version__, "torchmetrics": torchmetrics.__version__, "onnx": onnx.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__, "onnxruntime_device": ort.get_device(),
            "providers": ort.get_available_providers(), "gpus": gpus}


def _ms(r): return "failed: " + r["error"][:60] if "error" in r else f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f} ms"
def _rate(r): return "failed: " + r["error"][:60] if "error" in r else f"{r['rows_per_s'] / 1e6:.3f}M"
def _diff(x): return "n/a" if x is None else f"{x:.1e}"


def table_rows(res: dict) -> list[list[str]]:
    rows, o = [], res["onnxruntime"]
    names = {"ort_cpu": "CPU EP, 1 thread", "ort_cuda": "CUDA EP", "ort_cpu_fp16": "CPU EP fp16", "ort_cuda_fp16": "CUDA EP fp16",
             "eager": "eager", "cuda_graphs": "CUDA graphs", "compile": "torch.compile"}
    rows.append(["onnxruntime", "providers", "-", "available", ", ".join(o["providers"])])
    if o["cuda_error"]: rows.append(["onnxruntime", "CUDA EP", "-", "status", o["cuda_error"]])
    def engines(part, models, parity_keys):
        for kind, m in models.items():
            for key, label in parity_keys:
                if key in m.get("parity", {}): rows.append([part, label, kind, "parity: max abs diff", _diff(m["parity"][key])])
            for eng, r in m["engines"].items():
                if "skipped" in r: rows.append([part, names[eng], kind, "-", "skipped: " + r["skipped"]]); continue
                if "error" in r: rows.append([part, names[eng], kind, "-", "failed: " + r["error"][:80]]); continue
                if "latency_b1" in r: rows.append([part, names[eng], kind, "batch 1 p50 / p99", _ms(r["latency_b1"])])
                for b, t in r["throughput"].items(): rows.append([part, names[eng], kind, f"rows/s batch {int(b):,}", _rate(t)])
                if "max_abs_diff_vs_fp32" in r: rows.append([part, names[eng], kind, "max abs diff vs fp32", _diff(r["max_abs_diff_vs_fp32"])])
                if "first_call_s" in r: rows.append([part, names[eng], kind, "compile (first call)", f"{r['first_call_s']:.1f} s"])
    engines("onnxruntime", o["models"], [("torch_vs_ort_cpu", "torch CPU vs CPU EP"), ("cuda_vs_cpu", "CUDA EP vs CPU EP")])
    t = res["torch"]
    engines(f"torch ({t['device']}{', %d thread(s)' % t['threads'] if t['device'] == 'cpu' else ''})", t["models"], [("torch_cuda_vs_torch_cpu", "CUDA vs CPU")])
    for kind, m in res["training"].items():
        for b, r in m["by_batch"].items():
            if "error" in r: rows.append(["training", "Lightning", kind, f"batch {b}", "failed: " + r["error"][:80]]); continue
            what = f"{r['precision']}, {r['world_size']} x {'GPU' if res['mode'] == 'gpu' else 'CPU'}, {r['strategy']}"
            rows.append(["training", what, kind, f"samples/s batch {int(b):,}", f"{r['samples_per_s']:,.0f}"])
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows: print("| " + " | ".join(str(c) for c in r) + " |")


# ---------------------------------------------------------------- main
def config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on CPU with small sizes even when a GPU is present")
    p.add_argument("--quick", action="store_true", help="shrink everything further (the test's setting)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"), help="the JSON results file")
    p.add_argument("--compile", action="store_true", help="also time torch.compile when onnxruntime has CUDA (or on CPU)")
    p.add_argument("--devices", type=int, default=None, help="training devices (default: all visible GPUs; 1 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --cpu, as onnxruntime's CPU EP and a serving worker; torch's own otherwise)")
    p.add_argument("--precision", default=None, help="training precision (default: bf16-mixed)")
    p.add_argument("--train-rows", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    cfg = p.parse_args(argv)
    cfg.gpu = torch.cuda.is_available() and not cfg.cpu
    cfg.mode = "gpu" if cfg.gpu else "cpu"
    if cfg.gpu: size = dict(calls=2000, warmup=200, batches=[1024, 8192], min_calls=20, min_s=1.0, rows=200_000, epochs=3, train_batches=[512, 4096])
    elif not cfg.quick: size = dict(calls=1000, warmup=100, batches=[1024], min_calls=10, min_s=0.5, rows=20_000, epochs=1, train_batches=[512])
    else: size = dict(calls=200, warmup=20, batches=[1024], min_calls=3, min_s=0.1, rows=4096, epochs=1, train_batches=[512])
    if cfg.quick and cfg.gpu: size.update(calls=500, warmup=50, min_s=0.3, rows=50_000, epochs=1)
    for k in ("calls", "warmup", "batches", "min_calls", "min_s", "train_batches"): setattr(cfg, k, size[k])
    cfg.train_rows = cfg.train_rows or size["rows"]
    cfg.epochs = cfg.epochs or size["epochs"]
    cfg.devices = cfg.devices or (torch.cuda.device_count() if cfg.gpu else 1)
    cfg.precision = cfg.precision or "bf16-mixed"
    cfg.threads = cfg.threads or (None if cfg.gpu else 1)
    return cfg


def main(argv=None):
    cfg = config(argv)
    if cfg.threads: torch.set_num_threads(cfg.threads)  # 2 threads on a busy 2-core machine: up to 50x slower
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*(does not have many workers|val_dataloader|validation_step).*")
    env = environment(cfg)
    label = (f"GPU: {', '.join(env['gpus'])}" if cfg.gpu
             else "CPU (--cpu given)" if torch.cuda.is_available() else "CPU (no GPU found)")
    if not CHILD:
        print(f"mlpay GPU benchmark on {label}{' (--quick)' if cfg.quick else ''}")
        for k, v in env.items(): print(f"  {k}: {v}")
    data = synthetic(max(cfg.train_rows, max(cfg.batches)), seed=0)
    res = {"mode": cfg.mode, "device": label, "quick": cfg.quick, "env": env}
    if not CHILD:  # DDP's re-launched processes only train
        probe = synthetic(max(cfg.batches), seed=1)
        nets = {kind: make_net(kind, data) for kind in ("mlp", "sequence")}
        res["onnxruntime"] = bench_onnxruntime(cfg, nets, probe)
        res["torch"] = bench_torch(cfg, nets, probe, compile_=cfg.compile or (cfg.gpu and not res["onnxruntime"]["cuda"]))
    res["training"] = bench_training(cfg, data)
    if CHILD: return
    res["seconds"] = time.perf_counter() - T0
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print_table(f"mlpay GPU path on {label}{' (--quick)' if cfg.quick else ''}: {res['seconds']:.0f} s",
                ["part", "engine", "model", "measure", "value"], table_rows(res))
    print(f"\nfull numbers: {out}")


if __name__ == "__main__":
    main()
