"""The losses family's public functions: the regularized cross-entropy and its linear (LM-head) form, the loss for
Hugging Face causal LMs, R-Drop's symmetric KL, and (from :mod:`regops.losses.mixed`) the MixUp / CutMix losses.

``regops::cross_entropy`` computes, per row of ``[N, V]`` logits, cross-entropy against sparse targets (one
label, a mixed pair or a top-k teacher) with label smoothing, MaxSup, z-loss, a confidence penalty and the
decoupled-mixup term, plus per-row statistics, in one pass over the row (math: :mod:`regops.losses.reference`).
``regops::linear_cross_entropy`` does the same for ``hidden @ weight.T (+ bias)`` without ever holding more
than one block of logits; its backward recomputes each block. Everything that depends on the data stays on
the device (no ``.item()``, no ``nonzero``): the ops are CUDA-graph capturable and trace under
``torch.compile(fullgraph=True)``. Results do not depend on the launch: no atomics anywhere (deterministic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from regops._core import validate
from regops._core.dtypes import acc_dtype
from regops.losses import ops
from regops.losses import reference as ref
from regops.losses._class_dim import check_class_dim, check_weight_dtype, classes_last
from regops.losses._targets import (
    REDUCTIONS,
    loss_options,
    no_grad_needed,
    prepare,
    reduce_rows,
)
from regops.losses.mixed import mix_binary_cross_entropy, mix_cross_entropy, soft_target_cross_entropy
from regops.mix import MixedBatch

__all__ = [
    "LossStats",
    "causal_lm_loss",
    "cross_entropy",
    "linear_cross_entropy",
    "mix_binary_cross_entropy",
    "mix_cross_entropy",
    "soft_target_cross_entropy",
    "symmetric_kl",
]


# ------------------------------------------------------------------------------------------------ cross-entropy
_LABEL_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})
_FLOAT_DTYPES = frozenset(validate.FLOAT_DTYPES)
_INT64 = (-(2**63), 2**63 - 1)


def _int_labels(target: Any, lead: torch.Size, device: torch.device, ignore_index: Any) -> bool:
    """Whether ``target`` is a plain tensor of integer labels shaped ``lead`` on ``device``, with an int64
    ``ignore_index``: what ``regops::label_cross_entropy`` takes as it is."""
    return (
        type(target) is torch.Tensor
        and target.dtype in _LABEL_DTYPES
        and target.shape == lead
        and target.device == device
        and type(ignore_index) is int
        and _INT64[0] <= ignore_index <= _INT64[1]
    )


def _plain_class_weight(weight: Any, logits: torch.Tensor) -> bool:
    """Whether ``weight`` passes every check of the general path as class weights of ``[N, V]`` ``logits``."""
    return (
        type(weight) is torch.Tensor
        and weight.shape == logits.shape[1:]
        and weight.device == logits.device
        and weight.dtype in (logits.dtype, acc_dtype(logits))
        and not (weight.requires_grad and torch.is_grad_enabled())
    )


class LossStats(NamedTuple):
    """Per-row statistics of `cross_entropy` (shape: the logits' leading shape; float32, float64 for
    float64 logits; computed in the loss's own pass, no gradient).

    ``loss``: the unreduced row loss; ``lse``: log-sum-exp of the (scaled, capped) logits; ``entropy``:
    ``H(softmax)``; ``el2n``: ``||softmax - onehot(y)||_2`` ("Deep Learning on a Data Diet"); ``max_prob``;
    ``argmax`` (int64); ``margin``: ``z_y - max_{c != y} z_c`` (``+inf`` for one class). ``y`` is the label
    (the first of a mixed pair, the first teacher index). Ignored rows: loss 0, el2n and margin 0.

    Args:
        loss: the unreduced row loss.
        lse: log-sum-exp of the (scaled, capped) logits.
        entropy: the entropy of the row's softmax.
        el2n: ``||softmax - onehot(y)||_2``.
        max_prob: the largest probability.
        argmax: int64, the predicted class.
        margin: ``z_y - max_{c != y} z_c``.

    Example::

        >>> _, st = regops.cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]), return_stats=True)
        >>> st.el2n.shape, st.argmax.dtype
        (torch.Size([4]), torch.int64)
    """

    loss: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    el2n: torch.Tensor
    max_prob: torch.Tensor
    argmax: torch.Tensor
    margin: torch.Tensor


def _stats(rows: torch.Tensor, stats: torch.Tensor, argmax: torch.Tensor, lead: torch.Size, valid) -> LossStats:
    def col(i):
        return stats[:, i].reshape(lead)

    el2n = torch.where(valid, stats[:, ref.EL2N], 0.0).reshape(lead)
    margin = torch.where(valid, stats[:, ref.MARGIN], 0.0).reshape(lead)
    return LossStats(
        rows.detach().reshape(lead), col(ref.LSE), col(ref.ENTROPY), el2n, col(ref.MAX_PROB),
        argmax.reshape(lead), margin,
    )  # fmt: skip


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
    mix: MixedBatch | None = None,
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
    * ``mix`` (a `regops.MixedBatch`): ``lam CE(y_a) + (1 - lam) CE(y_b)`` with the smoothing folded in;
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
            ``class_dim``; float32/16, bfloat16 or float64. A DTensor with ``Shard`` on the class dim (vocabulary
            parallel, one mesh dim; ``Replicate()`` or ``Shard`` on a row dim elsewhere) is computed shard by shard
            with 2 all-reduces of ``[N]`` numbers per call and a local backward (see docs/losses.md; no
            ``return_stats``, no ``decoupled``); the loss is then a plain tensor with the same value on every rank
            (``"none"`` of row-sharded logits: a DTensor sharded like the rows), the gradient a DTensor with the
            logits' placements.
        target: int labels shaped like the logits without their class dim, or ``(indices, probabilities)`` with
            ``k`` more in a last dim; ``None`` with ``mix``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (the target's shape).
        return_stats: also return `LossStats` computed in the same pass.
        class_dim: where the classes are; ``None`` for ``F.cross_entropy``'s rule (dim 1, or dim 0 of a 1-D
            input), ``-1`` for classes-last logits such as ``[B, T, V]``.

    Returns:
        the loss (float32; float64 for float64 logits), and with ``return_stats`` a ``(loss, LossStats)`` pair.

    Example::

        >>> logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> loss = regops.cross_entropy(logits, labels, label_smoothing=0.1, z_loss=1e-4)
        >>> loss, st = regops.cross_entropy(logits, labels, maxsup=0.1, return_stats=True)
        >>> hard = st.el2n > 0.5  # data-pruning scores from the same pass
        >>> lm_logits, tokens = torch.randn(2, 5, 10), torch.randint(0, 10, (2, 5))
        >>> regops.cross_entropy(lm_logits, tokens, class_dim=-1).shape  # [B, T, V] logits, [B, T] labels
        torch.Size([])
    """
    if (
        type(logits) is torch.Tensor
        and mix is None
        and token_weight is None
        and class_dim is None
        and not return_stats
        and logits.dim() == 2
        and logits.dtype in _FLOAT_DTYPES
        and logits.shape[1]
        and _int_labels(target, logits.shape[:1], logits.device, ignore_index)
        and (weight is None or _plain_class_weight(weight, logits))
    ):  # plain labels [N] of [N, V] logits, the common case: every check below passes, one op reduces inside
        options = loss_options(
            label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction, None
        )
        if not options.decoupled:
            return ops.label_cross_entropy(logits, target, weight, ignore_index, options.values(), reduction)[0]
    logits = validate.floating(logits, "logits")
    if validate.is_dtensor(logits):
        from regops.losses import dtensor

        return dtensor.cross_entropy(
            logits, target, weight=weight, token_weight=token_weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, maxsup=maxsup, z_loss=z_loss, confidence_penalty=confidence_penalty,
            mix=mix, decoupled=decoupled, softcap=softcap, logit_scale=logit_scale, return_stats=return_stats,
            class_dim=class_dim,
        )  # fmt: skip
    if logits.dim() == 0:
        raise ValueError("regops: logits must have a class dim ([C], [N, C] or [N, C, d1, ...]), got a 0-d tensor")
    logits = classes_last(logits, target, class_dim)
    if logits.shape[-1] == 0:
        raise ValueError(f"regops: logits need V >= 1 classes, got shape {tuple(logits.shape)} (classes last)")
    options = loss_options(
        label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction, mix
    )
    no_grad_needed(weight=weight, token_weight=token_weight, target=target)
    check_weight_dtype(weight, "weight", logits.dtype)
    lead, n_classes = logits.shape[:-1], logits.shape[-1]
    if (
        mix is None
        and token_weight is None
        and not return_stats
        and not options.decoupled
        and _int_labels(target, lead, logits.device, ignore_index)
        and (
            weight is None
            or (isinstance(weight, torch.Tensor) and weight.shape == (n_classes,) and weight.device == logits.device)
        )
    ):  # plain labels, the common case: one op with the labels as they are, reduced inside
        loss = ops.label_cross_entropy(
            logits if logits.dim() == 2 else logits.reshape(-1, n_classes),
            target if target.dim() == 1 else target.reshape(-1), weight, ignore_index, options.values(), reduction,
        )[0]  # fmt: skip
        return loss if reduction != "none" or len(lead) == 1 else loss.reshape(lead)
    acc = acc_dtype(logits)
    tg = prepare(
        lead, n_classes, logits.device, acc, target, mix, ignore_index, weight, token_weight, options.decoupled
    )
    rows, stats, argmax = ops.cross_entropy(
        logits if logits.dim() == 2 else logits.reshape(-1, n_classes), tg.index, tg.tweight, tg.row_weight,
        tg.class_weight, options.values(), bool(return_stats),
    )  # fmt: skip
    loss = reduce_rows(rows, reduction, tg.denominator, lead)
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
    mix: MixedBatch | None = None,
    decoupled: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    r"""`cross_entropy` of ``hidden @ weight.T + bias`` without ever materialising the ``[rows, V]`` logits.

    The logits this form stands for are classes-last by construction (``[..., V]`` from ``hidden`` ``[..., H]``),
    so targets are shaped like ``hidden`` without its last dim (``[B, T]`` for ``[B, T, H]``): the form to use
    for language-model heads.

    The rows are processed in blocks (one block of logits exists at a time, 64 MiB in float32 on CPU). With
    ``reduction="mean"`` or ``"sum"`` and gradients needed, the forward sweep also forms each block's gradient
    and multiplies it into ``d hidden`` and ``d weight`` (accumulated in float32, float64 for float64), which the
    backward scales by the upstream gradient (every row shares it: exact). With ``reduction="none"`` the
    backward recomputes each block's logits instead, so the result is exact for any upstream gradient. Same
    options and statistics as `cross_entropy` (the class weights are ``class_weight`` here, since ``weight``
    is the classifier's).

    Args:
        hidden: ``[..., H]``; weight: ``[V, H]`` (an LM head: ``lm_head.weight``); bias: ``[V]`` or None. A
            DTensor weight sharded over its rows (the classes: ``Shard(0)`` on one mesh dim, as ``ColwiseParallel``
            leaves an LM head; bias sharded alike) is vocabulary parallel: each rank forms only its classes' logits,
            a block of rows at a time, with 2 all-reduces of ``[rows]`` numbers per block and one of ``d hidden``
            in the backward (see docs/losses.md; no ``return_stats``, no ``decoupled``); ``hidden`` is then a
            plain tensor (the same on every rank) or a ``Replicate()`` DTensor, the loss a plain tensor with the
            same value on every rank.
        target: int ``[...]`` labels (or sparse targets, or ``mix``). Same dtype for hidden, weight and bias.

    Returns:
        The loss (a 0-dim float32 tensor, float64 for float64 inputs; ``[...]`` under ``reduction="none"``), and
        its `LossStats` with ``return_stats=True``, as `cross_entropy`.

    Example::

        >>> lm_head, input_ids = torch.nn.Linear(16, 50, bias=False), torch.randint(0, 50, (2, 6))
        >>> h = torch.randn(2, 5, 16, requires_grad=True)  # [B, T-1, H] hidden states
        >>> loss = regops.linear_cross_entropy(h, lm_head.weight, input_ids[:, 1:], z_loss=1e-4)
        >>> loss.backward()  # the [B, T-1, 50] logits were never built
        >>> h.grad.shape
        torch.Size([2, 5, 16])
    """
    hidden = validate.floating(hidden, "hidden")
    weight = validate.floating(weight, "weight")
    if hidden.dim() == 0 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"regops: expected hidden [..., H] and weight [V, H] (V >= 1), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"regops: hidden, weight and bias must share a dtype, got {hidden.dtype} and {weight.dtype}")
    validate.same_device("hidden", hidden, "weight", weight)
    if bias is not None:
        bias = validate.floating(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"regops: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    options = loss_options(
        label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction, mix
    )
    if validate.is_dtensor(hidden, weight, bias):
        from regops.losses import dtensor

        return dtensor.linear_cross_entropy(
            hidden, weight, target, bias, options=options, class_weight=class_weight, token_weight=token_weight,
            ignore_index=ignore_index, reduction=reduction, mix=mix, return_stats=return_stats,
        )  # fmt: skip
    no_grad_needed(class_weight=class_weight, token_weight=token_weight, target=target)
    check_weight_dtype(class_weight, "class_weight", hidden.dtype)
    lead, n_classes = hidden.shape[:-1], weight.shape[0]
    acc = acc_dtype(hidden)
    tg = prepare(
        lead, n_classes, hidden.device, acc, target, mix, ignore_index, class_weight, token_weight, options.decoupled
    )
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, bias, tg.index, tg.tweight, tg.row_weight, tg.class_weight)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if reduction != "none" and wants_grad and tg.index.shape[0] > 0:
        # One sweep computes the loss and the gradients of the row sum (3 matmuls per block, not 4): exact, since
        # a "mean" / "sum" gives every row the same upstream gradient. reduction="none" recomputes in backward.
        rows, stats, argmax, *_ = ops.linear_cross_entropy_with_grad(*args, options.values(), bool(return_stats))
    else:
        rows, stats, argmax = ops.linear_cross_entropy(*args, options.values(), bool(return_stats))
    loss = reduce_rows(rows, reduction, tg.denominator, lead)
    if not return_stats:
        return loss
    return loss, _stats(rows, stats, argmax, lead, tg.row_weight != 0)


# ------------------------------------------------------------------------------------------------ symmetric KL
def symmetric_kl(
    logits_a: torch.Tensor, logits_b: torch.Tensor, *, reduction: str = "mean", class_dim: int | None = None
) -> torch.Tensor:
    r"""R-Drop consistency loss: ``\tfrac12\,[KL(p_a\|p_b) + KL(p_b\|p_a)]`` over the class dimension.

    .. math:: \ell = \tfrac12 \sum_v (p_{a,v} - p_{b,v})(\log p_{a,v} - \log p_{b,v}),
              \quad p = \mathrm{softmax}(\text{logits})

    Fused: the forward streams the vocabulary twice per row and keeps 4 floats per row; the backward writes the
    two gradients in one pass. No ``[rows, V]`` intermediate (softmax, log-softmax) is ever allocated. Logits
    must be finite. Twice differentiable (Hessian estimates of models using it work): under
    ``create_graph=True`` the backward runs as torch ops that autograd differentiates again.

    Args:
        logits_a, logits_b: same shape and floating dtype (computed in float32, float64 for float64): ``[C]`` or
            ``[N, C]``, or with more dims the classes in ``class_dim``.
        reduction: ``"mean"`` over rows (= R-Drop's batch mean; default), ``"sum"``, or ``"none"`` (the logits'
            shape without the class dim).
        class_dim: required for 3-D and larger logits, which have no single reading: ``-1`` for classes-last
            logits (``[B, T, V]`` from a language model), ``1`` for ``F.cross_entropy``'s ``[N, C, d1, ...]``.

    Returns:
        float32 (float64 for float64) loss.

    Example::

        >>> F = torch.nn.functional
        >>> la, lb, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])  # two dropout views
        >>> loss = F.cross_entropy(la, y) + F.cross_entropy(lb, y) + 0.5 * regops.symmetric_kl(la, lb)
        >>> reg = regops.symmetric_kl(torch.randn(2, 5, 10), torch.randn(2, 5, 10), class_dim=-1)  # [B, T, V]
        >>> bool(regops.symmetric_kl(la, la) == 0)
        True
    """
    validate.floating(logits_a, "logits_a")
    validate.floating(logits_b, "logits_b")
    if logits_a.shape != logits_b.shape or logits_a.dtype != logits_b.dtype:
        raise ValueError(
            f"regops: logits_a and logits_b must have the same shape and dtype, got {tuple(logits_a.shape)} "
            f"{logits_a.dtype} and {tuple(logits_b.shape)} {logits_b.dtype}"
        )
    validate.same_device("logits_a", logits_a, "logits_b", logits_b)
    nd = logits_a.dim()
    if class_dim is None and nd > 2:
        raise ValueError(
            f"regops: symmetric_kl of {nd}-D logits {tuple(logits_a.shape)} needs class_dim: -1 for classes-last "
            "logits ([B, T, V], a language model's), 1 for [N, C, d1, ...] (F.cross_entropy's layout)"
        )
    if class_dim is not None:
        class_dim = check_class_dim(class_dim, nd)
        logits_a, logits_b = logits_a.movedim(class_dim, -1), logits_b.movedim(class_dim, -1)
    if logits_a.dim() == 0 or logits_a.shape[-1] == 0:
        raise ValueError(f"regops: logits must have shape [..., V] with V > 0, got {tuple(logits_a.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cols = logits_a.shape[-1]
    loss, _ = ops.symmetric_kl(logits_a.reshape(-1, cols), logits_b.reshape(-1, cols))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(logits_a.shape[:-1])


# ------------------------------------------------------------------------------------------------ Hugging Face
def causal_lm_loss(**options: Any) -> Callable[..., torch.Tensor]:
    """A drop-in for transformers' ``ForCausalLMLoss`` backed by `regops.cross_entropy` with ``options``.

    Transformers models compute their loss through ``model.loss_function`` (default: ``ForCausalLMLoss``: shift
    the labels, ``F.cross_entropy`` on upcast float32 logits, ``"sum" / num_items_in_batch`` under gradient
    accumulation). The function returned has that signature and calls `regops.cross_entropy` instead: no
    float32 copy of the logits, the regularizers and statistics available, same reduction rules, no global patching.

    Args:
        **options: keyword arguments of `regops.cross_entropy` (``label_smoothing``, ``z_loss``, ...),
            applied on every call; ``reduction``, ``ignore_index``, ``return_stats``, ``mix`` and ``target``
            are set by the loss itself and raise a ValueError.

    Returns:
        A function with the signature of transformers' ``ForCausalLMLoss`` (``logits, labels, vocab_size,
        num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs``) returning the scalar loss.

    Example::

        >>> loss_function = regops.causal_lm_loss(label_smoothing=0.1, z_loss=1e-4)  # model.loss_function = ...
        >>> logits, input_ids = torch.randn(2, 6, 50, requires_grad=True), torch.randint(0, 50, (2, 6))
        >>> loss = loss_function(logits, input_ids, vocab_size=50)  # as transformers calls it
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
    """
    for key in ("reduction", "ignore_index", "return_stats", "mix", "target"):
        if key in options:
            raise ValueError(f"regops: causal_lm_loss sets {key} itself (as transformers' loss does)")

    def loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if shift_labels is None:  # tokens < n predict n
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        rows = logits.reshape(-1, vocab_size)
        target = shift_labels.reshape(-1).to(rows.device)
        if num_items_in_batch is None:
            return cross_entropy(rows, target, ignore_index=ignore_index, **options)
        total = cross_entropy(rows, target, ignore_index=ignore_index, reduction="sum", **options)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    return loss
