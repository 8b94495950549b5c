"""Make a model per-example-friendly, like Opacus's ``ModuleValidator.fix``: BatchNorm (which couples the
examples of a batch in train mode) becomes GroupNorm, and every change is reported."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Change:
    """One module replaced by :func:`fix_model`."""

    name: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.name}: {self.before} -> {self.after}"


def _group_norm_for(bn: nn.modules.batchnorm._BatchNorm, max_groups: int) -> nn.GroupNorm:
    channels = bn.num_features
    # Opacus's choice: the largest divisor of C that is <= max_groups (gcd(32, C) for powers of two)
    groups = math.gcd(max_groups, channels)
    gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn = gn.to(device=bn.weight.device, dtype=bn.weight.dtype)
    return gn


def _replacement(bn: nn.modules.batchnorm._BatchNorm, max_groups: int) -> nn.Module:
    """A GroupNorm, followed by what the module applies after normalizing when it is a norm-and-activation layer
    (timm's ``BatchNormAct2d``: its ``drop`` and ``act`` submodules): the model computes the same function but the
    statistics."""
    gn = _group_norm_for(bn, max_groups)
    after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    after = [m for m in after if not isinstance(m, nn.Identity)]
    if type(bn).forward is nn.modules.batchnorm._BatchNorm.forward or not after:
        return gn
    return nn.Sequential(gn, *after)


def fix_model(model: nn.Module, *, max_groups: int = 32, inplace: bool = False) -> tuple[nn.Module, list[Change]]:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm, lazy) of ``model`` by a ``GroupNorm`` with
    ``gcd(max_groups, C)`` groups and the same ``eps`` and ``affine``, freshly initialised (weight 1, bias 0),
    so that examples are independent and per-example gradients are defined. A norm-and-activation layer (timm's
    ``BatchNormAct2d``) keeps its activation and dropout after the GroupNorm.

    Args:
        model: any module (the root itself may be a BatchNorm).
        max_groups: upper bound on the number of groups (32, as Opacus and the GroupNorm paper).
        inplace: modify ``model`` itself; by default a deep copy is fixed and ``model`` is left untouched.

    Returns:
        ``(fixed model, changes)``; ``changes`` lists each replacement (``str(change)`` reads
        ``"layer1.0.bn1: BatchNorm2d(64) -> GroupNorm(32, 64)"``); empty when nothing needed fixing.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU())
        >>> model, changes = regops.fix_model(net)
        >>> print(*changes, sep="\\n")
        1: BatchNorm2d(64) -> GroupNorm(32, 64)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"regops: fix_model needs an nn.Module, got {type(model).__name__}")
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
        raise ValueError(f"regops: max_groups must be a positive int, got {max_groups!r}")
    if not inplace:
        model = copy.deepcopy(model)
    changes: list[Change] = []

    def describe(m: nn.Module) -> str:
        if isinstance(m, nn.Sequential):
            return " + ".join(describe(c) for c in m)
        if isinstance(m, nn.GroupNorm):
            return f"GroupNorm({m.num_groups}, {m.num_channels})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{type(m).__name__}({m.num_features})"
        return type(m).__name__

    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        gn = _replacement(model, max_groups)
        return gn, [Change("<root>", describe(model), describe(gn))]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                gn = _replacement(child, max_groups)
                setattr(module, child_name, gn)
                full = f"{name}.{child_name}" if name else child_name
                changes.append(Change(full, describe(child), describe(gn)))
    return model, changes
