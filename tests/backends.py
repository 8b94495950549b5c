"""Which kernels this machine should check: the (backend, device) targets of an op, and whether the C++ CPU
kernels of regops._C must be present (a C++ compiler exists and the build was not switched off)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from regops._core import dispatch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda") if HAS_CUDA else ("cpu",)
KERNEL_BACKENDS = ("triton", "cuda", "cpp")
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def kernel_targets(ops: tuple[str, ...], backends: tuple[str, ...] = KERNEL_BACKENDS) -> list[tuple[str, str]]:
    """(backend, device) pairs on this machine whose backend runs every op in ``ops`` on that device: the
    Triton kernels (on CPU tensors under the interpreter), the CUDA extension and the C++ CPU kernels, each only
    where it has the ops. The reference (``torch``) is what they are compared with, never a target."""
    return [
        (backend, device)
        for device in DEVICES
        for backend in backends
        if all(dispatch.availability(op, torch.device(device))[backend] is None for op in ops)
    ]


def known_ops() -> set[str]:
    """Every op a kernel test can name: those declared with regops._core.ops.declare."""
    return set(dispatch.registered_ops())


def cxx_compiler() -> str | None:
    """The compiler setup.py would use (the same search: ``$CXX``, c++, g++, clang++)."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def extension_expected() -> str | None:
    """Why regops._C must be loaded with its C++ CPU kernels here, or None when it need not be (no compiler,
    ``REGOPS_BUILD_EXT=0`` or ``REGOPS_EXT=off``)."""
    build = os.environ.get("REGOPS_BUILD_EXT", "auto").strip().lower()
    if build in ("0", "false", "no", "off"):
        return None
    if os.environ.get("REGOPS_EXT", "auto").strip().lower() == "off":
        return None
    compiler = cxx_compiler()
    return f"a C++ compiler ({compiler}) is on PATH and REGOPS_BUILD_EXT={build}" if compiler else None


def cpp_ops_in_sources() -> set[str]:
    """The ops csrc/<family>/cpu*.cpp register C++ CPU kernels for (``m.impl("<op>", ...)`` in their
    ``TORCH_LIBRARY_IMPL(regops, CPU, m)`` blocks)."""
    return _ops_in_sources("cpu*.cpp", "CPU")


def cuda_ops_in_sources() -> set[str]:
    """The ops csrc/<family>/cuda*.cpp register CUDA kernels for (their ``TORCH_LIBRARY_IMPL(regops, CUDA, m)``
    blocks)."""
    return _ops_in_sources("cuda*.cpp", "CUDA")


def _ops_in_sources(pattern: str, key: str) -> set[str]:
    ops = set()
    for path in CSRC.glob(f"*/{pattern}"):
        for block in re.split(r"(?=TORCH_LIBRARY)", path.read_text()):
            if block.startswith(f"TORCH_LIBRARY_IMPL(regops, {key},"):
                ops.update(re.findall(r'm\.impl\("(\w+)"', block))
    return ops
