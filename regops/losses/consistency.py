"""Two-view consistency losses (R-Drop): symmetric KL between two softmax distributions, fused over the vocab.

First order: one fused op forward (4 numbers saved per row) and one backward. Second order (Hessian-vector
products, ``create_graph=True``): the backward is then written with differentiable torch ops (row ``log_softmax``
of both views), so ``torch.autograd.grad`` can differentiate it again.
"""

from __future__ import annotations

import torch

from regops import _backend
from regops._core import validate as _validate
from regops.losses._class_dim import check_class_dim
from regops.reference import losses as _ref

__all__ = ["symmetric_kl"]

_backend.register("symmetric_kl", torch=_ref.symmetric_kl, triton="regops.kernels.symmetric_kl:symmetric_kl")
_backend.register(
    "symmetric_kl_backward",
    torch=_ref.symmetric_kl_backward,
    triton="regops.kernels.symmetric_kl:symmetric_kl_backward",
)


@torch.library.custom_op("regops::symmetric_kl", mutates_args=())
def _skl_op(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("symmetric_kl", a.device)(a.contiguous(), b.contiguous())


@_skl_op.register_fake
def _(a, b):
    acc = _ref.compute_dtype(a.dtype)
    return a.new_empty((a.shape[0],), dtype=acc), a.new_empty((a.shape[0], 4), dtype=acc)


@torch.library.custom_op("regops::symmetric_kl_backward", mutates_args=())
def _skl_backward_op(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("symmetric_kl_backward", a.device)(
        grad.contiguous(), a.contiguous(), b.contiguous(), stats
    )


@_skl_backward_op.register_fake
def _(grad, a, b, stats):
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
        b, memory_format=torch.contiguous_format
    )


def _skl_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _skl_backward(ctx, grad, _grad_stats):
    a, b, stats = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate (double backward)
        return _differentiable_backward(grad, a, b)
    return _skl_backward_op(grad, a, b, stats)


def _differentiable_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the per-row losses weighted by ``grad``, in torch ops (float32, float64 for float64)::

    dl/da = g/2 (p_a (d - <p_a, d>) + p_a - p_b),  dl/db = g/2 (p_b (<p_b, d> - d) + p_b - p_a),  d = log p_a - log p_b
    """
    cd = _ref.compute_dtype(a.dtype)
    la, lb = torch.log_softmax(a.to(cd), -1), torch.log_softmax(b.to(cd), -1)
    pa, pb = la.exp(), lb.exp()
    d = la - lb
    g = 0.5 * grad.to(cd).unsqueeze(-1)
    ga = g * (pa * (d - (pa * d).sum(-1, keepdim=True)) + pa - pb)
    gb = g * (pb * ((pb * d).sum(-1, keepdim=True) - d) + pb - pa)
    return ga.to(a.dtype), gb.to(b.dtype)


_skl_op.register_autograd(_skl_backward, setup_context=_skl_setup_context)

REDUCTIONS = ("mean", "sum", "none")


def symmetric_kl(
    logits_a: torch.Tensor, logits_b: torch.Tensor, *, reduction: str = "mean", class_dim: int | None = None
) -> torch.Tensor:
    r"""R-Drop consistency loss: :math:`\tfrac12\,[KL(p_a\|p_b) + KL(p_b\|p_a)]` over the class dimension.

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

        >>> loss = F.cross_entropy(la, y) + F.cross_entropy(lb, y) + alpha * regops.symmetric_kl(la, lb)
        >>> reg = regops.symmetric_kl(lm_logits_a, lm_logits_b, class_dim=-1)   # [B, T, V]
    """
    _validate.floating(logits_a, "logits_a")
    _validate.floating(logits_b, "logits_b")
    if logits_a.shape != logits_b.shape or logits_a.dtype != logits_b.dtype:
        raise ValueError(
            f"regops: logits_a and logits_b must have the same shape and dtype, got {tuple(logits_a.shape)} "
            f"{logits_a.dtype} and {tuple(logits_b.shape)} {logits_b.dtype}"
        )
    _validate.same_device("logits_a", logits_a, "logits_b", logits_b)
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
    loss, _ = _skl_op(logits_a.reshape(-1, cols), logits_b.reshape(-1, cols))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(logits_a.shape[:-1])
