"""Finding and loading the extension ``regops._C`` (prebuilt, or a cached just-in-time build).

Loading it registers its C++ CPU and CUDA kernels on the ``regops::`` operators declared in Python (the
``TORCH_LIBRARY_IMPL(regops, CPU | CUDA)`` blocks of csrc/): from then on the dispatcher runs them directly.
Nothing is loaded when regops is imported; :mod:`regops._core.dispatch` asks for it on the first op.

``REGOPS_EXT``: ``auto`` (default: the prebuilt ``regops._C``, else a cached just-in-time build), ``prebuilt``,
``jit`` (the cached build, built on the first GPU op when missing) or ``off``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import types
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch

from regops._core import jit

_BUILD_INFO = Path(__file__).resolve().parents[1] / "_build_info.json"
_STATE: dict[str, Any] = {}


@cache
def prebuilt_info() -> dict[str, Any]:
    """What the prebuilt ``regops._C`` was built with (setup.py writes ``_build_info.json`` beside it); empty when
    the package was installed without it."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def build_info() -> dict[str, Any]:
    """The build facts of the loaded extension (prebuilt or just-in-time), or of the prebuilt one."""
    return jit.build_info() if "just-in-time" in status() else prebuilt_info()


def _minor(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)", version)
    return match.group(0) if match else version


def torch_mismatch(info: dict[str, Any] | None = None) -> str | None:
    """A description of the torch the extension was built for, if the running torch cannot load it.

    torch keeps its C++ ABI within a minor release (2.14.0 and 2.14.1 load the same extensions; 2.15 does not),
    so the check is on the minor release -- as the wheel's label (``+cu130.torch2.14``) and its declared
    requirement (``torch>=2.14,<2.15``) say -- plus, for CUDA kernels, the CUDA release torch was built with.
    """
    info = prebuilt_info() if info is None else info
    built = info.get("torch_version")
    if not built:
        return None
    built_cuda, running_cuda = info.get("torch_cuda"), torch.version.cuda
    cuda_kernels = info.get("cuda_kernels", bool(built_cuda))
    cuda_differs = cuda_kernels and built_cuda != running_cuda
    if _minor(built) != _minor(torch.__version__) or cuda_differs:
        return f"torch {built} (CUDA {built_cuda}), but torch {torch.__version__} (CUDA {running_cuda}) is running"
    return None


def load() -> Any | None:
    """The loaded ``regops._C`` (a module, or a namespace naming a just-in-time build), or ``None`` (not built, or
    built for another torch: one warning). Loads it on the first call."""
    if "module" not in _STATE:
        _STATE["module"], _STATE["reason"] = _load()
    return _STATE["module"]


def status() -> str:
    """``"loaded"``, ``"loaded (just-in-time build ...)"`` or why the extension is not loaded."""
    load()
    return _STATE["reason"]


def loaded() -> bool:
    """Whether the extension is loaded already (never loads it)."""
    return _STATE.get("module") is not None


def reset() -> None:
    """Forget the state so that the next op looks again (after a just-in-time build)."""
    _STATE.clear()


def _load() -> tuple[Any | None, str]:
    mode = os.environ.get("REGOPS_EXT", "auto").strip().lower() or "auto"
    if mode not in ("auto", "prebuilt", "jit", "off"):
        raise ValueError(f"regops: REGOPS_EXT={mode!r} is not one of auto, prebuilt, jit, off")
    if mode == "off":
        return None, "disabled (REGOPS_EXT=off)"
    reason = "not built (installed without a C++ compiler, or with REGOPS_BUILD_EXT=0)"
    problem = None  # why a prebuilt regops._C was not loaded: warned about only if nothing else loads
    if mode in ("auto", "prebuilt") and importlib.util.find_spec("regops._C") is not None:
        module, problem = _load_prebuilt()
        if module is not None:
            return module, "loaded"
        reason = problem
        if mode == "prebuilt":
            _warn_fallback(problem)
            return None, reason
    if mode in ("auto", "jit"):
        path = jit.load_cached()
        if path is None and mode == "jit" and torch.cuda.is_available():
            path = jit.build()
        if path is not None:
            skipped = f"; the prebuilt one was not used: {problem}" if problem else ""
            return types.SimpleNamespace(__file__=str(path)), f"loaded (just-in-time build {path}{skipped})"
    if problem:
        _warn_fallback(problem)
    return None, reason


def _warn_fallback(problem: str) -> None:
    warnings.warn(
        f"regops: {problem}; CPU ops fall back to the reference, GPU ops to Triton", RuntimeWarning, stacklevel=6
    )


def _load_prebuilt() -> tuple[Any | None, str]:
    mismatch = torch_mismatch()
    if mismatch:
        return None, f"regops._C was built for {mismatch}; not loading it"
    try:
        module = importlib.import_module("regops._C")
    except (ImportError, OSError) as exc:  # undefined symbols from an ABI change, missing libcudart, ...
        return None, f"regops._C failed to load ({exc})"
    return module, "loaded"


def build_extension(verbose: bool = False) -> Path:
    """Build the extension (C++ CPU kernels; CUDA kernels too where possible) for this torch into the cache and use
    it from now on.

    For an installation without ``regops._C`` (a pure-Python wheel, or a torch upgrade): needs a C++ compiler and
    ``ninja``; for the CUDA kernels also ``nvcc`` (CUDA toolkit; ``CUDA_HOME`` if it is not found). CUDA targets:
    ``TORCH_CUDA_ARCH_LIST``, else the visible GPU's architecture.

    Args:
        verbose: print the compiler's commands and output.

    Returns:
        The path of the built library (under ``$REGOPS_CACHE`` or ``~/.cache/regops``).

    Example::

        >>> path = regops.build_extension()  # doctest: +SKIP
    """
    if loaded():
        raise RuntimeError(f"regops: an extension is already loaded ({status()})")
    path = jit.build(verbose)
    reset()
    return path
