"""The losses family's operators: schemas, fakes and derivatives, each declared once.

* ``cross_entropy`` / ``linear_cross_entropy`` (and their backwards): the regularized cross-entropy per row of
  ``[N, V]`` logits, or of ``hidden @ weight.T (+ bias)`` without the logits; sparse targets (``index``,
  ``tweight``), per-row and class weights, the scalar options as one ``float[] options``
  (:class:`~regops.losses._options.LossOptions`). ``linear_cross_entropy_with_grad`` also forms the gradients of
  the row sum in its forward sweep (for ``"mean"`` / ``"sum"``, where every row shares the upstream gradient).
* ``label_cross_entropy`` (and backward): the common case of ``cross_entropy`` (integer labels, ``ignore_index``,
  class weights) from the labels themselves, reduced inside the op: one call with no target tensors to build, and
  the same bits as ``cross_entropy`` on the targets its caller would build, then reduced.
* ``mix_cross_entropy``, ``soft_target_cross_entropy``, ``mix_binary_cross_entropy`` (and backwards): the MixUp /
  CutMix losses from index labels and timm's soft-target losses.
* ``symmetric_kl`` (and backward): R-Drop's two-view consistency loss.

Losses and statistics are float32 (float64 for float64 logits). References: :mod:`regops.losses.reference`,
:mod:`regops.losses.reference_mixed`; Triton launchers: :mod:`regops.losses.triton`.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype
from regops._core.ops import declare
from regops.losses import reference as ref
from regops.losses import reference_mixed as ref_mixed

TRITON = "regops.losses.triton:"

_TARGETS = "Tensor index, Tensor tweight, Tensor row_weight, Tensor? class_weight"


def _like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------------ cross-entropy
def _ce_fake(logits, index, tweight, row_weight, class_weight, options, want_stats):
    n, acc = logits.shape[0], acc_dtype(logits)
    return (
        logits.new_empty(n, dtype=acc),
        logits.new_empty((n, ref.N_STATS), dtype=acc),
        logits.new_empty(n, dtype=torch.long),
    )


cross_entropy = declare(
    f"cross_entropy(Tensor logits, {_TARGETS}, float[] options, bool want_stats) -> (Tensor, Tensor, Tensor)",
    reference=ref.cross_entropy,
    triton=TRITON + "cross_entropy",
    fake=_ce_fake,
)
cross_entropy_backward = declare(
    f"cross_entropy_backward(Tensor grad, Tensor logits, {_TARGETS}, Tensor stats, Tensor argmax, float[] options) "
    "-> Tensor",
    reference=ref.cross_entropy_backward,
    triton=TRITON + "cross_entropy_backward",
    fake=lambda grad, logits, *args: _like(logits),
)


def _ce_setup(ctx, inputs, output) -> None:
    logits, index, tweight, row_weight, class_weight, ctx.options, _ = inputs
    _, stats, argmax = output
    ctx.mark_non_differentiable(stats, argmax)
    ctx.save_for_backward(logits, index, tweight, row_weight, class_weight, stats, argmax)


def _ce_backward(ctx, grad_loss, _grad_stats, _grad_argmax):
    logits, *rest = ctx.saved_tensors
    return cross_entropy_backward(grad_loss, logits, *rest, ctx.options), None, None, None, None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)


def _label_fake(logits, target, class_weight, ignore_index, options, reduction):
    n, acc = logits.shape[0], acc_dtype(logits)
    return (
        logits.new_empty((n,) if reduction == "none" else (), dtype=acc),
        logits.new_empty((n, ref.N_STATS), dtype=acc),
        logits.new_empty(n, dtype=torch.long),
    )


_LABELS = "Tensor target, Tensor? class_weight, int ignore_index"
label_cross_entropy = declare(
    f"label_cross_entropy(Tensor logits, {_LABELS}, float[] options, str reduction) -> (Tensor, Tensor, Tensor)",
    reference=ref.label_cross_entropy,
    triton=TRITON + "label_cross_entropy",
    fake=_label_fake,
)
label_cross_entropy_backward = declare(
    "label_cross_entropy_backward(Tensor grad, Tensor logits, Tensor target, Tensor? class_weight, Tensor stats, "
    "Tensor argmax, int ignore_index, float[] options, str reduction) -> Tensor",
    reference=ref.label_cross_entropy_backward,
    triton=TRITON + "label_cross_entropy_backward",
    fake=lambda grad, logits, *args: _like(logits),
)


def _label_setup(ctx, inputs, output) -> None:
    logits, target, class_weight, ctx.ignore_index, ctx.options, ctx.reduction = inputs
    _, stats, argmax = output
    ctx.mark_non_differentiable(stats, argmax)
    ctx.save_for_backward(logits, target, class_weight, stats, argmax)


def _label_backward(ctx, grad_loss, _grad_stats, _grad_argmax):
    logits, target, class_weight, stats, argmax = ctx.saved_tensors
    grad = label_cross_entropy_backward(
        grad_loss, logits, target, class_weight, stats, argmax, ctx.ignore_index, ctx.options, ctx.reduction
    )
    return grad, None, None, None, None, None


label_cross_entropy.register_autograd(_label_backward, setup_context=_label_setup)


def _lce_fake(hidden, weight, bias, *args):
    return _ce_fake(hidden, *args)


linear_cross_entropy = declare(
    f"linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, {_TARGETS}, float[] options, bool want_stats) "
    "-> (Tensor, Tensor, Tensor)",
    reference=ref.linear_cross_entropy,
    triton=TRITON + "linear_cross_entropy",
    fake=_lce_fake,
)


def _lce_backward_fake(grad, hidden, weight, bias, *args):
    return (
        _like(hidden),
        _like(weight),
        weight.new_empty(weight.shape[0], dtype=(bias if bias is not None else weight).dtype),
    )


linear_cross_entropy_backward = declare(
    f"linear_cross_entropy_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, {_TARGETS}, "
    "Tensor stats, Tensor argmax, float[] options) -> (Tensor, Tensor, Tensor)",
    reference=ref.linear_cross_entropy_backward,
    triton=TRITON + "linear_cross_entropy_backward",
    fake=_lce_backward_fake,
)


def _lce_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, index, tweight, row_weight, class_weight, ctx.options, _ = inputs
    _, stats, argmax = output
    ctx.mark_non_differentiable(stats, argmax)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, index, tweight, row_weight, class_weight, stats, argmax)


def _lce_backward(ctx, grad_loss, _grad_stats, _grad_argmax):
    dh, dw, db = linear_cross_entropy_backward(grad_loss, *ctx.saved_tensors, ctx.options)
    return (dh, dw, db if ctx.has_bias else None) + (None,) * 6


linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup)


def _lce_grad_fake(hidden, weight, bias, *args):
    return (*_ce_fake(hidden, *args), _like(hidden), _like(weight), weight.new_empty(weight.shape[0]))


linear_cross_entropy_with_grad = declare(
    f"linear_cross_entropy_with_grad(Tensor hidden, Tensor weight, Tensor? bias, {_TARGETS}, float[] options, "
    "bool want_stats) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    reference=ref.linear_cross_entropy_with_grad,
    triton=TRITON + "linear_cross_entropy_with_grad",
    fake=_lce_grad_fake,
)


def _lce_grad_setup(ctx, inputs, output) -> None:
    _, stats, argmax, d_hidden, d_weight, d_bias = output
    ctx.mark_non_differentiable(stats, argmax, d_hidden, d_weight, d_bias)
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(d_hidden, d_weight, d_bias)


def _lce_grad_backward(ctx, grad_loss, *_unused):
    # Used only under "mean" / "sum": every row's upstream gradient is the same number, grad_loss[0].
    d_hidden, d_weight, d_bias = ctx.saved_tensors
    g = grad_loss.to(d_hidden.dtype)
    s = grad_loss[:1]
    dh = d_hidden * g.unsqueeze(1)
    dw = (d_weight * s.to(d_weight.dtype)).to(d_weight.dtype)
    db = (d_bias * s.to(d_bias.dtype)) if ctx.has_bias else None
    return (dh, dw, db) + (None,) * 6


linear_cross_entropy_with_grad.register_autograd(_lce_grad_backward, setup_context=_lce_grad_setup)


# ------------------------------------------------------------------------------------------------ mixed / soft targets
def _rows_fake(logits, *args, width: int | None = None):
    shape = (logits.shape[0],) if width is None else (logits.shape[0], width)
    return logits.new_empty(shape, dtype=acc_dtype(logits))


mix_cross_entropy = declare(
    "mix_cross_entropy(Tensor logits, Tensor target_a, Tensor target_b, Tensor lam, float smoothing) "
    "-> (Tensor, Tensor)",
    reference=ref_mixed.mix_cross_entropy,
    triton=TRITON + "mix_cross_entropy",
    fake=lambda logits, *args: (_rows_fake(logits), _rows_fake(logits)),
)
mix_cross_entropy_backward = declare(
    "mix_cross_entropy_backward(Tensor grad, Tensor logits, Tensor lse, Tensor target_a, Tensor target_b, "
    "Tensor lam, float smoothing) -> Tensor",
    reference=ref_mixed.mix_cross_entropy_backward,
    triton=TRITON + "mix_cross_entropy_backward",
    fake=lambda grad, logits, *args: _like(logits),
)


def _mce_setup(ctx, inputs, output) -> None:
    logits, target_a, target_b, lam, ctx.smoothing = inputs
    ctx.save_for_backward(logits, output[1], target_a, target_b, lam)


def _mce_backward(ctx, grad_loss, _grad_lse):
    g = mix_cross_entropy_backward(grad_loss, *ctx.saved_tensors, ctx.smoothing)
    return g, None, None, None, None


mix_cross_entropy.register_autograd(_mce_backward, setup_context=_mce_setup)

soft_target_cross_entropy = declare(
    "soft_target_cross_entropy(Tensor logits, Tensor target) -> (Tensor, Tensor)",
    reference=ref_mixed.soft_target_cross_entropy,
    triton=TRITON + "soft_target_cross_entropy",
    fake=lambda logits, target: (_rows_fake(logits), _rows_fake(logits, width=2)),
)
soft_target_cross_entropy_backward = declare(
    "soft_target_cross_entropy_backward(Tensor grad, Tensor logits, Tensor stats, Tensor target) -> Tensor",
    reference=ref_mixed.soft_target_cross_entropy_backward,
    triton=TRITON + "soft_target_cross_entropy_backward",
    fake=lambda grad, logits, *args: _like(logits),
)


def _stce_setup(ctx, inputs, output) -> None:
    logits, target = inputs
    ctx.save_for_backward(logits, output[1], target)


def _stce_backward(ctx, grad_loss, _grad_stats):
    logits, stats, target = ctx.saved_tensors
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_logits = soft_target_cross_entropy_backward(grad_loss, logits, stats, target)
    if ctx.needs_input_grad[1]:  # d/dt of -sum t log_softmax(z) = lse(z) - z
        grad_target = ((stats[:, :1] - logits.to(stats.dtype)) * grad_loss.unsqueeze(1)).to(target.dtype)
    return grad_logits, grad_target


soft_target_cross_entropy.register_autograd(_stce_backward, setup_context=_stce_setup)

_BCE = "float smoothing, float? threshold, Tensor? weight, Tensor? pos_weight"
mix_binary_cross_entropy = declare(
    f"mix_binary_cross_entropy(Tensor logits, Tensor target_a, Tensor target_b, Tensor lam, {_BCE}) -> Tensor",
    reference=ref_mixed.mix_binary_cross_entropy,
    triton=TRITON + "mix_binary_cross_entropy",
    fake=_rows_fake,
)
mix_binary_cross_entropy_backward = declare(
    f"mix_binary_cross_entropy_backward(Tensor grad, Tensor logits, Tensor target_a, Tensor target_b, Tensor lam, "
    f"{_BCE}) -> Tensor",
    reference=ref_mixed.mix_binary_cross_entropy_backward,
    triton=TRITON + "mix_binary_cross_entropy_backward",
    fake=lambda grad, logits, *args: _like(logits),
)


def _mbce_setup(ctx, inputs, output) -> None:
    logits, target_a, target_b, lam, ctx.smoothing, ctx.threshold, weight, pos_weight = inputs
    ctx.save_for_backward(logits, target_a, target_b, lam, weight, pos_weight)


def _mbce_backward(ctx, grad):
    logits, target_a, target_b, lam, weight, pos_weight = ctx.saved_tensors
    g = mix_binary_cross_entropy_backward(
        grad, logits, target_a, target_b, lam, ctx.smoothing, ctx.threshold, weight, pos_weight
    )
    return g, None, None, None, None, None, None, None


mix_binary_cross_entropy.register_autograd(_mbce_backward, setup_context=_mbce_setup)


# ------------------------------------------------------------------------------------------------ symmetric KL
symmetric_kl = declare(
    "symmetric_kl(Tensor a, Tensor b) -> (Tensor, Tensor)",
    reference=ref.symmetric_kl,
    triton=TRITON + "symmetric_kl",
    fake=lambda a, b: (_rows_fake(a), _rows_fake(a, width=4)),
)
symmetric_kl_backward = declare(
    "symmetric_kl_backward(Tensor grad, Tensor a, Tensor b, Tensor stats) -> (Tensor, Tensor)",
    reference=ref.symmetric_kl_backward,
    triton=TRITON + "symmetric_kl_backward",
    fake=lambda grad, a, b, stats: (_like(a), _like(b)),
)


def _skl_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _skl_backward(ctx, grad, _grad_stats):
    a, b, stats = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate (double backward)
        return _differentiable_skl_backward(grad, a, b)
    return symmetric_kl_backward(grad, a, b, stats)


def _differentiable_skl_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """The gradients of the per-row losses weighted by ``grad``, in torch ops (float32, float64 for float64)::

    dl/da = g/2 (p_a (d - <p_a, d>) + p_a - p_b),  dl/db = g/2 (p_b (<p_b, d> - d) + p_b - p_a),  d = log p_a - log p_b
    """
    cd = acc_dtype(a)
    la, lb = torch.log_softmax(a.to(cd), -1), torch.log_softmax(b.to(cd), -1)
    pa, pb = la.exp(), lb.exp()
    d = la - lb
    g = 0.5 * grad.to(cd).unsqueeze(-1)
    ga = g * (pa * (d - (pa * d).sum(-1, keepdim=True)) + pa - pb)
    gb = g * (pb * ((pb * d).sum(-1, keepdim=True) - d) + pb - pa)
    return ga.to(a.dtype), gb.to(b.dtype)


symmetric_kl.register_autograd(_skl_backward, setup_context=_skl_setup)

__all__ = [
    "cross_entropy",
    "cross_entropy_backward",
    "label_cross_entropy",
    "label_cross_entropy_backward",
    "linear_cross_entropy",
    "linear_cross_entropy_backward",
    "linear_cross_entropy_with_grad",
    "mix_binary_cross_entropy",
    "mix_binary_cross_entropy_backward",
    "mix_cross_entropy",
    "mix_cross_entropy_backward",
    "soft_target_cross_entropy",
    "soft_target_cross_entropy_backward",
    "symmetric_kl",
    "symmetric_kl_backward",
]
