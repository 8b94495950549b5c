"""Reference dropout on the shared Philox stream (CPU path, test oracle, benchmark baseline)."""

from __future__ import annotations

import struct

import torch

from regops.reference.philox import keep_mask


def dropout_scale(p: float) -> float:
    """The inverted-dropout scale 1/(1-p), rounded to float32 so every backend multiplies by the same number."""
    if p >= 1.0:
        return 0.0
    return struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """``where(keep, x * scale, 0)`` computed in float32 (float64 for float64) and rounded to x's dtype."""
    keep = keep_mask(seed, offset, x.shape, p, device=x.device)
    y = torch.where(keep, x.to(compute_dtype(x.dtype)) * dropout_scale(p), 0.0)
    return y.to(x.dtype)
