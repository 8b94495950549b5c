"""The generated parts of the site.

* The API reference (``docs/api/``): one page per public namespace, written at build time from its ``__all__``,
  so a new public name appears without editing a page. Each object is documented once, under the path a user
  writes (``regops.dropout`` for a top-level name, ``regops.nn.Dropout``, ``regops.hessian.trace``); the other
  namespaces that export it link to that entry.
* ``{benchmark-tables}``: tables read from ``benchmarks/results/**.json`` when the site is built (never pasted),
  and for the harness's result files the harness's own speedup plot, drawn from the same file into
  ``docs/_generated/``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = "_generated/benchmarks"  # under the source dir, so that Sphinx copies the images

# (namespace, page title, what it is); the order decides which page documents an object exported by several.
PAGES = [
    ("regops.dropout", "Dropout", "Dropout variants on one Philox stream. Exported at the top level."),
    ("regops.mix", "MixUp and CutMix", "Batch mixing with device-side draws. Exported at the top level."),
    ("regops.losses", "Losses", "Row-softmax losses on one online-softmax machinery. Exported at the top level."),
    ("regops.grad_norms", "Per-example gradient norms and DP clipping",
     "Per-example gradient norms from the ordinary backward pass. Exported at the top level."),
    ("regops.valuation", "Data valuation", "Per-example gradient products and scores. Exported at the top level."),
    ("regops.masks", "Masks", "Masks on adapters and parameters. Exported at the top level."),
    ("regops.penalties", "Penalties", "Activation sparsity, spectral norms, orthogonality. Exported at the top level."),
    ("regops.nn", "Modules (regops.nn)", "Drop-in modules of every family; `regops.patch` swaps them in."),
    ("regops.hessian", "Hessian estimates (regops.hessian)", "Hutchinson, Hutch++, XTrace, exact head curvature, GGN."),
    ("regops.optim", "Optimizers (regops.optim)", "Sharpness-aware steps and fused regularized updates."),
    ("regops.merge", "Model merging (regops.merge)", "Task arithmetic, DARE, TIES, DELLA over state dicts."),
    ("regops.privacy", "DP-SGD engine (regops.privacy)", "Opacus-style wrapping of model, optimizer and loader."),
    ("regops.per_example", "Per-example engine (regops.per_example)",
     "The engine under grad_norms and valuation, and how to add a rule for your own layer."),
    ("regops", "Backends, patching and the rest of regops", "Names of `regops` that belong to no family."),
]
# Namespaces that are modules users import (indexed as such); the others' names are all exported at the top level
# (and ``regops.dropout`` is the function there).
SINGLE_PAGE = {
    "regops", "regops.nn", "regops.hessian", "regops.optim", "regops.merge", "regops.privacy", "regops.per_example",
}  # fmt: skip


def public_namespaces() -> dict[str, list[str]]:
    """Every public namespace of the API reference and its ``__all__``."""
    return {ns: list(importlib.import_module(ns).__all__) for ns, _, _ in PAGES}


def _canonical(obj: object, name: str, home: str) -> str:
    """The path a user writes for ``obj``: top-level where regops exports it, regops.nn for modules."""
    import regops
    import regops.nn

    if name in regops.__all__ and getattr(regops, name, None) is obj:
        return f"regops.{name}"
    if name in regops.nn.__all__ and getattr(regops.nn, name, None) is obj:
        return f"regops.nn.{name}"
    return f"{home}.{name}"


def _kind(obj: object) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function" if callable(obj) else "data"


def _summary(obj: object) -> str:
    if _kind(obj) == "data":
        return "The installed version of regops."
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return first.split(". ")[0].rstrip(".") + "." if first else ""


def api_pages() -> dict[str, str]:
    """{file name: reStructuredText} of the API reference."""
    documented: dict[int, str] = {}
    pages: dict[str, str] = {}
    for ns, title, intro in PAGES:
        module = importlib.import_module(ns)
        full, links = [], []
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                links.append((f":py:mod:`{obj.__name__}`", f"the `{obj.__name__}` namespace (its own page)."))
                continue
            if ns == "regops" and any(name in importlib.import_module(n).__all__ for n, _, _ in PAGES[:-1]):
                continue  # documented on its family's page
            path = _canonical(obj, name, ns) if _kind(obj) != "data" else f"{ns}.{name}"
            if id(obj) in documented and _kind(obj) != "data":
                links.append((f":py:obj:`{documented[id(obj)]}`", _summary(obj)))
                continue
            documented[id(obj)] = path
            full.append((path, obj))
        lines = [f".. _api-{ns}:", "", title, "=" * len(title), "", intro, ""]
        lines += [f".. py:module:: {ns}", ""]
        if ns not in SINGLE_PAGE:
            lines[-1:-1] = ["   :no-index:"]
        if full:
            lines += [".. list-table::", "   :widths: 35 65", ""]
            for path, obj in full:
                lines += [f"   * - :py:obj:`{path}`", f"     - {_summary(obj) or ' '}"]
            lines.append("")
        if links:
            lines += ["Also here, documented on another page:", ""]
            lines += [f"* {ref} -- {text}" for ref, text in links]
            lines.append("")
        for path, obj in full:
            kind = _kind(obj)
            if kind == "data":
                value = getattr(importlib.import_module(ns), path.rsplit(".", 1)[1])
                lines += [f".. py:data:: {path.rsplit('.', 1)[1]}", f"   :value: {value!r}", ""]
                lines += ["   The installed version of regops.", ""]
                continue
            directive = {"function": "autofunction", "class": "autoclass", "exception": "autoexception"}[kind]
            lines += [f".. {directive}:: {path}"]
            if kind == "class":
                lines += ["   :members:"]
            lines.append("")
        pages[f"{ns}.rst"] = "\n".join(lines)
    index = ["API reference", "=============", "",
             "Every public name, generated from the docstrings (the same text as ``help()``).", "",
             ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   {ns}" for ns, _, _ in PAGES]
    pages["index.rst"] = "\n".join(index) + "\n"
    return pages


def write_generated(app) -> None:
    write_api_pages(Path(app.srcdir))
    write_plots(Path(app.srcdir))


def write_api_pages(srcdir: Path) -> None:
    out = srcdir / "api"
    out.mkdir(exist_ok=True)
    pages = api_pages()
    for name, text in pages.items():
        path = out / name
        if not path.exists() or path.read_text() != text:  # unchanged pages keep their mtime: no rebuild
            path.write_text(text)
    for stale in out.glob("*.rst"):
        if stale.name not in pages:
            stale.unlink()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 4 and all(isinstance(v, (int, float)) for v in value):
        ordered = sorted(value)  # every round of a timing: its count and spread, not the raw list
        return f"{len(value)} values, {ordered[0]:.4g} to {ordered[-1]:.4g}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            out += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, value)]


def _table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines + [""]


def _plot_name(path: Path) -> str:
    return path.relative_to(RESULTS).with_suffix(".png").as_posix().replace("/", "--")


def _harness_rows(data: object) -> list[dict] | None:
    """The rows of a harness result file (``benchmarks.harness``'s format), else None."""
    rows = data.get("results") if isinstance(data, dict) else None
    keys = {"family", "case", "params", "variant"}
    if isinstance(rows, list) and rows and all(isinstance(r, dict) and keys <= r.keys() for r in rows):
        return rows
    return None


def write_plots(srcdir: Path) -> None:
    """The harness's speedup plot of every harness result file, redrawn when the file is newer than it."""
    out = srcdir / PLOTS
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(RESULTS.rglob("*.json")):
        data = json.loads(path.read_text())
        rows = _harness_rows(data)
        target = out / _plot_name(path)
        if rows is None or (target.exists() and target.stat().st_mtime >= path.stat().st_mtime):
            continue
        from benchmarks.harness import plot  # the plot the harness draws when it writes the file

        plot(data["environment"], rows, target)


def benchmark_markdown(results: Path = RESULTS) -> str:
    """Markdown for every result file: its environment, then its rows (a table per list of records)."""
    out = []
    for path in sorted(results.rglob("*.json")):
        data = json.loads(path.read_text())
        rel = path.relative_to(ROOT).as_posix()
        out += [f"**`{rel}`**", ""]
        runs = data["runs"] if isinstance(data, dict) and isinstance(data.get("runs"), list) else [data]
        for i, run in enumerate(runs):
            if len(runs) > 1:
                out += [f"Run {i + 1} of {len(runs)}:", ""]
            env = run.get("environment", {}) if isinstance(run, dict) else {}
            if env:
                out += ["Environment: " + ", ".join(f"{k} `{_cell(v)}`" for k, v in env.items()), ""]
            body = {k: v for k, v in run.items() if k != "environment"} if isinstance(run, dict) else {"value": run}
            records = {k: v for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
            for rows in records.values():
                out += _table([dict(_flatten(r)) for r in rows])
            rest = [(k, v) for k, v in _flatten({k: v for k, v in body.items() if k not in records})]
            if rest:
                out += _table([{"quantity": k, "value": v} for k, v in rest])
        if _harness_rows(data) is not None:
            out += [f"```{{image}} /{PLOTS}/{_plot_name(path)}", f":alt: speedups of {rel}", "```", ""]
    return "\n".join(out)


class BenchmarkTables(SphinxDirective):
    """``{benchmark-tables}``: the tables of benchmarks/results, read when the site is built."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        for path in sorted(RESULTS.rglob("*.json")):
            self.env.note_dependency(str(path))
        container = nodes.container()
        text = benchmark_markdown()
        self.state.nested_parse(StringList(text.splitlines(), source="benchmarks/results"), 0, container)
        return container.children


def setup(app):
    app.connect("builder-inited", write_generated)
    app.add_directive("benchmark-tables", BenchmarkTables)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
