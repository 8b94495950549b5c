"""Input checks shared by the public functions: one clear Python exception per mistake."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"regops: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x: object, name: str = "x", dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    dtypes = dtypes if isinstance(dtypes, tuple) else tuple(dtypes)
    if isinstance(x, torch.Tensor) and x.dtype in dtypes:  # every call passes this one test
        return x
    x = tensor(x, name)
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


def is_dtensor(*tensors: object) -> bool:
    """Whether any argument is a ``torch.distributed.tensor.DTensor`` (never imports torch.distributed: a tensor
    can only be a DTensor once ``torch.distributed.tensor`` has been imported)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(t, mod.DTensor) for t in tensors)


# ----------------------------------------------------------------------------------------------- p
def check_probability(p: object, name: str = "p") -> float:
    """``p`` as a Python float in ``[0, 1]``, or a clear exception.

    Accepts what torch's dropout accepts as a number: Python and NumPy scalars (``np.float32(0.1)``), bools
    (``True`` is 1, as in torch) and one-element tensors that do not require grad. Rejects a tensor that
    requires grad (a mask is a discrete draw: there is no gradient in ``p``; torch raises there too).
    """
    if isinstance(p, torch.Tensor):
        if p.requires_grad:
            raise TypeError(
                f"regops: {name} is a tensor that requires grad; there is no gradient with respect to {name} "
                f"(the mask is a discrete draw). Pass {name}.detach() or a float."
            )
        if p.numel() != 1 or p.dtype == torch.bool:
            raise TypeError(f"regops: {name} must be a number, got a {p.dtype} tensor of shape {tuple(p.shape)}")
        p = p.item()
    if type(p).__module__ == "numpy":  # a NumPy scalar (np.bool_ is not a numbers.Real): its Python value
        p = p.item()
    if not isinstance(p, numbers.Real):
        raise TypeError(f"regops: {name} must be a number in [0, 1], got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"regops: {name} must be in [0, 1], got {p}")
    return p


_P_TENSORS: dict[float, torch.Tensor] = {}


def _p_tensor(value: float) -> torch.Tensor:
    """A 0-dim float64 CPU tensor holding ``value``, shared by every call with that value (ops never write it)."""
    t = _P_TENSORS.get(value)
    if t is None:
        if len(_P_TENSORS) >= 1024:
            _P_TENSORS.clear()
        with torch.inference_mode(False):  # a normal tensor, usable (and savable for backward) in any mode
            t = _P_TENSORS[value] = torch.tensor(value, dtype=torch.float64, device="cpu")
    return t


def runtime_probability(p: object, name: str = "p") -> tuple[float | None, torch.Tensor]:
    """``(value, tensor)``: what a public function passes to its op, which takes ``p`` as a 0-dim tensor.

    In eager mode ``value`` is the checked float (for the ``p == 0`` shortcut) and ``tensor`` holds it. Under
    ``torch.compile`` ``value`` is ``None`` and ``p`` is never branched on: a float ``p`` becomes a graph input
    (after dynamo's one automatic-dynamic recompile) and a tensor ``p`` is one from the start, so changing ``p``
    between calls never recompiles again. The op checks the range when it runs.
    """
    if torch.compiler.is_compiling():
        if isinstance(p, torch.Tensor):
            if p.requires_grad:
                check_probability(p, name)  # raises the clear error
            return None, p.detach().reshape(())
        # `zeros + p`, not torch.tensor(p): dynamo's float tensorify pass keeps this a graph input, not a constant
        return None, torch.zeros((), dtype=torch.float64) + p
    if type(p) is float and torch._C._len_torch_dispatch_stack() == 0:
        t = _P_TENSORS.get(p)  # a value checked before (NaN is never a key)
        if t is not None:
            return p, t
    value = check_probability(p, name)
    if torch._C._len_torch_dispatch_stack() == 0:
        return value, _p_tensor(value)
    return value, torch.tensor(value, dtype=torch.float64, device="cpu")  # e.g. under a FakeTensorMode


def probability_value(p: torch.Tensor, name: str = "p") -> float:
    """The float inside an op's ``p`` tensor, range-checked (under torch.compile this is the only check)."""
    value = float(p.item())
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"regops: {name} must be in [0, 1], got {value}")
    return value
