"""The hessian family's public functions: stochastic trace and diagonal estimates of a loss Hessian (Hutchinson,
Hutch++, XTrace), the Philox probes they use, a differentiable trace penalty, the exact curvature of a softmax
cross-entropy head; with the exact Gauss-Newton curvature (:func:`ggn_trace`, :func:`ggn_diagonal`), the Hessian as
a linear operator (:class:`HessianLinearOperator`) and the twice-differentiable context (:func:`twice_differentiable`).

Each validates its arguments and runs the estimator engines: probes and their fused accumulation are the
operators of :mod:`regops.hessian.ops`; FSDP2-sharded parameters go to :mod:`regops.hessian.dtensor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from regops._core import validate
from regops._core.dtypes import acc_dtype
from regops._core.validate import is_dtensor
from regops.hessian import _hutchinson, _probes, _sketch
from regops.hessian import reference as ref
from regops.hessian._context import twice_differentiable
from regops.hessian._ggn import ggn_diagonal, ggn_trace
from regops.hessian._hvp import HVP_METHODS, NOT_A_FUNCTION_OF_PARAMS, LossHVP, check_loss
from regops.hessian._inputs import DEFAULT_PROBE_BATCH, _check_params, _fd_step, _operator, _resolve, _user_probes
from regops.hessian._linop import HessianLinearOperator
from regops.hessian._probes import ParamLayout
from regops.hessian._results import DiagonalEstimate, TraceEstimate, diagonal_stats, groups_of, mean_stderr

__all__ = [
    "DiagonalEstimate",
    "HessianLinearOperator",
    "TraceEstimate",
    "diagonal",
    "ggn_diagonal",
    "ggn_trace",
    "linear_head_diagonal",
    "linear_head_trace",
    "probes",
    "trace",
    "trace_penalty",
    "twice_differentiable",
]

METHODS = ("hutchinson", "hutch++", "xtrace")


def _dtensor():
    """The FSDP2 path (imported on first use: importing it imports torch.distributed.tensor)."""
    from regops.hessian import dtensor

    return dtensor


def _check_common(num_probes, method, distribution, probe_batch, tol, hvp) -> int:
    if isinstance(num_probes, bool) or not isinstance(num_probes, int):
        raise TypeError(f"regops: num_probes must be an int, got {type(num_probes).__name__}")
    if num_probes < 1:
        raise ValueError(f"regops: num_probes must be >= 1, got {num_probes}")
    if method not in METHODS:
        raise ValueError(f"regops: method must be one of {METHODS}, got {method!r}")
    if distribution not in ref.DISTRIBUTIONS:
        raise ValueError(f"regops: distribution must be one of {ref.DISTRIBUTIONS}, got {distribution!r}")
    if hvp not in HVP_METHODS:
        raise ValueError(f"regops: hvp must be one of {HVP_METHODS}, got {hvp!r}")
    if probe_batch is None:
        # Finite differences run one probe at a time anyway: draw each from the seed when it is needed, so memory
        # holds one probe (and two gradients), not a block of them.
        probe_batch = 1 if hvp == "finite_difference" else min(num_probes, DEFAULT_PROBE_BATCH)
    if isinstance(probe_batch, bool) or not isinstance(probe_batch, int) or probe_batch < 1:
        raise ValueError(f"regops: probe_batch must be an int >= 1, got {probe_batch!r}")
    if tol is not None and (not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"regops: tol must be a positive number (relative standard error) or None, got {tol!r}")
    return probe_batch


def trace(
    loss_fn: Callable[..., torch.Tensor] | nn.Module,
    params: Any = None,
    *data: Any,
    num_probes: int = 100,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    probe_batch: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    by: str | None = None,
    hvp: str = "auto",
    progress: bool = False,
    distributed: bool = False,
    group: Any = None,
    probes: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    fd_eps: float | None = None,
) -> TraceEstimate | dict[str, TraceEstimate]:
    r"""Estimate the trace of the Hessian of a scalar loss with respect to ``params``.

    .. math:: \operatorname{tr}(H) \approx \frac{1}{m} \sum_{k=1}^{m} v_k^\top H v_k, \qquad
              \mathbb{E}[v v^\top] = I

    Forms:

    * ``trace(loss_fn, params)``: ``params`` is a tensor, a list/tuple or dict of tensors, or a module.
      ``loss_fn(params)`` returns the scalar loss from the tensors it is given (same container: needed for
      ``hvp="forward_over_reverse"``) or ``loss_fn()`` computes it from the tensors it closes over.
    * ``trace(model, criterion, inputs, targets)``: the loss ``criterion(model(inputs), targets)``.
    * ``trace(model, criterion, loader)``: the Hessian of the dataset loss, averaged over the batches
      ``(inputs, targets)`` the loader yields, weighted by batch size (as PyHessian does; the same probes for
      every batch). Model mode is left as it is (PyHessian forces ``eval()``).

    In every form the Hessian is taken with respect to the tensors that require grad; frozen ones
    (``requires_grad=False``) are left out (and still passed, unchanged, to a functional ``loss_fn``). A loss
    that reaches none of them raises ``ValueError``. Parameters of different dtypes keep their own precision
    (each dtype's products are accumulated in float32, float64 for float64). Attention models need no setup:
    the forwards run with ``scaled_dot_product_attention`` on its math backend (the fused kernels have no double
    backward). In train mode, dropout is held at one fixed mask (the one the first forward draws) for every
    probe and every engine: the estimate is the Hessian of the loss at that mask (docs/hessian.md).

    Args:
        loss_fn: a function ``loss_fn(params)`` (or ``loss_fn()``) returning the scalar loss, or a model (see
            Forms).
        params: the parameters of the functional form (a tensor, a list/tuple or dict of tensors, or a module),
            or the criterion of the model form.
        *data: the model form's ``inputs, targets``, or one loader of ``(inputs, targets)`` batches.
        num_probes: Hessian-vector products to spend (the budget for every method; >= 1).
        method: ``"hutchinson"``; ``"hutch++"`` (a third of the budget sketches the dominant subspace, exact
            there; error O(1/m) instead of O(1/sqrt(m)) when a few eigenvalues dominate); ``"xtrace"``
            (Hutch++ that reuses every probe for both roles, leaving each out in turn; ``num_probes >= 4``). Both
            take any ``num_probes`` and spend at most ``2 N`` products on ``N`` parameters (a sketch of ``N``
            probes spans everything: the trace is then exact); ``probe_cap`` in the result records the cap.
        distribution: ``"rademacher"`` (lowest variance for Hutchinson) or ``"gaussian"``; probes come from the
            Philox stream (`regops.hessian.reference`), reproducible from ``generator``'s state.
        probe_batch: probes per batched Hessian-vector product (memory ~ ``probe_batch`` x one backward);
            default ``min(num_probes, 16)``, and 1 for ``hvp="finite_difference"`` (each probe is regenerated from
            the seed when its two gradients are computed).
        tol: stop once the relative standard error ``stderr / |value|`` falls below ``tol`` (Hutchinson only;
            checked after every ``probe_batch`` probes, at least two). If ``num_probes`` run out first, a
            ``RuntimeWarning`` gives the error reached and about how many probes the tol needs.
        generator: a ``torch.Generator`` on the parameters' device type; default torch's default generator.
        by: ``None`` (one estimate), ``"param"`` or ``"module"``: a dict of estimates of the traces of the
            diagonal blocks of ``H`` per parameter / per module (the parameters whose names share a prefix
            before the last dot); they sum to the whole trace. Hutchinson only.
        hvp: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"``, ``"loop"`` or ``"finite_difference"``
            (vmap failures fall back with a warning; ``"auto"`` falls back to
            finite differences, with a warning, when the model has no double backward). For a model under FSDP2
            (``fully_shard``), ``"auto"`` and ``"finite_difference"`` run central differences of FSDP2's own
            sharded gradients (no rank holds more than its shards and the modules FSDP2 gathers); the other three
            compute exact products on *all-gathered* parameters (every rank holds the whole model: see
            `regops.hessian.dtensor`).
        progress: show a tqdm progress bar with the running relative standard error.
        distributed: split the probes across the ranks of ``group`` (every rank passes the same arguments and
            its share of nothing else: the same data gives the same Hessian); the seed is broadcast from rank 0
            and the results are combined with one all-reduce (one per round with ``tol``). Every rank returns
            the estimate a single process would compute with the same seed (in train mode, each rank's dropout
            masks come from its own generators). Hutchinson only.
        probes: your own probes instead of Philox ones (Hutchinson only; ``num_probes``, ``distribution`` and
            ``generator`` are then unused): a ``[K, N]`` tensor over the trainable params flattened and
            concatenated in order, or one ``[K, *p.shape]`` tensor per trainable param (a dict by name or a
            sequence). The estimate is unbiased for any probes with ``E[v v^T] = I``.
        fd_eps: the step ``h`` of ``hvp="finite_difference"`` (default ``eps^(1/3)`` of the params' dtype:
            4.9e-3 in float32, 6.1e-6 in float64; the bias is ``O(h^2)``, docs/hessian.md).

    Returns:
        `TraceEstimate` (``value``, ``stderr``, ``num_matvecs``, ``engine``, ``probe_cap``, ``fd_error``)
        or a dict of them (``by``).

    Example::

        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
        >>> x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
        >>> est = regops.hessian.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=200, tol=0.1)
        >>> est.value > 0, est.stderr < abs(est.value), est.num_matvecs <= 200  # stops once under tol
        (True, True, True)
    """
    problem = _resolve(loss_fn, params, data)
    supplied = None
    if probes is not None:
        if method != "hutchinson" or distributed:
            raise ValueError("regops: probes= needs method='hutchinson' and distributed=False")
        supplied = _user_probes(probes, problem)
        num_probes = supplied.shape[0]
    probe_batch = _check_common(num_probes, method, distribution, probe_batch, tol, hvp)
    if by not in (None, "param", "module"):
        raise ValueError(f"regops: by must be None, 'param' or 'module', got {by!r}")
    if method != "hutchinson" and (by is not None or distributed or tol is not None):
        raise ValueError(f"regops: by, tol and distributed need method='hutchinson' (got method={method!r})")
    if is_dtensor(*problem.params):  # FSDP2
        args = (loss_fn, problem, num_probes, method, distribution, probe_batch, tol, generator, by, hvp, distributed)
        return _dtensor().trace(*args, supplied, _fd_step(fd_eps))
    op = _operator(problem, hvp, probe_batch, fd_eps)
    layout = problem.layout
    if method in ("hutch++", "xtrace"):
        sketch = _sketch.hutchpp if method == "hutch++" else _sketch.xtrace
        value, err, samples = sketch(op, layout, num_probes, distribution, generator)
        cap = _sketch.probe_cap(layout)
        return TraceEstimate(value, err, op.num_matvecs, method, samples, op.engine, cap, op.fd_error)
    dist_ = _hutchinson.Dist.of(distributed, group)
    state = _hutchinson.run(
        op,
        layout,
        num_probes,
        distribution,
        generator,
        tol,
        _hutchinson.trace_rel_stderr,
        dist_,
        progress,
        "hessian trace",
        False,
        supplied,
    )
    matvecs = state.count
    _hutchinson.warn_tol(tol, _hutchinson.trace_rel_stderr(state), state.count, "trace")
    if by is None:
        samples = state.dots.sum(1)
        mean, err = mean_stderr(samples)
        return TraceEstimate(mean, err, matvecs, "hutchinson", samples, op.engine, None, op.fd_error)
    out = {}
    for key, idx in groups_of(problem.names, by).items():
        samples = state.dots[:, idx].sum(1)
        mean, err = mean_stderr(samples)
        out[key] = TraceEstimate(mean, err, matvecs, "hutchinson", samples, op.engine, None, op.fd_error)
    return out


def diagonal(
    loss_fn: Callable[..., torch.Tensor] | nn.Module,
    params: Any = None,
    *data: Any,
    num_probes: int = 100,
    distribution: str = "rademacher",
    probe_batch: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    hvp: str = "auto",
    progress: bool = False,
    distributed: bool = False,
    group: Any = None,
    probes: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    fd_eps: float | None = None,
) -> DiagonalEstimate:
    r"""Hutchinson estimate of the Hessian diagonal, one tensor per parameter.

    .. math:: \operatorname{diag}(H) \approx \frac{1}{m} \sum_k v_k \odot H v_k

    Unbiased for Rademacher and Gaussian probes alike (``E[v_i v_j] = delta_ij``); Rademacher has lower
    variance (``v_i^2 = 1``: the error comes only from off-diagonal entries). The products ``v * Hv`` and their
    per-probe inner products are accumulated in one fused pass over all parameters (``regops::hessian_probe_dot``).

    Forms, ``num_probes``, ``distribution``, ``probe_batch``, ``generator``, ``hvp``, ``progress``,
    ``distributed``, ``probes``, ``fd_eps``, frozen params, dtypes, attention and dropout: as `trace`.
    ``tol``: stop when ``||stderr|| / ||diag||`` falls below it.

    Returns:
        `DiagonalEstimate`: ``value`` and per-coordinate ``stderr`` shaped like the parameters (a dict
        keyed by name of the trainable params for dict params or a model; else a tuple in the order of
        ``params``, ``None`` at frozen entries), ``num_matvecs``, and the Hutchinson ``trace`` of the same
        probes.

    Args:
        loss_fn: a model (then ``params`` is the criterion and ``data`` the inputs and targets) or a function
            ``loss_fn(params) -> scalar``, as `trace`.
        params: the criterion (model form) or the parameters (a tensor, a sequence or a dict of tensors).
        *data: the model form's inputs and targets, or a ``DataLoader`` of batches.
        num_probes: probes to spend (>= 1).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        probe_batch: probes per batched Hessian-vector product, as `trace`.
        tol: stop once ``||stderr|| / ||diag||`` falls below it.
        generator: a ``torch.Generator`` on the parameters' device type; default torch's default generator.
        hvp: the Hessian-vector product engine, as `trace`.
        progress: show a tqdm progress bar.
        distributed: split the probes across the ranks of ``group``, as `trace`.
        group: the process group of ``distributed``; default the world.
        probes: your own probes, as `trace`.
        fd_eps: the step of ``hvp="finite_difference"``, as `trace`.

    Example::

        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> est = regops.hessian.diagonal(lambda p: (p[0] ** 4).sum(), [w], num_probes=50)
        >>> est.value[0]  # 12 * w**2: exact here, as H is diagonal
        tensor([12., 48.])
    """
    problem = _resolve(loss_fn, params, data)
    supplied = None
    if probes is not None:
        if distributed:
            raise ValueError("regops: probes= needs distributed=False")
        supplied = _user_probes(probes, problem)
        num_probes = supplied.shape[0]
    probe_batch = _check_common(num_probes, "hutchinson", distribution, probe_batch, tol, hvp)
    if is_dtensor(*problem.params):  # FSDP2
        args = (loss_fn, problem, num_probes, distribution, probe_batch, tol, generator, hvp, distributed)
        return _dtensor().diagonal(*args, supplied, _fd_step(fd_eps))
    op = _operator(problem, hvp, probe_batch, fd_eps)
    layout = problem.layout
    dist_ = _hutchinson.Dist.of(distributed, group)
    state = _hutchinson.run(
        op,
        layout,
        num_probes,
        distribution,
        generator,
        tol,
        _hutchinson.diag_rel_stderr,
        dist_,
        progress,
        "hessian diagonal",
        True,
        supplied,
    )
    m = state.count
    _hutchinson.warn_tol(tol, _hutchinson.diag_rel_stderr(state), m, "diagonal")
    mean, err = diagonal_stats(state.diag, state.diag_sq, m)
    values = layout.split(mean[None].to(layout.dtype))
    errors = layout.split(err[None].to(layout.dtype))
    values = tuple(v[0] for v in values)
    errors = tuple(e[0] for e in errors)
    samples = state.dots.sum(1)
    t_mean, t_err = mean_stderr(samples)
    tr = TraceEstimate(t_mean, t_err, m, "hutchinson", samples, op.engine, None, op.fd_error)
    return DiagonalEstimate(problem.per_param(values), problem.per_param(errors), m, tr)


def probes(
    params: Any,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """The probes the estimators use: ``num_probes`` Philox probes per parameter, ``[num_probes, *p.shape]``.

    All parameters' probes are drawn in one kernel launch; the same generator state gives the same probes on
    every backend (the Triton kernel reproduces the reference bit for bit). Rademacher entries are +-1; Gaussian
    entries are standard normal (float32 Box-Muller, rounded to the parameter dtype). To reproduce an estimator's
    probes, pass the tensors it differentiates: a module gives its parameters that require grad, as the
    estimators take them; from a list, leave out the frozen ones yourself.

    Args:
        params: the tensors to draw probes for (a tensor, a sequence or dict of tensors, or a module).
        num_probes: ``K``, probes per parameter.
        distribution: ``"rademacher"`` (+-1) or ``"gaussian"``.
        generator: a ``torch.Generator`` on the parameters' device type; default torch's default generator.

    Returns:
        A tuple of tensors ``[num_probes, *p.shape]``, one per parameter, in the parameters' dtypes.

    Example::

        >>> g, w = torch.Generator().manual_seed(0), torch.zeros(3, 4)
        >>> (v,) = regops.hessian.probes([w], 8, generator=g)
        >>> v.shape, sorted(v.unique().tolist())  # [8, *w.shape], Rademacher
        (torch.Size([8, 3, 4]), [-1.0, 1.0])
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"regops: num_probes must be an int >= 1, got {num_probes!r}")
    ref.check_distribution(distribution)
    if isinstance(params, nn.Module):  # as the estimators: the parameters that require grad
        params = [p for p in params.parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not params or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in params):
        raise TypeError("regops: params must be a non-empty list of floating-point tensors")
    layout = ParamLayout.of([str(i) for i in range(len(params))], params)
    seed = _probes.draw_seed(layout, num_probes, distribution, generator)
    return layout.split(_probes.probe_rows(seed, 0, num_probes, layout, distribution))


def trace_penalty(
    loss: torch.Tensor,
    params: Any,
    num_probes: int = 1,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Differentiable Hutchinson estimate of ``tr(H)`` of ``loss`` w.r.t. ``params``, to add to a training loss.

    .. math:: P = \frac{1}{K} \sum_{k=1}^{K} v_k^\top \nabla^2 L\, v_k,\qquad \mathbb{E}[P] = \operatorname{tr}(H)

    The Hessian-vector products are built with ``create_graph=True`` and batched over the ``K`` probes, so
    ``P.backward()`` gives an unbiased estimate of ``grad tr(H)`` (a third derivative, through the fused
    ``regops::hessian_probe_dot``). Cost per step: about one extra forward+backward of the backward graph per
    probe batch. Probes are Philox probes from ``generator``. The loss is the one you computed, so dropout keeps
    that forward's mask; in an attention model compute it under `regops.hessian.twice_differentiable`
    (the fused attention kernels have no double backward).

    Args:
        loss: the scalar loss, computed with a graph from ``params``.
        params: the tensors the curvature is taken with respect to: a module or ``model.parameters()`` (frozen
            parameters left out, as in every estimator), or a tensor, list, tuple or dict of tensors that all
            require grad (one that does not raises: a penalty has no gradient to give it). A loss that reaches
            none of them raises.
        num_probes: probes ``K`` (1 is the usual per-step choice).

    Returns:
        A 0-dim tensor with a graph to ``params``.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
        >>> loss = torch.nn.functional.cross_entropy(model(x), y)
        >>> (loss + 1e-3 * regops.hessian.trace_penalty(loss, model)).backward()
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"regops: num_probes must be an int >= 1, got {num_probes!r}")
    ref.check_distribution(distribution)
    loss = check_loss(loss)
    _check_listed(params)
    spec = _check_params(params)
    if not loss.requires_grad:
        raise ValueError(NOT_A_FUNCTION_OF_PARAMS)
    layout = ParamLayout.of(spec.names, spec.tensors)
    seed = _probes.draw_seed(layout, num_probes, distribution, generator)
    vs = layout.split(_probes.probe_rows(seed, 0, num_probes, layout, distribution))
    engine = LossHVP(lambda: loss, spec.tensors, None, "double_backward", create_graph=True)
    try:
        hvs = engine(vs)
    except RuntimeError as exc:
        if "scaled_dot_product" in str(exc) or "attention" in str(exc):
            raise RuntimeError(
                f"regops: the loss's graph has no double backward ({str(exc).splitlines()[0][:160]}); compute the "
                "loss under `with regops.hessian.twice_differentiable():` (attention on its math backend)"
            ) from exc
        raise
    dots, _, _ = _probes.probe_dot(vs, hvs, with_diag=False)
    return dots.sum(1).mean().to(loss.dtype)


def _check_listed(params: Any) -> None:
    """Tensors listed one by one are the ones the penalty is meant for: a frozen one among them is a mistake
    (a module or ``model.parameters()`` leaves its frozen parameters out instead)."""
    if isinstance(params, torch.Tensor):
        named = [("params", params)]
    elif isinstance(params, Mapping):
        named = [(f"params[{k!r}]", v) for k, v in params.items()]
    elif isinstance(params, (list, tuple)) and not isinstance(params, nn.Module):
        named = [(f"params[{i}]", v) for i, v in enumerate(params)]
    else:
        return
    for name, t in named:
        if isinstance(t, torch.Tensor) and not t.requires_grad:
            raise ValueError(
                f"regops: {name} (shape {tuple(t.shape)}) does not require grad: trace_penalty differentiates the "
                "trace with respect to the tensors it is given, and this one would be silently left out. Call "
                "requires_grad_() on it, leave it out of params, or pass the module (or model.parameters()) to "
                "skip frozen parameters"
            )


def linear_head_diagonal(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Exact diagonal of the Hessian of ``cross_entropy(features @ weight.T + bias, targets)`` w.r.t. the head.

    The Hessian of softmax cross-entropy w.r.t. the logits is ``diag(p_i) - p_i p_i^T`` (independent of the
    targets, label smoothing included), and the logits are linear in ``(W, b)``, so (``w_i`` = 1/B for a mean)

    .. math:: \operatorname{diag}(H_W) = (P \odot (1-P))^\top \operatorname{diag}(w)\,(F \odot F),\qquad
              \operatorname{diag}(H_b) = \textstyle\sum_i w_i\, p_i \odot (1-p_i)

    one matrix product, no probes and no double backward. The result is differentiable (e.g. to align head
    Hessians across domains, as the Hessian-alignment penalty does) and gradients flow into ``features``,
    ``weight`` and ``bias``.

    Args:
        features: ``[*, d]`` head inputs (leading dimensions are examples), floating point.
        weight: ``[C, d]``.
        bias: ``[C]`` or ``None``.
        targets: ``[*]`` class indices; only needed to drop examples equal to ``ignore_index``.
        reduction: ``"mean"`` (over the kept examples, as ``F.cross_entropy``) or ``"sum"``.

    Returns:
        ``(diag_W [C, d], diag_b [C] or None)`` in float32 (float64 for float64 inputs).

    Example::

        >>> backbone, head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), torch.nn.Linear(16, 5)
        >>> feats = backbone(torch.randn(32, 8))  # [B, d]
        >>> dW, db = regops.hessian.linear_head_diagonal(feats, head.weight, head.bias)
        >>> head_trace = dW.sum() + db.sum()
        >>> dW.shape, db.shape
        (torch.Size([5, 16]), torch.Size([5]))
    """
    validate.floating(features, "features")
    validate.floating(weight, "weight")
    if weight.dim() != 2 or features.dim() < 1 or features.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"regops: features [*, d] and weight [C, d] must agree on d, got shapes {tuple(features.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias is not None:
        validate.floating(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"regops: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"regops: reduction must be 'mean' or 'sum', got {reduction!r}")
    feats = features.reshape(-1, features.shape[-1])
    logits = torch.nn.functional.linear(feats, weight, bias)
    keep = torch.ones(feats.shape[0], dtype=feats.dtype, device=feats.device)
    if targets is not None:
        validate.tensor(targets, "targets")
        if targets.numel() != feats.shape[0]:
            raise ValueError(
                f"regops: targets must have one class index per example ({feats.shape[0]}), got shape "
                f"{tuple(targets.shape)}"
            )
        keep = (targets.reshape(-1) != ignore_index).to(feats.dtype)
    weights = keep / keep.sum().clamp_min(1) if reduction == "mean" else keep
    # The Hessian of softmax cross-entropy w.r.t. the logits is diag(p) - p p^T: its diagonal is p (1 - p).
    acc = acc_dtype(feats, logits)
    p = torch.softmax(logits.to(acc), dim=-1)
    curv = p * (1.0 - p) * weights.to(acc)[:, None]
    h = feats.to(acc)
    return curv.T @ (h * h), (curv.sum(0) if bias is not None else None)


def linear_head_trace(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Exact trace of the head Hessian (the sum of `linear_head_diagonal`), a 0-dim tensor.

    Since ``sum_d h_d^2`` factors out, this is ``sum_i w_i (||h_i||^2 + [bias]) (1 - ||p_i||^2)``.

    Args:
        features: ``[*, d]`` head inputs (leading dimensions are examples), floating point.
        weight: ``[C, d]``.
        bias: ``[C]`` or ``None``.
        targets: ``[*]`` class indices; only needed to drop examples equal to ``ignore_index``.
        reduction: ``"mean"`` (over the kept examples, as ``F.cross_entropy``) or ``"sum"``.
        ignore_index: the target value of examples left out.

    Returns:
        0-dim tensor: the trace of the softmax cross-entropy Hessian with respect to ``weight`` and ``bias``.

    Example::

        >>> feats, head = torch.randn(32, 16), torch.nn.Linear(16, 5)
        >>> tr = regops.hessian.linear_head_trace(feats, head.weight, head.bias)
        >>> dW, db = regops.hessian.linear_head_diagonal(feats, head.weight, head.bias)
        >>> torch.allclose(tr, dW.sum() + db.sum())
        True
    """
    diag_w, diag_b = linear_head_diagonal(
        features, weight, bias, targets=targets, reduction=reduction, ignore_index=ignore_index
    )
    return diag_w.sum() + (diag_b.sum() if diag_b is not None else 0.0)
