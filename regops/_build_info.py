"""What regops._C was built with, as recorded by setup.py in ``_build_info.json`` beside the built library."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

_PATH = Path(__file__).with_name("_build_info.json")


@cache
def read() -> dict[str, Any]:
    """The recorded build facts (empty when the package was installed without the extension)."""
    try:
        return json.loads(_PATH.read_text())
    except (OSError, ValueError):
        return {}


def _minor(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)", version)
    return match.group(0) if match else version


def torch_mismatch() -> str | None:
    """A description of the torch the extension was built for, if the running torch cannot load it.

    torch keeps its C++ ABI within a minor release (2.14.0 and 2.14.1 load the same extensions; 2.15 does not),
    so the check is on the minor release -- as the wheel's label (``+cu130.torch2.14``) and its declared
    requirement (``torch>=2.14,<2.15``) say -- plus, for CUDA kernels, the CUDA release torch was built with.
    """
    import torch

    info = read()
    built = info.get("torch_version")
    if not built:
        return None
    built_cuda, running_cuda = info.get("torch_cuda"), torch.version.cuda
    cuda_kernels = info.get("cuda_kernels", bool(built_cuda))
    cuda_differs = cuda_kernels and built_cuda != running_cuda
    if _minor(built) != _minor(torch.__version__) or cuda_differs:
        return f"torch {built} (CUDA {built_cuda}), but torch {torch.__version__} (CUDA {running_cuda}) is running"
    return None
