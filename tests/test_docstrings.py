"""What a user reads with help(): every public function of regops, regops.nn and every family's namespace says
what it takes (an Args section, or that it takes none) and what it returns, and no public
docstring sends the reader into a private module."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

NAMESPACES = (
    "regops", "regops.nn", "regops.hessian", "regops.optim", "regops.privacy", "regops.merge", "regops.masks",
    "regops.penalties", "regops.valuation", "regops.dropout", "regops.mix", "regops.losses", "regops.grad_norms",
    "regops.per_example",
)  # fmt: skip
PRIVATE = re.compile(r"regops\._core\b|regops\.\w+\._\w+|regops\.\w+\.api\b|:mod:`\._")
# Sphinx roles show raw in help(): docstrings use plain backticks (the site links them, default_role py:obj).
ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|math):`")


def _public() -> list[tuple[str, object]]:

    found = {}
    for name in NAMESPACES:
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for attr in names:
            obj = getattr(module, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith("regops"):
                found.setdefault(f"{name}.{attr}", obj)
    return sorted(found.items())


def _doc(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    init = obj.__dict__.get("__init__") if inspect.isclass(obj) else None
    if init is not None and init.__doc__:
        doc += "\n" + inspect.getdoc(init)
    return doc


def _has_args(doc: str) -> bool:
    return bool(re.search(r"^Args:", doc, re.M)) or "Takes no arguments" in doc


FUNCTIONS = [(n, o) for n, o in _public() if inspect.isfunction(o)]
CLASSES = [(n, o) for n, o in _public() if inspect.isclass(o)]


def test_the_namespaces_are_seen():
    assert len(FUNCTIONS) >= 40 and len(CLASSES) >= 30


@pytest.mark.parametrize("name, fn", FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_every_public_function_documents_its_arguments_and_result(name, fn):
    doc = _doc(fn)
    assert _has_args(doc), f"{name}: no Args section (or 'Takes no arguments')"
    assert re.search(r"^(Returns|Yields):", doc, re.M), f"{name}: no Returns section"


@pytest.mark.parametrize("name, obj", _public(), ids=[n for n, _ in _public()])
def test_no_public_docstring_points_into_a_private_module(name, obj):
    assert not PRIVATE.findall(_doc(obj)), f"{name}: {PRIVATE.findall(_doc(obj))}"


@pytest.mark.parametrize("name, cls", CLASSES, ids=[n for n, _ in CLASSES])
def test_public_classes_document_their_arguments(name, cls):
    assert _has_args(_doc(cls)), f"{name}: no Args section (or 'Takes no arguments')"


def _own_text(obj: object) -> str:
    """What help() shows that regops wrote: the docstring, the constructor's, and those of the methods the class
    itself defines (inherited torch methods keep torch's text)."""
    text = _doc(obj)
    if inspect.isclass(obj):
        for value in vars(obj).values():
            text += "\n" + (getattr(getattr(value, "__func__", value), "__doc__", None) or "")
    return text


@pytest.mark.parametrize("name, obj", _public(), ids=[n for n, _ in _public()])
def test_help_shows_no_sphinx_role_and_the_public_path(name, obj):
    assert not ROLE.findall(_own_text(obj)), f"{name}: Sphinx roles in help(): {ROLE.findall(_own_text(obj))}"
    assert not PRIVATE.findall(_own_text(obj)), f"{name}: {PRIVATE.findall(_own_text(obj))}"
    assert not PRIVATE.match(obj.__module__), f"help({name}) names its module {obj.__module__}"


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_namespace_docstrings_read_plainly(namespace):
    doc = importlib.import_module(namespace).__doc__ or ""
    assert not ROLE.findall(doc) and not PRIVATE.findall(doc), f"help({namespace}) shows a role or a private path"
