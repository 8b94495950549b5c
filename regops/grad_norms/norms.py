"""Public per-example gradient norms: the ``per_sample_grad_norms`` block and ``per_sample_squared_norms``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from regops.grad_norms.recorder import _Recorder

LOSS_REDUCTIONS = ("sum", "mean")


# ----------------------------------------------------------------------------------------------- public API
class PerSampleGradNorms:
    """Context manager recording per-example gradient norms of ``model`` during one forward + backward.

    Use :func:`per_sample_grad_norms` to create it. After the backward:

    * ``total``: ``[B]`` float32, ``||grad_theta loss_n||_2`` over all trainable parameters;
    * ``per_param``: ``{parameter name: [B]}`` per-example norms of each parameter's gradient;
    * ``per_param_sq``: the same, squared;
    * ``per_module``: ``{module name: [B]}`` over each module's parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "sum",
        *,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
        retain_signals: bool = False,
    ) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"regops: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self._rec = _Recorder(model, forms=forms, unsupported=unsupported, retain_signals=retain_signals)
        self._params = {name: p for e in self._rec.entries for name, p in e.params.values()}
        self._received: set[str] = set()
        self._post_handles: list[Any] = []
        self._cache: dict[str, torch.Tensor] | None = None
        self._used = False

    def __enter__(self) -> PerSampleGradNorms:
        if self._used:
            raise RuntimeError("regops: a PerSampleGradNorms block can be entered once; create a new one per batch")
        self._used = True
        self._rec.attach()
        for name, p in self._params.items():
            self._post_handles.append(p.register_post_accumulate_grad_hook(self._received_hook(name)))
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
        if not self._rec.retain_signals:
            # Later backward passes through this graph are not ours; free the saved activations.
            self._rec.active = False
            for call in self._rec.calls:
                call.saved = None

    # -- results
    @property
    def batch_size(self) -> int:
        if self._rec.batch is None:
            raise RuntimeError(
                "regops: no forward pass of a tracked layer was recorded; run the model's forward (and the "
                "backward) inside the `with regops.per_sample_grad_norms(model) as norms:` block"
            )
        return self._rec.batch

    @property
    def per_param_sq(self) -> dict[str, torch.Tensor]:
        """``{parameter name: [B]}`` squared per-example gradient norms (float32; float64 models: float64)."""
        sq = self._rec.squared_norms()
        missing = sorted(n for n in self._received if n not in sq)
        if missing:
            raise RuntimeError(
                f"regops: parameters {missing} received gradients but their modules' forward was not "
                "called on this batch (a parameter used outside its module's forward, e.g. tied "
                "functionally, cannot be tracked); per-example norms would be wrong"
            )
        b = self.batch_size
        if not sq and self._rec.calls and all(not c.fired for c in self._rec.calls):
            raise RuntimeError("regops: no backward pass reached the tracked layers inside the block")
        scale = float(b * b) if self.loss_reduction == "mean" else 1.0
        out = {}
        for name, p in self._params.items():
            v = sq.get(name)
            if v is None:
                v = torch.zeros(b, dtype=torch.float32, device=p.device)
            out[name] = v * scale if scale != 1.0 else v
        return out

    @property
    def per_param(self) -> dict[str, torch.Tensor]:
        """``{parameter name: [B]}`` per-example gradient norms."""
        return {k: v.sqrt() for k, v in self.per_param_sq.items()}

    @property
    def per_module(self) -> dict[str, torch.Tensor]:
        """``{module name: [B]}`` per-example norms of the gradient of each tracked module's parameters."""
        sq = self.per_param_sq
        return {e.label: torch.stack([sq[n] for n, _ in e.params.values()]).sum(0).sqrt() for e in self._rec.entries}

    @property
    def total(self) -> torch.Tensor:
        """``[B]`` per-example gradient norms over all tracked parameters."""
        sq = self.per_param_sq
        devices = {v.device for v in sq.values()}
        dev = next(iter(devices))
        return torch.stack([v.to(dev) for v in sq.values()]).sum(0).sqrt()


def per_sample_grad_norms(
    model: nn.Module,
    loss_reduction: str = "sum",
    *,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    retain_signals: bool = False,
) -> PerSampleGradNorms:
    r"""Per-example gradient norms of ``model``'s trainable parameters, from the ordinary backward pass.

    Run the forward and the backward of one batch inside the block; ``p.grad`` receives the ordinary summed
    gradient as usual, and the returned object then holds, for each example ``n`` of the batch,

    .. math:: \text{total}_n = \Big\|\nabla_\theta \ell_n\Big\|_2,\qquad
              \text{per\_param}[k]_n = \big\|\nabla_{\theta_k} \ell_n\big\|_2 ,

    where the loss is :math:`\sum_n \ell_n` (``loss_reduction="sum"``) or :math:`\frac1B \sum_n \ell_n`
    (``"mean"``). Norms are float32 ``[B]`` tensors (float64 for a float64 model); low-precision activations
    (bf16/fp16, autocast) are accumulated in float32.

    Args:
        model: built from Linear (2-D or N-D inputs), Conv1d/2d/3d (any stride, padding, padding_mode,
            dilation, groups), Embedding (``padding_idx``; not ``scale_grad_by_freq``), LayerNorm, GroupNorm,
            RMSNorm, with or without biases, and parameter-free modules. Frozen parameters are skipped. Dim 0
            of every layer's input is the batch. A module or parameter used several times (weight tying, a
            layer applied twice) is handled exactly by summing its per-example gradients before the norm.
        loss_reduction: how the loss combines the examples, ``"sum"`` or ``"mean"`` (over dim 0).
        forms: ``"auto"`` (per layer by cost: ghost iff ``2 T^2 <= p d``), ``"ghost"``, ``"instantiate"``,
            or a dict ``{module name: form}``.
        unsupported: ``"error"`` (default) raises for a module of another type with trainable parameters;
            ``"vmap"`` computes that module's per-example gradients with ``torch.func`` (exact when the module
            treats examples independently; costs ``B x`` its parameter count in memory).
        retain_signals: keep the layer inputs and output gradients after the backward, as needed by
            :func:`clip_per_sample_`.

    Example::

        >>> with regops.per_sample_grad_norms(model, loss_reduction="mean") as norms:
        ...     loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> norms.total.shape          # torch.Size([B])
        >>> norms.per_param["0.weight"]
    """
    return PerSampleGradNorms(
        model, loss_reduction, forms=forms, unsupported=unsupported, retain_signals=retain_signals
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
        >>> eye = torch.eye(10)   # one pseudo-loss per output coordinate c: <output_n, e_c>
        >>> sq = per_sample_squared_norms(model, lambda: model(x), lambda o: [eye[c].expand_as(o) for c in range(10)])
        >>> sq[3]["fc.weight"].shape   # torch.Size([B]): ||d output_n[3] / d fc.weight||^2 per example
    """
    rec = _Recorder(model, forms=forms, unsupported=unsupported, hook_outputs=False)
    rec.attach()
    try:
        output = forward()
    finally:
        rec.detach_forward()
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"regops: forward() must return a tensor, got {type(output).__name__}")
    calls = [c for c in rec.calls if c.output is not None]
    names = [n for e in rec.entries for n, _ in e.params.values()]
    params = {n: p for e in rec.entries for n, p in e.params.values()}
    results = []
    try:
        for s in signals(output) if callable(signals) else signals:
            rec.reset()
            if calls:
                grads = torch.autograd.grad(output, [c.output for c in calls], s, retain_graph=True, allow_unused=True)
                for call, g in zip(calls, grads, strict=True):
                    if g is not None:
                        rec.contribute(call, g)
            sq = rec.squared_norms()
            b = rec.batch or output.shape[0]
            results.append({n: sq.get(n, torch.zeros(b, dtype=torch.float32, device=params[n].device)) for n in names})
    finally:
        rec.close()
        for c in rec.calls:
            c.output = None
    return results
