"""Swap torch modules in a model for regops modules, in place, with a handle that reverts the swap."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

import torch

from regops._core.modules import SWAPS


def _resolve(target: type | str) -> type | None:
    if isinstance(target, type):
        return target
    module, _, attr = target.partition(":")
    if module not in sys.modules:  # no instance can exist before its module is imported: don't import it
        return None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):  # optional dependency not installed
        return None


def _swap_table() -> dict[type, type]:
    table = {}
    for target, cls in SWAPS.items():
        resolved = _resolve(target)
        if resolved is not None:
            table[resolved] = cls
    return table


@dataclass
class PatchHandle:
    """What `patch` replaced: ``(parent, name, original, replacement)`` per swapped child.

    Use `revert` (or the handle as a context manager) to put the original modules back.

    Args:
        swapped: the swaps, in order (`patch` fills it).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> with regops.patch(model) as handle:
        ...     type(model[1]).__name__, len(handle)
        ('Dropout', 1)
        >>> type(model[1]).__module__  # reverted on exit
        'torch.nn.modules.dropout'
    """

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.swapped)

    def revert(self) -> None:
        for parent, name, original, replacement in reversed(self.swapped):
            original.train(replacement.training)
            attr = getattr(replacement, "_p_attr", None)
            if attr is not None and hasattr(original, attr):  # a p schedule applied while patched carries over
                setattr(original, attr, getattr(replacement, attr))
            parent._modules[name] = original
        self.swapped.clear()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def patch(model: torch.nn.Module) -> PatchHandle:
    """Replace, in place, every submodule whose type is exactly a supported torch module with the regops one.

    Supported: ``torch.nn.Dropout``, ``Dropout1d``, ``Dropout2d``, ``Dropout3d`` and timm's ``DropPath``
    (whatever regops.nn declares with ``@swaps``). Subclasses and other dropout kinds (e.g. ``AlphaDropout``)
    are left alone. A module shared by several parents is replaced by one shared regops module. The replacement
    shares the original's hooks (forward, pre-forward, backward, state_dict: handles taken before the swap still
    remove them), buffers and attributes, and takes its training flag.

    Args:
        model: the module whose submodules are swapped, in place.

    Returns:
        A `PatchHandle`: ``len(handle)`` modules were swapped; ``handle.revert()`` (or leaving a
        ``with`` block) puts the originals back.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Dropout2d(0.1))
        >>> handle = regops.patch(model)
        >>> len(handle), isinstance(model[1], regops.nn.Dropout)  # how many modules were swapped
        (2, True)
        >>> handle.revert()
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"regops.patch expects a torch.nn.Module, got {type(model).__name__}")
    table = _swap_table()
    if type(model) in table:
        raise ValueError(
            f"regops.patch swaps submodules in place; the model itself is a {type(model).__name__}. "
            f"Use {table[type(model)].__module__}.{table[type(model)].__name__}.from_module(model) instead."
        )
    handle = PatchHandle()
    replacements: dict[int, torch.nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            cls = table.get(type(child)) if child is not None else None
            if cls is None:
                continue
            replacement = replacements.get(id(child))
            if replacement is None:
                replacement = replacements[id(child)] = cls.from_module(child)
            parent._modules[name] = replacement
            handle.swapped.append((parent, name, child, replacement))
    return handle
