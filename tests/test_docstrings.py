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
PRIVATE = re.compile(r"regops\._core\b|regops\.\w+\._\w+|:mod:`\._")
# Public classes whose docstrings do not have an Args section yet (result types and modules that mirror torch's
# constructors); the list may only shrink: a class that gains one must leave it.
CLASSES_WITHOUT_ARGS = {
    "BackendUnavailableError", "PatchHandle", "MixParams", "MixedBatch", "Mixup", "CutMix", "MixUp", "DPClipping",
    "PerSampleGradNorms", "PrivacyAccountant", "LossStats", "MixCrossEntropy", "SoftTargetCrossEntropy",
    "GradientCoherence", "TracInTopK", "ReLUL1Stats", "DropPath", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "DropoutAddLayerNorm", "MultiSampleDropout", "CrossEntropyLoss", "LinearCrossEntropyLoss", "LoRALinear",
    "PeftLoRALinear", "ReLUL1", "DiagonalEstimate", "HessianLinearOperator", "TraceEstimate", "GSAM", "SGD",
    "AdamW", "LookSAM", "BatchMemoryManager", "DPOptimizer", "PrivateModule",
}  # fmt: skip


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
    short = name.rsplit(".", 1)[1]
    if short in CLASSES_WITHOUT_ARGS:
        assert not _has_args(_doc(cls)), f"{name} documents its arguments now: drop it from CLASSES_WITHOUT_ARGS"
    else:
        assert _has_args(_doc(cls)), f"{name}: no Args section"
