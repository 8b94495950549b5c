"""Hessian-vector products batched over probes, and the Hessian of a loss averaged over batches as an operator.

Three engines compute ``[H v_1, ..., H v_K]`` for one loss:

* ``"double_backward"``: one ``backward(create_graph=True)`` per loss (reused for every probe), then one
  backward of ``g . v`` batched over the ``K`` probes with ``torch.autograd.grad(..., is_grads_batched=True)``
  (autograd vmaps the backward graph: the K products become larger matrix products).
* ``"forward_over_reverse"``: ``torch.func.vmap`` over probes of ``jvp(grad(loss))`` (Pearlmutter's R-op on the
  gradient). It needs ``loss_fn`` to take the parameters as its argument (a functional loss).
* ``"loop"``: one double backward per probe, as PyHessian does (the fallback).

``"auto"`` picks forward-over-reverse when the loss is functional (the fastest engine per probe in
benchmarks/bench_hessian.py on CPU with one and two threads, and the one that fuses best on a GPU); for a
closure it picks batched double backward, or the loop on a CPU limited to one thread (batching then buys no
parallelism and vmap costs a little).
vmap cannot run everything: code that calls ``.item()`` or branches on tensor values, in-place updates of
captured tensors (BatchNorm's running statistics in train mode), custom autograd Functions without a vmap rule,
and some operators' backward formulas. When the batched engine raises for that reason, the operator falls back
(forward-over-reverse -> batched double backward -> loop) once, with a ``RuntimeWarning`` that gives the reason;
later calls use the engine that worked.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from regops.hessian._probes import ParamLayout

HVP_METHODS = ("auto", "double_backward", "forward_over_reverse", "loop")

_VMAP_ERRORS = (RuntimeError, NotImplementedError)


def takes_params(loss_fn: Callable[..., Any]) -> bool:
    """Whether ``loss_fn`` takes the parameters as an argument (else it is a closure over them)."""
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return True
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return bool(positional)


def check_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"regops: loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"regops: the loss must be a scalar (one element), got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"regops: the loss must have a floating dtype, got {loss.dtype}")
    return loss.reshape(())


class LossHVP:
    """Hessian-vector products of one scalar loss with respect to ``params``.

    ``loss_fn(args)`` (functional: ``args`` is ``params`` in the container ``pack`` builds) or ``loss_fn()``
    (closure). Call with per-parameter probes ``[K, *shape]``; returns ``H v`` in the same form.
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        params: Sequence[torch.Tensor],
        pack: Callable[[Sequence[torch.Tensor]], Any] | None,
        method: str = "auto",
        create_graph: bool = False,
    ) -> None:
        self.loss_fn, self.params, self.pack = loss_fn, tuple(params), pack
        self.create_graph = create_graph
        if method == "auto":
            if pack is not None and not create_graph:
                method = "forward_over_reverse"
            elif self.params[0].device.type == "cpu" and torch.get_num_threads() == 1:
                method = "loop"  # one thread: batching buys no parallelism, and the loop skips vmap's overhead
            else:
                method = "double_backward"
        if method == "forward_over_reverse" and pack is None:
            raise ValueError(
                "regops: hvp='forward_over_reverse' needs a loss_fn that takes the parameters as its argument"
            )
        self.method = method
        self._grads: tuple[torch.Tensor | None, ...] | None = None
        self._checked = False

    # ------------------------------------------------------------------ shared
    def _loss(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.loss_fn(self.pack(params)) if self.pack is not None else self.loss_fn()
        return check_loss(out)

    def gradients(self) -> tuple[torch.Tensor | None, ...]:
        """First derivatives with a graph (computed once, reused by every probe)."""
        if self._grads is None:
            loss = self._loss(self.params)
            if not loss.requires_grad:
                raise ValueError("regops: the loss does not depend on params (it does not require grad)")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self._grads = tuple(g if g is not None and g.requires_grad else None for g in grads)
        return self._grads

    def __call__(self, vs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        while True:
            try:
                return self._run(vs)
            except _VMAP_ERRORS as exc:
                fallback = {"forward_over_reverse": "double_backward", "double_backward": "loop"}.get(self.method)
                if fallback is None or not _is_vmap_failure(exc):
                    raise
                warnings.warn(
                    f"regops: {self.method} Hessian-vector products failed under vmap ({_first_line(exc)}); "
                    f"falling back to {fallback}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.method = fallback

    def _run(self, vs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.method == "forward_over_reverse":
            return self._forward_over_reverse(vs)
        grads = self.gradients()
        used = [i for i, g in enumerate(grads) if g is not None]
        k = vs[0].shape[0]
        if not used:  # the loss is at most linear in params: H = 0
            return tuple(torch.zeros_like(v) for v in vs)
        outputs = [grads[i] for i in used]
        if self.method == "double_backward":
            hv = torch.autograd.grad(
                outputs,
                self.params,
                [vs[i] for i in used],
                retain_graph=True,
                create_graph=self.create_graph,
                is_grads_batched=True,
                allow_unused=True,
            )
            return tuple(torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs, strict=True))
        rows = [
            torch.autograd.grad(
                outputs,
                self.params,
                [vs[i][j] for i in used],
                retain_graph=True,
                create_graph=self.create_graph,
                allow_unused=True,
                materialize_grads=True,
            )
            for j in range(k)
        ]
        return tuple(torch.stack([r[p] for r in rows]) for p in range(len(self.params)))

    def _forward_over_reverse(self, vs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from torch.func import grad, jvp, vmap

        if not self._checked:  # one plain forward: a loss that ignores params is an error, not a zero Hessian
            with torch.enable_grad():
                if not self._loss(self.params).requires_grad:
                    raise ValueError("regops: the loss does not depend on params (it does not require grad)")
            self._checked = True

        primals = tuple(p.detach() for p in self.params)
        grad_fn = grad(lambda ps: self._loss(ps))

        def hvp(*v):
            return jvp(grad_fn, (primals,), (tuple(v),))[1]

        return tuple(vmap(hvp)(*vs))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _is_vmap_failure(exc: BaseException) -> bool:
    """Errors that mean "this code cannot run batched", not "this code is wrong"."""
    text = str(exc).lower()
    keys = ("vmap", "batch", "functorch", "is_grads_batched", "inplace", "in-place", ".item()", "data-dependent")
    return isinstance(exc, NotImplementedError) or any(k in text for k in keys)


class HessianOperator:
    """``V -> H V`` for ``[K, N]`` probe rows, ``H`` the Hessian of the loss (weighted mean over batches).

    ``batches`` is an iterable (re-iterated on every product) of ``(loss_fn, weight)``; a single batch keeps
    its gradient graph between products, so the forward and first backward are paid once.
    """

    def __init__(
        self,
        batches: Callable[[], Iterable[tuple[Callable[..., Any], float]]],
        params: Sequence[torch.Tensor],
        layout: ParamLayout,
        pack: Callable[[Sequence[torch.Tensor]], Any] | None,
        method: str,
        probe_batch: int,
        single: bool,
    ) -> None:
        self.batches, self.params, self.layout, self.pack = batches, tuple(params), layout, pack
        self.method, self.probe_batch, self.single = method, probe_batch, single
        self._cached: list[tuple[LossHVP, float]] | None = None
        self.num_matvecs = 0

    def _engines(self) -> Iterable[tuple[LossHVP, float]]:
        if self.single:
            if self._cached is None:
                self._cached = [(LossHVP(fn, self.params, self.pack, self.method), w) for fn, w in self.batches()]
            return self._cached
        return ((LossHVP(fn, self.params, self.pack, self.method), w) for fn, w in self.batches())

    def apply(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-parameter ``[K, *shape]`` probes -> per-parameter ``H v``; ``probe_batch`` probes at a time."""
        k = vs[0].shape[0]
        self.num_matvecs += k
        out: list[torch.Tensor] | None = None
        total = 0.0
        for engine, weight in self._engines():
            total += weight
            parts = [engine([v[s : s + self.probe_batch] for v in vs]) for s in range(0, k, self.probe_batch)]
            hv = [torch.cat(chunks) if len(chunks) > 1 else chunks[0] for chunks in zip(*parts, strict=True)]
            if out is None:
                out = [h if weight == 1.0 else h * weight for h in hv]
            else:
                for o, h in zip(out, hv, strict=True):
                    o.add_(h, alpha=weight)
            if not self.single:
                self.method = engine.method  # keep a fallback for the next batch
        if out is None or total == 0.0:
            raise ValueError("regops: no data: the batches were empty")
        return [o.div_(total) for o in out] if total != 1.0 else out

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``[K, N] -> [K, N]`` in the layout's dtype."""
        return self.layout.cat(self.apply(self.layout.split(v)))
