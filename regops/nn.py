"""Drop-in modules. Each declares the torch (or third-party) module it can replace, for :func:`regops.patch`."""

from __future__ import annotations

import torch

from regops.dropout import dropout as _dropout_fn

# Module class (or "package.module:Class" for optional dependencies) -> regops class with ``from_module``.
SWAPS: dict[type | str, type] = {}


def swaps(*targets: type | str):
    """Class decorator: ``regops.patch`` replaces instances of exactly ``targets`` with this class."""

    def register(cls: type) -> type:
        if not hasattr(cls, "from_module"):
            raise TypeError(f"{cls.__name__} needs a from_module(module) classmethod to be swappable")
        for target in targets:
            SWAPS[target] = cls
        return cls

    return register


@swaps(torch.nn.Dropout)
class Dropout(torch.nn.Dropout):
    """:class:`torch.nn.Dropout` (same constructor, repr and state_dict) backed by :func:`regops.dropout`.

    Saves no mask for backward. Still an instance of ``torch.nn.Dropout``, so code that looks for dropout
    modules keeps finding it.

    >>> m = regops.nn.Dropout(p=0.1)
    >>> y = m(torch.randn(4, 16))
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _dropout_fn(input, self.p, self.training, self.inplace)

    @classmethod
    def from_module(cls, module: torch.nn.Dropout) -> Dropout:
        new = cls(p=module.p, inplace=module.inplace)
        new.train(module.training)
        return new
