"""The dropout family's public functions: drop-ins for torch's and timm's dropouts, fused variants, structured
masks and multi-sample dropout. Each validates its arguments, draws the call's seed (:mod:`regops._core.rng`) and
runs its operator (:mod:`regops.dropout.ops`); DTensor inputs go to :mod:`regops.dropout.dtensor`.

Every random draw comes from the one Philox stream; every mask is a function of (seed, offset, logical index) and
is bit-identical across the reference, the C++ and CUDA kernels and Triton.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from regops._core import rng, validate
from regops._core.validate import is_dtensor, runtime_probability
from regops.dropout import ops
from regops.dropout import reference as ref
from regops.dropout._multi_sample import multi_sample_dropout

__all__ = [
    "bias_dropout_add",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add_layer_norm",
    "multi_sample_dropout",
    "nested_dropout",
    "shared_dropout",
]

MASK_MODES = ("recompute", "bitmask")


def _dtensor():
    """The DTensor paths (imported on first use: importing them imports torch.distributed.tensor)."""
    from regops.dropout import dtensor

    return dtensor


def dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
    mask_mode: str = "recompute",
) -> torch.Tensor:
    r"""Drop-in for `torch.nn.functional.dropout` that stores no mask for backward.

    .. math::
        y_i = \frac{m_i\,x_i}{1-p}, \qquad
        m_i = [\,\mathrm{philox}(seed, i) \gg 1 > \lfloor p\,2^{31}\rfloor - 1\,]

    Each element is zeroed with probability ``p`` (to within ``2^{-31}``); survivors are scaled by
    ``1/(1-p)`` (rounded to float32). The mask is a function of (seed, offset, element index) only, so the
    backward regenerates it: autograd saves a 16-byte seed, nothing of the size of ``x``. As in torch, ``x`` is
    *multiplied* by the mask: a NaN or Inf at a dropped position gives NaN (forward and backward), so an overflow
    is never hidden from AMP's GradScaler.

    Under ``torch.compile`` ``p`` is a runtime value: changing it between calls recompiles at most once (a float
    ``p``: dynamo's automatic-dynamic recompile) or never (a 0-dim tensor ``p``, or a `regops.nn` module).

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

        >>> _ = torch.manual_seed(0)
        >>> y = regops.dropout(torch.ones(8), p=0.25)  # 0 or 4/3 per element; same y after manual_seed(0)
        >>> bool(((y == 0) | torch.isclose(y, torch.tensor(4 / 3))).all())
        True
    """
    validate.floating(x, "x")
    p_value, p_t = runtime_probability(p)
    if generator is not None:
        rng.check_generator(generator, x.device)
    if mask_mode != "recompute" and mask_mode not in MASK_MODES:
        raise ValueError(f"regops: mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if training is not True:
        validate.flag(training, "training")
        return x
    if p_value == 0.0:
        return x
    if is_dtensor(x):
        return _dtensor().dropout(x, p_value, p_t, inplace, mask_mode, generator)
    seed = rng.philox_seed(x.device, x.numel(), generator)
    y = ops.dropout(x, p_t, seed) if mask_mode == "recompute" else ops.dropout_bitmask(x, p_t, seed)[0]
    return x.copy_(y) if inplace else y


def _seed_for(device: torch.device, rows: int, cols: int, p: float | None, generator) -> torch.Tensor:
    if p == 0.0:  # None (under torch.compile): p is a runtime value, draw a seed
        return torch.zeros(2, dtype=torch.int64, device=device)  # a device fill: capture-safe
    return rng.philox_seed(device, rows * 4 * ref.row_counters(cols), generator)


def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    cols = x.shape[-1] if x.dim() else 1
    return (x.numel() // cols if cols else 0), cols


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    p: float,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``residual + dropout(x + bias, p)`` in one pass forward and one pass backward.

    .. math:: y = r + \frac{m \odot (x + b)}{1 - p}

    Computed in float32 (float64 for float64) and rounded once. The keep-mask ``m`` is regenerated in backward
    from a 16-byte seed, so autograd saves nothing of the size of ``x``; gradients: ``dx = m * g / (1-p)``,
    ``dbias = sum over rows of dx``, ``dresidual = g``, and derivatives of every order (Hessian estimates work).
    The mask uses the *row layout* (row ``r`` of the last dimension starts at counter ``offset + r * ceil(H/4)``);
    when ``H % 4 == 0`` it is exactly `regops.dropout`'s mask for the same seed. As in torch, the mask
    multiplies: a NaN or Inf of ``x + bias`` at a dropped position gives NaN.

    Args:
        x: ``[..., H]``; float32, float16, bfloat16 or float64.
        bias: ``[H]`` or ``None``.
        residual: x's shape.
        p: drop probability in ``[0, 1]`` (as `regops.dropout`: a runtime value under torch.compile).
        training: ``False`` (or ``p == 0``) is the unfused identity ``residual + (x + bias)``, as torch computes.
        generator: a ``torch.Generator`` on x's device type.

    Dtypes follow torch's type promotion, like the unfused ``residual + dropout(x + bias)``: under autocast a
    bfloat16 ``x`` with float32 ``bias``/``residual`` gives a float32 result (the inputs are cast first).

    Returns:
        Tensor of x's shape and the promoted dtype, in x's memory format when x is dense.

    Example::

        >>> attn_out, attn_bias, hidden = torch.randn(2, 5, 8), torch.randn(8), torch.randn(2, 5, 8)
        >>> h = regops.bias_dropout_add(attn_out, attn_bias, hidden, p=0.1)
        >>> h.shape
        torch.Size([2, 5, 8])
    """
    validate.floating(x, "x")
    validate.floating(residual, "residual")
    p_value, p_t = runtime_probability(p)
    rng.check_generator(generator, x.device)
    if x.dim() == 0:
        raise ValueError("regops: bias_dropout_add needs x with at least one dimension")
    if residual.shape != x.shape:
        raise ValueError(f"regops: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    validate.same_device("x", x, "residual", residual)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    if bias is not None:
        validate.floating(bias, "bias")
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"regops: bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
        validate.same_device("x", x, "bias", bias)
        dtype = torch.promote_types(dtype, bias.dtype)
    validate.flag(training, "training")
    if not training or p_value == 0.0:
        return residual + (x if bias is None else x + bias)
    if x.dtype != dtype or residual.dtype != dtype or (bias is not None and bias.dtype != dtype):
        x, residual = x.to(dtype), residual.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if is_dtensor(x):
        return _dtensor().bias_dropout_add(x, bias, residual, p_value, generator)
    rows, cols = _rows_cols(x)
    return ops.bias_dropout_add(x, bias, residual, p_t, _seed_for(x.device, rows, cols, p_value, generator))


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: float,
    eps: float = 1e-5,
    *,
    rms_norm: bool = False,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""``norm(dropout(x) + residual) * weight + bias`` fused, forward and backward (LayerNorm or RMSNorm).

    .. math::
        s = \frac{m \odot x}{1-p} + r, \qquad
        y = \frac{s - \mu(s)}{\sqrt{\sigma^2(s) + \epsilon}}\, w + b
        \quad(\text{RMSNorm: } y = s / \sqrt{\overline{s^2} + \epsilon}\, w + b)

    The pre-norm sum ``s`` is stored in the residual's dtype (float32 with ``residual_in_fp32``) and the norm is
    taken of that stored value. Saved for backward: ``s``, two floats per row, ``weight`` and the 16-byte seed --
    no mask (it is regenerated, row layout as `bias_dropout_add`). Gradients for x, residual, weight, bias,
    and double backward (``create_graph=True`` switches to a differentiable, unfused backward). The mask
    multiplies, as torch's dropout: a NaN or Inf of ``x`` at a dropped position gives NaN.

    Args:
        x: ``[..., H]``; float32, float16, bfloat16 or float64.
        residual: x's shape (any float dtype), or ``None``.
        weight, bias: ``[H]`` (any float dtype) or ``None``; a bias is allowed with RMSNorm too.
        p: dropout probability of ``x``; eps: added to the variance.
        rms_norm: RMSNorm instead of LayerNorm. prenorm: also return ``s`` (the new residual stream).
        residual_in_fp32: keep ``s`` in float32. training: ``False`` disables the dropout.
    Returns:
        ``y`` (x's dtype), or ``(y, s)`` when ``prenorm``.

    Example::

        >>> ln = torch.nn.LayerNorm(8)
        >>> h, resid = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        >>> y, resid = regops.dropout_add_layer_norm(h, resid, ln.weight, ln.bias, 0.1, prenorm=True)
        >>> y.shape, resid.shape
        (torch.Size([2, 5, 8]), torch.Size([2, 5, 8]))
    """
    validate.floating(x, "x")
    p_value, p_t = runtime_probability(p)
    rng.check_generator(generator, x.device)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"regops: dropout_add_layer_norm needs x of shape [..., H] with H > 0, got {tuple(x.shape)}")
    if residual is not None:
        validate.floating(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"regops: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        validate.same_device("x", x, "residual", residual)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            validate.floating(t, name)
            if t.shape != x.shape[-1:]:
                raise ValueError(f"regops: {name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")
            validate.same_device("x", x, name, t)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"regops: eps must be a non-negative number, got {eps!r}")
    validate.flag(training, "training")
    if not training:
        p_value, p_t = 0.0, torch.zeros((), dtype=torch.float64)
    if is_dtensor(x):
        return _dtensor().dropout_add_layer_norm(x, residual, weight, bias, p_value, float(eps),
                                rms_norm, prenorm, residual_in_fp32, generator)  # fmt: skip
    rows, cols = _rows_cols(x)
    seed = _seed_for(x.device, rows, cols, p_value, generator)
    y, s, _, _ = ops.dropout_add_layer_norm(x, residual, weight, bias, p_t, float(eps), rms_norm, residual_in_fp32,
                                            seed)  # fmt: skip
    return (y, s) if prenorm else y


def _apply_shared(x, p, mask_shape, training, inplace, generator) -> torch.Tensor:
    p_value, p_t = p
    validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if is_dtensor(x):
        return _dtensor().shared(x, p_value, list(mask_shape), inplace, generator)
    n = 1
    for s in mask_shape:
        n *= s
    seed = rng.philox_seed(x.device, n, generator)
    y = ops.shared_dropout(x, p_t, list(mask_shape), seed)
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
    shape, row-major) is `regops.dropout`'s mask of ``ones(reduced shape)`` for the same seed; only the
    seed is saved for backward.

    Args:
        x: any shape, floating dtype. p: drop probability. dims: an int or a sequence of dims (negative allowed).
        training, inplace, generator: as `regops.dropout`.
    Returns:
        Tensor of ``x``'s shape and dtype.

    Example::

        >>> y = regops.shared_dropout(torch.randn(8, 128, 512), 0.1, dims=-1)   # drop whole tokens
    """
    validate.floating(x, "x")
    p = runtime_probability(p)
    rng.check_generator(generator, x.device)
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
    validate.floating(x, "x")
    p = runtime_probability(p)
    rng.check_generator(generator, x.device)
    mask_shape = _channel_mask_shape(name, x, spatial)
    if mask_shape is None:
        # torch returns early for eval, p == 0, empty inputs and p == 1 (x * 0), and fails only when it draws
        # (under torch.compile p is not known while tracing: that fails too).
        p_value, _ = p
        validate.flag(training, "training")
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
    """`torch.nn.functional.dropout1d` semantics (zero whole channels of ``(N, C, L)`` or ``(C, L)``).

    Other ranks raise ``RuntimeError``, as torch. Only the seed is saved for backward.

    Args:
        x, p, training, inplace, generator: as `regops.dropout`; ``p`` drops whole channels.
    Returns:
        Tensor of ``x``'s shape and dtype.

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
    """`torch.nn.functional.dropout2d` semantics (zero whole channels of ``(N, C, H, W)``).

    Exactly torch's rank rules: every input is read as batched ``(N, C, ...)`` (3-D as ``(N, C, L)``), with
    torch's warnings for ranks other than 4; fewer than 2 dims raise when a mask is drawn.

    Args:
        x, p, training, inplace, generator: as `regops.dropout`; ``p`` drops whole channels.
    Returns:
        Tensor of ``x``'s shape and dtype.

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
    """`torch.nn.functional.dropout3d` semantics (zero whole channels of ``(N, C, D, H, W)`` or ``(C, D, H, W)``).

    Exactly torch's rank rules: only a 5-D input is batched; any other rank is unbatched ``(C, ...)`` (a 3-D
    input is ``(C, D, H)``, a 1-D input drops elements), with torch's warning for ranks other than 4 and 5.

    Args:
        x, p, training, inplace, generator: as `regops.dropout`; ``p`` drops whole channels.
    Returns:
        Tensor of ``x``'s shape and dtype.

    >>> y = regops.dropout3d(torch.randn(2, 8, 4, 16, 16), 0.1)
    """
    return _channel_dropout("dropout3d", x, p, training, inplace, generator, 3)


def _check_drop_path(x, drop_prob, generator) -> tuple[float | None, torch.Tensor]:
    validate.floating(x, "x")
    p = runtime_probability(drop_prob, "drop_prob")
    rng.check_generator(generator, x.device)
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

    One draw per sample: ``m_b`` is `regops.dropout`'s mask of ``ones(B)``. The backward regenerates it.
    As in timm, ``training`` defaults to ``False`` (pass ``training=True``, or use `regops.nn.DropPath`),
    ``training=False`` or ``drop_prob == 0`` returns ``x`` itself, and the mask multiplies (a NaN or Inf in a
    dropped sample gives NaN). The output keeps x's memory format.

    Args:
        x: ``[B, ...]``, floating. drop_prob: in ``[0, 1]`` (a runtime value under torch.compile).
    Returns:
        Tensor of ``x``'s shape and dtype.

    Example::

        >>> branch_out = torch.ones(4, 3)
        >>> y = regops.drop_path(branch_out, 0.5, training=True)  # each row all 0 or all 2
        >>> bool(((y == 0) | (y == 2)).all(dim=1).all())
        True
    """
    p_value, p_t = _check_drop_path(x, drop_prob, generator)
    validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if is_dtensor(x):
        return _dtensor().drop_path(x, None, p_value, scale_by_keep, generator)
    return ops.drop_path(x, None, p_t, scale_by_keep, rng.philox_seed(x.device, x.shape[0], generator))


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
    ``dres = g``). Arguments and defaults as `drop_path` (``training=False`` by default, as timm).

    Args:
        x: the branch output ``[B, ...]``; residual: x's shape and dtype.
    Returns:
        ``residual + drop_path(x)``, of ``x``'s shape and dtype.

    Example::

        >>> block, h = torch.nn.Linear(8, 8), torch.randn(4, 8)
        >>> h = regops.drop_path_add(block(h), h, 0.1, training=True)  # h + drop_path(block(h))
        >>> h.shape
        torch.Size([4, 8])
    """
    p_value, p_t = _check_drop_path(x, drop_prob, generator)
    validate.floating(residual, "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"regops: residual must match x's shape and dtype, got {tuple(residual.shape)} {residual.dtype} "
            f"for x {tuple(x.shape)} {x.dtype}"
        )
    validate.same_device("x", x, "residual", residual)
    validate.flag(training, "training")
    if not training:
        p_value, p_t = 0.0, torch.zeros((), dtype=torch.float64)
    if is_dtensor(x):
        return _dtensor().drop_path(x, residual, p_value, scale_by_keep, generator)
    if p_value != 0.0:
        seed = rng.philox_seed(x.device, x.shape[0], generator)
    else:  # nothing is drawn (a device fill: capture-safe)
        seed = torch.zeros(2, dtype=torch.int64, device=x.device)
    return ops.drop_path(x, residual, p_t, scale_by_keep, seed)


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
    Returns:
        Tensor of ``x``'s shape and dtype.

    Example::

        >>> features = torch.ones(4, 16)
        >>> z = regops.nested_dropout(features, p=0.05)  # [B, D]: keep a random-length prefix per sample
        >>> z.shape
        torch.Size([4, 16])
    """
    validate.floating(x, "x")
    p_value, p_t = runtime_probability(p)
    rng.check_generator(generator, x.device)
    if x.dim() < 2:
        raise ValueError(f"regops: nested_dropout needs x of shape [B, ..., units, ...], got {tuple(x.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim() or dim % x.dim() == 0:
        raise ValueError(f"regops: dim must index a non-batch dimension of a {x.dim()}-D x, got {dim!r}")
    validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if is_dtensor(x):
        return _dtensor().nested_dropout(x, p_value, dim % x.dim(), generator)
    seed = rng.philox_seed(x.device, x.shape[0], generator)
    return ops.nested_dropout(x, p_t, dim % x.dim(), seed)
