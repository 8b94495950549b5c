"""What regops._C was built with, as recorded by setup.py in ``_build_info.json`` beside this file."""

from __future__ import annotations

import json
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


def torch_mismatch() -> str | None:
    """A description of the torch the extension was built for, if that is not the torch running now."""
    import torch

    info = read()
    built = info.get("torch_version")
    if not built:
        return None
    running = torch.__version__.split("+")[0]
    built_cuda, running_cuda = info.get("torch_cuda"), torch.version.cuda
    if built.split("+")[0] != running or (built_cuda and running_cuda and built_cuda != running_cuda):
        return f"torch {built} (CUDA {built_cuda}), but torch {torch.__version__} (CUDA {running_cuda}) is running"
    return None
