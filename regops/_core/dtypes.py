"""The one accumulation rule: float64 inputs are computed in float64, everything else in float32."""

from __future__ import annotations

import torch


def acc_dtype(*inputs: torch.Tensor | torch.dtype) -> torch.dtype:
    """``torch.float64`` if any input (a tensor or a dtype) is float64, else ``torch.float32``: the dtype every
    regops kernel, reference and loss computes and accumulates in (bfloat16 and float16 inputs included)."""
    for t in inputs:
        if (t.dtype if isinstance(t, torch.Tensor) else t) == torch.float64:
            return torch.float64
    return torch.float32
