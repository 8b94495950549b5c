"""The merge family's public functions: task arithmetic, DARE, TIES, DARE-TIES and DELLA over a base and K deltas.

Each takes one tensor or a whole state dict (any mapping of names to tensors, lazily loading ones included: it
reads one name at a time) and streams over it tensor by tensor and chunk by chunk (`regops.merge._stream`):
the K deltas are never stacked, and the extra memory is a few chunks, whatever K. Random masks come from
regops' Philox stream keyed by (the generator's draw, the tensor's name, the delta's index) and the global element
index: reproducible from a generator and independent of the chunking, the device and the other tensors.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, MutableMapping, Sequence

import torch

from regops._core import rng, validate
from regops.merge._stream import CHUNK, Plan, merge_tensor

__all__ = ["dare", "dare_ties", "della", "magnitude_prune", "task_arithmetic", "ties"]

SIGN_METHODS = ("total", "frequency")
StateDict = Mapping[str, torch.Tensor]


def _number(v: object, name: str) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"regops: {name} must be a number, got {type(v).__name__}")
    return float(v)


def _density(density: object) -> float:
    d = _number(density, "density")
    if not 0.0 < d <= 1.0:
        raise ValueError(f"regops: density must be in (0, 1], got {d}")
    return d


def _sign_method(method: object) -> str:
    if method not in SIGN_METHODS:
        raise ValueError(f"regops: majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def _weights(weights: object, count: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * count
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().reshape(-1).tolist()
    if not isinstance(weights, Sequence) or len(weights) != count:
        raise ValueError(f"regops: weights must be a sequence of {count} numbers (one per delta), got {weights!r}")
    return tuple(_number(w, "weights[i]") for w in weights)


def _delta_list(deltas: object) -> list:
    if isinstance(deltas, torch.Tensor):
        if deltas.dim() == 0:
            raise ValueError(
                "regops: deltas must be a sequence of tensors or state dicts (or a stacked [K, ...] tensor)"
            )
        return list(deltas.unbind(0))
    if isinstance(deltas, Mapping) or not isinstance(deltas, Sequence) or len(deltas) == 0:
        raise ValueError("regops: deltas must be a non-empty sequence of tensors or of state dicts")
    return list(deltas)


def _check_pair(name: str, base: torch.Tensor, delta: object, k: int) -> torch.Tensor:
    where = f" of {name!r}" if name else ""
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"regops: delta {k}{where} must be a tensor, got {type(delta).__name__}")
    if delta.shape != base.shape:
        raise ValueError(f"regops: delta {k}{where} has shape {tuple(delta.shape)}, the base {tuple(base.shape)}")
    validate.floating(delta, f"delta {k}{where}")
    return delta


def _merge(base, deltas, plan: Plan, generator, inplace: bool, out, chunk_size: int | None):
    deltas = _delta_list(deltas)
    plan = Plan(**{**plan.__dict__, "weights": _weights(plan.weights, len(deltas))})
    chunk = CHUNK if chunk_size is None else int(chunk_size)
    if chunk < 4 or chunk % 4:
        raise ValueError(f"regops: chunk_size must be a positive multiple of 4, got {chunk_size}")
    if inplace and out is not None:
        raise ValueError("regops: pass either inplace=True or out=, not both")
    with torch.no_grad():
        if isinstance(base, torch.Tensor):
            return _merge_tensor_call(base, deltas, plan, generator, inplace, out, chunk)
        if not isinstance(base, Mapping):
            raise TypeError(f"regops: base must be a tensor or a state dict, got {type(base).__name__}")
        return _merge_state_dict(base, deltas, plan, generator, inplace, out, chunk)


def _call_seed(device: torch.device, plan: Plan, generator) -> tuple[int, int]:
    rng.check_generator(generator, device)
    if plan.keep not in ("random", "della"):
        return 0, 0
    key, offset = rng.philox_seed(device, 0, generator).tolist()
    return key, offset


def _merge_tensor_call(base, deltas, plan, generator, inplace, out, chunk):
    validate.floating(base, "base")
    deltas = [_check_pair("", base, d, k) for k, d in enumerate(deltas)]
    if out is not None:
        raise TypeError("regops: out= takes a mapping for state dicts; for a tensor use inplace=True or the result")
    key, offset = _call_seed(base.device, plan, generator)
    target = base if inplace else torch.empty_like(base, memory_format=torch.contiguous_format)
    if inplace and not base.is_contiguous():
        raise ValueError("regops: inplace=True needs a contiguous base tensor")
    flat = target.reshape(-1)
    merge_tensor("", base, deltas, plan, key, offset, lambda s, e, m: flat[s:e].copy_(m), chunk)
    return target


def _merge_state_dict(base: StateDict, deltas, plan, generator, inplace, out, chunk):
    for k, d in enumerate(deltas):
        if not isinstance(d, Mapping):
            raise TypeError(f"regops: delta {k} must be a state dict like the base, got {type(d).__name__}")
        names = set(d)  # iterating names never loads a tensor (``in`` may, on a lazy mapping)
        missing = [name for name in base if name not in names]
        if missing:
            raise KeyError(f"regops: delta {k} has no tensor named {missing[0]!r} (and {len(missing) - 1} more)")
    if inplace and not isinstance(base, MutableMapping):
        raise TypeError("regops: inplace=True needs a mutable state dict")
    result: MutableMapping = base if inplace else ({} if out is None else out)
    seed = None
    for name in base:
        t = base[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"regops: base[{name!r}] must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():  # integer buffers (step counters, position ids) are kept as they are
            if not inplace:
                result[name] = t.clone()
            continue
        ds = [_check_pair(name, t, d[name], k) for k, d in enumerate(deltas)]
        if seed is None:
            seed = _call_seed(t.device, plan, generator)
        if inplace and not t.is_contiguous():
            raise ValueError(f"regops: inplace=True needs contiguous tensors; {name!r} is not")
        target = t if inplace else torch.empty_like(t, memory_format=torch.contiguous_format)
        flat = target.reshape(-1)
        merge_tensor(name, t, ds, plan, seed[0], seed[1], lambda s, e, m, f=flat: f[s:e].copy_(m), chunk)
        del ds
        if not inplace:
            result[name] = target
    return result


_COMMON_ARGS = """
        base: a tensor, or a state dict (a mapping of names to tensors; integer tensors are copied unchanged).
        deltas: K tensors of the base's shape (or a stacked ``[K, ...]`` tensor), or K state dicts with every name
            of the base: the task vectors ``theta_k - theta_base``, or the fine-tuned weights themselves with
            ``finetuned=True`` (each delta is then formed chunk by chunk, never as a tensor).
        weights: K numbers (default all 1): the scaling of each task vector (lambda in the papers).
        finetuned: the deltas are fine-tuned weights, not differences.
        inplace: write the result into the base's tensors (documented in-place; the base must be contiguous).
        out: a mutable mapping that receives the merged tensors (e.g. a writer that saves each to disk), for state
            dicts; default: a new dict.
        chunk_size: elements per streamed chunk (a multiple of 4); the result does not depend on it.
"""
_RETURNS = """
    Returns:
        The merged tensor (the base's shape and dtype), or for a state dict the mapping of merged tensors (``out``
        when given). Computed in float32 (float64 for float64), rounded once to the base's dtype. Extra memory: a
        few chunks (about ``(K + 4) * chunk_size`` elements), the output when not in place, and nothing that grows
        with K or with the tensor beyond that.
"""


def task_arithmetic(
    base,
    deltas,
    weights=None,
    *,
    finetuned: bool = False,
    inplace: bool = False,
    out=None,
    chunk_size: int | None = None,
):
    r"""Task arithmetic: ``theta = theta_base + sum_k w_k delta_k``.

    Args:
    {common}
    Example::

        >>> base = {"w": torch.zeros(4)}
        >>> math_sd, code_sd = {"w": torch.ones(4)}, {"w": torch.full((4,), 3.0)}
        >>> regops.merge.task_arithmetic(base, [math_sd, code_sd], weights=[0.5, 0.5], finetuned=True)["w"]
        tensor([2., 2., 2., 2.])
    """
    plan = Plan(keep="all", combine="sum", weights=weights, finetuned=finetuned)  # type: ignore[arg-type]
    return _merge(base, deltas, plan, None, inplace, out, chunk_size)


def dare(
    base,
    deltas,
    density: float,
    weights=None,
    *,
    rescale: bool = True,
    finetuned: bool = False,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    out=None,
    chunk_size: int | None = None,
):
    r"""DARE (drop and rescale, Yu et al. 2023) then task arithmetic (PEFT's ``dare_linear``).

    .. math:: \theta = \theta_{base} + \sum_k w_k \frac{m_k \odot \delta_k}{d}, \qquad m_k \sim \mathrm{Bernoulli}(d)

    Each entry of each delta is kept with probability ``density`` (to ``2^{-31}``), from regops' Philox stream:
    the same masks for the same generator state on every device and chunking. ``density=1`` is task arithmetic.

    Args:
        density: fraction kept, in (0, 1].
        rescale: divide survivors by ``density`` (DARE's rescale).
        generator: a ``torch.Generator`` on the base's device type (default: torch's default generator).
    {common}
    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> base = torch.zeros(1000)
        >>> merged = regops.merge.dare(base, [torch.ones(1000)], density=0.1, generator=g)
        >>> sorted(merged.unique().tolist())  # dropped, or kept and divided by the density
        [0.0, 10.0]
    """
    plan = Plan("random", "sum", weights, _density(density), rescale=rescale, finetuned=finetuned)  # type: ignore[arg-type]
    return _merge(base, deltas, plan, generator, inplace, out, chunk_size)


def magnitude_prune(
    base,
    deltas,
    density: float,
    weights=None,
    *,
    finetuned: bool = False,
    inplace: bool = False,
    out=None,
    chunk_size: int | None = None,
):
    r"""Keep the ``int(density * n)`` largest-magnitude entries of each delta (per tensor), then task arithmetic
    (PEFT's ``magnitude_prune``). Ties at the threshold are kept in index order, so exactly that many survive.

    Args:
        density: fraction of each delta's entries kept, in (0, 1].
    {common}
    Example::

        >>> regops.merge.magnitude_prune(torch.zeros(4), [torch.tensor([0.1, -3.0, 2.0, 0.5])], density=0.5)
        tensor([ 0., -3.,  2.,  0.])
    """
    plan = Plan("magnitude", "sum", weights, _density(density), finetuned=finetuned)  # type: ignore[arg-type]
    return _merge(base, deltas, plan, None, inplace, out, chunk_size)


def ties(
    base,
    deltas,
    density: float,
    weights=None,
    *,
    majority_sign_method: str = "total",
    finetuned: bool = False,
    inplace: bool = False,
    out=None,
    chunk_size: int | None = None,
):
    r"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean (PEFT's ``ties``).

    1. trim: keep the ``int(density * n)`` largest-magnitude entries of each delta (exact top-k per tensor, found
       by a streamed radix select; ties at the threshold in index order);
    2. elect: ``e = \mathrm{sign}(\sum_k \hat\delta_k)`` (``"total"``) or the sign of
       ``\sum_k \mathrm{sign}(\hat\delta_k)`` (``"frequency"``), 0 counting as +;
    3. disjoint mean: ``\theta = \theta_{base} + \frac{\sum_k [\mathrm{sign}\,\hat\delta_k = e]\, w_k \hat\delta_k}
       {\max(1, \sum_k [\mathrm{sign}\,\hat\delta_k = e])}``.

    Args:
        density: fraction of each delta's entries kept by the trim, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"``.
    {common}
    Example::

        >>> deltas = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0]), torch.tensor([2.0, 3.0])]
        >>> regops.merge.ties(torch.zeros(2), deltas, density=1.0)  # the -2 loses the sign vote
        tensor([2., 2.])
    """
    method = _sign_method(majority_sign_method)
    plan = Plan("magnitude", method, weights, _density(density), finetuned=finetuned)  # type: ignore[arg-type]
    return _merge(base, deltas, plan, None, inplace, out, chunk_size)


def dare_ties(
    base,
    deltas,
    density: float,
    weights=None,
    *,
    majority_sign_method: str = "total",
    rescale: bool = True,
    finetuned: bool = False,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    out=None,
    chunk_size: int | None = None,
):
    r"""DARE's random drop and rescale, then TIES' sign election and disjoint mean (PEFT's ``dare_ties``).

    Args:
        density: keep probability of each entry, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"``.
        rescale: divide survivors by ``density``.
        generator: a ``torch.Generator`` on the base's device type (default: torch's default generator).
    {common}
    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> merged = regops.merge.dare_ties(torch.zeros(8), [torch.ones(8), -torch.ones(8)], density=0.5, generator=g)
        >>> merged.shape
        torch.Size([8])
    """
    method = _sign_method(majority_sign_method)
    plan = Plan("random", method, weights, _density(density), rescale=rescale, finetuned=finetuned)  # type: ignore[arg-type]
    return _merge(base, deltas, plan, generator, inplace, out, chunk_size)


def della(
    base,
    deltas,
    density: float,
    epsilon: float = 0.0,
    weights=None,
    *,
    majority_sign_method: str | None = "total",
    rescale: bool = True,
    finetuned: bool = False,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    out=None,
    chunk_size: int | None = None,
):
    r"""DELLA-merging (Deep et al. 2024): MagPrune, then (by default) sign election and disjoint mean.

    MagPrune ranks each row of a delta (dim 0 indexes rows; a 1-D tensor is one row) by magnitude and keeps entry
    ``i`` with probability ``q_i = d - \epsilon + 2\epsilon\,\frac{r_i - 1}{n - 1}`` (rank ``r_i``
    ascending, ties in index order), scaling survivors by ``1/q_i`` when ``rescale``. ``epsilon = 0`` is DARE
    with the same keep probability. ``majority_sign_method=None`` sums the pruned deltas (mergekit's
    ``della_linear``).

    Args:
        density: mean keep probability.
        epsilon: half-width of the probability window, with ``0 < density - epsilon`` and
            ``density + epsilon <= 1``.
        majority_sign_method: ``"total"``, ``"frequency"`` or None (sum without sign election).
        rescale: scale survivors by ``1 / q_i``.
        generator: a ``torch.Generator`` on the base's device type (default: torch's default generator).
    {common}
    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> merged = regops.merge.della(torch.zeros(2, 8), [torch.randn(2, 8)], density=0.5, epsilon=0.1, generator=g)
        >>> merged.shape
        torch.Size([2, 8])
    """
    dens, eps = _density(density), _number(epsilon, "epsilon")
    if eps < 0 or dens - eps <= 0 or dens + eps > 1:
        raise ValueError(f"regops: epsilon must satisfy 0 <= epsilon < density and density + epsilon <= 1, got {eps}")
    combine = "sum" if majority_sign_method is None else _sign_method(majority_sign_method)
    plan = Plan("della", combine, weights, dens, eps, rescale, finetuned)  # type: ignore[arg-type]
    return _merge(base, deltas, plan, generator, inplace, out, chunk_size)


for _fn in (task_arithmetic, dare, magnitude_prune, ties, dare_ties, della):
    _fn.__doc__ = _fn.__doc__.replace("    {common}\n", _COMMON_ARGS.lstrip("\n") + _RETURNS + "\n")
