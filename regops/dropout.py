"""Dropout without a stored mask: the backward regenerates the mask from (seed, offset).

``regops::dropout`` is a torch.library operator with a fake impl, a CPU impl (the reference) and autograd; the
kernel that runs it is chosen in :mod:`regops._backend`. Its only state for backward is the int64 ``seed``
tensor of shape ``[2]`` (16 bytes), whatever the size of ``x``.
"""

from __future__ import annotations

import torch

from regops import _backend, _rng, _validate
from regops.reference import dropout as _ref
from regops.reference.philox import keep_threshold

__all__ = ["dropout"]


def _dropout_cuda(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    return torch.ops.regops_C.dropout(x, keep_threshold(p), _ref.dropout_scale(p), seed, offset)


def _dropout_cuda_fake(x: torch.Tensor, threshold: int, scale: float, seed: int, offset: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_backend.register(
    "dropout",
    torch=_ref.dropout,
    triton="regops.kernels.dropout:dropout",
    cuda=_dropout_cuda,
    cuda_fake=_dropout_cuda_fake,
)


@torch.library.custom_op("regops::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    key, offset = seed.tolist()
    return _backend.implementation("dropout", x.device)(x.contiguous(), p, key, offset)


@_dropout_op.register_fake
def _(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    _, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(seed)


def _backward(ctx, grad: torch.Tensor):
    (seed,) = ctx.saved_tensors
    return _dropout_op(grad, ctx.p, seed), None, None


_dropout_op.register_autograd(_backward, setup_context=_setup_context)


def dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Drop-in for :func:`torch.nn.functional.dropout` that stores no mask for backward.

    .. math:: y_i = \frac{m_i\,x_i}{1-p}, \qquad m_i = [\,\mathrm{philox}(seed, i) \gg 1 > \lfloor p\,2^{31}\rfloor - 1\,]

    Each element is zeroed with probability ``p`` (to within :math:`2^{-31}`); survivors are scaled by
    ``1/(1-p)`` (rounded to float32). The mask is a function of (seed, offset, element index) only, so the
    backward regenerates it: autograd saves a 16-byte seed, nothing of the size of ``x``.

    Args:
        x: any shape; float32, float16, bfloat16 or float64; any device (CPU runs the reference). Non-contiguous
            inputs are read in logical (row-major) order and give a contiguous output.
        p: drop probability in ``[0, 1]``. ``p = 1`` gives zeros.
        training: when ``False`` (or ``p == 0``) returns ``x`` itself, as torch does.
        inplace: write the result into ``x`` (as torch's ``inplace=True``; autograd rules for in-place apply).
        generator: a ``torch.Generator`` on ``x``'s device type; default: torch's default generator.

    Returns:
        Tensor of ``x``'s shape and dtype.

    Example::

        >>> torch.manual_seed(0)
        >>> y = regops.dropout(torch.ones(8), p=0.25)   # 0 or 4/3 per element; same y after manual_seed(0)
    """
    _validate.floating(x, "x")
    p = _validate.probability(p)
    _rng.check_generator(generator, x.device)
    if not training or p == 0.0:
        return x
    seed = _rng.philox_seed(x.device, x.numel(), generator)
    y = _dropout_op(x, p, seed)
    return x.copy_(y) if inplace else y
