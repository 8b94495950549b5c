"""What the families' modules share: a probability attribute that is a runtime value under ``torch.compile``, and
the declaration of which foreign module a regops module replaces (read by :func:`regops.patch`)."""

from __future__ import annotations

import numbers

import torch

# Module class (or "package.module:Class" for optional dependencies) -> regops class with ``from_module``.
SWAPS: dict[type | str, type] = {}


class RuntimeProbability:
    """Mixin: the module's probability attribute (``p``, or ``drop_prob``) is mirrored into a 0-dim float64 CPU
    tensor that the ops take, so that under ``torch.compile`` a p schedule (``module.p = new_p`` between steps)
    is a runtime value: no guard on the float, no recompile. In eager mode the float itself is used.

    The tensor is a plain attribute (not a buffer): not in the state_dict, and ``.to(device)`` leaves it on the
    CPU, where reading it costs no device sync.
    """

    _p_attr = "p"

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == self._p_attr:
            if isinstance(value, torch.Tensor):  # the user's own 0-dim tensor: the ops read it directly
                object.__setattr__(self, "_p_runtime", value.detach())
                return
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            number = float(value) if ok else float("nan")  # NaN: the op raises a clear error if it ever runs
            runtime = self.__dict__.get("_p_runtime")
            if runtime is None or runtime.dtype != torch.float64 or runtime.device.type != "cpu":
                object.__setattr__(self, "_p_runtime", torch.tensor(number, dtype=torch.float64))
            else:
                with torch.no_grad():
                    runtime.fill_(number)  # in place: a compiled graph reads it as an input

    def _probability(self):
        """What forward passes as p: the tensor under torch.compile, the float otherwise."""
        return self._p_runtime if torch.compiler.is_compiling() else getattr(self, self._p_attr)


_SHARED_STATE = ("_parameters", "_buffers", "_non_persistent_buffers_set")


def adopt_module_state(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Give ``new`` (a regops replacement of ``old``) everything of ``old`` a user may have attached.

    Hook dicts (forward, pre-forward, backward, state_dict hooks, ...) are *shared*, not copied, so hooks
    registered before the swap run on the replacement and their handles still remove them; parameters and
    buffers are shared too, and other attributes a user set are copied over. ``training`` follows ``old``.
    """
    for key, value in old.__dict__.items():
        if "hook" in key or key in _SHARED_STATE:
            new.__dict__[key] = value
        elif key not in new.__dict__:
            new.__dict__[key] = value
    new.train(old.training)
    return new


def swaps(*targets: type | str):
    """Class decorator: ``regops.patch`` replaces instances of exactly ``targets`` with this class."""

    def register(cls: type) -> type:
        if not hasattr(cls, "from_module"):
            raise TypeError(f"{cls.__name__} needs a from_module(module) classmethod to be swappable")
        for target in targets:
            SWAPS[target] = cls
        return cls

    return register
