"""Backend selection: automatic choice, overrides, and one clear error when nothing can run."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch, extension
from tests.backends import extension_expected

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _without_extension(monkeypatch) -> None:
    """Dispatch as on an installation without regops._C (whether or not this one has it)."""
    monkeypatch.setattr(extension, "load", lambda: None)
    monkeypatch.setattr(extension, "status", lambda: "not built (test)")


def test_cpu_defaults_to_cpp_kernel_else_reference(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    # Where the extension must exist, the C++ kernel is the choice; elsewhere the reference.
    assert dispatch.choose("dropout", CPU) == ("cpp" if extension_expected() else "torch")
    assert dispatch.choose("symmetric_kl", CPU) == "torch"  # no C++ CPU kernel for it
    _without_extension(monkeypatch)
    assert dispatch.choose("dropout", CPU) == "torch"
    with regops.use_backend("cpp"):
        with pytest.raises(regops.BackendUnavailableError, match="regops._C is unavailable: not built"):
            dispatch.choose("dropout", CPU)


def test_cpp_backend_runs_on_cpu_tensors_only():
    with regops.use_backend("cpp"):
        with pytest.raises(regops.BackendUnavailableError, match="C\\+\\+ CPU kernels run on cpu tensors, not cuda"):
            dispatch.choose("dropout", CUDA)


def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("REGOPS_BACKEND", "torch")
    assert dispatch.choose("dropout", CPU) == "torch"
    with regops.use_backend("triton"):
        assert dispatch.requested_backend() == "triton"
        assert dispatch.choose("dropout", CPU) == "triton"
        with regops.use_backend(None):
            assert dispatch.requested_backend() == "torch"  # env again
            assert dispatch.choose("dropout", CPU) == "torch"
        assert dispatch.choose("dropout", CPU) == "triton"


def test_env_selects_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setenv("REGOPS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_interpreted()
    assert dispatch.choose("dropout", CPU) == "triton"
    x = torch.randn(100)
    seed, p = torch.tensor([1, 2]), torch.tensor(0.5, dtype=torch.float64)  # the op takes p as a 0-dim tensor
    out = torch.ops.regops.dropout(x, p, seed)
    monkeypatch.setenv("REGOPS_BACKEND", "torch")
    assert torch.equal(out, torch.ops.regops.dropout(x, p, seed))


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        with regops.use_backend("cudnn"):
            pass
    monkeypatch.setenv("REGOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="REGOPS_BACKEND='fast'"):
        dispatch.choose("dropout", CPU)


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with regops.use_backend("triton"):
        with pytest.raises(regops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            regops.dropout(torch.randn(4), 0.5)
    with regops.use_backend("cuda"):
        with pytest.raises(regops.BackendUnavailableError, match="run on cuda tensors, not cpu"):
            regops.dropout(torch.randn(4), 0.5)


def test_cuda_tensor_without_any_kernel_gets_one_error_naming_both(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    _without_extension(monkeypatch)
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    with pytest.raises(regops.BackendUnavailableError) as err:
        dispatch.choose("dropout", CUDA)
    msg = str(err.value)
    assert "regops._C is unavailable: not built (test)" in msg
    assert "Triton is not installed" in msg
    assert "REGOPS_BACKEND=torch" in msg


def test_cuda_prefers_extension_then_triton(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    _without_extension(monkeypatch)
    assert dispatch.choose("dropout", CUDA) == "triton"


def test_availability_lists_every_backend():
    avail = dispatch.availability("dropout", CPU)
    assert set(avail) == set(dispatch.BACKENDS)
    assert avail["torch"] is None
    assert "cuda tensors" in avail["cuda"]


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op"):
        dispatch.choose("nope", CPU)
