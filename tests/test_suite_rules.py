"""Rules the suite and the benchmarks keep, checked on their source: every subprocess has a timeout, no error is
swallowed around the code under test, no assertion is true by construction, the suite has a per-test deadline, and
every measured figure in the README and docs names a committed result file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_SOURCES = sorted(
    [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("regops/**/*.py")]
    + [ROOT / "setup.py"]
)
SUBPROCESS_CALLS = {"run", "call", "check_call", "check_output"}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def test_every_subprocess_has_a_timeout():
    missing = []
    for path in PY_SOURCES:
        for node in ast.walk(_tree(path)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in SUBPROCESS_CALLS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "subprocess"
                and not any(k.arg == "timeout" for k in node.keywords)
            ):
                missing.append(_where(path, node))
    assert not missing, f"subprocess calls without timeout=: {missing}"


def test_the_suite_has_a_per_test_deadline(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed"
    assert float(pytestconfig.getini("timeout")) > 0


def _handler_names(handler: ast.ExceptHandler) -> set[str]:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {t.id for t in types if isinstance(t, ast.Name)} | ({"<bare>"} if handler.type is None else set())


def test_no_error_is_swallowed_around_the_code_under_test():
    """Tests never catch ``Exception`` (a crash must fail, not skip or pass); in the benchmarks only a peer
    library's error may be caught, and only to report it as that peer's refusal (:class:`PeerRefused`)."""
    found = []
    for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.ExceptHandler) or not _handler_names(node) & {"Exception", "<bare>"}:
                continue
            body = ast.dump(ast.Module(body=node.body, type_ignores=[]))
            if path.parent.name == "benchmarks" and "PeerRefused" in body:
                continue
            found.append(_where(path, node))
    assert not found, f"except Exception around measured or tested code: {found}"


def test_no_assertion_is_true_by_construction():
    """``assert {a, b}``, ``assert [x]``, ``assert "text"``: a non-empty literal is always true."""
    found = []
    for path in ROOT.glob("tests/*.py"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Assert):
                test = node.test
                literal = isinstance(test, (ast.Set, ast.List, ast.Tuple, ast.Dict)) and (
                    test.keys if isinstance(test, ast.Dict) else test.elts
                )
                constant = isinstance(test, ast.Constant) and bool(test.value)
                if literal or constant:
                    found.append(_where(path, node))
    assert not found, f"assertions that cannot fail: {found}"


# ------------------------------------------------------------------------------------------------ published figures
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:\s?(?:ms|s|MiB|MB|GiB|GB)\b|x\b|-\d+(?:\.\d+)?x\b)")
RESULT = re.compile(r"benchmarks/results/[\w./-]+\.json")
# Numbers with units that describe configuration, not measurements.
NOT_MEASURED = ("per 3 GB of memory", "600 s per test")


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs (blank-line separated), fenced code blocks left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [p for p in re.split(r"\n\s*\n", prose) if p.strip()]


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted(ROOT.glob("docs/**/*.md"))]


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_published_figure_names_a_committed_result_file(doc):
    orphans = []
    for paragraph in _paragraphs(doc.read_text()):
        text = paragraph
        for phrase in NOT_MEASURED:
            text = text.replace(phrase, "")
        figures = FIGURE.findall(text)
        if not figures:
            continue
        files = RESULT.findall(paragraph)
        if not files:
            orphans.append(f"{figures[:3]} in: {paragraph.strip()[:160]!r}")
        for name in files:
            assert (ROOT / name).is_file(), f"{doc.name} cites {name}, which is not committed"
    assert not orphans, "figures without a result file:\n" + "\n".join(orphans)


def test_the_figure_check_sees_timings_ratios_and_memory():
    text = "takes 20.7 vs 32.8 ms on one thread, 0.81-0.92x the time, peak 236 MiB, 1.30x (min), 6.2 GB"
    assert FIGURE.findall(text) == ["32.8 ms", "0.81-0.92x", "236 MiB", "1.30x", "6.2 GB"]
    assert not FIGURE.findall("torch>=2.6, a [4096, 1024] tensor, 1e-15, sm_80, x2")


def test_every_planted_mutation_still_applies():
    """scripts/mutation_check.py plants known bugs and runs the tests that must catch them: each mutation's text
    occurs exactly once in its file and its tests exist, so a rename or a refactor cannot quietly retire one."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert len(module.MUTATIONS) >= 10
    for m in module.MUTATIONS:
        files = [t for t in m.tests if t.startswith("tests/")]
        assert files and all((ROOT / t).is_file() for t in files), (m.name, m.tests)
        if m.hide:  # moves files aside (an environment without them): nothing to find in a source
            continue
        assert (ROOT / m.path).read_text().count(m.old) == 1, (m.name, m.path)
