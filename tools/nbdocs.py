"""README.md from nbs/index.ipynb, and the documentation site without Quarto.

    python tools/nbdocs.py readme           # write README.md from settings.ini's readme_nb (nbs/index.ipynb)
    python tools/nbdocs.py readme --check   # exit 1, with a diff, when README.md is not what readme writes
    python tools/nbdocs.py site             # nbdev's doc processing of every notebook into _proc/, then one
                                            # HTML page per notebook (nbconvert) in settings.ini's doc_path (_docs/)

Both run nbdev's own doc processors (`nbdev.processors.FilterDefaults`, what `nbdev_readme` and `nbdev_docs` run):
the `# title` + `> summary` cell becomes the front matter, `#| hide` cells and directives go, and `site` executes
each notebook's exported cells, imports and `show_doc`s as nbdev does. Only the last step differs from nbdev's:
`nbdev_readme` and `nbdev_docs` hand the processed notebooks to Quarto, which PyPI's quarto-cli downloads from
GitHub at install time; here markdown cells are written as they are (README.md) or nbconvert renders the pages.
Nothing is downloaded and no notebook is written to: the outputs are README.md, _proc/ and _docs/.
"""

import argparse
import difflib
import os
import re
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

README_NOTE = "<!-- Generated from nbs/{nb} by `make readme`: edit the notebook, not this file. -->"
_QUARTO_ATTRS = re.compile(r"\]\(([^)\s]*)\)\{[^}]*\}")
_NB_IMAGE = re.compile(r"(!\[[^\]]*\]\()(?![a-z]+:|/)")  # an image path relative to the notebook (nbs/), not a URL
_DIRECTIVE = re.compile(r"^#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def _cfg():
    from nbdev.config import get_config

    return get_config()


def _frontmatter(nb):
    "The front matter nbdev's FrontmatterProc put in the first raw cell, and that cell's index (or None)."
    for i, c in enumerate(nb.cells):
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            return yaml.safe_load(c.source.strip().strip("-")) or {}, i
    return {}, None


def _directives(src):
    "Leading `#| key: value` lines of a cell: ({key: value}, the source without them)."
    lines, d = src.splitlines(), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        d[m.group(1)] = m.group(2)
        lines.pop(0)
    return d, "\n".join(lines)


def _text(x):
    return "".join(x) if isinstance(x, list) else x


def _outputs_md(cell, path):
    res = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            res.append("```\n" + _text(o.text).rstrip("\n") + "\n```")
        elif o.output_type in ("execute_result", "display_data"):
            data = o.get("data", {})
            if "text/markdown" in data:
                res.append(_text(data["text/markdown"]).strip("\n"))
            elif "text/plain" in data and not any(k.startswith("image/") for k in data):
                res.append("```\n" + _text(data["text/plain"]).rstrip("\n") + "\n```")
            else:
                sys.exit(f"{path}: cell {cell.idx_}: a {', '.join(data)} output cannot go in README.md; clear it")
        elif o.output_type == "error":
            sys.exit(f"{path}: cell {cell.idx_} has an error output; clear it")
    return res


def render_readme():
    "README.md's text: nbdev's doc processors on the readme notebook, then every cell as markdown."
    from execnb.nbio import read_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, add_links, insert_warning

    cfg = _cfg()
    path = cfg.nbs_path / cfg.readme_nb
    nb = read_nb(path)
    # add_links would point `names` at the doc site (doc_host), which is not published: README.md keeps them as code.
    procs = [p for p in FilterDefaults().procs() if p not in (add_links, insert_warning)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NBProcessor(nb=nb, procs=procs).process()
    fm, i = _frontmatter(nb)
    if "title" not in fm:
        sys.exit(f"{path}: the first markdown cell must be `# title` and `> summary`")
    parts = [f"# {fm['title']}"] + ([f"> {fm['description']}"] if fm.get("description") else [])
    parts.append(README_NOTE.format(nb=cfg.readme_nb))
    for c in nb.cells[(i + 1 if i is not None else 0) :]:
        d, src = _directives(c.source) if c.cell_type == "code" else ({}, c.source)
        if c.cell_type == "code":
            if d.get("echo", "true").lower() != "false" and src.strip():
                parts.append("```python\n" + src.strip("\n") + "\n```")
            if d.get("output", "true").lower() != "false":
                parts += _outputs_md(c, path)
        elif src.strip():  # README.md sits one level above the notebook: its images are under nbs/
            parts.append(_NB_IMAGE.sub(rf"\1{os.path.relpath(cfg.nbs_path, cfg.config_path)}/", src.strip("\n")))
    return "\n\n".join(parts) + "\n"


def readme(check=False):
    cfg = _cfg()
    out = cfg.config_path / "README.md"
    new = render_readme()
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    if check:
        if new == old:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md", f"nbs/{cfg.readme_nb}")
        )
        print(f"\nREADME.md is not what nbs/{cfg.readme_nb} renders to: edit the notebook and run `make readme`")
        return 1
    if new != old:
        out.write_text(new, encoding="utf-8")
    return 0


def _process(job):
    "Worker: nbdev's doc processing of one notebook (nbdev.serve_drv.main); the error, if any, in a few lines."
    src, dst = job
    import nbdev.serve_drv
    from nbdev.processors import FilterDefaults

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            nbdev.serve_drv.main((Path(src), Path(dst), FilterDefaults))
            return src, None
        except Exception as e:
            os.environ.pop("IN_TEST", None)
            lines = str(e).splitlines()
            msg = lines[0].rstrip(" :")
            cause = e.__cause__ or e.__context__
            if cause is not None:
                msg += f": {type(cause).__name__}: {cause}"
            first = lines[1] if len(lines) > 1 else None
            mixed = [str(w.message).split("---\n")[1] for w in caught if "imports and other" in str(w.message)]
            if first is not None:
                msg += f"\n    the cell starts: {first!r}"
                if any(m.splitlines()[0] == first for m in mixed if m):
                    msg += (
                        "\n    it mixes imports with other code, and nbdev runs such cells when it builds the docs,"
                        " without the cells before them (nbdev's FAQ): give its imports a cell of their own"
                    )
            return src, msg


def _page(nb, pages, fm):
    "The processed notebook as nbconvert should show it: a title, links to the other pages, Quarto's directives."
    import nbformat

    cells = [nbformat.v4.new_markdown_cell(" · ".join(f"[{t}]({f})" for f, t in pages))]
    title = [f"# {fm.get('title', '')}"] + ([f"> {fm['description']}"] if fm.get("description") else [])
    cells.append(nbformat.v4.new_markdown_cell("\n\n".join(title)))
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            continue
        if c.cell_type == "code":
            d, c.source = _directives(c.source)
            if d.get("echo", "true").lower() == "false":
                c.metadata.setdefault("tags", []).append("remove_input")
            if d.get("output", "true").lower() == "false":
                c.outputs = []
            for o in c.get("outputs", []):  # show_doc's links carry Quarto attributes, which nbconvert would print
                if "text/markdown" in o.get("data", {}):
                    o.data["text/markdown"] = _QUARTO_ATTRS.sub(r"](\1)", _text(o.data["text/markdown"]))
        cells.append(c)
    nb.cells = cells
    nb.metadata["title"] = fm.get("title", "")
    return nb


def site(n_workers):
    import nbformat
    from nbconvert import HTMLExporter
    from nbdev.doclinks import nbglob
    from traitlets.config import Config

    cfg = _cfg()
    nbs, proc, docs = cfg.nbs_path, cfg.config_path / "_proc", cfg.doc_path
    shutil.rmtree(proc, ignore_errors=True)
    proc.mkdir(parents=True)
    files = sorted(nbglob(nbs, func=Path, file_glob="", file_re=""), key=lambda p: (p.name != cfg.readme_nb, p.name))
    for f in files:
        if f.suffix != ".ipynb":
            (proc / f.relative_to(nbs)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, proc / f.relative_to(nbs))
    jobs = [(str(f), str(proc / f.relative_to(nbs))) for f in files if f.suffix == ".ipynb"]
    # The workers unpickle `_process` by module name: IPython's shell, which nbdev runs the cells in, replaces __main__.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nbdocs

    with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as ex:
        failed = [(s, m) for s, m in ex.map(nbdocs._process, jobs) if m]
    shutil.rmtree(docs, ignore_errors=True)
    docs.mkdir(parents=True)
    if (nbs / "images").is_dir():  # the pages' images, at the same relative paths as beside the notebooks
        shutil.copytree(nbs / "images", docs / "images")
    processed, bad = [], {s for s, _ in failed}
    for src, dst in jobs:
        if src in bad:
            continue
        nb = nbformat.read(dst, as_version=4)
        fm, _ = _frontmatter(nb)
        processed.append((nb, fm, fm.get("output-file", Path(dst).stem + ".html")))
    pages = [(f, fm.get("title", f)) for _, fm, f in processed]
    conf = Config(TagRemovePreprocessor={"enabled": True, "remove_input_tags": {"remove_input"}})
    exporter = HTMLExporter(template_name="lab", config=conf, exclude_input_prompt=True, exclude_output_prompt=True)
    for nb, fm, out in processed:
        body, _ = exporter.from_notebook_node(_page(nb, pages, fm))
        (docs / out).write_text(body, encoding="utf-8")
    print(f"{len(processed)} pages in {os.path.relpath(docs, cfg.config_path)}/ (nbconvert; `quarto` is not on PATH)")
    if failed:
        for src, m in failed:
            print(f"{os.path.relpath(src, cfg.config_path)}: {m}", file=sys.stderr)
        print(
            f"\nthe docs do not build: {len(failed)} of {len(jobs)} notebooks failed nbdev's doc processing",
            file=sys.stderr,
        )
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("readme", help="write README.md from the readme notebook").add_argument(
        "--check", action="store_true", help="write nothing; exit 1 with a diff when README.md differs"
    )
    sub.add_parser("site", help="the docs site in doc_path without Quarto").add_argument(
        "--n-workers", type=int, default=os.cpu_count() or 1
    )
    a = ap.parse_args()
    sys.exit(readme(a.check) if a.cmd == "readme" else site(a.n_workers))


if __name__ == "__main__":
    main()
