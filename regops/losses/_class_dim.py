"""Where the classes are: one rule for the losses (``F.cross_entropy``'s) and one for reading model outputs.

* :func:`classes_last` -- the losses: ``class_dim=None`` is torch's convention (``[C]``, ``[N, C]``,
  ``[N, C, d1, ...]``); a 3-D+ call that looks classes-last (``[B, T, V]`` with ``[B, T]`` targets) raises and says
  to pass ``class_dim=-1``, rather than giving a different loss than ``F.cross_entropy`` when ``T == V``.
* :func:`infer_classes_last` -- logits read back from a model (data scores, sampled-label Fisher): the class dim
  is the one the targets leave out, an error when both readings fit.
* :func:`check_weight_dtype` -- class weights in the logits' dtype or the compute dtype, as torch requires.
"""

from __future__ import annotations

from typing import Any

import torch

from regops._core.dtypes import acc_dtype


def check_class_dim(class_dim: Any, nd: int) -> int:
    if isinstance(class_dim, bool) or not isinstance(class_dim, int) or not -nd <= class_dim < nd:
        raise ValueError(f"regops: class_dim must be an int in [{-nd}, {nd}) for {nd}-D logits, got {class_dim!r}")
    return class_dim


def _target_lead(target: Any) -> torch.Size | None:
    """The leading shape a target implies: its own shape for labels, all but the last dim for sparse targets."""
    if isinstance(target, torch.Tensor):
        return target.shape
    if isinstance(target, (tuple, list)) and len(target) == 2 and isinstance(target[0], torch.Tensor):
        return target[0].shape[:-1] if target[0].dim() else None
    return None


def classes_last(logits: torch.Tensor, target: Any, class_dim: int | None) -> torch.Tensor:
    """``logits`` with the class dim moved last (a view; the row kernels copy it if it is not contiguous).

    ``class_dim=None`` is ``F.cross_entropy``'s convention: ``[C]`` (unbatched), ``[N, C]`` and ``[N, C, d1, ...]``
    (classes in dim 1). A 3-D+ input whose target matches its shape without the last dim (and not without dim 1)
    looks like classes-last LM logits ``[B, T, V]``: an error that says to pass ``class_dim=-1`` rather than a
    silently different loss. An explicit ``class_dim`` is taken as given."""
    nd = logits.dim()
    if class_dim is None:
        if nd <= 2:
            return logits
        lead = _target_lead(target)
        torch_lead = logits.shape[:1] + logits.shape[2:]
        if lead is not None and lead == logits.shape[:-1] and lead != torch_lead:
            raise ValueError(
                f"regops: logits {tuple(logits.shape)} with target {tuple(lead)} look classes-last (as [B, T, V] LM "
                "logits), but regops.cross_entropy follows F.cross_entropy, which reads the classes in dim 1 of an "
                "input with more than 2 dims. Pass class_dim=-1 for classes-last logits (or flatten them: "
                "logits.flatten(0, -2), target.flatten())"
            )
        return logits.movedim(1, -1)
    class_dim = check_class_dim(class_dim, nd)
    return logits if class_dim % nd == nd - 1 else logits.movedim(class_dim, -1)


def check_weight_dtype(weight: Any, name: str, dtype: torch.dtype) -> None:
    """Class weights in the logits' dtype or in the loss's compute dtype (float32 for 16-bit logits, which is what
    autocast gives torch's loss). Anything else raises, as ``F.cross_entropy`` does: a float64 weight with float32
    logits would silently lose its precision, a float32 weight with float64 logits does not give float64 math."""
    if not isinstance(weight, torch.Tensor) or weight.dtype in (dtype, acc_dtype(dtype)):
        return
    raise TypeError(
        f"regops: {name} is {weight.dtype} but the logits are {dtype} (torch.nn.functional.cross_entropy raises here "
        f"too): pass {name}.to({str(dtype).removeprefix('torch.')})"
        + (", or float64 logits for float64 math" if weight.dtype == torch.float64 else "")
    )


def infer_classes_last(logits: torch.Tensor, targets: Any, class_dim: int | None) -> torch.Tensor:
    """``logits`` with their class dim last. ``[B, C]``: dim 1. 3-D and more: ``class_dim`` if given, else the
    dim the integer ``targets`` leave out, when that is unambiguous: targets ``[B, T]`` with logits ``[B, T, V]``
    are classes-last (a language model), with ``[B, C, T]`` classes in dim 1 (``F.cross_entropy``'s convention);
    when both fit (``T == V``) an error asks for ``class_dim``."""
    nd = logits.dim()
    if class_dim is not None:
        return logits.movedim(check_class_dim(class_dim, nd), -1)
    if nd <= 2:
        return logits
    shape = getattr(targets, "shape", None)
    last = shape == logits.shape[:-1]
    second = shape == logits.shape[:1] + logits.shape[2:]
    if last and second:
        raise ValueError(
            f"regops: logits {tuple(logits.shape)} with targets {tuple(shape)} fit both classes in dim 1 (as "
            "F.cross_entropy reads [N, C, d1, ...]) and classes last (as [B, T, V] LM logits): pass class_dim=1 or "
            "class_dim=-1"
        )
    return logits.movedim(1, -1) if second else logits
