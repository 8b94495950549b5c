"""Public per-example gradient norms: the ``per_sample_grad_norms`` block and ``per_sample_squared_norms``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from regops.per_example._recorder import _Recorder, check_reduction


class PerSampleGradNorms:
    """Context manager recording per-example gradient norms of ``model`` during the forward and backward
    passes inside it (one batch, or several micro-batches: gradient accumulation).

    Use `per_sample_grad_norms` to create it. After the backward, with ``N`` the number of examples of
    all the forwards of the block, in order:

    * ``total``: ``[N]`` float32, ``||grad_theta loss_n||_2`` over all trainable parameters;
    * ``per_param``: ``{parameter name: [N]}`` per-example norms of each parameter's gradient;
    * ``per_param_sq``: the same, squared;
    * ``per_module``: ``{module name: [N]}`` over the parameters each module holds;
    * ``micro_batch_sizes``: the batch size of each forward.

    Args:
        model: the model whose trainable parameters are tracked.
        loss_reduction: ``"sum"`` or ``"mean"`` (required).
        forms: ``"auto"``, ``"ghost"``, ``"instantiate"`` or ``{module name: form}``.
        unsupported: ``"error"`` or ``"vmap"``.
        retain_signals: keep the recorded signals for `clip_per_sample_`.
        batch_dim: 0, or 1 for sequence-first models.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> with regops.per_sample_grad_norms(model, loss_reduction="sum") as norms:
        ...     model(torch.randn(3, 4)).sum().backward()
        >>> isinstance(norms, regops.PerSampleGradNorms), norms.micro_batch_sizes
        (True, [3])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str | None = None,
        *,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
        retain_signals: bool = False,
        batch_dim: int = 0,
    ) -> None:
        self.loss_reduction = check_reduction(loss_reduction)
        self._rec = _Recorder(
            model, forms=forms, unsupported=unsupported, retain_signals=retain_signals, batch_dim=batch_dim
        )
        self._params = dict(self._rec.params)
        self._received: set[str] = set()
        self._post_handles: list[Any] = []
        self._used = False

    def __enter__(self) -> PerSampleGradNorms:
        if self._used:
            raise RuntimeError("regops: a PerSampleGradNorms block can be entered once; create a new one per batch")
        self._used = True
        # With signals kept (clipping follows), the block's own gradient is set apart from what p.grad held
        # before, so that clipping can replace the one and keep the other.
        self._grad_before: dict[str, torch.Tensor] = {}
        if self._rec.retain_signals:
            for name, p in self._params.items():
                if p.grad is not None:
                    self._grad_before[name] = p.grad
                    p.grad = None
        for name, p in self._params.items():
            self._post_handles.append(p.register_post_accumulate_grad_hook(self._received_hook(name)))
        self._rec.attach()
        return self

    def _received_hook(self, name: str) -> Callable:
        def hook(p):
            self._received.add(name)

        return hook

    def __exit__(self, *exc) -> None:
        self._rec.detach_forward()
        for h in self._post_handles:
            h.remove()
        self._post_handles.clear()
        for name, prev in self._grad_before.items():
            p = self._params[name]
            p.grad = prev if p.grad is None else prev + p.grad
        if not self._rec.retain_signals:
            # Later backward passes through this graph are not ours; free the saved activations.
            self._rec.enabled = False
            for call in self._rec.calls:
                call.saved = None

    # -- results
    @property
    def micro_batch_sizes(self) -> list[int]:
        """The batch size of each forward of the block, in order."""
        sizes = [mb.batch for mb in self._rec.mbs if mb.batch is not None]
        if not sizes:
            raise RuntimeError(
                "regops: no forward pass of a tracked parameter was recorded; run the model's forward (and the "
                "backward) inside the `with regops.per_sample_grad_norms(model, ...) as norms:` block"
            )
        return sizes

    @property
    def batch_size(self) -> int:
        """Number of examples recorded (all micro-batches)."""
        return sum(self.micro_batch_sizes)

    @property
    def per_param_sq(self) -> dict[str, torch.Tensor]:
        """``{parameter name: [N]}`` squared per-example gradient norms (float32; float64 models: float64)."""
        per_mb = self._rec.squared_norms()
        seen = {n for sq in per_mb for n in sq}
        missing = sorted(n for n in self._received if n not in seen)
        if missing:
            raise RuntimeError(
                f"regops: parameters {missing} received gradients through a use regops did not see (outside the "
                "block's forward, or through an autograd.Function); per-example norms would be wrong"
            )
        sizes = self.micro_batch_sizes
        if self._rec.calls and all(not c.fired for c in self._rec.calls):
            raise RuntimeError("regops: no backward pass reached the tracked layers inside the block")
        out = {}
        mbs = [(mb, sq) for mb, sq in zip(self._rec.mbs, per_mb, strict=True) if mb.batch is not None]
        for name, p in self._params.items():
            parts = []
            for mb, sq in mbs:
                v = sq.get(name)
                if v is None:
                    v = torch.zeros(mb.batch, dtype=_norm_dtype(p), device=p.device)
                elif self.loss_reduction == "mean":
                    v = v * float(mb.batch * mb.batch)
                parts.append(v)
            out[name] = parts[0] if len(parts) == 1 else torch.cat([v.to(parts[0]) for v in parts])
        del sizes
        return out

    @property
    def per_param(self) -> dict[str, torch.Tensor]:
        """``{parameter name: [N]}`` per-example gradient norms."""
        return {k: v.sqrt() for k, v in self.per_param_sq.items()}

    def module_groups(self) -> dict[str, list[str]]:
        """``{module name: [parameter names it holds]}`` for the modules holding trainable parameters."""
        groups: dict[str, list[str]] = {}
        for name, p in self._params.items():
            groups.setdefault(self._rec.owner.get(id(p), ""), []).append(name)
        return groups

    @property
    def per_module(self) -> dict[str, torch.Tensor]:
        """``{module name: [N]}`` per-example norms of the gradient of the parameters each module holds."""
        sq = self.per_param_sq
        return {m: torch.stack([sq[n] for n in names]).sum(0).sqrt() for m, names in self.module_groups().items()}

    @property
    def total(self) -> torch.Tensor:
        """``[N]`` per-example gradient norms over all tracked parameters."""
        sq = self.per_param_sq
        if not sq:
            return torch.zeros(self.batch_size)
        dev = next(iter(sq.values())).device
        return torch.stack([v.to(dev) for v in sq.values()]).sum(0).sqrt()


def _norm_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def per_sample_grad_norms(
    model: nn.Module,
    loss_reduction: str | None = None,
    *,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    retain_signals: bool = False,
    batch_dim: int = 0,
) -> PerSampleGradNorms:
    r"""Per-example gradient norms of ``model``'s trainable parameters, from the ordinary backward pass.

    Run the forward and the backward inside the block; ``p.grad`` receives the ordinary gradient as usual,
    and the returned object then holds, for each example ``n``,

    .. math:: \text{total}_n = \Big\|\nabla_\theta \ell_n\Big\|_2,\qquad
              \text{per\_param}[k]_n = \big\|\nabla_{\theta_k} \ell_n\big\|_2 ,

    where each forward's loss is ``\sum_n \ell_n`` (``loss_reduction="sum"``) or
    ``\frac1B \sum_n \ell_n`` (``"mean"``, ``B`` that forward's batch size). Several forward+backward
    pairs in one block (gradient accumulation) give the norms of all their examples, in order. Norms are
    float32 tensors (float64 for a float64 model); low-precision activations (bf16/fp16, autocast with the
    backward inside or outside it) are accumulated in float32.

    Args:
        model: any model whose examples are independent. Parameters of Linear, Conv1d/2d/3d, Embedding,
            LayerNorm, GroupNorm, RMSNorm, BatchNorm (eval mode), Hugging Face Conv1D and registered rules
            (`regops.per_example.register_rule`) are handled by their rule; every other use of a trainable
            parameter (``F.linear(h, emb.weight)``, ``x @ W.T``, ``weight * h``, ``nn.MultiheadAttention``,
            ``cls_token.expand(B, ...)``) is seen op by op and handled exactly, or raises naming the
            parameter. A parameter used several times (tied or reused weights) gets the norm of its summed
            per-example gradient. Frozen parameters are skipped. Batch statistics (BatchNorm in train mode)
            raise.
        loss_reduction: required: how the loss combines the examples, ``"sum"`` or ``"mean"``.
        forms: ``"auto"`` (per layer by cost: ghost iff ``2 T^2 <= p d``), ``"ghost"``, ``"instantiate"``,
            or a dict ``{module name: form}``.
        unsupported: ``"error"`` (default): a module without a rule is handled op by op (above) and an op
            regops cannot attribute raises; ``"vmap"``: such a module's own parameters get per-example
            gradients from ``torch.func`` (exact when it treats examples independently; costs ``B x`` its
            parameter count in memory).
        retain_signals: keep the layer inputs and output gradients after the backward, as needed by
            `clip_per_sample_`.
        batch_dim: ``0`` (batch first) or ``1`` for sequence-first models (``[T, B, ...]`` activations, as
            ``nn.Transformer(batch_first=False)``): the batch dim of every 3+-D activation; 2-D activations
            (``[B, d]``) and convolution inputs keep the batch first.

    Returns:
        A context manager (`PerSampleGradNorms`); after the backward, ``norms.total`` is the ``[N]``
        float32 norm of each example's gradient, ``norms.per_param`` and ``norms.per_module`` the same per
        parameter and per module.

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        >>> with regops.per_sample_grad_norms(model, loss_reduction="mean") as norms:
        ...     loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> norms.total.shape
        torch.Size([16])
        >>> norms.per_param["0.weight"].shape
        torch.Size([16])
    """
    return PerSampleGradNorms(
        model,
        loss_reduction,
        forms=forms,
        unsupported=unsupported,
        retain_signals=retain_signals,
        batch_dim=batch_dim,
    )


# --------------------------------------------------------------------------------------------- reusable core
def per_sample_squared_norms(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    signals: Callable[[torch.Tensor], Iterable[torch.Tensor]] | Iterable[torch.Tensor],
    *,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
) -> list[dict[str, torch.Tensor]]:
    r"""Per-example squared gradient norms of pseudo-losses ``<output_n, s_n>``: one forward, a backward each.

    Runs ``output = forward()`` once with the recorder attached, then for every signal ``s`` (same shape as
    ``output``; from ``signals(output)`` if a callable) computes, without touching ``p.grad`` and without
    computing any parameter gradient,

    .. math:: r_s[k]_n = \Big\|\frac{\partial\langle \mathrm{output}_n, s_n\rangle}{\partial\theta_k}\Big\|^2

    for every tracked parameter name ``k`` and example ``n`` (float32 ``[B]``). It shares its recorder with
    :func:`per_sample_grad_norms`; the exact Gauss-Newton trace, for one, is
    ``sum_c sum_k r_{s_c}[k]`` with ``s_c = `` the columns of a square root of the loss Hessian.

    Example::

        >>> from regops.grad_norms import per_sample_squared_norms
        >>> model, x = torch.nn.Sequential(torch.nn.Linear(4, 10)), torch.randn(8, 4)
        >>> eye = torch.eye(10)  # one pseudo-loss per output coordinate c: <output_n, e_c>
        >>> sq = per_sample_squared_norms(model, lambda: model(x), lambda o: [eye[c].expand_as(o) for c in range(10)])
        >>> sq[3]["0.weight"].shape  # ||d output_n[3] / d weight||^2 per example
        torch.Size([8])
    """
    rec = _Recorder(model, forms=forms, unsupported=unsupported, hook_outputs=False)
    rec.attach()
    try:
        output = forward()
    finally:
        rec.detach_forward()
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"regops: forward() must return a tensor, got {type(output).__name__}")
    watched = list(rec.watched)
    names = list(rec.params)
    params = dict(rec.params)
    results = []
    try:
        for s in signals(output) if callable(signals) else signals:
            rec.reset()
            if watched:
                taps = [t for t, _ in watched]
                grads = torch.autograd.grad(output, taps, s, retain_graph=True, allow_unused=True)
                for (_, callback), g in zip(watched, grads, strict=True):
                    if g is not None:
                        callback(rec, g)
            per_mb = rec.squared_norms()
            sq = per_mb[-1] if per_mb else {}
            b = (rec.mbs[-1].batch if rec.mbs else None) or output.shape[0]
            results.append({n: sq.get(n, torch.zeros(b, dtype=torch.float32, device=params[n].device)) for n in names})
    finally:
        rec.close()
        rec.watched.clear()
    return results
