r"""Exact and Monte-Carlo generalised Gauss-Newton (GGN) curvature of a classification or regression loss.

For a loss ``L = sum_n w ell(z_n, y_n)`` of model outputs ``z_n = f(x_n; theta)`` (``w = 1/B`` for a mean),

.. math:: G = w \sum_n J_n^\top \Lambda_n J_n, \qquad \Lambda_n = \nabla^2_{z} \ell(z_n, y_n) = S_n S_n^\top

(``J_n`` the Jacobian of ``z_n`` w.r.t. the parameters). ``G`` drops the second derivatives of the network from
the Hessian; for piecewise-linear networks (ReLU, max-pool) it *is* the Hessian almost everywhere. Its trace is
a sum of squared per-example gradient norms of ``C`` pseudo-losses ``<z_n, S_n[:, c]>``:

.. math:: \operatorname{tr} G = w \sum_{c=1}^{C} \sum_n \big\| J_n^\top S_n[:, c] \big\|^2

so it costs one forward and ``C`` backward passes through the per-example squared-norm machinery of the
grad-norms family (:func:`regops.grad_norms.per_sample_squared_norms`), which never materialises per-example
gradients. Factors: cross-entropy ``S_n[:, c] = sqrt(p_nc) (e_c - p_n)`` (``S S^T = diag p - p p^T``, whatever
the targets); squared error ``S = sqrt(2) I`` (``w = 1/(B D)`` for torch's element mean).

The Monte-Carlo version replaces ``S_n`` by one sampled column ``s_n`` with ``E[s_n s_n^T] = Lambda_n``: labels
drawn from the model's own softmax, ``s_n = p_n - e_{yhat_n}`` (Sophia-G / Gauss-Newton-Bartlett), or
``s_n = sqrt(2) xi_n`` with Gaussian ``xi_n`` for squared error. One backward pass, unbiased.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from regops._core.dtypes import acc_dtype

LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")
METHODS = ("exact", "mc")


def _check(model, inputs, targets, loss, reduction, method) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"regops: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"regops: inputs must be a tensor, got {type(inputs).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"regops: loss must be one of {LOSSES}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if method not in METHODS:
        raise ValueError(f"regops: method must be one of {METHODS}, got {method!r}")
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise TypeError(f"regops: targets must be a tensor or None, got {type(targets).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("regops: the model has no parameters that require grad")


def _output_check(out: object, loss: str, targets) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() < 1:
        raise ValueError("regops: the model must return a tensor whose dim 0 is the batch")
    if loss == "cross_entropy" and out.dim() != 2:
        raise ValueError(f"regops: loss='cross_entropy' needs logits of shape [B, C], got {tuple(out.shape)}")
    if targets is not None and targets.shape[0] != out.shape[0]:
        raise ValueError(
            f"regops: targets must have the batch size {out.shape[0]} in dim 0, got shape {tuple(targets.shape)}"
        )
    return out


def _weight(out: torch.Tensor, loss: str, reduction: str) -> float:
    if reduction == "sum":
        return 1.0
    return 1.0 / (out.numel() if loss == "mse" else out.shape[0])


def _exact_signals(out: torch.Tensor, loss: str) -> Iterator[torch.Tensor]:
    """Columns of the factor ``S_n`` of the loss Hessian, one ``[B, *]`` signal at a time."""
    z = out.detach()
    if loss == "cross_entropy":
        p = torch.softmax(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=-1)
        for c in range(z.shape[1]):
            e = torch.zeros_like(p)
            e[:, c] = 1.0
            yield (p[:, c : c + 1].sqrt() * (e - p)).to(z.dtype)
    else:
        flat = z.reshape(z.shape[0], -1)
        for d in range(flat.shape[1]):
            s = torch.zeros_like(flat)
            s[:, d] = 2.0**0.5
            yield s.reshape(z.shape)


def _mc_signal(out: torch.Tensor, loss: str, generator: torch.Generator | None) -> torch.Tensor:
    """One sampled column ``s_n`` with ``E[s_n s_n^T]`` = the loss Hessian w.r.t. ``z_n``."""
    z = out.detach()
    if loss == "cross_entropy":
        p = torch.softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
        where = generator.device if generator is not None else z.device
        labels = torch.multinomial(p.to(where), 1, generator=generator).to(z.device)
        return (p - F.one_hot(labels[:, 0], z.shape[1]).to(p.dtype)).to(z.dtype)
    where = generator.device if generator is not None else z.device
    xi = torch.randn(z.shape, generator=generator, dtype=torch.float64, device=where).to(z.device, z.dtype)
    return xi * 2.0**0.5


def _squared_norms(model, forward, signals, forms, unsupported):
    from regops.grad_norms import per_sample_squared_norms

    return per_sample_squared_norms(model, forward, signals, forms=forms, unsupported=unsupported)


def ggn_trace(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    *,
    method: str = "exact",
    by: str | None = None,
    generator: torch.Generator | None = None,
    forms: str | None = None,
    unsupported: str = "error",
) -> torch.Tensor | dict[str, torch.Tensor]:
    r"""Trace of the generalised Gauss-Newton matrix of ``loss(model(inputs), targets)``: exact, no probes.

    ``method="exact"``: one forward and ``C`` backward passes (``C`` = outputs per example), each turned into
    per-example squared gradient norms without per-example gradients (the identities of
    `regops.per_sample_grad_norms`). For ReLU networks this is the exact Hessian trace, which Hutchinson
    would need thousands of probes to reach to 1%. ``method="mc"``: one backward with labels sampled from the
    model (unbiased).

    Args:
        model: layers supported by `regops.per_sample_grad_norms` (Linear, Conv, Embedding, norms;
            ``unsupported="vmap"`` for others); examples must be independent (no BatchNorm in train mode).
        inputs: ``[B, ...]``; targets: class indices ``[B]`` / regression targets, or ``None`` (the GGN of
            these losses does not depend on the targets; they are only checked for shape).
        loss: ``"cross_entropy"`` (logits ``[B, C]``) or ``"mse"`` (any output ``[B, ...]``).
        reduction: ``"mean"`` (as torch: over examples for cross-entropy, over elements for MSE) or ``"sum"``.
        by: ``None`` or ``"param"`` (a dict ``{name: trace of that parameter's diagonal block}``).
        generator: for ``method="mc"``.

    Returns:
        A 0-dim float32 tensor (float64 for a float64 model), or a dict of them; detached (no graph, exact and
        Monte-Carlo alike). For a differentiable curvature term use `trace_penalty` or
        `linear_head_trace`.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
        >>> tr = regops.hessian.ggn_trace(model, x, y)  # exact, C backward passes
        >>> tr_mc = regops.hessian.ggn_trace(model, x, y, method="mc")  # one backward, unbiased
        >>> float(tr) > 0
        True
    """
    _check(model, inputs, targets, loss, reduction, method)
    if by not in (None, "param"):
        raise ValueError(f"regops: by must be None or 'param', got {by!r}")
    holder: dict[str, torch.Tensor] = {}

    def forward() -> torch.Tensor:
        holder["out"] = _output_check(model(inputs), loss, targets)
        return holder["out"]

    def signals(out: torch.Tensor):
        if method == "exact":
            yield from _exact_signals(out, loss)
        else:
            yield _mc_signal(out, loss, generator)

    results = _squared_norms(model, forward, signals, forms, unsupported)
    w = _weight(holder["out"], loss, reduction)
    per_param: dict[str, torch.Tensor] = {}
    for res in results:
        for name, sq in res.items():
            per_param[name] = per_param.get(name, 0.0) + sq.sum()
    # Detached: the per-example norm machinery gives these a graph, but not the derivative of tr G (that needs
    # third derivatives of the network); a value without a graph beats a wrong gradient.
    per_param = {n: (v * w).detach() for n, v in per_param.items()}
    if by == "param":
        return per_param
    return torch.stack(list(per_param.values())).sum()


def ggn_diagonal(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    *,
    method: str = "exact",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 64,
) -> dict[str, torch.Tensor]:
    r"""Diagonal of the generalised Gauss-Newton matrix, one tensor per trainable parameter.

    ``method="exact"``: ``w sum_c sum_n (J_n^T S_n[:, c])^2`` from per-example gradients of the ``C``
    pseudo-losses (``torch.func.vmap`` over examples, ``chunk_size`` examples at a time: memory
    ``chunk_size x`` the parameter count). ``method="mc"`` (Sophia-G, Gauss-Newton-Bartlett): one ordinary
    backward of the loss with labels sampled from the model, ``g``; the estimate is ``B * g * g`` for a mean
    over ``B`` examples (``g * g`` for a sum). Unbiased because the sampled labels make the per-example
    gradients independent with mean zero.

    Args: as `ggn_trace`; the model must treat examples independently.

    Returns:
        ``{parameter name: tensor shaped like the parameter}`` (float32, float64 for a float64 model), detached.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
        >>> d = regops.hessian.ggn_diagonal(model, x, y)
        >>> d["0.weight"].shape == model[0].weight.shape
        True
    """
    _check(model, inputs, targets, loss, reduction, method)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = acc_dtype(*params.values())
    if method == "mc":
        out = _output_check(model(inputs), loss, targets)
        s = _mc_signal(out, loss, generator)
        # <z, s> summed over the batch has gradient sum_n J_n^T s_n; its square is an unbiased estimate of
        # sum_n J_n^T Lambda_n J_n (the cross terms have mean zero).
        grads = torch.autograd.grad((out * s).sum(), list(params.values()), allow_unused=True)
        w = _weight(out, loss, reduction)
        return {
            n: (torch.zeros_like(p, dtype=acc) if g is None else (g.to(acc) ** 2 * w).detach())
            for (n, p), g in zip(params.items(), grads, strict=True)
        }
    from torch.func import functional_call, grad, vmap

    detached = {n: p.detach() for n, p in params.items()}
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        out = _output_check(model(inputs), loss, targets)
    w = _weight(out, loss, reduction)

    def pseudo(ps: dict[str, torch.Tensor], x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        z = functional_call(model, {**buffers, **ps}, (x.unsqueeze(0),))
        return (z[0] * s).sum()

    per_example = vmap(grad(pseudo), in_dims=(None, 0, 0), chunk_size=chunk_size)
    total = {n: torch.zeros_like(p, dtype=acc) for n, p in params.items()}
    for s in _exact_signals(out, loss):
        g = per_example(detached, inputs, s)
        for n in total:
            total[n] += (g[n].to(acc) ** 2).sum(0)
    return {n: (t * w).detach() for n, t in total.items()}
