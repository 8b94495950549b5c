"""The package's shape, checked: no import cycles (not even inside functions), no module over 600 lines, every
family laid out the same way, every op declared once and every C++ kernel registered on a declared op."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import regops
from regops._core import dispatch, extension

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600
FAMILY_FILES = ("__init__.py", "api.py")  # every family
OP_FAMILY_FILES = (*FAMILY_FILES, "ops.py", "reference.py", "triton.py")  # a family that declares operators


def _modules() -> dict[str, Path]:
    """Module name -> source file, for regops/ and kernels/ (installed as regops.kernels)."""
    found = {}
    for base, package in ((ROOT / "regops", "regops"), (ROOT / "kernels", "regops.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The regops modules ``name`` imports anywhere in its source (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        edges.update(t for t in targets if t in modules and t != name)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its own modules is how a package exposes them, not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and modules[t].name == "__init__.py")}
    assert _cycles(graph) == []


def test_no_module_over_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_family_has_the_same_files():
    """Every package of regops/ but _core is a family: its public functions in api.py; one that declares operators
    (an ops.py, or any op of its name in the registry) has their reference and Triton launchers beside them."""
    families = [d for d in (ROOT / "regops").iterdir() if (d / "__init__.py").is_file() and d.name != "_core"]
    assert len(families) >= 10, families
    for folder in families:
        declares = (folder / "ops.py").is_file()
        files = OP_FAMILY_FILES if declares else FAMILY_FILES
        missing = [f for f in files if not (folder / f).is_file()]
        assert missing == [], (folder.name, missing)
    # every declared op lives in a family's ops.py
    for name in dispatch.registered_ops():
        module = dispatch.declared(name).reference.__module__
        assert module.startswith("regops.") and module.split(".")[1] in {f.name for f in families}, (name, module)


def test_every_cpp_kernel_belongs_to_a_declared_op():
    if extension.load() is None:
        return
    declared = {f"regops::{name}" for name in dispatch.registered_ops()}
    for key in ("CPU", "CUDA"):
        registered = {
            op for op in torch._C._dispatch_get_registrations_for_dispatch_key(key) if op.startswith("regops::")
        }
        assert registered <= declared, (key, sorted(registered - declared))


def test_an_op_is_declared_once():
    assert len(dispatch.registered_ops()) == len(set(dispatch.registered_ops()))
    assert regops.dropout is not None
