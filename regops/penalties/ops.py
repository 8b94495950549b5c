"""The penalties family's operators: schemas, fakes, backends and derivatives, each declared once.

``relu_l1`` saves ``x`` and the 0-dim ``l1`` (what ReLU's own backward keeps, one tensor of x's size); its
backward is ``(g + l1) * d act / dx`` in one pass. ``power_iteration`` saves its singular vectors (``[G, m + n]``)
and differentiates ``sigma = u^T W v``. ``orthogonality_penalty`` saves ``W`` only and rebuilds the Gram matrix in
backward. References: :mod:`regops.penalties.reference`; Triton launchers: :mod:`regops.penalties.triton`; C++
kernels: csrc/penalties/.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype
from regops._core.ops import declare
from regops.penalties import reference as ref

TRITON = "regops.penalties.triton:"


# ------------------------------------------------------------------------------------------------ relu_l1
def _relu_l1_fake(x, l1, threshold, squared, stats):
    cd = acc_dtype(x)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if not stats:
        e = x.new_empty(0, dtype=cd)
        return y, e, e.clone(), e.clone()
    return y, x.new_empty(x.shape[:-1], dtype=cd), x.new_empty(x.shape[-1:], dtype=cd), x.new_empty((), dtype=cd)


relu_l1 = declare(
    "relu_l1(Tensor x, Tensor l1, float threshold, bool squared, bool stats) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=ref.relu_l1,
    triton=TRITON + "relu_l1",
    fake=_relu_l1_fake,
)
relu_l1_backward = declare(
    "relu_l1_backward(Tensor grad, Tensor x, Tensor l1, float threshold, bool squared) -> Tensor",
    reference=ref.relu_l1_backward,
    triton=TRITON + "relu_l1_backward",
    fake=lambda grad, x, l1, threshold, squared: torch.empty_like(x, memory_format=torch.contiguous_format),
)


def _relu_l1_setup(ctx, inputs, output) -> None:
    x, l1, ctx.threshold, ctx.squared, _ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, l1)


def _relu_l1_bwd(ctx, grad, *_):
    x, l1 = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(x)
    if torch.is_grad_enabled():  # create_graph=True: differentiable in g, x (ReLU^2) and l1
        return ref.relu_l1_grad(grad, x, l1, ctx.threshold, ctx.squared).to(x.dtype), None, None, None, None
    return relu_l1_backward(grad, x, l1, ctx.threshold, ctx.squared), None, None, None, None


relu_l1.register_autograd(_relu_l1_bwd, setup_context=_relu_l1_setup)


# ------------------------------------------------------------------------------------------------ spectral norms
def _power_fake(weights, v, num_iters):
    g = len(weights)
    m, n = weights[0].shape
    cd = acc_dtype(*weights, v)
    return v.new_empty((g,), dtype=cd), v.new_empty((g, m), dtype=cd), v.new_empty((g, n), dtype=cd)


power_iteration = declare(
    "power_iteration(Tensor[] weights, Tensor v, int num_iters) -> (Tensor, Tensor, Tensor)",
    reference=ref.power_iteration,
    triton=TRITON + "power_iteration",
    triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
    fake=_power_fake,
)


def _power_setup(ctx, inputs, output) -> None:
    weights = inputs[0]
    ctx.dtypes = [w.dtype for w in weights]
    _, u, v = output
    ctx.mark_non_differentiable(u, v)
    ctx.save_for_backward(u, v)


def _power_bwd(ctx, grad_sigma, *_):
    u, v = ctx.saved_tensors
    if grad_sigma is None:
        return None, None, None
    outer = grad_sigma[:, None, None] * u[:, :, None] * v[:, None, :]  # d(u^T W v)/dW = u v^T
    return [outer[g].to(dt) for g, dt in enumerate(ctx.dtypes)], None, None


power_iteration.register_autograd(_power_bwd, setup_context=_power_setup)


# ------------------------------------------------------------------------------------------------ orthogonality
orthogonality_penalty = declare(
    "orthogonality_penalty(Tensor W) -> Tensor",
    reference=ref.orthogonality_penalty,
    triton=TRITON + "orthogonality_penalty",
    triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
    fake=lambda w: w.new_empty(w.shape[:-2], dtype=acc_dtype(w)),
)
orthogonality_penalty_backward = declare(
    "orthogonality_penalty_backward(Tensor grad, Tensor W) -> Tensor",
    reference=ref.orthogonality_penalty_backward,
    fake=lambda grad, w: torch.empty_like(w, memory_format=torch.contiguous_format),
    gpu_reference=True,  # one Gram matrix and a matmul: torch's GEMMs are the kernel
)


def _ortho_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _ortho_bwd(ctx, grad):
    (w,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the same formula from differentiable torch ops
        cd = acc_dtype(w)
        wc = w.to(cd)
        rows = w.shape[-2] <= w.shape[-1]
        g = wc @ wc.mT if rows else wc.mT @ wc
        g = g - torch.eye(g.shape[-1], dtype=cd, device=w.device)
        dw = g @ wc if rows else wc @ g
        return (dw * (4.0 * grad.to(cd))[..., None, None]).to(w.dtype)
    return orthogonality_penalty_backward(grad, w)


orthogonality_penalty.register_autograd(_ortho_bwd, setup_context=_ortho_setup)

__all__ = [
    "orthogonality_penalty",
    "orthogonality_penalty_backward",
    "power_iteration",
    "relu_l1",
    "relu_l1_backward",
]
