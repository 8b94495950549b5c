"""Shared fixtures: devices, kernel backends to check against the reference, NaN-poisoned allocations.

Without a GPU the Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must be set before
any kernel module is imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (a failure reproduces; a green run stays green).
settings.register_profile("regops", derandomize=True, deadline=None)
settings.load_profile("regops")

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh compile cache per run: inductor's on-disk cache does not key on a custom op's schema, so code compiled
# for another checkout (or an earlier version of an op) could be replayed against this one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="regops-inductor-"))

import regops  # noqa: E402
from tests.backends import KERNEL_BACKENDS, kernel_targets, known_ops  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """``kernel_target`` is parametrized over :func:`kernel_targets` of the ops the test names with
    ``@pytest.mark.ops(...)``; a kernel test without that marker is a collection error, so a test can never run
    a backend its op does not have (and bury a real failure under ``BackendUnavailableError``).
    ``backends=(...)`` narrows the choice for a test that calls one backend's launchers directly."""
    if "kernel_target" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("ops")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: kernel_target needs @pytest.mark.ops(<op names>)")
    unknown = sorted(set(marker.args) - known_ops())
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown ops {unknown}")
    backends = tuple(marker.kwargs.get("backends", KERNEL_BACKENDS))
    if set(backends) - set(KERNEL_BACKENDS):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: backends must be among {KERNEL_BACKENDS}")
    targets = kernel_targets(tuple(marker.args), backends)
    metafunc.parametrize("kernel_target", targets, ids=[f"{b}-{d}" for b, d in targets], indirect=True)


@pytest.fixture
def kernel_target(request):
    """A (backend, device) pair with a real kernel for the test's ops; the test runs with that backend forced."""
    backend, device = request.param
    with regops.use_backend(backend):
        yield backend, torch.device(device)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch, NumPy and Python random state: a draw a test does not seed itself
    is still the same on every run, so a statistical check is either always green or always red."""
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


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
