"""The one hook the single-process functions call: ``is_dtensor`` (cheap) and ``forward`` (lazy).

Kept free of imports of regops' op modules (and of ``torch.distributed.tensor``) so that any module can import
it: a tensor can only be a DTensor if ``torch.distributed.tensor`` has been imported already.
"""

from __future__ import annotations

import importlib
from typing import Any

from regops._core.validate import is_dtensor  # noqa: F401


def forward(module: str, function: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``regops.distributed.<module>.<function>(*args, **kwargs)`` (imported on first use)."""
    return getattr(importlib.import_module(f"regops.distributed.{module}"), function)(*args, **kwargs)
