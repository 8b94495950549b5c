"""The regularized cross-entropy and its linear (LM-head) form: ops, autograd and the functional API.

``regops::cross_entropy`` computes, per row of ``[N, V]`` logits, cross-entropy against sparse targets (one
label, a mixed pair or a top-k teacher) with label smoothing, MaxSup, z-loss, a confidence penalty and the
decoupled-mixup term, plus per-row statistics, in one pass over the row (math: :mod:`regops.reference.losses`).
``regops::linear_cross_entropy`` does the same for ``hidden @ weight.T (+ bias)`` without ever holding more
than one block of logits; its backward recomputes each block. Everything that depends on the data stays on
the device (no ``.item()``, no ``nonzero``): the ops are CUDA-graph capturable and trace under
``torch.compile(fullgraph=True)``. Results do not depend on the launch: no atomics anywhere (deterministic).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from regops import _backend
from regops._core import validate as _validate
from regops.losses._class_dim import check_weight_dtype, classes_last
from regops.reference import losses as _ref

__all__ = ["LossStats", "cross_entropy", "linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")

_backend.register("cross_entropy", torch=_ref.cross_entropy, triton="regops.kernels.losses:cross_entropy")
_backend.register(
    "cross_entropy_backward",
    torch=_ref.cross_entropy_backward,
    triton="regops.kernels.losses:cross_entropy_backward",
)
_backend.register(
    "linear_cross_entropy",
    torch=_ref.linear_cross_entropy,
    triton="regops.kernels.losses:linear_cross_entropy",
)
_backend.register(
    "linear_cross_entropy_with_grad",
    torch=_ref.linear_cross_entropy_with_grad,
    triton="regops.kernels.losses:linear_cross_entropy_with_grad",
)
_backend.register(
    "linear_cross_entropy_backward",
    torch=_ref.linear_cross_entropy_backward,
    triton="regops.kernels.losses:linear_cross_entropy_backward",
)


# ============================================================================================== ops
def _ce_fake(logits, index, tweight, row_weight, class_weight, *args):
    n, acc = logits.shape[0], _ref.compute_dtype(logits.dtype)
    return (
        logits.new_empty(n, dtype=acc),
        logits.new_empty((n, _ref.N_STATS), dtype=acc),
        logits.new_empty(n, dtype=torch.long),
    )


@torch.library.custom_op("regops::cross_entropy", mutates_args=())
def _ce_op(
    logits: torch.Tensor,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    smoothing: float,
    maxsup: float,
    z_loss: float,
    confidence: float,
    decoupled: float,
    softcap: float,
    scale: float,
    want_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _backend.implementation("cross_entropy", logits.device)
    return fn(
        logits.contiguous(), index.contiguous(), tweight.contiguous(), row_weight.contiguous(),
        None if class_weight is None else class_weight.contiguous(),
        smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale, want_stats,
    )  # fmt: skip


_ce_op.register_fake(_ce_fake)


@torch.library.custom_op("regops::cross_entropy_backward", mutates_args=())
def _ce_backward_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    smoothing: float,
    maxsup: float,
    z_loss: float,
    confidence: float,
    decoupled: float,
    softcap: float,
    scale: float,
) -> torch.Tensor:
    fn = _backend.implementation("cross_entropy_backward", logits.device)
    return fn(
        grad.contiguous(), logits.contiguous(), index.contiguous(), tweight.contiguous(), row_weight.contiguous(),
        None if class_weight is None else class_weight.contiguous(), stats.contiguous(), argmax.contiguous(),
        smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale,
    )  # fmt: skip


@_ce_backward_op.register_fake
def _(grad, logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup(ctx, inputs, output) -> None:
    logits, index, tweight, row_weight, class_weight, *floats, _want = inputs
    _, stats, argmax = output
    ctx.mark_non_differentiable(stats, argmax)
    ctx.floats = floats
    ctx.has_cw = class_weight is not None
    saved = [logits, index, tweight, row_weight, stats, argmax] + ([class_weight] if ctx.has_cw else [])
    ctx.save_for_backward(*saved)


def _ce_bwd(ctx, grad_loss, _grad_stats, _grad_argmax):
    logits, index, tweight, row_weight, stats, argmax, *cw = ctx.saved_tensors
    class_weight = cw[0] if ctx.has_cw else None
    g = _ce_backward_op(grad_loss, logits, index, tweight, row_weight, class_weight, stats, argmax, *ctx.floats)
    return (g,) + (None,) * 12


_ce_op.register_autograd(_ce_bwd, setup_context=_ce_setup)


@torch.library.custom_op("regops::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    smoothing: float,
    maxsup: float,
    z_loss: float,
    confidence: float,
    decoupled: float,
    softcap: float,
    scale: float,
    want_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _backend.implementation("linear_cross_entropy", hidden.device)
    return fn(
        hidden.contiguous(), weight.contiguous(), bias, index.contiguous(), tweight.contiguous(),
        row_weight.contiguous(), class_weight,
        smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale, want_stats,
    )  # fmt: skip


@_lce_op.register_fake
def _(hidden, weight, bias, *args):
    return _ce_fake(hidden, *args)


@torch.library.custom_op("regops::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    smoothing: float,
    maxsup: float,
    z_loss: float,
    confidence: float,
    decoupled: float,
    softcap: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _backend.implementation("linear_cross_entropy_backward", hidden.device)
    return fn(
        grad.contiguous(), hidden.contiguous(), weight.contiguous(), bias, index.contiguous(), tweight.contiguous(),
        row_weight.contiguous(), class_weight, stats.contiguous(), argmax.contiguous(),
        smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale,
    )  # fmt: skip


@_lce_backward_op.register_fake
def _(grad, hidden, weight, bias, *args):
    v = weight.shape[0]
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty(v, dtype=bias.dtype if bias is not None else weight.dtype),
    )


def _lce_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, index, tweight, row_weight, class_weight, *floats, _want = inputs
    _, stats, argmax = output
    ctx.mark_non_differentiable(stats, argmax)
    ctx.floats = floats
    ctx.has_bias, ctx.has_cw = bias is not None, class_weight is not None
    saved = [hidden, weight, index, tweight, row_weight, stats, argmax]
    saved += ([bias] if ctx.has_bias else []) + ([class_weight] if ctx.has_cw else [])
    ctx.save_for_backward(*saved)


def _lce_bwd(ctx, grad_loss, _grad_stats, _grad_argmax):
    hidden, weight, index, tweight, row_weight, stats, argmax, *rest = ctx.saved_tensors
    bias = rest.pop(0) if ctx.has_bias else None
    class_weight = rest.pop(0) if ctx.has_cw else None
    dh, dw, db = _lce_backward_op(
        grad_loss, hidden, weight, bias, index, tweight, row_weight, class_weight, stats, argmax, *ctx.floats
    )
    return (dh, dw, db if ctx.has_bias else None) + (None,) * 12


_lce_op.register_autograd(_lce_bwd, setup_context=_lce_setup)


@torch.library.custom_op("regops::linear_cross_entropy_with_grad", mutates_args=())
def _lce_grad_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    smoothing: float,
    maxsup: float,
    z_loss: float,
    confidence: float,
    decoupled: float,
    softcap: float,
    scale: float,
    want_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _backend.implementation("linear_cross_entropy_with_grad", hidden.device)
    return fn(
        hidden.contiguous(), weight.contiguous(), bias, index.contiguous(), tweight.contiguous(),
        row_weight.contiguous(), class_weight,
        smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale, want_stats,
    )  # fmt: skip


@_lce_grad_op.register_fake
def _(hidden, weight, bias, *args):
    v = weight.shape[0]
    return (
        *_ce_fake(hidden, *args),
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty(v),
    )


def _lce_grad_setup(ctx, inputs, output) -> None:
    _, stats, argmax, d_hidden, d_weight, d_bias = output
    ctx.mark_non_differentiable(stats, argmax, d_hidden, d_weight, d_bias)
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(d_hidden, d_weight, d_bias)


def _lce_grad_bwd(ctx, grad_loss, *_unused):
    # Used only under "mean" / "sum": every row's upstream gradient is the same number, grad_loss[0].
    d_hidden, d_weight, d_bias = ctx.saved_tensors
    g = grad_loss.to(d_hidden.dtype)
    s = grad_loss[:1]
    dh = d_hidden * g.unsqueeze(1)
    dw = (d_weight * s.to(d_weight.dtype)).to(d_weight.dtype)
    db = (d_bias * s.to(d_bias.dtype)) if ctx.has_bias else None
    return (dh, dw, db) + (None,) * 12


_lce_grad_op.register_autograd(_lce_grad_bwd, setup_context=_lce_grad_setup)


# ============================================================================================== API
class LossStats(NamedTuple):
    """Per-row statistics of :func:`cross_entropy` (shape: the logits' leading shape; float32, float64 for
    float64 logits; computed in the loss's own pass, no gradient).

    ``loss``: the unreduced row loss; ``lse``: log-sum-exp of the (scaled, capped) logits; ``entropy``:
    ``H(softmax)``; ``el2n``: ``||softmax - onehot(y)||_2`` ("Deep Learning on a Data Diet"); ``max_prob``;
    ``argmax`` (int64); ``margin``: ``z_y - max_{c != y} z_c`` (``+inf`` for one class). ``y`` is the label
    (the first of a mixed pair, the first teacher index). Ignored rows: loss 0, el2n and margin 0.
    """

    loss: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    el2n: torch.Tensor
    max_prob: torch.Tensor
    argmax: torch.Tensor
    margin: torch.Tensor


def _number(value: Any, name: str, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not torch.compiler.is_compiling():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"regops: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value >= low and (high is None or value <= high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"regops: {name} must be {bound}, got {value}")
    return value


class _Targets(NamedTuple):
    index: torch.Tensor  # int64 [N, J], in range
    tweight: torch.Tensor  # [N, J]
    row_weight: torch.Tensor  # [N]
    class_weight: torch.Tensor | None
    denominator: torch.Tensor  # scalar: what "mean" divides by


def _check_range(index: torch.Tensor, ignored: torch.Tensor, n_classes: int, name: str) -> torch.Tensor:
    """Entries outside ``[0, V)`` that are not ignored: a ValueError on CPU; on other devices (no host sync)
    their rows get a NaN loss and NaN gradients, never a silent out-of-bounds read."""
    bad = ((index < 0) | (index >= n_classes)) & ~ignored
    if index.device.type == "cpu" and index.numel() and not torch.compiler.is_compiling() and bool(bad.any()):
        first = index[bad][0].item()
        raise ValueError(f"regops: {name} holds the class index {first}, outside [0, {n_classes}) and not ignore_index")
    return bad


def _prepare(
    lead: torch.Size,
    n_classes: int,
    device: torch.device,
    acc: torch.dtype,
    target: Any,
    mix: Any,
    ignore_index: int,
    weight: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    decoupled: float,
) -> _Targets:
    n = lead.numel()
    if mix is not None:
        from regops.mix import MixedBatch

        if not isinstance(mix, MixedBatch):
            raise TypeError(f"regops: mix must be the MixedBatch returned by mix_batch, got {type(mix).__name__}")
        if target is not None:
            raise ValueError("regops: pass either target or mix (whose labels are the targets), not both")
        if mix.target_a.numel() != n:
            raise ValueError(f"regops: the logits have {n} rows but mix has {mix.target_a.numel()} samples")
        _validate.same_device("logits", torch.empty(0, device=device), "mix.target_a", mix.target_a)
        index = torch.stack([mix.target_a.reshape(n), mix.target_b.reshape(n)], 1).long()
        lam = (mix.params.lam if acc == torch.float64 else mix.lam).to(acc).reshape(n)
        tweight = torch.stack([lam, 1.0 - lam], 1)
    elif isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError("regops: sparse targets are a pair (indices [..., k], probabilities [..., k])")
        index, probs = (_validate.tensor(t, "target") for t in target)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.shape[:-1] != lead:
            raise ValueError(
                f"regops: sparse target indices must be integer [..., k] with leading shape {tuple(lead)}, got "
                f"{index.dtype} {tuple(index.shape)}"
            )
        probs = _validate.floating(probs, "target probabilities")
        if probs.shape != index.shape or index.dim() == 0 or index.shape[-1] == 0:
            raise ValueError(
                f"regops: target probabilities {tuple(probs.shape)} must match indices {tuple(index.shape)}"
            )
        _validate.same_device("logits", torch.empty(0, device=device), "target", index)
        index = index.reshape(n, -1).long()
        tweight = probs.reshape(n, -1).to(acc)
    else:
        if target is None:
            raise ValueError(
                "regops: target is required (class indices, or (indices, probabilities)) unless mix is given"
            )
        target = _validate.tensor(target, "target")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(
                f"regops: target must hold integer class indices, got {target.dtype}; for dense soft targets use "
                "regops.soft_target_cross_entropy, for sparse ones target=(indices, probabilities)"
            )
        if target.shape != lead:
            raise ValueError(
                f"regops: target must have the logits' leading shape (their shape without the class dim) "
                f"{tuple(lead)}, got {tuple(target.shape)}"
            )
        _validate.same_device("logits", torch.empty(0, device=device), "target", target)
        index = target.reshape(n, 1).long()
        tweight = torch.ones(n, 1, dtype=acc, device=device)
    if decoupled and index.shape[1] != 2:
        raise ValueError("regops: decoupled mixup needs mixed targets (mix=...)")
    entry_ignored = index == ignore_index
    bad = _check_range(index, entry_ignored, n_classes, "target")
    tweight = torch.where(entry_ignored, 0.0, tweight)
    index = torch.where(entry_ignored | bad, 0, index)
    # a label (or a mixed pair's first label) decides for its row; sparse targets: all their entries
    valid = ~entry_ignored.all(1) if isinstance(target, (tuple, list)) else ~entry_ignored[:, 0]
    row_weight = valid.to(acc)
    if token_weight is not None:
        token_weight = _validate.floating(token_weight, "token_weight")
        if token_weight.shape != lead:
            raise ValueError(f"regops: token_weight must have shape {tuple(lead)}, got {tuple(token_weight.shape)}")
        _validate.same_device("logits", torch.empty(0, device=device), "token_weight", token_weight)
        row_weight = row_weight * token_weight.reshape(n).to(acc)
    row_weight = torch.where(bad.any(1), float("nan"), row_weight)
    class_weight = None
    if weight is not None:
        class_weight = _validate.floating(weight, "weight")
        if class_weight.shape != (n_classes,):
            raise ValueError(f"regops: weight must be a [V={n_classes}] tensor, got {tuple(class_weight.shape)}")
        _validate.same_device("logits", torch.empty(0, device=device), "weight", class_weight)
        class_weight = class_weight.to(acc)
        denominator = (row_weight * (tweight * class_weight[index]).sum(1)).sum()
    else:
        denominator = row_weight.sum()
    return _Targets(index, tweight, row_weight, class_weight, denominator)


def _no_grad_needed(**tensors: Any) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"regops: no gradient flows to {name}; pass {name}.detach()")
            if isinstance(t, (tuple, list)):
                _no_grad_needed(**{f"{name}[{i}]": x for i, x in enumerate(t)})


def _reduce(rows: torch.Tensor, reduction: str, denominator: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    # All rows ignored: 0 (and zero gradients), not torch's 0/0 = NaN.
    return total / torch.where(denominator == 0, 1.0, denominator)


def _stats(rows: torch.Tensor, stats: torch.Tensor, argmax: torch.Tensor, lead: torch.Size, valid) -> LossStats:
    def col(i):
        return stats[:, i].reshape(lead)

    el2n = torch.where(valid, stats[:, _ref.EL2N], 0.0).reshape(lead)
    margin = torch.where(valid, stats[:, _ref.MARGIN], 0.0).reshape(lead)
    return LossStats(
        rows.detach().reshape(lead), col(_ref.LSE), col(_ref.ENTROPY), el2n, col(_ref.MAX_PROB),
        argmax.reshape(lead), margin,
    )  # fmt: skip


def _options(label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction, mix):
    if label_smoothing is None:
        label_smoothing = mix.label_smoothing if mix is not None else 0.0
    opts = (
        _number(label_smoothing, "label_smoothing", 0.0, 1.0),
        _number(maxsup, "maxsup"),
        _number(z_loss, "z_loss"),
        _number(confidence_penalty, "confidence_penalty"),
        _number(decoupled, "decoupled"),
        0.0 if softcap is None else _number(softcap, "softcap"),
        _number(logit_scale, "logit_scale", float("-inf")),
    )
    if softcap is not None and opts[5] == 0.0:
        raise ValueError("regops: softcap must be > 0 (None disables it)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return opts


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | None = None,
    maxsup: float = 0.0,
    z_loss: float = 0.0,
    confidence_penalty: float = 0.0,
    mix: Any = None,
    decoupled: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    class_dim: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    r"""Cross-entropy with its regularizers, fused: one pass over each row forward, one backward.

    A drop-in for ``F.cross_entropy``: the same shapes mean the same thing. Logits ``[N, C]``, ``[C]``
    (unbatched) or ``[N, C, d1, ...]`` (classes in dim 1, targets ``[N, d1, ...]``); classes-last logits (a
    language model's ``[B, T, V]`` with targets ``[B, T]``) take ``class_dim=-1``, and such a call without it
    raises instead of reading ``T`` as the classes.

    For a row with logits ``z`` (``K`` classes), label ``y``, ``lse = logsumexp(z)``:

    * cross-entropy ``lse - z_y``; label smoothing ``a``: ``(1-a)(lse - z_y) + a(lse - mean_k z_k)`` (torch's);
    * MaxSup ``m``: ``+ m (z_max - mean_k z_k)``; z-loss ``l``: ``+ l lse^2``; confidence penalty ``b``:
      ``- b H(softmax(z))``;
    * ``mix`` (a :class:`~regops.MixedBatch`): ``lam CE(y_a) + (1 - lam) CE(y_b)`` with the smoothing folded in;
      ``decoupled`` ``eta`` (needs ``mix``): ``+ eta [-lam log(e^{z_a} / (e^{z_a} + R)) - (1-lam)
      log(e^{z_b} / (e^{z_b} + R))]``, ``R = sum_{c not in {a, b}} e^{z_c}``;
    * ``target=(indices [..., k], probs [..., k])``: sparse (top-k teacher) targets,
      ``sum_j probs_j (lse - z_{indices_j})`` (distillation without a ``V``-wide target);
    * ``logit_scale`` ``s`` and ``softcap`` ``c``: the loss sees ``c tanh(s x / c)`` (``s x`` without a cap);
    * ``weight`` ``[V]`` (class weights, torch's definition, also inside the smoothing term) and ``token_weight``
      (per row): a row's loss is ``token_weight (sum_j t_j w_{i_j} CE_j ... )`` and its regularizers are weighted
      by ``token_weight sum_j t_j w_{i_j}``; ``"mean"`` divides by the sum of those weights over kept rows (the
      count of non-ignored rows without weights; torch's ``sum w_y`` with class weights).

    Rows whose label is ``ignore_index`` contribute nothing and count nothing; a batch with every row ignored
    gives 0 (torch: NaN) and zero gradients. Labels outside ``[0, V)`` raise a ValueError on CPU; on a GPU
    (no host sync allowed) those rows give NaN. Gradients flow to ``logits`` only.

    Numerics: statistics and losses are float32 (float64 for float64 logits) whatever the logits' dtype, the
    gradient is formed in that precision and rounded once to the logits' dtype. Memory beyond the logits and
    their gradient: ``O(rows)``. No host synchronisation, no atomics (deterministic, CUDA-graph capturable).

    Args:
        logits: ``[N, C]``, ``[C]`` or ``[N, C, d1, ...]`` (``class_dim=None``), or any shape with the classes in
            ``class_dim``; float32/16, bfloat16 or float64.
        target: int labels shaped like the logits without their class dim, or ``(indices, probabilities)`` with
            ``k`` more in a last dim; ``None`` with ``mix``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (the target's shape).
        return_stats: also return :class:`LossStats` computed in the same pass.
        class_dim: where the classes are; ``None`` for ``F.cross_entropy``'s rule (dim 1, or dim 0 of a 1-D
            input), ``-1`` for classes-last logits such as ``[B, T, V]``.

    Returns:
        the loss (float32; float64 for float64 logits), and with ``return_stats`` a ``(loss, LossStats)`` pair.

    Example::

        >>> loss = regops.cross_entropy(logits, labels, label_smoothing=0.1, z_loss=1e-4)
        >>> loss, st = regops.cross_entropy(logits, labels, maxsup=0.1, return_stats=True)
        >>> hard = st.el2n > 0.5                         # data-pruning scores from the same pass
        >>> loss = regops.cross_entropy(lm_logits, labels, class_dim=-1)   # [B, T, V] logits, [B, T] labels
    """
    logits = _validate.floating(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("regops: logits must have a class dim ([C], [N, C] or [N, C, d1, ...]), got a 0-d tensor")
    logits = classes_last(logits, target, class_dim)
    if logits.shape[-1] == 0:
        raise ValueError(f"regops: logits need V >= 1 classes, got shape {tuple(logits.shape)} (classes last)")
    opts = _options(
        label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction, mix
    )
    _no_grad_needed(weight=weight, token_weight=token_weight, target=target)
    check_weight_dtype(weight, "weight", logits.dtype)
    lead, n_classes = logits.shape[:-1], logits.shape[-1]
    acc = _ref.compute_dtype(logits.dtype)
    tg = _prepare(lead, n_classes, logits.device, acc, target, mix, ignore_index, weight, token_weight, opts[4])
    rows, stats, argmax = _ce_op(
        logits.reshape(-1, n_classes), tg.index, tg.tweight, tg.row_weight, tg.class_weight, *opts, bool(return_stats)
    )
    loss = _reduce(rows, reduction, tg.denominator, lead)
    if not return_stats:
        return loss
    return loss, _stats(rows, stats, argmax, lead, tg.row_weight != 0)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | None = None,
    maxsup: float = 0.0,
    z_loss: float = 0.0,
    confidence_penalty: float = 0.0,
    mix: Any = None,
    decoupled: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    r""":func:`cross_entropy` of ``hidden @ weight.T + bias`` without ever materialising the ``[rows, V]`` logits.

    The logits this form stands for are classes-last by construction (``[..., V]`` from ``hidden`` ``[..., H]``),
    so targets are shaped like ``hidden`` without its last dim (``[B, T]`` for ``[B, T, H]``): the form to use
    for language-model heads.

    The rows are processed in blocks (one block of logits exists at a time, 64 MiB in float32 on CPU). With
    ``reduction="mean"`` or ``"sum"`` and gradients needed, the forward sweep also forms each block's gradient
    and multiplies it into ``d hidden`` and ``d weight`` (accumulated in float32, float64 for float64), which the
    backward scales by the upstream gradient (every row shares it: exact). With ``reduction="none"`` the
    backward recomputes each block's logits instead, so the result is exact for any upstream gradient. Same
    options and statistics as :func:`cross_entropy` (the class weights are ``class_weight`` here, since ``weight``
    is the classifier's).

    Args:
        hidden: ``[..., H]``; weight: ``[V, H]`` (an LM head: ``lm_head.weight``); bias: ``[V]`` or None.
        target: int ``[...]`` labels (or sparse targets, or ``mix``). Same dtype for hidden, weight and bias.

    Example::

        >>> h = model.transformer(input_ids)[0][:, :-1]                      # [B, T-1, H]
        >>> loss = regops.linear_cross_entropy(h, model.lm_head.weight, input_ids[:, 1:], z_loss=1e-4)
    """
    hidden = _validate.floating(hidden, "hidden")
    weight = _validate.floating(weight, "weight")
    if hidden.dim() == 0 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"regops: expected hidden [..., H] and weight [V, H] (V >= 1), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"regops: hidden, weight and bias must share a dtype, got {hidden.dtype} and {weight.dtype}")
    _validate.same_device("hidden", hidden, "weight", weight)
    if bias is not None:
        bias = _validate.floating(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"regops: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    opts = _options(
        label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction, mix
    )
    _no_grad_needed(class_weight=class_weight, token_weight=token_weight, target=target)
    check_weight_dtype(class_weight, "class_weight", hidden.dtype)
    lead, n_classes = hidden.shape[:-1], weight.shape[0]
    acc = _ref.compute_dtype(hidden.dtype)
    tg = _prepare(lead, n_classes, hidden.device, acc, target, mix, ignore_index, class_weight, token_weight, opts[4])
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, bias, tg.index, tg.tweight, tg.row_weight, tg.class_weight)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if reduction != "none" and wants_grad and tg.index.shape[0] > 0:
        # One sweep computes the loss and the gradients of the row sum (3 matmuls per block, not 4): exact, since
        # a "mean" / "sum" gives every row the same upstream gradient. reduction="none" recomputes in backward.
        rows, stats, argmax, *_ = _lce_grad_op(*args, *opts, bool(return_stats))
    else:
        rows, stats, argmax = _lce_op(*args, *opts, bool(return_stats))
    loss = _reduce(rows, reduction, tg.denominator, lead)
    if not return_stats:
        return loss
    return loss, _stats(rows, stats, argmax, lead, tg.row_weight != 0)
