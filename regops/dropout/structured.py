"""Structured dropout on the shared Philox stream: masks shared along dims (token/feature/channel dropout),
drop path (stochastic depth, one draw per sample), nested (ordered) dropout and multi-sample dropout.

Every mask is a function of (seed, offset) and is regenerated in backward; what autograd keeps is the 16-byte
seed. Small masks (one value per channel or per sample) are drawn with the dropout kernel of the running backend
applied to a tensor of ones, so they are bit-identical across the reference, Triton and CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from regops import _backend, _rng, _validate
from regops.distributed import _hook as _dtensor
from regops.dropout._core import (
    in_layout_of,
    probability_value,
    register_seeded_mask_op,
    runtime_probability,
)
from regops.reference import dropout as _ref

__all__ = [
    "drop_path",
    "drop_path_add",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "multi_sample_dropout",
    "nested_dropout",
    "shared_dropout",
]


def _unit_mask(shape: Sequence[int], p: float, seed: torch.Tensor, device, dtype) -> torch.Tensor:
    """``dropout(ones(shape))``: 0 or ``1/(1-p)`` per element, from the running backend's dropout kernel."""
    ones = torch.ones(tuple(shape), dtype=dtype, device=device)
    return _backend.implementation("dropout", ones.device)(ones, p, *_rng.seed_args(seed, "dropout", ones.device))


# ------------------------------------------------------------------------------------------------ shared masks
@torch.library.custom_op("regops::shared_dropout", mutates_args=())
def _shared_dropout_op(x: torch.Tensor, p: torch.Tensor, mask_shape: list[int], seed: torch.Tensor) -> torch.Tensor:
    cd = _ref.compute_dtype(x.dtype)
    mask = _unit_mask(mask_shape, probability_value(p), seed, x.device, cd)
    return in_layout_of(x, (x.to(cd) * mask).to(x.dtype).contiguous())


register_seeded_mask_op(_shared_dropout_op)


def _apply_shared(x, p, mask_shape, training, inplace, generator) -> torch.Tensor:
    p_value, p_t = p
    _validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "shared", x, p_value, list(mask_shape), inplace, generator)
    n = 1
    for s in mask_shape:
        n *= s
    seed = _rng.philox_seed(x.device, n, generator)
    y = _shared_dropout_op(x, p_t, list(mask_shape), seed)
    return x.copy_(y) if inplace else y


def shared_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    dims: int | Sequence[int] = (),
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Dropout whose mask is shared along ``dims``: one keep/drop draw per slice, broadcast over ``dims``.

    .. math:: y = x \odot \mathrm{broadcast}(m) / (1-p), \quad m \in \{0,1\}^{\text{shape with } 1 \text{ at dims}}

    Token dropout of ``[B, T, D]`` activations: ``dims=-1`` (a whole token vector is dropped); feature dropout:
    ``dims=1`` (a feature is dropped for every token); ``dims=()`` is plain dropout. The mask (of the reduced
    shape, row-major) is :func:`regops.dropout`'s mask of ``ones(reduced shape)`` for the same seed; only the
    seed is saved for backward.

    Args:
        x: any shape, floating dtype. p: drop probability. dims: an int or a sequence of dims (negative allowed).
        training, inplace, generator: as :func:`regops.dropout`.

    Example::

        >>> y = regops.shared_dropout(torch.randn(8, 128, 512), 0.1, dims=-1)   # drop whole tokens
    """
    _validate.floating(x, "x")
    p = runtime_probability(p)
    _rng.check_generator(generator, x.device)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    norm = set()
    rank = max(x.dim(), 1)  # as torch: a 0-dim tensor accepts dim 0 and -1
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or not -rank <= d < rank:
            raise ValueError(f"regops: dims must be ints in [-{rank}, {rank}), got {dims}")
        norm.add(d % rank)
    mask_shape = [1 if i in norm else s for i, s in enumerate(x.shape)]
    return _apply_shared(x, p, mask_shape, training, inplace, generator)


_DEPRECATED_RANK = (
    "{name}: Received a {dim}-D input to {name}, which is deprecated and will result in an error in a future "
    "release. To retain the behavior and silence this warning, please use dropout instead. Note that {name} "
    "exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, a channel dimension, "
    "and an optional batch dimension (i.e. {lo}D or {hi}D inputs)."
)


def _channel_mask_shape(name: str, x: torch.Tensor, spatial: int) -> list[int] | None:
    """The mask shape torch's ``dropout{1,2,3}d`` draws for ``x`` (``None``: torch raises if it draws at all).

    torch's rules, rank by rank: dropout1d takes only 2-D ``(C, L)`` and 3-D ``(N, C, L)``. dropout2d warns on
    ranks other than 3 and 4 and treats *every* input as batched ``(N, C, ...)`` (a 3-D input is ``(N, C, L)``,
    with a second warning). dropout3d warns on ranks other than 4 and 5 and treats every rank but 5 as unbatched
    (``(C, ...)``: a 3-D input is ``(C, D, H)``, a 1-D input is per element). The mask is one draw per
    (sample, channel), broadcast over the rest; a batched input of fewer than 2 dims has no channel.
    """
    dim = x.dim()
    if spatial == 1 and dim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {dim}D input. Note that dropout1d exists to "
            "provide channel-wise dropout on inputs with 1 spatial dimension, a channel dimension, and an optional "
            "batch dimension (i.e. 2D or 3D inputs)."
        )
    lo, hi = spatial + 1, spatial + 2
    quiet = torch.compiler.is_compiling()  # dynamo cannot trace warnings.warn (a graph break)
    if spatial > 1 and dim not in (lo, hi) and not quiet:
        warnings.warn(_DEPRECATED_RANK.format(name=name, dim=dim, spatial=spatial, lo=lo, hi=hi), stacklevel=4)
    if spatial == 2 and dim == 3 and not quiet:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout behavior is "
            "desired - input is interpreted as shape (N, C, L), where C is the channel dim. This behavior will "
            "change in a future release to interpret the input as one without a batch dimension, i.e. shape "
            "(C, H, W). To maintain the 1D channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=4,
        )
    batched = dim == hi if spatial != 2 else True
    shape = list(x.shape) if batched else [1, *x.shape]
    if len(shape) < 2:
        return None
    mask = shape[:2] + [1] * (len(shape) - 2)
    return mask if batched else mask[1:]


def _channel_dropout(name, x, p, training, inplace, generator, spatial: int) -> torch.Tensor:
    _validate.floating(x, "x")
    p = runtime_probability(p)
    _rng.check_generator(generator, x.device)
    mask_shape = _channel_mask_shape(name, x, spatial)
    if mask_shape is None:
        # torch returns early for eval, p == 0, empty inputs and p == 1 (x * 0), and fails only when it draws
        # (under torch.compile p is not known while tracing: that fails too).
        p_value, _ = p
        _validate.flag(training, "training")
        if not training or p_value == 0.0 or x.numel() == 0:
            return x
        if p_value != 1.0:
            raise RuntimeError(f"{name}: Feature dropout requires at least 2 dimensions in the input")
        mask_shape = list(x.shape)
    return _apply_shared(x, p, mask_shape, training, inplace, generator)


def dropout1d(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`torch.nn.functional.dropout1d` semantics (zero whole channels of ``(N, C, L)`` or ``(C, L)``).

    Other ranks raise ``RuntimeError``, as torch. Only the seed is saved for backward.

    >>> y = regops.dropout1d(torch.randn(8, 16, 100), 0.1)
    """
    return _channel_dropout("dropout1d", x, p, training, inplace, generator, 1)


def dropout2d(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`torch.nn.functional.dropout2d` semantics (zero whole channels of ``(N, C, H, W)``).

    Exactly torch's rank rules: every input is read as batched ``(N, C, ...)`` (3-D as ``(N, C, L)``), with
    torch's warnings for ranks other than 4; fewer than 2 dims raise when a mask is drawn.

    >>> y = regops.dropout2d(torch.randn(8, 16, 32, 32), 0.1)
    """
    return _channel_dropout("dropout2d", x, p, training, inplace, generator, 2)


def dropout3d(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`torch.nn.functional.dropout3d` semantics (zero whole channels of ``(N, C, D, H, W)`` or ``(C, D, H, W)``).

    Exactly torch's rank rules: only a 5-D input is batched; any other rank is unbatched ``(C, ...)`` (a 3-D
    input is ``(C, D, H)``, a 1-D input drops elements), with torch's warning for ranks other than 4 and 5.

    >>> y = regops.dropout3d(torch.randn(2, 8, 4, 16, 16), 0.1)
    """
    return _channel_dropout("dropout3d", x, p, training, inplace, generator, 3)


# ------------------------------------------------------------------------------------------------ drop path
_backend.register("scale_rows_add", torch=_ref.scale_rows_add, triton="regops.kernels.dropout:scale_rows_add")


def _sample_scales(batch, p, scale_by_keep, seed, device, dtype) -> torch.Tensor:
    scales = _unit_mask((batch,), p, seed, device, dtype)
    return scales if scale_by_keep else (scales != 0).to(dtype)


@torch.library.custom_op("regops::drop_path", mutates_args=())
def _drop_path_op(
    x: torch.Tensor, residual: torch.Tensor | None, p: torch.Tensor, scale_by_keep: bool, seed: torch.Tensor
) -> torch.Tensor:
    cd = _ref.compute_dtype(x.dtype)
    scales = _sample_scales(x.shape[0], probability_value(p), scale_by_keep, seed, x.device, cd)
    res = residual.contiguous() if residual is not None else None
    return in_layout_of(x, _backend.implementation("scale_rows_add", x.device)(x.contiguous(), scales, res))


@_drop_path_op.register_fake
def _(x, residual, p, scale_by_keep, seed):
    return in_layout_of(x, torch.empty_like(x, memory_format=torch.contiguous_format))


def _drop_path_setup_context(ctx, inputs, output) -> None:
    _, residual, p, scale_by_keep, seed = inputs
    ctx.scale_by_keep, ctx.has_residual = scale_by_keep, residual is not None
    ctx.save_for_backward(p, seed)


def _drop_path_backward(ctx, grad):
    p, seed = ctx.saved_tensors
    dx = _drop_path_op(grad, None, p, ctx.scale_by_keep, seed)
    return dx, (grad if ctx.has_residual else None), None, None, None


_drop_path_op.register_autograd(_drop_path_backward, setup_context=_drop_path_setup_context)


def _check_drop_path(x, drop_prob, generator) -> tuple[float | None, torch.Tensor]:
    _validate.floating(x, "x")
    p = runtime_probability(drop_prob, "drop_prob")
    _rng.check_generator(generator, x.device)
    if x.dim() == 0:
        raise ValueError("regops: drop_path needs a batch dimension (dim 0)")
    return p


def drop_path(
    x: torch.Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Stochastic depth, a drop-in for timm's ``drop_path(x, drop_prob=0., training=False, scale_by_keep=True)``.

    Each sample (dim 0) is zeroed with probability ``drop_prob``:

    .. math:: y_b = x_b \cdot m_b / (1-p) \quad(\text{no } 1/(1-p) \text{ unless } scale\_by\_keep)

    One draw per sample: ``m_b`` is :func:`regops.dropout`'s mask of ``ones(B)``. The backward regenerates it.
    As in timm, ``training`` defaults to ``False`` (pass ``training=True``, or use :class:`regops.nn.DropPath`),
    ``training=False`` or ``drop_prob == 0`` returns ``x`` itself, and the mask multiplies (a NaN or Inf in a
    dropped sample gives NaN). The output keeps x's memory format.

    Args:
        x: ``[B, ...]``, floating. drop_prob: in ``[0, 1]`` (a runtime value under torch.compile).

    Example::

        >>> y = regops.drop_path(branch_out, 0.1, training=True)
    """
    p_value, p_t = _check_drop_path(x, drop_prob, generator)
    _validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "drop_path", x, None, p_value, scale_by_keep, generator)
    return _drop_path_op(x, None, p_t, scale_by_keep, _rng.philox_seed(x.device, x.shape[0], generator))


def drop_path_add(
    x: torch.Tensor,
    residual: torch.Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + drop_path(x, drop_prob, training)`` in one pass (one pass backward: ``dx = m_b g / (1-p)``,
    ``dres = g``). Arguments and defaults as :func:`drop_path` (``training=False`` by default, as timm).

    Args:
        x: the branch output ``[B, ...]``; residual: x's shape and dtype.

    Example::

        >>> h = regops.drop_path_add(block(h), h, 0.1, training=True)
    """
    p_value, p_t = _check_drop_path(x, drop_prob, generator)
    _validate.floating(residual, "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"regops: residual must match x's shape and dtype, got {tuple(residual.shape)} {residual.dtype} "
            f"for x {tuple(x.shape)} {x.dtype}"
        )
    _validate.same_device("x", x, "residual", residual)
    _validate.flag(training, "training")
    if not training:
        p_value, p_t = 0.0, torch.zeros((), dtype=torch.float64)
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "drop_path", x, residual, p_value, scale_by_keep, generator)
    no_seed = torch.zeros(2, dtype=torch.int64, device=x.device)
    seed = _rng.philox_seed(x.device, x.shape[0], generator) if p_value != 0.0 else no_seed
    return _drop_path_op(x, residual, p_t, scale_by_keep, seed)


# ------------------------------------------------------------------------------------------------ nested dropout
_backend.register("nested_dropout", torch=_ref.nested_dropout)


@torch.library.custom_op("regops::nested_dropout", mutates_args=())
def _nested_dropout_op(x: torch.Tensor, p: torch.Tensor, dim: int, seed: torch.Tensor) -> torch.Tensor:
    key, offset = seed.tolist()
    # No GPU kernel: CUDA tensors (and a forced Triton backend) run the reference; CPU tensors run what the backend
    # chooses (the C++ kernel when built).
    impl = _ref.nested_dropout
    if x.device.type == "cpu" and _backend.requested_backend() in (None, "cpp", "torch"):
        impl = _backend.implementation("nested_dropout", x.device)
    return in_layout_of(x, impl(x, probability_value(p), dim, key, offset).contiguous())


register_seeded_mask_op(_nested_dropout_op)


def nested_dropout(
    x: torch.Tensor,
    p: float,
    dim: int = -1,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Nested (ordered) dropout: per sample keep the first ``b`` units along ``dim``, ``b ~ Geometric(p)``.

    .. math:: y_{n,\dots,j,\dots} = x_{n,\dots,j,\dots}\,[\,j < b_n\,], \qquad P(b_n = k) = (1-p)^{k-1} p

    (``b`` truncated at the number of units; no rescaling, as in Rippel et al. 2014 and "Compressing Features
    for Learning with Noisy Labels"). Sample ``n`` (dim 0) uses word ``n`` of the stream, inverted with integer
    thresholds computed on the host, so every device draws the same ``b``. Only the seed is saved for backward.

    Args:
        x: ``[B, ...]``; dim: the unit dimension (not 0). p: in ``(0, 1]``; ``p = 1`` keeps only the first unit.

    Example::

        >>> z = regops.nested_dropout(features, p=0.05)   # [B, D]: keep a random-length prefix per sample
    """
    _validate.floating(x, "x")
    p_value, p_t = runtime_probability(p)
    _rng.check_generator(generator, x.device)
    if x.dim() < 2:
        raise ValueError(f"regops: nested_dropout needs x of shape [B, ..., units, ...], got {tuple(x.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim() or dim % x.dim() == 0:
        raise ValueError(f"regops: dim must index a non-batch dimension of a {x.dim()}-D x, got {dim!r}")
    _validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "nested_dropout", x, p_value, dim % x.dim(), generator)
    seed = _rng.philox_seed(x.device, x.shape[0], generator)
    return _nested_dropout_op(x, p_t, dim % x.dim(), seed)


# ------------------------------------------------------------------------------------------------ multi-sample
_backend.register(
    "multi_sample_dropout_mean",
    torch=_ref.multi_sample_mean_dropout,
    triton="regops.kernels.dropout:multi_sample_mean_dropout",
)


@torch.library.custom_op("regops::multi_sample_dropout_mean", mutates_args=())
def _multi_sample_op(x: torch.Tensor, p: torch.Tensor, num_samples: int, seed: torch.Tensor) -> torch.Tensor:
    key, offset = _rng.seed_args(seed, "multi_sample_dropout_mean", x.device)
    impl = _backend.implementation("multi_sample_dropout_mean", x.device)
    return in_layout_of(x, impl(x.contiguous(), probability_value(p), num_samples, key, offset))


register_seeded_mask_op(_multi_sample_op)


def multi_sample_seeds(
    x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One seed for a ``num_samples``-mask call on ``x`` and the per-sample seeds it implies.

    Sample ``k`` uses first counter ``offset + k * ceil(numel / 4)``: its mask is :func:`regops.dropout`'s for
    that seed, and the mean of the ``k`` masks is what :func:`multi_sample_dropout` applies.
    """
    step = _ref.multi_sample_counters(x.numel())
    seed = _rng.philox_seed(x.device, num_samples * 4 * step, generator)
    per_sample = [seed + torch.tensor([0, k * step], device=seed.device) for k in range(num_samples)]
    return seed, per_sample


def multi_sample_dropout(
    x: torch.Tensor,
    p: float,
    num_samples: int,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``x * mean_k(m_k) / (1-p)``: the mean of ``num_samples`` dropout masks applied in one pass.

    For a linear head ``W``, ``mean_k W(dropout_k(x)) = W(multi_sample_dropout(x))``: multi-sample dropout
    (Inoue 2019) without materializing K masked copies. The K masks are regenerated in backward. NaN/Inf as
    torch's ``mean_k(dropout_k(x))``: NaN where some sample dropped a NaN or Inf.

    Example::

        >>> logits = head(regops.multi_sample_dropout(features, 0.5, num_samples=8))
    """
    _validate.floating(x, "x")
    p_value, p_t = runtime_probability(p)
    _rng.check_generator(generator, x.device)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"regops: num_samples must be a positive int, got {num_samples!r}")
    _validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "multi_sample_dropout", x, p_value, num_samples, generator)
    seed, _ = multi_sample_seeds(x, num_samples, generator)
    return _multi_sample_op(x, p_t, num_samples, seed)
