"""The optim family's public classes: SAM and its variants around any base optimizer, and regops' AdamW and SGD
(drop-ins for torch's, with regularizers composed into their one pass)."""

from __future__ import annotations

from regops.optim._fused import SGD, AdamW
from regops.optim._sam import GSAM, SAM, LookSAM

__all__ = ["GSAM", "SAM", "SGD", "AdamW", "LookSAM"]
