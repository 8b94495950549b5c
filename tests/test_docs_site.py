"""The documentation site builds with warnings as errors (the command of scripts/docs.sh), and its API reference
has an entry for every public name: everything in ``regops.__all__``, ``regops.nn``, ``regops.hessian`` and every
family's namespace, read back from the built objects inventory (what Sphinx actually documented)."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sphinx.util import inventory as sphinx_inventory  # the docs extra is part of the test environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
import regops_docs  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "html"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", "docs", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the site does not build cleanly:\n{done.stderr[-4000:]}"
    return out


def test_docs_sh_runs_the_same_build():
    script = (ROOT / "scripts" / "docs.sh").read_text()
    assert "python -m sphinx -b html -W --keep-going -q docs" in script and "DOCS_OUT" in script


def _inventory(site: Path) -> dict[str, str]:
    with open(site / "objects.inv", "rb") as f:
        inv = sphinx_inventory.InventoryFile.load(f, "", lambda base, uri: uri)
    return {name: kind for kind, entries in inv.items() if kind.startswith("py:") for name in entries}


@pytest.mark.timeout(420)
def test_every_public_name_has_a_reference_entry(site):
    inventory = _inventory(site)
    documented = {}
    for name in inventory:
        module, _, attr = name.rpartition(".")
        try:
            documented.setdefault(id(getattr(importlib.import_module(module), attr)), name)
        except (ImportError, AttributeError, ValueError):
            continue
    missing = []
    for ns, names in regops_docs.public_namespaces().items():
        module = importlib.import_module(ns)
        for name in names:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                if obj.__name__ not in inventory:
                    missing.append(f"{ns}.{name}")
            elif f"{ns}.{name}" not in inventory and id(obj) not in documented:
                missing.append(f"{ns}.{name}")
    assert not missing, f"no API entry for {missing}"
    assert {"regops", "regops.nn", "regops.hessian", "regops.optim", "regops.merge"} <= set(
        regops_docs.public_namespaces()
    )
    assert len(documented) >= 100


def test_the_benchmark_page_is_generated_from_the_results(site):
    results = sorted((ROOT / "benchmarks" / "results").rglob("*.json"))
    assert results
    page = (site / "benchmarks.html").read_text()
    for path in results:
        assert path.relative_to(ROOT).as_posix() in page, f"{path} has no table on the benchmarks page"
    assert "<table" in page


def test_no_private_module_path_on_the_site(site):
    import re

    private = re.compile(r"regops\._core\b|regops\.\w+\._\w+|regops\.\w+\.api\b")
    found = {}
    for page in sorted(site.glob("api/*.html")) + [site / "index.html", site / "getting-started.html"]:
        text = re.sub(r"<[^>]+>", "", page.read_text())
        if hits := sorted(set(private.findall(text))):
            found[page.name] = hits
    assert not found, f"private module paths on the site: {found}"
