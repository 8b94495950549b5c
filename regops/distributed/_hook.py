"""The one hook the single-process functions call: ``is_dtensor`` (cheap) and ``forward`` (lazy).

Kept free of imports of regops' op modules (and of ``torch.distributed.tensor``) so that any module can import
it: a tensor can only be a DTensor if ``torch.distributed.tensor`` has been imported already.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def is_dtensor(*tensors: Any) -> bool:
    """Whether any argument is a ``torch.distributed.tensor.DTensor`` (never imports torch.distributed)."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return False
    return any(isinstance(t, mod.DTensor) for t in tensors)


def forward(module: str, function: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``regops.distributed.<module>.<function>(*args, **kwargs)`` (imported on first use)."""
    return getattr(importlib.import_module(f"regops.distributed.{module}"), function)(*args, **kwargs)
