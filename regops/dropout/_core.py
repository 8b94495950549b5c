"""Dropout without a stored mask: the backward regenerates the mask from (seed, offset); or, on request, a mask
packed 1 bit per element.

``regops::dropout`` is a torch.library operator with a fake impl, a CPU impl (the reference) and autograd; the
kernel that runs it is chosen in :mod:`regops._backend`. Its only state for backward is the int64 ``seed``
tensor of shape ``[2]`` (16 bytes), whatever the size of ``x``.
"""

from __future__ import annotations

import numbers

import torch

from regops import _backend, _rng, _validate
from regops.distributed import _hook as _dtensor
from regops.reference import dropout as _ref
from regops.reference.philox import keep_threshold

__all__ = ["dropout"]

MASK_MODES = ("recompute", "bitmask")


# ------------------------------------------------------------------------------------------------ p as a runtime value
def check_probability(p: object, name: str = "p") -> float:
    """``p`` as a Python float in ``[0, 1]``, or a clear exception.

    Accepts what torch's dropout accepts as a number: Python and NumPy scalars (``np.float32(0.1)``), bools
    (``True`` is 1, as in torch) and one-element tensors that do not require grad. Rejects a tensor that
    requires grad (the mask is a discrete draw: there is no gradient in ``p``; torch raises there too).
    """
    if isinstance(p, torch.Tensor):
        if p.requires_grad:
            raise TypeError(
                f"regops: {name} is a tensor that requires grad; dropout has no gradient with respect to {name} "
                f"(the mask is a discrete draw). Pass {name}.detach() or a float."
            )
        if p.numel() != 1 or p.dtype == torch.bool:
            raise TypeError(f"regops: {name} must be a number, got a {p.dtype} tensor of shape {tuple(p.shape)}")
        p = p.item()
    if type(p).__module__ == "numpy":  # a NumPy scalar (np.bool_ is not a numbers.Real): its Python value
        p = p.item()
    if not isinstance(p, numbers.Real):
        raise TypeError(f"regops: {name} must be a number in [0, 1], got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"regops: {name} must be in [0, 1], got {p}")
    return p


def runtime_probability(p: object, name: str = "p") -> tuple[float | None, torch.Tensor]:
    """``(value, tensor)``: what a public function passes to its op, which takes ``p`` as a 0-dim tensor.

    In eager mode ``value`` is the checked float (for the ``p == 0`` shortcut) and ``tensor`` holds it. Under
    ``torch.compile`` ``value`` is ``None`` and ``p`` is never branched on: a float ``p`` becomes a graph input
    (after dynamo's one automatic-dynamic recompile) and a tensor ``p`` is one from the start, so changing ``p``
    between calls never recompiles again. The op checks the range when it runs.
    """
    if torch.compiler.is_compiling():
        if isinstance(p, torch.Tensor):
            if p.requires_grad:
                check_probability(p, name)  # raises the clear error
            return None, p.detach().reshape(())
        # `zeros + p`, not torch.tensor(p): dynamo's float tensorify pass keeps this a graph input, not a constant
        return None, torch.zeros((), dtype=torch.float64) + p
    value = check_probability(p, name)
    return value, torch.tensor(value, dtype=torch.float64)


def probability_value(p: torch.Tensor, name: str = "p") -> float:
    """The float inside an op's ``p`` tensor, range-checked (under torch.compile this is the only check)."""
    value = float(p.item())
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"regops: {name} must be in [0, 1], got {value}")
    return value


def in_layout_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (contiguous, x's shape) laid out like ``x``: channels_last in, channels_last out, as torch does.

    Masks follow the logical (row-major) index whatever the layout, so the kernels run on contiguous data and
    a dense non-contiguous ``x`` costs one extra copy. Fake impls call this too, so strides always agree.
    """
    if x.is_contiguous():
        return y
    out = torch.empty_like(x, dtype=y.dtype)
    return y if out.stride() == y.stride() else out.copy_(y)


# ------------------------------------------------------------------------------------------------ dropout
def _dropout_cuda(x: torch.Tensor, p: float, seed: torch.Tensor | int, offset: int | None) -> torch.Tensor:
    seed = _rng.device_seed(seed, offset, x.device)
    return torch.ops.regops_C.dropout(x, keep_threshold(p), _ref.dropout_scale(p), seed)


def _dropout_cuda_fake(x: torch.Tensor, threshold: int, scale: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_backend.register(
    "dropout",
    torch=_ref.dropout,
    triton="regops.kernels.dropout:dropout",
    cuda=_dropout_cuda,
    cuda_fake=_dropout_cuda_fake,
)


@torch.library.custom_op("regops::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    key, offset = _rng.seed_args(seed, "dropout", x.device)
    y = _backend.implementation("dropout", x.device)(x.contiguous(), probability_value(p), key, offset)
    return in_layout_of(x, y)


def register_seeded_mask_op(op) -> None:
    """Fake impl and autograd of an op ``y = op(x, *params, seed)`` that multiplies ``x`` elementwise by a mask
    regenerated from ``seed``: the output is shaped and laid out like ``x``, and since the Jacobian is that
    diagonal mask, the backward is the same op applied to the gradient (so every order of derivative works).
    Autograd keeps only the seed and the 0-dim ``p``."""

    @op.register_fake
    def _(x, *params_and_seed):
        return in_layout_of(x, torch.empty_like(x, memory_format=torch.contiguous_format))

    def setup_context(ctx, inputs, output) -> None:
        params = inputs[1:-1]
        ctx.tensor_slots = [i for i, a in enumerate(params) if isinstance(a, torch.Tensor)]
        ctx.params = [None if isinstance(a, torch.Tensor) else a for a in params]
        ctx.save_for_backward(*(params[i] for i in ctx.tensor_slots), inputs[-1])

    def backward(ctx, grad: torch.Tensor):
        *tensors, seed = ctx.saved_tensors
        params = list(ctx.params)
        for i, t in zip(ctx.tensor_slots, tensors, strict=True):
            params[i] = t
        return (op(grad, *params, seed), *([None] * (len(params) + 1)))

    op.register_autograd(backward, setup_context=setup_context)


register_seeded_mask_op(_dropout_op)

# ------------------------------------------------------------------------------------------------ bitmask mode
_backend.register("dropout_bitmask", torch=_ref.dropout_bitmask, triton="regops.kernels.dropout:dropout_bitmask")
_backend.register("apply_bitmask", torch=_ref.apply_bitmask, triton="regops.kernels.dropout:apply_bitmask")


@torch.library.custom_op("regops::dropout_bitmask", mutates_args=())
def _dropout_bitmask_op(x: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key, offset = _rng.seed_args(seed, "dropout_bitmask", x.device)
    y, bits = _backend.implementation("dropout_bitmask", x.device)(x.contiguous(), probability_value(p), key, offset)
    return in_layout_of(x, y), bits


@_dropout_bitmask_op.register_fake
def _(x: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)
    return in_layout_of(x, torch.empty_like(x, memory_format=torch.contiguous_format)), bits


@torch.library.custom_op("regops::apply_bitmask", mutates_args=())
def _apply_bitmask_op(g: torch.Tensor, bits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    scale = _ref.dropout_scale(probability_value(p))
    return in_layout_of(g, _backend.implementation("apply_bitmask", g.device)(g.contiguous(), bits, scale))


@_apply_bitmask_op.register_fake
def _(g: torch.Tensor, bits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return in_layout_of(g, torch.empty_like(g, memory_format=torch.contiguous_format))


def _bitmask_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], inputs[1])
    ctx.mark_non_differentiable(output[1])


def _bitmask_backward(ctx, grad: torch.Tensor, _grad_bits):
    bits, p = ctx.saved_tensors
    return _apply_bitmask_op(grad, bits, p), None, None


_dropout_bitmask_op.register_autograd(_bitmask_backward, setup_context=_bitmask_setup_context)


def _apply_bitmask_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _apply_bitmask_backward(ctx, grad: torch.Tensor):
    bits, p = ctx.saved_tensors
    return _apply_bitmask_op(grad, bits, p), None, None


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
    backward regenerates it: autograd saves a 16-byte seed, nothing of the size of ``x``. As in torch, ``x`` is
    *multiplied* by the mask: a NaN or Inf at a dropped position gives NaN (forward and backward), so an overflow
    is never hidden from AMP's GradScaler.

    Under ``torch.compile`` ``p`` is a runtime value: changing it between calls recompiles at most once (a float
    ``p``: dynamo's automatic-dynamic recompile) or never (a 0-dim tensor ``p``, or a :class:`regops.nn` module).

    Args:
        x: any shape; float32, float16, bfloat16 or float64; any device (CPU runs the reference). Non-contiguous
            inputs are read in logical (row-major) order; the output keeps ``x``'s memory format when ``x`` is
            dense (channels_last in, channels_last out), else it is contiguous.
        p: drop probability in ``[0, 1]``: a Python or NumPy number, or a one-element tensor that does not
            require grad. ``p = 1`` gives ``x * 0`` (zeros, NaN where ``x`` is NaN or Inf), as torch.
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
    p_value, p_t = runtime_probability(p)
    _rng.check_generator(generator, x.device)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"regops: mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    _validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "dropout", x, p_value, inplace, mask_mode, generator)
    seed = _rng.philox_seed(x.device, x.numel(), generator)
    y = _dropout_op(x, p_t, seed) if mask_mode == "recompute" else _dropout_bitmask_op(x, p_t, seed)[0]
    return x.copy_(y) if inplace else y
