"""The penalties family's public functions: activation sparsity fused into the activation, batched spectral norms,
and the orthogonality penalty.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from regops._core import rng, validate
from regops.penalties import ops

__all__ = ["ReLUL1Stats", "orthogonality_penalty", "relu_l1", "spectral_norms"]


class ReLUL1Stats(NamedTuple):
    """Sparsity statistics of one `relu_l1` call, from the same pass as the activation (no gradient).

    Args:
        token_active: ``x.shape[:-1]``, the fraction of the ``d`` units active in each token.
        unit_active: ``[d]``, the fraction of tokens in which each unit is active.
        activation_sum: 0-dim, the sum of the activations (the penalty is ``l1 * activation_sum``).

    Example::

        >>> _, stats = regops.relu_l1(torch.tensor([[1.0, -1.0], [2.0, -3.0]]), 1e-5, return_stats=True)
        >>> stats.unit_active, stats.activation_sum
        (tensor([1., 0.]), tensor(3.))
    """

    token_active: torch.Tensor  # x.shape[:-1]: fraction of the d units active in each token
    unit_active: torch.Tensor  # [d]: fraction of tokens in which each unit is active
    activation_sum: torch.Tensor  # (): sum of the activations (the penalty is l1 * activation_sum)


_L1_TENSORS: dict[float, torch.Tensor] = {}


def _runtime_l1(l1: object) -> torch.Tensor:
    """``l1`` as the 0-dim float64 CPU tensor the op takes: a runtime value under ``torch.compile`` (a float becomes
    a graph input, a tensor is one), so an l1 schedule never recompiles."""
    if torch.compiler.is_compiling():
        if isinstance(l1, torch.Tensor):
            return l1.detach().to(torch.float64).reshape(())
        return torch.zeros((), dtype=torch.float64) + l1
    if isinstance(l1, torch.Tensor):
        if l1.numel() != 1:
            raise TypeError(f"regops: l1 must be a number or a one-element tensor, got shape {tuple(l1.shape)}")
        value = float(l1.detach().item())
    elif isinstance(l1, numbers.Real) and not isinstance(l1, bool):
        value = float(l1)
    else:
        raise TypeError(f"regops: l1 must be a number, got {type(l1).__name__}")
    if not value >= 0.0:
        raise ValueError(f"regops: l1 must be a non-negative number, got {value}")
    t = _L1_TENSORS.get(value)
    if t is None:
        if len(_L1_TENSORS) >= 1024:
            _L1_TENSORS.clear()
        with torch.inference_mode(False):
            t = _L1_TENSORS[value] = torch.tensor(value, dtype=torch.float64)
    return t


def relu_l1(
    x: torch.Tensor,
    l1: float | torch.Tensor = 0.0,
    *,
    squared: bool = False,
    threshold: float = 0.0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ReLUL1Stats]:
    r"""ReLU (ReLU^2, FATReLU) whose backward also adds the gradient of ``l1 * sum(activation)``: ProSparse-style
    activation sparsity without another read of the activation.

    .. math::
        a = \begin{cases} x & x > \tau \\ 0 & \text{else} \end{cases}
        \;(\text{squared: } x^2), \qquad
        \frac{\partial}{\partial x}\Big(L + l_1 \textstyle\sum a\Big) = (g + l_1)\, a'(x)

    with ``a'(x) = [x > \tau]`` (``2x [x > \tau]`` squared). The L1 term itself is not added to any loss
    value: its gradient is fused into this op's backward (log ``l1 * stats.activation_sum`` if you want its value).
    Autograd saves ``x`` and a 0-dim ``l1``. NaN passes through the activation, as ``torch.relu``.

    Args:
        x: ``[..., d]``; float32, float16, bfloat16 or float64.
        l1: the penalty weight, >= 0: a number or a 0-dim tensor, a runtime value under ``torch.compile``.
        squared: ReLU^2 (Primer); threshold: FATReLU's threshold ``\tau \ge 0`` (0: ReLU).
        return_stats: also return `ReLUL1Stats` from the same pass.

    Returns:
        The activation, of ``x``'s shape and dtype (its backward adds ``l1`` times the L1 gradient); with
        ``return_stats=True`` the pair ``(activation, ReLUL1Stats)``.

    Example::

        >>> up_proj, x = torch.nn.Linear(16, 64), torch.randn(8, 16)
        >>> h = regops.relu_l1(up_proj(x), l1=1e-5)
        >>> h, stats = regops.relu_l1(up_proj(x), 1e-5, return_stats=True)
        >>> dead = stats.unit_active == 0  # units active in no token
        >>> h.shape, dead.shape
        (torch.Size([8, 64]), torch.Size([64]))
    """
    validate.floating(x, "x")
    if x.dim() == 0:
        raise ValueError("regops: relu_l1 needs x with at least one dimension [..., d]")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise ValueError(f"regops: threshold must be a non-negative number, got {threshold!r}")
    l1_t = _runtime_l1(l1)
    y, token, unit, total = ops.relu_l1(x, l1_t, float(threshold), bool(squared), bool(return_stats))
    return (y, ReLUL1Stats(token, unit, total)) if return_stats else y


def _matrix(w: object, i: int) -> torch.Tensor:
    validate.floating(w, f"weights[{i}]")
    if w.dim() < 2:
        raise ValueError(f"regops: weights[{i}] must have at least 2 dimensions, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def spectral_norms(
    weights: Sequence[torch.Tensor],
    num_iters: int | None = None,
    state: Sequence[torch.Tensor] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""Largest singular values of many matrices by batched power iteration, warm-started from ``state``.

    Matrices of one shape, dtype and device form a group, iterated together: on GPU one Triton launch per
    iteration per group (each program a slice of rows of one matrix), on CPU a loop of matrix-vector products.
    Each iteration: ``u = \mathrm{normalize}(W v),\ z = W^\top u,\ \sigma = \|z\|,\ v = z / \sigma``. The
    returned ``\sigma = u^\top W v`` is differentiable in the weights (gradient ``u v^\top``, the vectors
    held constant, as ``torch.nn.utils.parametrizations.spectral_norm``), so ``sum(sigmas)`` is a spectral penalty.

    Args:
        weights: matrices ``[m, n]`` (a tensor of more dimensions is read as ``[shape[0], -1]``, as torch's
            spectral_norm with ``dim=0``); float32, float16, bfloat16 or float64.
        num_iters: iterations (default 20 without ``state``, 1 with it).
        state: the ``v`` vectors a previous call returned (one per weight): a warm start, so one iteration per
            training step tracks the norms.
        generator: draws the random start vectors when there is no ``state``.

    Returns:
        ``(sigmas, state)``: ``sigmas [len(weights)]`` (float32; float64 for float64 weights) and the new state.

    Example::

        >>> ws = [torch.diag(torch.tensor([3.0, 1.0])), torch.randn(8, 4, requires_grad=True)]
        >>> sig, st = regops.spectral_norms(ws)  # 20 iterations from random starts
        >>> sig, st = regops.spectral_norms(ws, state=st)  # each step after: 1 warm iteration
        >>> round(float(sig.detach()[0]), 4)
        3.0
        >>> (1e-3 * sig.square().sum()).backward()
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or not weights:
        raise ValueError("regops: weights must be a non-empty sequence of matrices")
    mats = [_matrix(w, i) for i, w in enumerate(weights)]
    iters = (1 if state is not None else 20) if num_iters is None else num_iters
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"regops: num_iters must be a positive int, got {num_iters!r}")
    if state is not None and (isinstance(state, torch.Tensor) or len(state) != len(mats)):
        raise ValueError(f"regops: state must be the list of {len(mats)} vectors a previous call returned")
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(mats):
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
    sigmas: list[torch.Tensor | None] = [None] * len(mats)
    new_state: list[torch.Tensor | None] = [None] * len(mats)
    for (shape, _, device), idx in groups.items():
        rng.check_generator(generator, device)
        if state is not None:
            for i in idx:
                if not isinstance(state[i], torch.Tensor) or state[i].shape != (shape[1],):
                    raise ValueError(f"regops: state[{i}] must be a vector of {shape[1]} elements")
            v0 = torch.stack([state[i].to(device) for i in idx])
        else:
            v0 = torch.randn((len(idx), shape[1]), dtype=torch.float32, device=device, generator=generator)
        sig, _, v = ops.power_iteration([mats[i] for i in idx], v0, iters)
        for j, i in enumerate(idx):
            sigmas[i], new_state[i] = sig[j], v[j]
    out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in mats) else torch.float32
    return torch.stack([s.to(out_dtype) for s in sigmas]), new_state  # type: ignore[misc]


def orthogonality_penalty(W: torch.Tensor) -> torch.Tensor:
    r"""Soft orthogonality ``\|W W^\top - I\|_F^2`` with the Gram matrix of the smaller side.

    For ``W [..., m, n]``: ``G = W W^\top`` (``m <= n``) or ``W^\top W`` (``m > n``), penalty
    ``\|G - I\|_F^2`` per matrix; gradient ``4 (G - I) W`` (``4 W (G - I)``). On GPU the forward
    sums squared tiles of ``G - I`` without storing ``G``; the backward builds ``G`` once (the only
    ``k x k`` tensor) and one matmul. Autograd saves ``W`` only. Double backward works.

    Args:
        W: ``[..., m, n]``; float32, float16, bfloat16 or float64.

    Returns:
        ``[...]`` (0-dim for one matrix) in float32 (float64 for float64).

    Example::

        >>> regops.orthogonality_penalty(torch.eye(3))  # orthogonal: no penalty
        tensor(0.)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> penalty = 1e-4 * sum(regops.orthogonality_penalty(m.weight) for m in model if hasattr(m, "weight"))
        >>> penalty.backward()
    """
    validate.floating(W, "W")
    if W.dim() < 2:
        raise ValueError(f"regops: W must have at least 2 dimensions [..., m, n], got shape {tuple(W.shape)}")
    return ops.orthogonality_penalty(W)
