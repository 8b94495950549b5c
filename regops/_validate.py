"""Input checks shared by the public functions: one clear Python exception per mistake."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"regops: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x: object, name: str = "x", dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    x = tensor(x, name)
    dtypes = tuple(dtypes)
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"regops: {name} must have a floating dtype ({names}), got {x.dtype}")
    return x


def flag(value: object, name: str = "training") -> bool:
    """A switch such as ``training``: a Python bool, as torch requires (``F.dropout(x, 0.5, "yes")`` raises in
    torch; a truthy string or a one-element tensor is not silently read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"regops: {name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def probability(p: object, name: str = "p") -> float:
    if isinstance(p, torch.Tensor):
        if p.numel() != 1:
            raise TypeError(f"regops: {name} must be a number, got a tensor of shape {tuple(p.shape)}")
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"regops: {name} must be a number in [0, 1], got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ValueError(f"regops: {name} must be in [0, 1], got {p}")
    return p


def same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"regops: {name_a} is on {a.device} but {name_b} is on {b.device}")


def same_batch(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() == 0 or b.dim() == 0 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"regops: {name_a} and {name_b} must share the batch dimension, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
