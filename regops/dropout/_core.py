"""Dropout without a stored mask: the backward regenerates the mask from (seed, offset); or, on request, a mask
packed 1 bit per element.

``regops::dropout`` is a torch.library operator with a fake impl, a CPU impl (the reference) and autograd; the
kernel that runs it is chosen in :mod:`regops._backend`. Its only state for backward is the int64 ``seed``
tensor of shape ``[2]`` (16 bytes), whatever the size of ``x``.
"""

from __future__ import annotations

import torch

from regops import _backend, _rng, _validate
from regops.distributed import _hook as _dtensor
from regops.reference import dropout as _ref
from regops.reference.philox import keep_threshold

__all__ = ["dropout"]

MASK_MODES = ("recompute", "bitmask")


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


def register_seeded_mask_op(op) -> None:
    """Fake impl and autograd of an op ``y = op(x, *params, seed)`` that multiplies ``x`` elementwise by a mask
    regenerated from ``seed``: the output is contiguous and shaped like ``x``, and since the Jacobian is that
    diagonal mask, the backward is the same op applied to the gradient. Autograd keeps only the seed."""

    @op.register_fake
    def _(x, *params_and_seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output) -> None:
        ctx.params = inputs[1:-1]
        ctx.save_for_backward(inputs[-1])

    def backward(ctx, grad: torch.Tensor):
        (seed,) = ctx.saved_tensors
        return (op(grad, *ctx.params, seed), *([None] * (len(ctx.params) + 1)))

    op.register_autograd(backward, setup_context=setup_context)


register_seeded_mask_op(_dropout_op)

# ------------------------------------------------------------------------------------------------ bitmask mode
_backend.register("dropout_bitmask", torch=_ref.dropout_bitmask, triton="regops.kernels.dropout:dropout_bitmask")
_backend.register("apply_bitmask", torch=_ref.apply_bitmask, triton="regops.kernels.dropout:apply_bitmask")


@torch.library.custom_op("regops::dropout_bitmask", mutates_args=())
def _dropout_bitmask_op(x: torch.Tensor, p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key, offset = seed.tolist()
    return _backend.implementation("dropout_bitmask", x.device)(x.contiguous(), p, key, offset)


@_dropout_bitmask_op.register_fake
def _(x: torch.Tensor, p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.contiguous_format), bits


@torch.library.custom_op("regops::apply_bitmask", mutates_args=())
def _apply_bitmask_op(g: torch.Tensor, bits: torch.Tensor, scale: float) -> torch.Tensor:
    return _backend.implementation("apply_bitmask", g.device)(g.contiguous(), bits, scale)


@_apply_bitmask_op.register_fake
def _(g: torch.Tensor, bits: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(g, memory_format=torch.contiguous_format)


def _bitmask_setup_context(ctx, inputs, output) -> None:
    ctx.scale = _ref.dropout_scale(inputs[1])
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _bitmask_backward(ctx, grad: torch.Tensor, _grad_bits):
    (bits,) = ctx.saved_tensors
    return _apply_bitmask_op(grad, bits, ctx.scale), None, None


_dropout_bitmask_op.register_autograd(_bitmask_backward, setup_context=_bitmask_setup_context)


def _apply_bitmask_setup_context(ctx, inputs, output) -> None:
    ctx.scale = inputs[2]
    ctx.save_for_backward(inputs[1])


def _apply_bitmask_backward(ctx, grad: torch.Tensor):
    (bits,) = ctx.saved_tensors
    return _apply_bitmask_op(grad, bits, ctx.scale), None, None


_apply_bitmask_op.register_autograd(_apply_bitmask_backward, setup_context=_apply_bitmask_setup_context)


def dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
    mask_mode: str = "recompute",
) -> torch.Tensor:
    r"""Drop-in for :func:`torch.nn.functional.dropout` that stores no mask for backward.

    .. math::
        y_i = \frac{m_i\,x_i}{1-p}, \qquad
        m_i = [\,\mathrm{philox}(seed, i) \gg 1 > \lfloor p\,2^{31}\rfloor - 1\,]

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
        mask_mode: ``"recompute"`` (default: the backward regenerates the mask, 16 bytes saved) or ``"bitmask"``
            (the mask is saved packed, 1 bit per element: ``ceil(numel / 8)`` bytes, for when the seed must not
            be replayed). Both give the same output for the same seed.

    Returns:
        Tensor of ``x``'s shape and dtype.

    Example::

        >>> torch.manual_seed(0)
        >>> y = regops.dropout(torch.ones(8), p=0.25)   # 0 or 4/3 per element; same y after manual_seed(0)
    """
    _validate.floating(x, "x")
    p = _validate.probability(p)
    _rng.check_generator(generator, x.device)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"regops: mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if not training or p == 0.0:
        return x
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "dropout", x, p, inplace, mask_mode, generator)
    seed = _rng.philox_seed(x.device, x.numel(), generator)
    y = _dropout_op(x, p, seed) if mask_mode == "recompute" else _dropout_bitmask_op(x, p, seed)[0]
    return x.copy_(y) if inplace else y
