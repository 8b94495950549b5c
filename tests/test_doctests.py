"""Every example in a public docstring runs as written, on CPU, and shows what it says (``doctest``).

The examples see ``torch`` and ``regops`` (imported, as a user's session would have them) and nothing else: each
builds its own small inputs. Every public function and class has one."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest
import torch

import regops
from tests.test_docstrings import NAMESPACES


def _public() -> list[tuple[str, object]]:
    found: dict[int, tuple[str, object]] = {}
    for ns in NAMESPACES:
        module = importlib.import_module(ns)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found.setdefault(id(obj), (f"{ns}.{name}", obj))
    return sorted(found.values())


PUBLIC = _public()
FINDER = doctest.DocTestFinder(recurse=True, exclude_empty=True)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests(name: str, obj: object) -> list[doctest.DocTest]:
    tests = FINDER.find(obj, name, module=False, globs={})
    return [t for t in tests if t.examples and not any(p.startswith("_") for p in t.name[len(name) :].split("."))]


def _run(name: str, obj: object) -> tuple[int, str]:
    failed, report = 0, []
    for test in _tests(name, obj):
        torch.manual_seed(0)
        test.globs = {"torch": torch, "regops": regops}
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        failed += runner.run(test, out=report.append).failed
    return failed, "".join(report)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_every_public_example_runs(name, obj):
    assert _tests(name, obj), f"{name}: no example in its docstring"
    failed, report = _run(name, obj)
    assert not failed, f"{name}: its example does not run as written:\n{report[-3000:]}"


def test_a_broken_example_is_caught():
    def broken():
        """Example::

        >>> 1 + 1
        3
        """

    assert _run("broken", broken)[0] == 1
