"""The masks family's public functions: LoRA dropout, the adapter input masked as it is multiplied.

Every random draw comes from the one Philox stream (:mod:`regops._core.rng`): the mask of
:func:`lora_dropout` is :func:`regops.dropout`'s for the same seed, bit for bit, on every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regops._core import rng, validate
from regops._core.validate import runtime_probability
from regops.masks import ops

__all__ = ["lora_dropout"]


def lora_dropout(
    x: torch.Tensor,
    A: torch.Tensor,
    p: float = 0.0,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``F.linear(regops.dropout(x, p), A)`` without the dropped copy of ``x``: LoRA's down-projection of a
    dropped-out input (PEFT's ``lora_A(lora_dropout(x))``).

    .. math:: y = \frac{(m \odot x)\, A^\top}{1-p}

    The mask ``m`` is `regops.dropout`'s for the same generator state (the element index of ``x``, row
    major), applied while ``x`` is loaded: no dropped copy is made (on CPU the C++ kernel masks row chunks; on
    GPU the Triton kernel masks the operand tiles), and autograd saves ``x``, ``A`` and a 16-byte seed --
    nothing of x's size but ``x`` itself. Backward regenerates the mask:
    ``dx = m \odot (g A) / (1-p)``, ``dA = g^\top (m \odot x) / (1-p)``; double backward works.

    Args:
        x: ``[..., K]``; float32, float16, bfloat16 or float64.
        A: ``[R, K]`` (``lora_A.weight``), x's dtype and device.
        p: drop probability in ``[0, 1]``, a runtime value under ``torch.compile`` (as `regops.dropout`).
        training: ``False`` (or ``p == 0``) is ``F.linear(x, A)``.
        generator: a ``torch.Generator`` on x's device type.

    Returns:
        ``[..., R]`` in x's dtype.

    Example::

        >>> x, lora_A, lora_B = torch.randn(8, 64), torch.nn.Linear(64, 4, bias=False), torch.nn.Linear(4, 32)
        >>> h = regops.lora_dropout(x, lora_A.weight, p=0.1)  # then lora_B(h) * scaling
        >>> h.shape
        torch.Size([8, 4])
        >>> torch.allclose(regops.lora_dropout(x, lora_A.weight, p=0.1, training=False), lora_A(x))
        True
    """
    validate.floating(x, "x")
    validate.floating(A, "A")
    p_value, p_t = runtime_probability(p)
    rng.check_generator(generator, x.device)
    if x.dim() == 0:
        raise ValueError("regops: lora_dropout needs x with at least one dimension [..., K]")
    if A.dim() != 2 or A.shape[1] != x.shape[-1]:
        raise ValueError(f"regops: A must have shape [R, {x.shape[-1]}] (x is {tuple(x.shape)}), got {tuple(A.shape)}")
    if A.dtype != x.dtype:
        raise TypeError(f"regops: A and x must have the same dtype, got {A.dtype} and {x.dtype}")
    validate.same_device("x", x, "A", A)
    if not training or p_value == 0.0:
        return F.linear(x, A)
    seed = rng.philox_seed(x.device, x.numel(), generator)
    return ops.lora_dropout(x, A, p_t, seed)
