"""Where the C++ CPU kernels should exist, they do, they are the checkout's, and the kernel tests cover them.

A machine with a C++ compiler builds regops._C (``REGOPS_BUILD_EXT`` other than ``0``): an environment installed
without it, or an in-place build older than the sources, fails here instead of letting every C++ kernel test
quietly run the reference. The kernel fixture's targets are checked too: every op with a kernel gets a target.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from regops._core import dispatch, extension, toolkit
from tests.backends import (
    DEVICES,
    HAS_CUDA,
    cpp_ops_in_sources,
    cuda_ops_in_sources,
    extension_expected,
    kernel_targets,
)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def test_sources_declare_cpp_kernels():
    ops = cpp_ops_in_sources()
    assert {"dropout", "bias_dropout_add", "dropout_add_layer_norm", "mix_apply"} <= ops, ops
    assert ops <= set(dispatch.registered_ops()), ops - set(dispatch.registered_ops())
    cuda_ops = cuda_ops_in_sources()
    assert {"dropout", "bias_dropout_add", "mix_apply"} <= cuda_ops, cuda_ops
    assert cuda_ops <= set(dispatch.registered_ops()), cuda_ops - set(dispatch.registered_ops())


def test_extension_is_loaded_with_every_cpp_kernel_when_it_should_be():
    why = extension_expected()
    if why is None:
        pytest.skip("no C++ compiler, or REGOPS_BUILD_EXT=0 / REGOPS_EXT=off: the reference runs on CPU")
    assert extension.load() is not None, f"{why}, but regops._C is not loaded: {extension.status()}"
    missing = sorted(op for op in cpp_ops_in_sources() if not dispatch.native_registered(op, "cpp"))
    assert not missing, f"{why}, but the loaded regops._C has no C++ CPU kernel for {missing} (rebuild it)"
    for op in cpp_ops_in_sources():
        assert dispatch.choose(op, torch.device("cpu")) == "cpp", op


def test_extension_built_with_cuda_kernels_has_every_one():
    if extension.load() is None:
        pytest.skip(f"regops._C is not loaded: {extension.status()}")
    if not extension.build_info().get("cuda_kernels"):
        pytest.skip("regops._C was built with its C++ CPU kernels only")
    missing = sorted(op for op in cuda_ops_in_sources() if not dispatch.native_registered(op, "cuda"))
    assert not missing, f"regops._C was built with CUDA kernels but has none for {missing} (rebuild it)"


def test_loaded_extension_was_built_from_this_checkouts_sources():
    if extension.load() is None:
        if extension_expected():
            pytest.fail(f"regops._C is not loaded: {extension.status()}")
        pytest.skip("regops._C not built here (no compiler, or REGOPS_BUILD_EXT=0)")
    info = extension.build_info()
    assert info.get("cpu_kernels"), info
    recorded = info.get("csrc_hash")
    current = toolkit.csrc_hash(str(CSRC))
    assert recorded == current, (
        f"regops._C was built from other sources (csrc hash {recorded}) than the checkout's ({current}): rebuild it "
        "(REGOPS_BUILD_EXT=cpu python -m pip install --no-deps --no-build-isolation -e .)"
    )


def test_csrc_hash_follows_every_source_and_header(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    before = toolkit.csrc_hash(str(src))
    assert before == toolkit.csrc_hash(str(CSRC))
    for name in ("module.cpp", "dropout/cpu.cpp", "dropout/kernels.cu", "common/philox.cuh", "common/cpu_common.h"):
        path = src / name
        text = path.read_text()
        path.write_text(text + "\n")
        assert toolkit.csrc_hash(str(src)) != before, name
        path.write_text(text)
    assert toolkit.csrc_hash(str(src)) == before


def test_every_kernel_gets_a_kernel_target():
    """The kernel fixture checks each op on every backend that has it here: Triton (under the interpreter on CPU,
    on the GPU otherwise), the C++ CPU kernels where the extension has them, the CUDA kernels with a GPU."""
    cpu = torch.device("cpu")
    for op in dispatch.registered_ops():
        targets = set(kernel_targets((op,)))
        if dispatch.declared(op).triton is not None:
            assert ("triton", "cuda" if HAS_CUDA else "cpu") in targets, (op, targets)
        if extension_expected() and op in cpp_ops_in_sources():
            assert ("cpp", "cpu") in targets, (op, targets)
        if HAS_CUDA and dispatch.native_registered(op, "cuda"):
            assert ("cuda", "cuda") in targets, (op, targets)
        for backend, device in targets:
            assert dispatch.availability(op, torch.device(device))[backend] is None
        assert ("cuda", "cpu") not in targets and ("cpp", "cuda") not in targets
    assert set(DEVICES) == ({"cpu", "cuda"} if HAS_CUDA else {"cpu"})
    assert dispatch.availability("symmetric_kl", cpu)["cpp"] is not None  # no C++ kernel: never a cpp target
