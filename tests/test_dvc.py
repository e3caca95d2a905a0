"""dvc.yaml must track the code its stages run, and name the plot columns the code writes.

Every stage whose `cmd` runs an mlpay console script (`mlpay-<name>`, mapped to `mlpay.<module>:<function>` by
settings.ini's `console_scripts`) must list in its `deps` exactly the mlpay modules that script's module imports,
transitively (imports inside functions included): a missing module means an edit there does not rerun the stage,
an extra one means needless reruns. The import closure is computed from the current code with `ast`, so when
modules are added, renamed or removed, the failure names the stage and the files to add or drop.
"""
from __future__ import annotations

import ast
import configparser
import posixpath
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PKG = "mlpay"
NOT_DEPS = ("__init__.py", "_modidx.py")  # nbdev's version file and index: not stage code
SCRIPT = re.compile(rf"^{PKG}-[\w-]+$")


def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def console_scripts() -> dict[str, str]:
    "`{script: module}` from settings.ini's `console_scripts` (`mlpay-x=mlpay.mod:func`)."
    ini = configparser.ConfigParser()
    ini.read(ROOT / "settings.ini")
    out = {}
    for entry in ini["DEFAULT"].get("console_scripts", "").split():
        name, _, target = entry.partition("=")
        out[name.strip()] = target.split(":")[0].strip()
    return out


def module_file(name: str, root: Path = ROOT) -> Path | None:
    "The source file of mlpay module `name` (`mlpay.a.b`) in the checkout `root`, or None when there is none."
    base = root.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file(): return f
    return None


def _module_name(f: Path, root: Path) -> str:
    parts = f.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_ours(name: str | None) -> bool: return name == PKG or (name or "").startswith(PKG + ".")


@cache
def direct_imports(f: Path, root: Path = ROOT) -> tuple[set[Path], tuple[str, ...]]:
    "The mlpay module files `f` imports anywhere (functions included), and the mlpay names it imports that do not exist."
    name, is_pkg = _module_name(f, root), f.name == "__init__.py"
    found, unresolved = set(), []
    def add(mod: str, required: bool = True):
        mf = module_file(mod, root)
        if mf is not None: found.add(mf)
        elif required: unresolved.append(mod)
    for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_ours(a.name):
                    parts = a.name.split(".")
                    for i in range(1, len(parts) + 1): add(".".join(parts[:i]))  # `import mlpay.a.b` runs mlpay.a too
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = pkg[:len(pkg) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else: target = node.module
            if not _is_ours(target): continue
            add(target)
            for a in node.names:  # `from mlpay import config`, `from . import files`: submodules
                if a.name != "*": add(f"{target}.{a.name}", required=False)
    return found, tuple(unresolved)


def import_closure(module: str, root: Path = ROOT) -> tuple[set[Path], list[str]]:
    "The mlpay module files `module` runs on import, itself included (not mlpay/__init__.py, mlpay/_modidx.py), and broken imports."
    start = module_file(module, root)
    if start is None: return set(), [f"{module} (the console script's module) does not exist"]
    seen, todo, broken = set(), [start], []
    while todo:
        f = todo.pop()
        if f in seen: continue
        seen.add(f)
        found, unresolved = direct_imports(f, root)
        broken += [f"{f.relative_to(root).as_posix()} imports {u}, which does not exist" for u in unresolved]
        todo += sorted(found - seen)
    return seen - {root / PKG / n for n in NOT_DEPS}, broken


def _stage_bodies(stages: dict):
    "(name, stage) for each stage; a foreach/matrix stage's template under its name."
    for name, st in (stages or {}).items():
        yield name, st.get("do", st) if isinstance(st, dict) else {}


def _cmd_scripts(cmd) -> list[str]:
    "The mlpay console scripts (`mlpay-x`) and `python -m mlpay.x` modules a stage's cmd runs."
    cmds = [cmd] if isinstance(cmd, str) else list(cmd or [])
    out = []
    for c in cmds:
        tokens = shlex.split(c, posix=True)
        for i, t in enumerate(tokens):
            base = posixpath.basename(t)
            if SCRIPT.match(base): out.append(base)
            elif t == "-m" and i + 1 < len(tokens) and _is_ours(tokens[i + 1]): out.append(f"-m {tokens[i + 1]}")
    return out


def _dep_path(d) -> str:
    p = next(iter(d)) if isinstance(d, dict) else str(d)
    return posixpath.normpath(p.removeprefix("./"))


def script_stages() -> list[tuple[str, dict, list[str]]]:
    return [(name, st, s) for name, st in _stage_bodies(dvc_yaml().get("stages")) if (s := _cmd_scripts(st.get("cmd")))]


def test_import_closure_follows_every_import_form(tmp_path):
    "The analysis itself, on a made-up package: relative, absolute, in-function, submodule and dotted imports."
    files = {"__init__.py": "from .a import x\n", "_modidx.py": "d = {}\n",
             "a.py": "from . import b\nimport json\ndef f():\n    from mlpay.c import y\n",
             "b.py": "import mlpay.sub.d\n", "c.py": "from .b import *\n", "sub/__init__.py": "",
             "sub/d.py": "from ..e import z\nfrom .. import f as g\n", "e.py": "", "f.py": "", "unused.py": "", "broken.py": "from .gone import q\n"}
    for name, text in files.items():
        (tmp_path / PKG / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PKG / name).write_text(text)
    got, broken = import_closure(f"{PKG}.a", tmp_path)
    assert {f.relative_to(tmp_path / PKG).as_posix() for f in got} == {"a.py", "b.py", "c.py", "sub/__init__.py", "sub/d.py", "e.py", "f.py"}
    assert not broken
    assert import_closure(f"{PKG}.broken", tmp_path)[1] == ["mlpay/broken.py imports mlpay.gone, which does not exist"]
    assert _cmd_scripts(["mlpay-train --params params.yaml && .venv/bin/mlpay-evaluate x=1", "python -m mlpay.export"]) == \
        ["mlpay-train", "mlpay-evaluate", "-m mlpay.export"]


def test_some_stages_run_mlpay_scripts():
    assert len(script_stages()) >= 3, "the pipeline's stages should run mlpay console scripts: did the cmd syntax change?"


@pytest.mark.parametrize("stage", [name for name, _, _ in script_stages()])
def test_stage_deps_are_the_import_closure_of_its_script(stage):
    _, st, scripts = next(s for s in script_stages() if s[0] == stage)
    known = console_scripts()
    expected, broken, ran = set(), [], []
    for s in scripts:
        if s.startswith("-m "): module = s[3:]
        elif s in known: module = known[s]
        else:
            broken.append(f"{s} is not a console script in settings.ini (known: {', '.join(sorted(known))})")
            continue
        ran.append(f"{s} -> {module}")
        files, bad = import_closure(module)
        expected |= {f.relative_to(ROOT).as_posix() for f in files}
        broken += bad
    if broken: pytest.fail(f"stage '{stage}': " + "; ".join(broken), pytrace=False)
    listed = [p for p in map(_dep_path, st.get("deps") or []) if p == PKG or p.startswith(PKG + "/")]
    missing, extra = sorted(expected - set(listed)), sorted(set(listed) - expected)
    if missing or extra: pytest.fail(
        f"stage '{stage}' ({', '.join(ran)}): its deps in dvc.yaml do not match the mlpay modules it imports\n"
        f"  missing: {', '.join(missing) or '-'}\n  extra: {', '.join(extra) or '-'}\n"
        f"  the mlpay deps should be exactly: {', '.join(sorted(expected))}", pytrace=False)
    assert len(listed) == len(set(listed)), f"stage '{stage}': mlpay deps listed twice: {sorted(p for p in set(listed) if listed.count(p) > 1)}"


# Plots: the top-level `plots:` entries that read mlpay-evaluate's plot directory name files and columns that
# `mlpay.evaluation.write_plots` writes, and every file it writes is plotted.

def _resolve(s: str) -> str:
    "`s` with dvc.yaml's `${key}` interpolations replaced from params.yaml (DVC's default `vars`)."
    from omegaconf import OmegaConf
    params = OmegaConf.load(ROOT / "params.yaml")
    def value(m):
        v = OmegaConf.select(params, m[1])
        assert v is not None, f"dvc.yaml interpolates ${{{m[1]}}}, which params.yaml does not set"
        return str(v)
    return posixpath.normpath(re.sub(r"\$\{\s*([^}\s]+)\s*\}", value, s))


def _plot_entries() -> list[tuple[str, dict]]:
    out = []
    for item in dvc_yaml().get("plots") or []:
        if isinstance(item, str): out.append((item, {}))
        else: (pid, props), = item.items(); out.append((pid, props or {}))
    return out


def _plot_columns(pid: str, props: dict) -> dict[str, set[str]]:
    "`{file: columns}` a plot entry reads: its y columns per file, and its x column(s)."
    y, x = props.get("y"), props.get("x")
    if isinstance(y, dict): cols = {_resolve(f): {c} if isinstance(c, str) else set(c) for f, c in y.items()}
    elif y is not None: cols = {_resolve(pid): {y} if isinstance(y, str) else set(y)}
    else: cols = {}
    if isinstance(x, dict):
        for f, c in x.items(): cols.setdefault(_resolve(f), set()).add(c)
    elif x is not None:
        for f in cols or [_resolve(pid)]: cols.setdefault(f, set()).add(x)
    return cols


def _evaluate_plots_dir() -> str:
    "The plot directory mlpay-evaluate writes: an `outs` entry of its stage ending in /plots."
    for name, st, scripts in script_stages():
        if "mlpay-evaluate" in scripts:
            dirs = [_resolve(_dep_path(o)) for o in st.get("outs") or [] if _dep_path(o).endswith("/plots")]
            assert len(dirs) == 1, f"stage '{name}' should have one `.../plots` output (mlpay-evaluate --out-dir DIR writes DIR/plots), got {dirs}"
            return dirs[0]
    pytest.fail("no dvc.yaml stage runs mlpay-evaluate")


@pytest.fixture(scope="module")
def written_plots(tmp_path_factory) -> dict[str, list[str] | None]:
    "`{file name: CSV columns, or None for an image}` of a `write_plots` run on small synthetic predictions."
    import numpy as np
    import polars as pl
    from mlpay.evaluation import fit_calibrator, write_plots
    rng = np.random.default_rng(0)
    n_days, per_day = 28, 200
    n = n_days * per_day
    day = np.sort(rng.integers(0, n_days, n))
    p = 1 / (1 + np.exp(5.0 - 1.8 * rng.normal(size=n)))
    preds = pl.DataFrame({"TX_TIME_DAYS": day, "CUSTOMER_ID": rng.integers(0, 300, n), "TX_AMOUNT": rng.gamma(2, 30, n),
                          "TX_FRAUD": (rng.random(n) < p).astype(np.int8), "score": p ** 0.4,
                          "split": np.where(day < n_days // 2, "val", "test")})
    val = preds.filter(pl.col("split") == "val")
    files = write_plots(preds, fit_calibrator(val["score"], val["TX_FRAUD"]), tmp_path_factory.mktemp("plots"))
    return {f.name: pl.read_csv(f).columns if f.suffix == ".csv" else None for f in files}


def test_plots_name_the_files_and_columns_write_plots_writes(written_plots):
    root, problems, plotted = _evaluate_plots_dir(), [], set()
    for pid, props in _plot_entries():
        has_xy = "x" in props or "y" in props
        files = _plot_columns(pid, props) if has_xy else {_resolve(pid): set()}
        for f, cols in files.items():
            if f == root:
                problems.append(f"plot '{pid}' is the whole directory {root}: list one entry per plot, with x and y")
                continue
            if not f.startswith(root + "/"): continue  # not mlpay-evaluate's (DVCLive's, say)
            name = posixpath.relpath(f, root)
            if name not in written_plots:
                problems.append(f"plot '{pid}' reads {f}, which write_plots does not write (it writes {', '.join(written_plots)})")
                continue
            plotted.add(name)
            columns = written_plots[name]
            if columns is None:
                if has_xy: problems.append(f"plot '{pid}' gives x/y for the image {f}")
            elif not has_xy: problems.append(f"plot '{pid}' lists {f} without x and y: name its columns ({', '.join(columns)})")
            elif unknown := sorted(cols - set(columns)):
                problems.append(f"plot '{pid}' reads column(s) {', '.join(unknown)} of {f}, which has {', '.join(columns)}")
    if unplotted := sorted(set(written_plots) - plotted):
        problems.append(f"write_plots writes {', '.join(unplotted)} into {root}, which no entry in dvc.yaml's plots: shows")
    if problems: pytest.fail("dvc.yaml plots:\n  " + "\n  ".join(problems), pytrace=False)
