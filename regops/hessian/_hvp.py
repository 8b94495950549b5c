"""Hessian-vector products batched over probes, and the Hessian of a loss averaged over batches as an operator.

Four engines compute ``[H v_1, ..., H v_K]`` for one loss:

* ``"double_backward"``: one ``backward(create_graph=True)`` per loss (reused for every probe), then one
  backward of ``g . v`` batched over the ``K`` probes with ``torch.autograd.grad(..., is_grads_batched=True)``
  (autograd vmaps the backward graph: the K products become larger matrix products).
* ``"forward_over_reverse"``: ``torch.func.vmap`` over probes of ``jvp(grad(loss))`` (Pearlmutter's R-op on the
  gradient). It needs ``loss_fn`` to take the parameters as its argument (a functional loss).
* ``"loop"``: one double backward per probe, as PyHessian does.
* ``"finite_difference"``: ``H v ~ (g(theta + h v) - g(theta - h v)) / 2h``, two first-order backwards per
  probe, for models with no double backward at all (fused kernels without a second derivative, regops' own
  fused dropout ops included). Central differences have a bias ``h^2/6 * D^4 L[., v, v, v] + O(h^4)``; the
  default step ``h = eps^(1/3)`` of the parameters' dtype (4.9e-3 in float32, 6.1e-6 in float64) balances it
  against rounding (``~ eps |g| / h``), so expect ~1e-5 relative accuracy in float32, ~1e-10 in float64. The
  step assumes the forward computes in the parameters' dtype: a float64 model whose layers compute in float32
  (HF Llama's RMSNorm does) needs ``fd_eps`` ~ 5e-3, and bfloat16/float16 params (default step 0.2/0.1) give
  only a rough estimate -- run finite differences on a float32 copy.
  The functional forms evaluate the loss at new tensors; a closure (``loss_fn()``) is evaluated after
  perturbing ``params`` in place, restored bit for bit (a copy is put back) before the engine returns.

``"auto"`` picks forward-over-reverse when the loss is functional (the fastest engine per probe in
benchmarks/hessian.py on CPU with one and two threads, and the one that fuses best on a GPU); for a
closure it picks batched double backward, or the loop on a CPU limited to one thread (batching then buys no
parallelism and vmap costs a little).

Every second-order engine runs the forward under :func:`regops.hessian.twice_differentiable` (attention on its
math backend, which has a double backward; MSE, Huber, soft-margin and multi-margin losses as elementwise ops,
which forward mode and double backward differentiate), so every standard loss and attention model works on every
engine.

Fallbacks. vmap cannot run everything: code that calls ``.item()`` or branches on tensor values, in-place
updates of captured tensors (BatchNorm's running statistics in train mode), custom autograd Functions without a
vmap rule, ops without a forward-mode derivative. When a batched engine raises for that reason, the operator
falls back (forward-over-reverse -> batched double backward -> loop) once, with a ``RuntimeWarning`` that gives
the reason; later calls use the engine that worked. When the model has no double backward at all, ``"auto"``
falls back to ``"finite_difference"`` (with a warning that names the op); an explicitly chosen second-order
engine raises an error that says to use ``hvp="finite_difference"``.

Dropout and other randomness in train mode. Every forward of a batch replays the state of torch's default
generators at that batch's first forward (:class:`~regops.hessian._context.FixedRNG`), on every engine (vmap
runs with ``randomness="same"``): the estimate is the Hessian of the loss at *one fixed dropout mask* per batch,
the same for every probe, the mask a plain forward would have drawn at that point. That is neither the Hessian
of the eval-mode network nor the expected Hessian over masks; for the eval-mode network call ``model.eval()``
first, for the expectation over masks average estimates from several calls (each draws a new mask). The
replayed generators are torch's default CPU generator and the default generator of the parameters' CUDA device;
a dropout layer given its own ``torch.Generator`` (or one on another device type) is not held fixed.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from regops.hessian._context import FixedRNG, twice_differentiable
from regops.hessian._probes import ParamLayout

HVP_METHODS = ("auto", "double_backward", "forward_over_reverse", "loop", "finite_difference")

_ENGINE_ERRORS = (RuntimeError, NotImplementedError)


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


NOT_A_FUNCTION_OF_PARAMS = (
    "regops: the loss does not depend on any of the given params (no gradient reaches them); pass the tensors "
    "the loss is computed from"
)


ONCE_DIFFERENTIABLE = (
    "regops: the loss's graph goes through an autograd.Function whose backward is marked @once_differentiable "
    "(it has no derivative), so a double backward would silently drop the second-order terms through it"
)


def check_second_order(grads: Sequence[torch.Tensor | None]) -> None:
    """Gradients built with ``create_graph=True`` whose graph holds a ``@once_differentiable`` backward: torch
    differentiates them without an error but treats that backward as a constant (a wrong Hessian), so raise."""
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "torch::autograd::Error":  # the node once_differentiable puts on its outputs
            raise RuntimeError(ONCE_DIFFERENTIABLE)
        stack.extend(f for f, _ in node.next_functions)


def check_depends(grads: Sequence[torch.Tensor | None]) -> None:
    """A loss none of whose params receive a gradient has no Hessian w.r.t. them: an error, not a zero."""
    if all(g is None for g in grads):
        raise ValueError(NOT_A_FUNCTION_OF_PARAMS)


def default_fd_step(params: Sequence[torch.Tensor]) -> float:
    """``eps^(1/3)`` of the least precise parameter dtype: balances the ``O(h^2)`` bias of central differences
    against the ``O(eps / h)`` rounding of the gradient difference."""
    eps = max(torch.finfo(p.dtype).eps for p in params)
    return eps ** (1.0 / 3.0)


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
        rng: FixedRNG | None = None,
        fd_step: float | None = None,
        check: bool = True,
        auto: bool = False,
    ) -> None:
        self.loss_fn, self.params, self.pack = loss_fn, tuple(params), pack
        self.create_graph = create_graph
        self.auto = method == "auto" or auto  # auto may fall back to finite differences
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
        if method == "finite_difference" and create_graph:
            raise ValueError(
                "regops: hvp='finite_difference' gives no graph (create_graph needs a second-order engine)"
            )
        self.method = method
        self.rng = rng if rng is not None else FixedRNG(self.params[0].device)
        self.fd_step = fd_step if fd_step is not None else default_fd_step(self.params)
        self._grads: tuple[torch.Tensor | None, ...] | None = None
        self._checked = not check
        self.fd_error: float | None = None  # estimated relative error of finite-difference products, when run
        self.estimate_fd_error = True  # on the first finite-difference probe this engine computes

    # ------------------------------------------------------------------ shared
    def _loss(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        with self.rng():
            out = self.loss_fn(self.pack(params)) if self.pack is not None else self.loss_fn()
        return check_loss(out)

    def _second_order(self) -> contextlib.AbstractContextManager:
        return twice_differentiable()

    def gradients(self) -> tuple[torch.Tensor | None, ...]:
        """First derivatives with a graph (computed once, reused by every probe)."""
        if self._grads is None:
            with self._second_order():
                loss = self._loss(self.params)
                if not loss.requires_grad:
                    raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            if not self._checked:
                check_depends(grads)
                self._checked = True
            check_second_order(grads)
            self._grads = tuple(g if g is not None and g.requires_grad else None for g in grads)
        return self._grads

    def __call__(self, vs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        while True:
            try:
                return self._run(vs)
            except _ENGINE_ERRORS as exc:
                fallback = self._fallback(exc)
                if fallback is None:
                    raise
                reason = f"regops: {self.method} Hessian-vector products failed ({_first_line(exc)}); "
                self.method = fallback
                self._grads = None
                if fallback != "finite_difference":
                    warnings.warn(reason + f"falling back to {fallback}", RuntimeWarning, stacklevel=3)
                    continue
                out = self._run(vs)  # the warning carries the error estimate of what it computed
                warnings.warn(
                    reason + f"falling back to finite differences (central, step h={self.fd_step:.3g}): estimated "
                    f"relative error of H v {self.fd_error:.2g} (from a second step 2h; bias O(h^2)). Make the "
                    "model twice differentiable for exact products",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return out

    def _fallback(self, exc: BaseException) -> str | None:
        if self.method == "finite_difference":
            return None
        if _no_double_backward(exc):
            if self.auto and not self.create_graph:
                return "finite_difference"
            if self.create_graph:
                raise RuntimeError(
                    f"regops: the loss's graph has no double backward ({_first_line(exc)}); a differentiable "
                    "curvature penalty needs the second derivatives of every op in it"
                ) from exc
            raise RuntimeError(
                f"regops: the model has no double backward ({_first_line(exc)}), so hvp={self.method!r} cannot "
                "compute Hessian-vector products; use hvp='finite_difference' (two first-order backwards per "
                "probe) or hvp='auto'"
            ) from exc
        if self.method == "forward_over_reverse" and (_is_vmap_failure(exc) or _is_forward_ad_failure(exc)):
            return "double_backward"
        if self.method == "double_backward" and _is_vmap_failure(exc):
            return "loop"
        return None

    def _run(self, vs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.method == "forward_over_reverse":
            return self._forward_over_reverse(vs)
        if self.method == "finite_difference":
            return self._finite_difference(vs)
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

    def _check_once(self) -> None:
        """One forward and backward: a loss that reaches none of the params is an error, not H = 0, and one whose
        backward has no derivative (``@once_differentiable``) is no more differentiable in forward mode."""
        if self._checked:
            return
        with torch.enable_grad(), self._second_order():
            loss = self._loss(self.params)
            if not loss.requires_grad:
                raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            check_depends(grads)
            check_second_order(grads)
        self._checked = True

    def _forward_over_reverse(self, vs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from torch.func import grad, jvp, vmap

        self._check_once()
        primals = tuple(p.detach() for p in self.params)
        grad_fn = grad(lambda ps: self._loss(ps))

        def hvp(*v):
            return jvp(grad_fn, (primals,), (tuple(v),))[1]

        # randomness="same": one dropout mask for the whole batch of probes (the replayed one, see FixedRNG).
        with self._second_order():
            return tuple(vmap(hvp, randomness="same")(*vs))

    # ------------------------------------------------------------------ finite differences
    def _gradient_at(self, step: float, v: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """``grad L(theta + step * v)`` (first order, no graph)."""
        with torch.enable_grad():
            if self.pack is not None:
                moved = [(p.detach() + step * vi).requires_grad_() for p, vi in zip(self.params, v, strict=True)]
                loss = self._loss(moved)
                if not loss.requires_grad:
                    raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
                return list(torch.autograd.grad(loss, moved, allow_unused=True))
            saved = [p.detach().clone() for p in self.params]
            try:
                with torch.no_grad():
                    for p, s, vi in zip(self.params, saved, v, strict=True):
                        p.copy_(s + step * vi)
                loss = self._loss(self.params)
                if not loss.requires_grad:
                    raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
                return list(torch.autograd.grad(loss, self.params, allow_unused=True))
            finally:
                with torch.no_grad():
                    for p, s in zip(self.params, saved, strict=True):
                        p.copy_(s)

    def _finite_difference(self, vs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        h = self.fd_step
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"regops: the finite-difference step must be a positive number, got {h!r}")
        k = vs[0].shape[0]
        out = [torch.zeros_like(v) for v in vs]
        for j in range(k):
            v = [vi[j] for vi in vs]
            hv = self._central(h, v)
            if self.estimate_fd_error:
                # Richardson: with bias c h^2, D(2h) - D(h) = 3 c h^2, so |D(2h) - D(h)| / 3 estimates D(h)'s error
                # (rounding included); one extra pair of gradients, on the first probe of each batch's loss.
                self.estimate_fd_error = False
                self._note_error(hv, self._central(2.0 * h, v))
            for o, d in zip(out, hv, strict=True):
                if d is not None:
                    o[j] = d.to(o.dtype)
        return tuple(out)

    def _central(self, h: float, v: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        plus = self._gradient_at(h, v)
        if not self._checked:
            check_depends(plus)
            self._checked = True
        minus = self._gradient_at(-h, v)
        return [None if a is None or b is None else (a - b) / (2.0 * h) for a, b in zip(plus, minus, strict=True)]

    def _note_error(self, hv: Sequence[torch.Tensor | None], hv2: Sequence[torch.Tensor | None]) -> None:
        pairs = [(a.double(), b.double()) for a, b in zip(hv, hv2, strict=True) if a is not None]
        diff = sum(float((a - b).square().sum()) for a, b in pairs)
        norm = sum(float(a.double().square().sum()) for a in hv if a is not None)
        rel = math.sqrt(diff) / 3.0 / math.sqrt(norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
        self.fd_error = rel if self.fd_error is None else max(self.fd_error, rel)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _is_vmap_failure(exc: BaseException) -> bool:
    """Errors that mean "this code cannot run batched", not "this code is wrong"."""
    text = str(exc).lower()
    keys = ("vmap", "batch", "functorch", "is_grads_batched", "inplace", "in-place", ".item()", "data-dependent")
    return isinstance(exc, NotImplementedError) or any(k in text for k in keys)


def _is_forward_ad_failure(exc: BaseException) -> bool:
    """An op without a (working) forward-mode derivative: reverse-over-reverse still works."""
    text = str(exc).lower()
    return "forward ad" in text or "forward-mode" in text or "zerotensor" in text or "jvp" in text


def _no_double_backward(exc: BaseException) -> bool:
    """An op whose backward cannot itself be differentiated (no second derivative at all)."""
    text = str(exc).lower()
    return (
        ("derivative for" in text and "not implemented" in text and "_backward" in text)
        or "no autograd formula was registered" in text
        or "double backward" in text
        or "twice differentiable" in text
    )


class HessianOperator:
    """``V -> H V`` for ``[K, N]`` probe rows, ``H`` the Hessian of the loss (weighted mean over batches).

    ``batches`` is an iterable (re-iterated on every product) of ``(loss_fn, weight)``; a single batch keeps
    its gradient graph between products, so the forward and first backward are paid once. Batch ``b`` keeps
    one :class:`FixedRNG` across products, so its dropout masks are the same for every probe.
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
        fd_step: float | None = None,
    ) -> None:
        self.batches, self.params, self.layout, self.pack = batches, tuple(params), layout, pack
        self.method, self.probe_batch, self.single = method, probe_batch, single
        self.fd_step = fd_step
        self.auto = method == "auto"
        self._cached: list[tuple[LossHVP, float]] | None = None
        self._rngs: list[FixedRNG] = []
        self._checked = False
        self.num_matvecs = 0
        self._fd_error: float | None = None
        self._estimated: set[int] = set()  # batches whose finite-difference error has been estimated

    def _rng(self, index: int) -> FixedRNG:
        while len(self._rngs) <= index:
            self._rngs.append(FixedRNG(self.layout.device))
        return self._rngs[index]

    def _engine(self, index: int, fn: Callable[..., Any]) -> LossHVP:
        check = not self._checked  # one batch that reaches the params is enough
        self._checked = True
        engine = LossHVP(
            fn,
            self.params,
            self.pack,
            self.method,
            rng=self._rng(index),
            fd_step=self.fd_step,
            check=check,
            auto=self.auto,
        )
        engine.estimate_fd_error = index not in self._estimated
        return engine

    def _engines(self) -> Iterable[tuple[LossHVP, float]]:
        if self.single:
            if self._cached is None:
                self._cached = [(self._engine(i, fn), w) for i, (fn, w) in enumerate(self.batches())]
            return self._cached
        return ((self._engine(i, fn), w) for i, (fn, w) in enumerate(self.batches()))

    @property
    def engine(self) -> str:
        """The engine in use (after any fallback)."""
        if self._cached:
            return self._cached[0][0].method
        return self.method

    @property
    def fd_error(self) -> float | None:
        """The largest estimated relative error of the finite-difference products so far (``None``: none ran)."""
        return self._fd_error

    def apply(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-parameter ``[K, *shape]`` probes -> per-parameter ``H v``; ``probe_batch`` probes at a time."""
        k = vs[0].shape[0]
        self.num_matvecs += k
        out: list[torch.Tensor] | None = None
        total = 0.0
        for index, (engine, weight) in enumerate(self._engines()):
            total += weight
            parts = [engine([v[s : s + self.probe_batch] for v in vs]) for s in range(0, k, self.probe_batch)]
            hv = [torch.cat(chunks) if len(chunks) > 1 else chunks[0] for chunks in zip(*parts, strict=True)]
            if out is None:
                out = [h if weight == 1.0 else h * weight for h in hv]
            else:
                for o, h in zip(out, hv, strict=True):
                    o.add_(h, alpha=weight)
            if engine.fd_error is not None:
                self._estimated.add(index)
                self._fd_error = engine.fd_error if self._fd_error is None else max(self._fd_error, engine.fd_error)
            if not self.single:
                self.method = engine.method  # keep a fallback for the next batch
        if out is None or total == 0.0:
            raise ValueError("regops: no data: the batches were empty")
        return [o.div_(total) for o in out] if total != 1.0 else out

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``[K, N] -> [K, N]`` in the layout's dtype."""
        return self.layout.cat(self.apply(self.layout.split(v)))
