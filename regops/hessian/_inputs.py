"""The estimators' inputs: which tensors to differentiate (frozen ones left out in every form), the loss of each
batch in the three call forms, user-supplied probes, and the Hessian operator built from them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regops._loader import ReplayLoader
from regops.hessian._hvp import HessianOperator, takes_params
from regops.hessian._probes import ParamLayout

# Probes per batched Hessian-vector product unless the caller says otherwise.
DEFAULT_PROBE_BATCH = 16


@dataclass
class _Params:
    """The tensors to differentiate with respect to: those of ``params`` that require grad (frozen ones are left
    out in every form), and how to rebuild the user's container around them for a functional ``loss_fn``."""

    names: tuple[str, ...]  # of the trainable tensors (dict keys, list indices as strings, module names)
    tensors: tuple[torch.Tensor, ...]
    keyed: bool
    slots: tuple[int, ...]  # position of each trainable tensor among all of params
    everything: tuple[tuple[str, torch.Tensor], ...]  # every entry of params, frozen ones included
    kind: str  # "module", "tensor", "mapping", "sequence"

    def pack(self) -> Callable[[Sequence[torch.Tensor]], Any]:
        """``loss_fn``'s argument from the trainable tensors: the user's container, frozen entries kept."""
        if self.kind == "module":
            names = self.names
            return lambda ps: dict(zip(names, ps, strict=True))
        if self.kind == "tensor":
            return lambda ps: ps[0]

        def rebuild(ps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            full = [t for _, t in self.everything]
            for slot, p in zip(self.slots, ps, strict=True):
                full[slot] = p
            return full

        if self.kind == "mapping":
            keys = [k for k, _ in self.everything]
            return lambda ps: dict(zip(keys, rebuild(ps), strict=True))
        return lambda ps: tuple(rebuild(ps))

    def positional(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """Per-trainable-tensor results in the positions of ``params`` (``None`` for frozen entries)."""
        out: list[Any] = [None] * len(self.everything)
        for slot, v in zip(self.slots, values, strict=True):
            out[slot] = v
        return tuple(out)


def _check_params(params: object) -> _Params:
    if isinstance(params, nn.Module):
        named, kind = list(params.named_parameters()), "module"
    elif isinstance(params, torch.Tensor):
        named, kind = [("0", params)], "tensor"
    elif isinstance(params, Mapping):
        named, kind = [(str(k), v) for k, v in params.items()], "mapping"
    elif isinstance(params, Iterable):
        named, kind = [(str(i), p) for i, p in enumerate(params)], "sequence"
    else:
        raise TypeError(f"regops: params must be tensors (a list, a dict or a module), got {type(params).__name__}")
    if not named:
        raise ValueError("regops: params is empty; pass the tensors to differentiate with respect to")
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"regops: params[{name!r}] must be a torch.Tensor, got {type(p).__name__}")
    slots = tuple(i for i, (_, p) in enumerate(named) if p.requires_grad)
    if not slots:
        raise ValueError(
            "regops: none of params requires grad; the Hessian is taken with respect to the tensors that require "
            "grad (frozen ones are left out)"
        )
    trainable = [named[i] for i in slots]
    for name, p in trainable:
        if not p.is_floating_point():
            raise TypeError(f"regops: params[{name!r}] must have a floating dtype, got {p.dtype}")
        if p.device != trainable[0][1].device:
            raise ValueError(
                f"regops: params[{name!r}] is on {p.device} but params[{trainable[0][0]!r}] on {trainable[0][1].device}"
            )
    names, tensors = zip(*trainable, strict=True)
    keyed = kind in ("module", "mapping")
    return _Params(tuple(names), tuple(tensors), keyed, slots, tuple(named), kind)


@dataclass
class _Problem:
    spec: _Params
    pack: Callable[[Sequence[torch.Tensor]], Any] | None
    batches: Callable[[], Iterable[tuple[Callable[..., Any], float]]]
    single: bool
    # model form: the same batches' losses as ``loss_fn()`` calling the model itself (FSDP2 runs its own hooks)
    forwards: Callable[[], Iterable[tuple[Callable[[], torch.Tensor], float]]] | None = None

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return self.spec.tensors

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names

    @property
    def keyed(self) -> bool:  # results keyed by name (dict params or a model)
        return self.spec.keyed

    @property
    def layout(self) -> ParamLayout:
        return ParamLayout.of(self.names, self.params)

    def per_param(self, values: Sequence[Any]) -> tuple[Any, ...] | dict[str, Any]:
        """Per-trainable-tensor results as the user's container: a dict by name, else a tuple in the order of
        ``params`` with ``None`` for frozen entries."""
        if self.keyed:
            return dict(zip(self.names, values, strict=True))
        return self.spec.positional(values)


def _batch_size(targets: object, inputs: object) -> int:
    for t in (targets, inputs):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    return 1


def _what(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__


def _resolve(first: object, second: object, data: tuple) -> _Problem:
    """``(loss_fn, params)`` | ``(model, criterion, inputs, targets)`` | ``(model, criterion, loader)``."""
    if isinstance(first, nn.Module) and not isinstance(second, (torch.Tensor, Mapping, list, tuple)):
        model, criterion = first, second
        if not callable(criterion):
            raise TypeError(f"regops: criterion must be callable, got {type(criterion).__name__}")
        spec = _check_params(model)
        pack = spec.pack()

        def batch_loss(inputs, targets):
            return lambda p: criterion(torch.func.functional_call(model, p, (inputs,)), targets)

        def native_loss(inputs, targets):
            return lambda: criterion(model(inputs), targets)

        if len(data) == 2:
            inputs, targets = data
            return _Problem(
                spec,
                pack,
                lambda: [(batch_loss(inputs, targets), 1.0)],
                True,
                lambda: [(native_loss(inputs, targets), 1.0)],
            )
        if len(data) == 1:
            loader = data[0]
            if isinstance(loader, (torch.Tensor, Mapping)):
                raise TypeError(
                    f"regops: targets are missing: trace(model, criterion, inputs) got inputs ({_what(loader)}) and "
                    "no targets; pass them as the fourth argument, trace(model, criterion, inputs, targets) (None "
                    "for a criterion that takes none: criterion(outputs, None)), or a DataLoader of (inputs, targets) "
                    "batches as the third"
                )
            if not isinstance(loader, Iterable):
                raise TypeError(
                    f"regops: the third argument must be the inputs (with targets as the fourth) or a DataLoader of "
                    f"(inputs, targets) batches, got {type(loader).__name__}"
                )
            device = spec.tensors[0].device
            # every product walks the loader again: replay the first pass's batches (a shuffling sampler would
            # otherwise give each probe batch other examples, other batch sizes and other dropout masks)
            loader = ReplayLoader(loader)

            def pairs():
                for batch in loader:
                    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                        raise TypeError(
                            f"regops: the loader passed as trace(model, criterion, loader) must yield (inputs, "
                            f"targets) pairs, got a {_what(batch)}; for one batch call trace(model, criterion, "
                            "inputs, targets)"
                        )
                    inputs, targets = (b.to(device) if isinstance(b, torch.Tensor) else b for b in batch[:2])
                    yield inputs, targets, float(_batch_size(targets, inputs))

            def batches():
                return ((batch_loss(i, t), w) for i, t, w in pairs())

            def forwards():
                return ((native_loss(i, t), w) for i, t, w in pairs())

            return _Problem(spec, pack, batches, False, forwards)
        raise TypeError(
            "regops: with a model, call trace(model, criterion, inputs, targets) or trace(model, criterion, loader)"
        )
    if data:
        raise TypeError("regops: trace(loss_fn, params, ...) takes no further positional arguments")
    if not callable(first):
        raise TypeError(f"regops: loss_fn must be callable, got {type(first).__name__}")
    if second is None:
        raise TypeError("regops: params is required with a loss_fn")
    spec = _check_params(second)
    pack = spec.pack() if takes_params(first) else None
    return _Problem(spec, pack, lambda: [(first, 1.0)], True)


def _fd_step(fd_eps: Any) -> float | None:
    """``fd_eps`` checked, as a float (``None``: the default step)."""
    if fd_eps is not None and (isinstance(fd_eps, bool) or not isinstance(fd_eps, (int, float)) or not fd_eps > 0):
        raise ValueError(f"regops: fd_eps must be a positive number (the finite-difference step), got {fd_eps!r}")
    return None if fd_eps is None else float(fd_eps)


def _operator(problem: _Problem, hvp: str, probe_batch: int, fd_eps: float | None = None) -> HessianOperator:
    fd_step = _fd_step(fd_eps)
    return HessianOperator(
        problem.batches,
        problem.params,
        problem.layout,
        problem.pack,
        hvp,
        probe_batch,
        problem.single,
        fd_step,
    )


def _user_probes(probes: Any, problem: _Problem) -> torch.Tensor:
    """Probes given by the user -> ``[K, N]`` rows in the layout: a ``[K, N]`` tensor (the trainable params
    flattened and concatenated in order), or one ``[K, *shape]`` tensor per trainable param (a dict by name, or a
    sequence in the order of params, with ``None`` or any value at frozen entries)."""
    layout = problem.layout
    if isinstance(probes, torch.Tensor):
        if probes.dim() != 2 or probes.shape[1] != layout.numel or probes.shape[0] < 1:
            raise ValueError(
                f"regops: probes as one tensor must be [K, N] with N = {layout.numel} (the trainable params "
                f"flattened and concatenated), got shape {tuple(probes.shape)}"
            )
        parts = list(layout.split(probes))
    else:
        if isinstance(probes, Mapping):
            missing = [n for n in problem.names if n not in probes]
            if missing:
                raise ValueError(f"regops: probes has no entry for params {missing}")
            parts = [probes[n] for n in problem.names]
        elif isinstance(probes, Sequence):
            parts = list(probes)
            if len(parts) == len(problem.spec.everything) and len(parts) != len(problem.names):
                parts = [parts[i] for i in problem.spec.slots]
            if len(parts) != len(problem.names):
                raise ValueError(
                    f"regops: probes must have one tensor per trainable param ({len(problem.names)}), got {len(parts)}"
                )
        else:
            raise TypeError(f"regops: probes must be a tensor, a sequence or a dict of tensors, got {type(probes)}")
        k = None
        for name, part, p in zip(problem.names, parts, problem.params, strict=True):
            if not isinstance(part, torch.Tensor) or part.shape[1:] != p.shape or part.dim() != p.dim() + 1:
                shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise ValueError(f"regops: probes for {name!r} must be [K, *{tuple(p.shape)}], got {shape}")
            k = part.shape[0] if k is None else k
            if part.shape[0] != k or k < 1:
                raise ValueError("regops: every param's probes must have the same number K >= 1 of rows")
    for part in parts:
        if not part.is_floating_point():
            raise TypeError(f"regops: probes must be floating point, got {part.dtype}")
        if part.device != layout.device:
            raise ValueError(f"regops: probes are on {part.device}, params on {layout.device}")
    return layout.cat(parts)
