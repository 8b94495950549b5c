"""Shared fixtures: devices, kernel backends to check against the reference, NaN-poisoned allocations.

Without a GPU the Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must be set before
any kernel module is imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import regops  # noqa: E402
from regops import _backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _kernel_targets() -> list[tuple[str, str]]:
    """(backend, device) pairs whose kernels are checked against the reference on this machine."""
    targets = []
    if _backend.triton_importable():
        targets.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    if HAS_CUDA and _backend.extension() is not None:
        targets.append(("cuda", "cuda"))
    return targets


KERNEL_TARGETS = _kernel_targets()


@pytest.fixture(params=KERNEL_TARGETS, ids=[f"{b}-{d}" for b, d in KERNEL_TARGETS])
def kernel_target(request):
    """A (backend, device) pair with a real kernel; the test runs with that backend forced."""
    backend, device = request.param
    with regops.use_backend(backend):
        yield backend, torch.device(device)


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make Python-level torch.empty / empty_like return NaN-filled tensors: a kernel that leaves an output
    element unwritten then fails its comparison instead of passing on leftover memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield
