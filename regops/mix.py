"""MixUp and CutMix with device-side draws, one mixing kernel, and losses that never build ``B x C`` targets.

Three layers:

* **Draws and parameters.** Every random number (Beta lambdas, switch / apply coins, box centres and sizes,
  random partners) is drawn with torch on the input's device (honouring ``torch.manual_seed`` or a
  ``generator``), then turned into per-sample parameters (:class:`MixParams`: lambda, partner index, box) by
  vectorised code that follows timm's ``Mixup`` (or torchvision's v2 ``MixUp``/``CutMix``) rule by rule.
  Nothing goes to the host, nothing loops over the batch.
* **One mixing op.** ``regops::mix_apply`` mixes every sample with its partner -- blend outside the box, paste
  inside it -- in a single launch for every mode (batch / pair / elem, MixUp / CutMix / both). It is
  differentiable (manifold mixup): the backward is the same kernel run transposed, gradients reach both partners.
* **Losses from index labels** live in the losses family (:mod:`regops.losses.mixed`: ``mix_cross_entropy``,
  ``soft_target_cross_entropy``, ``mix_binary_cross_entropy``; :func:`regops.cross_entropy` with ``mix=``); their
  names stay importable from here.

Public API: :class:`Mixup` (drop-in for ``timm.data.Mixup``; ``inplace=True`` for timm's in-place mixing),
:func:`mix_batch` + :class:`MixedBatch`, :func:`mixed_targets`, :func:`manifold_mix`, :class:`MixUp` /
:class:`CutMix` (torchvision v2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from regops import _backend
from regops._core import rng as _rng
from regops._core import validate as _validate
from regops.distributed import _hook as _dtensor
from regops.reference import mix as _ref

__all__ = [
    "CutMix",
    "MixParams",
    "MixUp",
    "MixedBatch",
    "Mixup",
    "manifold_mix",
    "mix_batch",
    "mixed_targets",
]

# The mixed-label losses moved to regops.losses (the row-softmax family); they stay importable from here.
_MOVED_TO_LOSSES = (
    "MixCrossEntropy",
    "SoftTargetCrossEntropy",
    "mix_binary_cross_entropy",
    "mix_cross_entropy",
    "soft_target_cross_entropy",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_LOSSES:
        from regops.losses import mixed

        return getattr(mixed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MODES = ("batch", "pair", "elem")
PARTNERS = ("flip", "roll", "random")
IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)


# ============================================================================================== kernel backends
def _mix_apply_cuda(x, w_self, w_other, partner, box):
    return torch.ops.regops_C.mix_apply(x, w_self.float(), w_other.float(), partner, box)


def _mix_apply_backward_cuda(grad, w_self, w_other, partner, box):
    inverse = _inverse_permutation(partner)
    return torch.ops.regops_C.mix_apply_backward(grad, w_self.float(), w_other.float(), inverse, box)


def _mix_apply_cuda_fake(x, w_self, w_other, index, box):
    return torch.empty_like(x, memory_format=_memory_format(x))


def _inverse_permutation(partner: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(partner)
    inv[partner] = torch.arange(partner.numel(), device=partner.device, dtype=partner.dtype)
    return inv


_backend.register(
    "mix_apply",
    torch=_ref.mix_apply,
    triton="regops.kernels.mix:mix_apply",
    cuda=_mix_apply_cuda,
    cuda_fake=_mix_apply_cuda_fake,
    # the C++ CPU kernel returns torch.empty_like(x) filled in; the reference reads the weights on the host
    cpp_fake=lambda x, w_self, w_other, partner, box: torch.empty_like(x),
)
_backend.register(
    "mix_apply_backward",
    torch=_ref.mix_apply_backward,
    triton="regops.kernels.mix:mix_apply_backward",
    cuda=_mix_apply_backward_cuda,
    cuda_fake=_mix_apply_cuda_fake,
)


# ============================================================================================== ops
def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("regops::mix_apply", mutates_args=())
def _mix_apply_op(
    x: torch.Tensor, w_self: torch.Tensor, w_other: torch.Tensor, partner: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    x = x.contiguous(memory_format=_memory_format(x))
    return _backend.implementation("mix_apply", x.device)(x, w_self, w_other, partner, box)


@_mix_apply_op.register_fake
def _(x, w_self, w_other, partner, box):
    return torch.empty_like(x, memory_format=_memory_format(x))


@torch.library.custom_op("regops::mix_apply_backward", mutates_args=())
def _mix_apply_backward_op(
    grad: torch.Tensor, w_self: torch.Tensor, w_other: torch.Tensor, partner: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    grad = grad.contiguous(memory_format=_memory_format(grad))
    return _backend.implementation("mix_apply_backward", grad.device)(grad, w_self, w_other, partner, box)


@_mix_apply_backward_op.register_fake
def _(grad, w_self, w_other, partner, box):
    return torch.empty_like(grad, memory_format=_memory_format(grad))


def _mix_apply_setup(ctx, inputs, output) -> None:
    _, w_self, w_other, partner, box = inputs
    ctx.save_for_backward(w_self, w_other, partner, box)


def _mix_apply_bwd(ctx, grad):
    w_self, w_other, partner, box = ctx.saved_tensors
    return _mix_apply_backward_op(grad, w_self, w_other, partner, box), None, None, None, None


_mix_apply_op.register_autograd(_mix_apply_bwd, setup_context=_mix_apply_setup)


# ============================================================================================== parameters
@dataclass(frozen=True)
class MixParams:
    """Per-sample mixing parameters: what the kernel needs, nothing random left.

    Attributes:
        lam: float64 ``[B]``, the weight of sample ``b``'s own label (after CutMix area correction); 1 = unmixed.
        partner: int64 ``[B]``, a permutation: sample ``b`` is mixed with ``partner[b]``.
        box: int64 ``[B, 4]``, ``(y0, y1, x0, x1)`` half-open on the last two dims, pasted from the partner
            (all zeros for MixUp samples and unmixed samples).
        use_cutmix: bool ``[B]``, the sample is a CutMix sample (image weights 1 / 0 outside its box).
    """

    lam: torch.Tensor
    partner: torch.Tensor
    box: torch.Tensor
    use_cutmix: torch.Tensor

    @property
    def image_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(w_self, w_other)``: ``lam``, ``1 - lam`` for MixUp samples, ``1``, ``0`` for CutMix samples."""
        w_self = torch.where(self.use_cutmix, 1.0, self.lam).float()
        w_other = torch.where(self.use_cutmix, 0.0, 1.0 - self.lam).float()
        return w_self, w_other

    @property
    def label_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(lam, 1 - lam)``, each rounded once from float64 (as timm's float32 target arithmetic)."""
        return self.lam.float(), (1.0 - self.lam).float()


@dataclass(frozen=True)
class _Config:
    mixup_alpha: float
    cutmix_alpha: float
    cutmix_minmax: tuple[float, float] | None
    prob: float
    switch_prob: float
    mode: str
    correct_lam: bool
    partner: str
    enabled: bool = True


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"regops: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"regops: {name} must not be NaN")
    return value


def _make_config(
    mixup_alpha: float,
    cutmix_alpha: float,
    cutmix_minmax: Sequence[float] | None,
    prob: float,
    switch_prob: float,
    mode: str,
    correct_lam: bool,
    partner: str,
) -> _Config:
    mixup_alpha = _check_number(mixup_alpha, "mixup_alpha")
    cutmix_alpha = _check_number(cutmix_alpha, "cutmix_alpha")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"regops: alphas must be >= 0 (0 disables), got {mixup_alpha=}, {cutmix_alpha=}")
    minmax = None
    if cutmix_minmax is not None:
        if not isinstance(cutmix_minmax, Sequence) or len(cutmix_minmax) != 2:
            raise ValueError(f"regops: cutmix_minmax must be a pair (min, max), got {cutmix_minmax!r}")
        lo, hi = (_check_number(v, "cutmix_minmax") for v in cutmix_minmax)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"regops: cutmix_minmax must satisfy 0 <= min < max <= 1, got ({lo}, {hi})")
        minmax = (lo, hi)
        cutmix_alpha = 1.0  # as timm: min/max boxes force CutMix on (alpha 1 keeps the switch logic simple)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        raise ValueError(
            "regops: nothing to mix: mixup_alpha and cutmix_alpha are both 0 (and no cutmix_minmax); "
            "enable one of them (alpha > 0), or set mixup_enabled = False to pass batches through"
        )
    if mode not in MODES:
        raise ValueError(f"regops: mode must be one of {MODES}, got {mode!r}")
    if partner not in PARTNERS:
        raise ValueError(f"regops: partner must be one of {PARTNERS}, got {partner!r}")
    if mode == "pair" and partner == "roll":
        raise ValueError("regops: mode='pair' mixes samples in pairs; use partner='flip' or 'random', not 'roll'")
    return _Config(
        mixup_alpha,
        cutmix_alpha,
        minmax,
        _validate.probability(prob, "prob"),
        _validate.probability(switch_prob, "switch_prob"),
        mode,
        bool(correct_lam),
        partner,
    )


def _partners(kind: str, mode: str, batch: int, device, generator) -> torch.Tensor:
    idx = torch.arange(batch, device=device)
    if kind == "flip":
        return batch - 1 - idx
    if kind == "roll":  # torchvision's roll(1, 0): sample b is mixed with sample b - 1
        return (idx - 1) % batch
    perm = torch.randperm(batch, device=device, generator=generator)
    if mode != "pair":
        return perm
    # A random perfect matching: perm[2k] <-> perm[2k + 1] (the last sample of an odd batch stays alone).
    partner = idx.clone()
    even = perm[: batch // 2 * 2].view(-1, 2)
    partner[even[:, 0]] = even[:, 1]
    partner[even[:, 1]] = even[:, 0]
    return partner


def _beta(alpha: float, n: int, device, generator) -> torch.Tensor:
    conc = torch.full((n, 2), alpha, dtype=torch.float64, device=device)
    return torch._sample_dirichlet(conc, generator=generator)[:, 0]


def _uniform(n: int, device, generator) -> torch.Tensor:
    return torch.rand(n, dtype=torch.float64, device=device, generator=generator)


@dataclass
class _Draws:
    """The raw random numbers of one call (float64 ``[n]``), in the units timm's NumPy draws use."""

    apply: torch.Tensor  # U[0,1): mix iff < prob
    switch: torch.Tensor  # U[0,1): CutMix iff < switch_prob (when both are enabled)
    lam_mixup: torch.Tensor | None  # Beta(mixup_alpha)
    lam_cutmix: torch.Tensor | None  # Beta(cutmix_alpha)
    u_y: torch.Tensor  # box position (centre for alpha boxes, corner for min/max boxes)
    u_x: torch.Tensor
    u_h: torch.Tensor  # box size (min/max boxes only)
    u_w: torch.Tensor


def _draw(cfg: _Config, n: int, device, generator) -> _Draws:
    u = lambda: _uniform(n, device, generator)  # noqa: E731
    return _Draws(
        apply=u(),
        switch=u(),
        lam_mixup=_beta(cfg.mixup_alpha, n, device, generator) if cfg.mixup_alpha > 0 else None,
        lam_cutmix=_beta(cfg.cutmix_alpha, n, device, generator) if cfg.cutmix_alpha > 0 else None,
        u_y=u(),
        u_x=u(),
        u_h=u(),
        u_w=u(),
    )


def _floor_index(u: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """A uniform integer in ``[0, n)`` from ``u`` in ``[0, 1)`` (``numpy.random.randint(0, n)``)."""
    return torch.floor(u * n).long()


def _params_from_draws(cfg: _Config, draws: _Draws, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """timm's rules, vectorised: ``(lam float64, use_cutmix bool, box int64 [n, 4])`` for each draw.

    Per-element and pair modes keep lambdas in float32 (timm stores them in a float32 array and computes the box
    size in float32); batch mode keeps float64 (timm's Python float).
    """
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = draws.switch < cfg.switch_prob
        lam = torch.where(use_cutmix, draws.lam_cutmix, draws.lam_mixup)
    elif cfg.mixup_alpha > 0:
        use_cutmix = torch.zeros_like(draws.apply, dtype=torch.bool)
        lam = draws.lam_mixup
    else:
        use_cutmix = torch.ones_like(draws.apply, dtype=torch.bool)
        lam = draws.lam_cutmix
    per_sample = cfg.mode != "batch"
    if per_sample:
        lam = lam.float().double()
    applied = (draws.apply < cfg.prob) & cfg.enabled
    lam = torch.where(applied, lam, 1.0)
    cut = use_cutmix & (lam != 1.0)
    if cfg.cutmix_minmax is not None:
        lo_h, hi_h = int(height * cfg.cutmix_minmax[0]), int(height * cfg.cutmix_minmax[1])
        lo_w, hi_w = int(width * cfg.cutmix_minmax[0]), int(width * cfg.cutmix_minmax[1])
        if lo_h >= hi_h or lo_w >= hi_w:
            raise ValueError(
                f"regops: cutmix_minmax={cfg.cutmix_minmax} gives an empty box-size range on a {height}x{width} "
                f"image (int(size * min) must be < int(size * max))"
            )
        cut_h = lo_h + _floor_index(draws.u_h, hi_h - lo_h)
        cut_w = lo_w + _floor_index(draws.u_w, hi_w - lo_w)
        y0 = _floor_index(draws.u_y, height - cut_h + 1)
        x0 = _floor_index(draws.u_x, width - cut_w + 1)
        y1, x1 = y0 + cut_h, x0 + cut_w
    else:
        ctype = torch.float32 if per_sample else torch.float64
        ratio = torch.sqrt(1.0 - lam.to(ctype))
        cut_h = torch.floor(ratio * height).long()
        cut_w = torch.floor(ratio * width).long()
        cy = _floor_index(draws.u_y, height)
        cx = _floor_index(draws.u_x, width)
        y0 = (cy - cut_h // 2).clamp(0, height)
        y1 = (cy + (cut_h + 1) // 2).clamp(0, height)
        x0 = (cx - cut_w // 2).clamp(0, width)
        x1 = (cx + (cut_w + 1) // 2).clamp(0, width)
    box = torch.stack([y0, y1, x0, x1], dim=1)
    box = torch.where(cut.unsqueeze(1), box, 0)
    if cfg.correct_lam or cfg.cutmix_minmax is not None:
        area = ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).double()
        corrected = 1.0 - area / float(height * width)
        if per_sample:
            corrected = corrected.float().double()
        lam = torch.where(cut, corrected, lam)
    return lam, cut, box


def _spatial(x: torch.Tensor) -> tuple[int, int]:
    return (1, x.shape[1]) if x.dim() == 2 else (x.shape[-2], x.shape[-1])


def _sample_params(cfg: _Config, x: torch.Tensor, generator: torch.Generator | None) -> MixParams:
    batch = x.shape[0]
    height, width = _spatial(x)
    device = x.device
    if cfg.cutmix_alpha > 0 and x.dim() < 3:
        raise ValueError(f"regops: CutMix needs inputs with >= 3 dims [B, ..., H, W], got shape {tuple(x.shape)}")
    partner = _partners(cfg.partner, cfg.mode, batch, device, generator)
    n = 1 if cfg.mode == "batch" else batch
    lam, cut, box = _params_from_draws(cfg, _draw(cfg, n, device, generator), height, width)
    if _dtensor.is_dtensor(x):
        partner, lam, cut, box = _dtensor.forward("mix", "sync_draws", x, partner, lam, cut, box)
    if cfg.mode == "batch":
        rep = torch.zeros(batch, dtype=torch.long, device=device)
    elif cfg.mode == "pair":
        rep = torch.minimum(torch.arange(batch, device=device), partner)  # both partners share one draw
    else:
        rep = torch.arange(batch, device=device)
    alone = partner == torch.arange(batch, device=device)  # the middle sample of an odd batch under 'flip'
    lam = torch.where(alone, 1.0, lam[rep])
    cut = cut[rep] & ~alone
    box = torch.where(cut.unsqueeze(1), box[rep], 0)
    return MixParams(lam=lam, partner=partner, box=box, use_cutmix=cut)


# ============================================================================================== validation
def _check_images(x: Any, name: str = "x") -> torch.Tensor:
    x = _validate.tensor(x, name)
    if x.dtype not in IMAGE_DTYPES:
        raise TypeError(f"regops: {name} must be float32/16, bfloat16, float64 or uint8, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"regops: {name} must be a batch [B, ...] with >= 2 dims, got shape {tuple(x.shape)}")
    return x


def _check_labels(target: Any, batch: int, num_classes: int | None, device, name: str = "target") -> torch.Tensor:
    target = _validate.tensor(target, name)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"regops: {name} must hold integer class indices, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(
            f"regops: {name} must have shape [{batch}] (one class index per sample), got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(f"regops: {name} is on {target.device} but the batch is on {device}")
    if target.numel() and num_classes is not None and not torch.compiler.is_compiling():
        low, high = torch.aminmax(target)
        low, high = int(low), int(high)
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"regops: {name} holds labels outside [0, num_classes={num_classes}): min {low}, max {high}"
            )
    return target.long()


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"regops: num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _check_smoothing(value: Any, name: str = "label_smoothing") -> float:
    value = _check_number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"regops: {name} must be in [0, 1], got {value}")
    return value


# ============================================================================================== mixing
def _apply(x: torch.Tensor, params: MixParams) -> torch.Tensor:
    w_self, w_other = params.image_weights
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("mix", "mix_apply", x, lambda t: _apply(t, params))
    return _mix_apply_op(x, w_self, w_other, params.partner, params.box)


def _mix_masks(masks: torch.Tensor, params: MixParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float masks are mixed like the images; integer label maps get the boxes pasted (and their partners' maps)."""
    _validate.tensor(masks, "masks")
    if masks.dim() < 2 or masks.shape[0] != x.shape[0] or _spatial(masks) != _spatial(x):
        raise ValueError(
            f"regops: masks must be [B, ..., H, W] with the batch's B, H, W; got {tuple(masks.shape)} for a batch "
            f"of shape {tuple(x.shape)}"
        )
    if masks.device != x.device:
        raise ValueError(f"regops: masks are on {masks.device} but the batch is on {x.device}")
    if masks.dtype.is_floating_point:
        return _apply(masks, params), None
    if masks.dtype == torch.bool or masks.dtype.is_complex:
        raise TypeError(f"regops: masks must be float (mixed) or integer label maps, got {masks.dtype}")
    height, width = _spatial(masks)
    m4 = _ref.as_nchw(masks)
    partner_maps = m4.index_select(0, params.partner)
    pasted = torch.where(_ref.box_mask(params.box, height, width), partner_maps, m4)
    return pasted.reshape(masks.shape), partner_maps.reshape(masks.shape)


@dataclass
class MixedBatch:
    """What :func:`mix_batch` did to a batch, for losses that work from index labels.

    Attributes:
        target_a: int64 ``[B]``, each sample's own label.
        target_b: int64 ``[B]``, its partner's label (``target_a[partner]``).
        lam: float32 ``[B]``, the weight of ``target_a`` (CutMix: the area left to the sample).
        params: the :class:`MixParams` (partner, boxes) used, to mix anything else the same way.
        label_smoothing: default smoothing for :func:`mix_cross_entropy` / :func:`mix_binary_cross_entropy`.
        num_classes: the class count the labels were checked against (or ``None``).
        masks: the mixed ``masks`` (if any were given): float masks blended like the images, integer label
            maps with the partner's map pasted in each CutMix box.
        masks_b: for integer label maps, the partner's maps (``None`` for float masks). A pixel's label is
            ``masks`` with weight ``mask_lam`` and ``masks_b`` with weight ``1 - mask_lam``.
    """

    target_a: torch.Tensor
    target_b: torch.Tensor
    lam: torch.Tensor
    params: MixParams
    label_smoothing: float = 0.0
    num_classes: int | None = None
    masks: list[torch.Tensor] | torch.Tensor | None = None
    masks_b: list[torch.Tensor | None] | torch.Tensor | None = None

    @property
    def mask_lam(self) -> torch.Tensor:
        """float32 ``[B]``: pixel weight of ``masks`` for integer label maps (MixUp samples: lam; CutMix: 1)."""
        return torch.where(self.params.use_cutmix, 1.0, self.params.lam).float()


def mix_batch(
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    mixup_alpha: float = 1.0,
    cutmix_alpha: float = 0.0,
    cutmix_minmax: Sequence[float] | None = None,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    correct_lam: bool = True,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
    partner: str = "flip",
    masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    params: MixParams | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, MixedBatch]:
    r"""MixUp / CutMix a batch and keep index labels: ``x_mixed, mix = regops.mix_batch(x, target, ...)``.

    Same keyword arguments and distributions as :class:`Mixup` (timm's ``Mixup``). Sample ``b`` is mixed with
    ``p = partner[b]`` (``'flip'``: ``B - 1 - b`` as timm; ``'roll'``: ``b - 1`` as torchvision; ``'random'``: a
    random permutation, a random pairing in ``'pair'`` mode)::

        MixUp:   x'_b = lam_b x_b + (1 - lam_b) x_p                 lam_b ~ Beta(mixup_alpha, mixup_alpha)
        CutMix:  x'_b = x_b with box_b pasted from x_p,  lam_b = 1 - area(box_b) / (H W)

    Train with :func:`mix_cross_entropy` (``lam CE(y_a) + (1 - lam) CE(y_b)``), which never builds a ``B x C``
    target. Every draw is made on ``x``'s device with ``generator`` (default: torch's), and the mixing is one
    kernel launch; ``x`` is not modified (unless ``inplace=True``: timm mixes in place).

    Args:
        x: ``[B, ..., H, W]`` (CutMix boxes on the last two dims) or ``[B, D]`` (MixUp only); float32/16,
            bfloat16, float64 or uint8 (blended in float32, rounded half to even); NCHW or channels_last (kept).
        target: int ``[B]`` class indices.
        mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam: as :class:`Mixup`.
        label_smoothing: stored in ``mix`` as the losses' default.
        num_classes: if given, labels are checked to lie in ``[0, num_classes)``.
        partner: ``'flip'``, ``'roll'`` or ``'random'``.
        masks: a tensor or list of tensors ``[B, ..., H, W]`` (dense labels) mixed with the same lambdas and boxes.
        generator: ``torch.Generator`` on ``x``'s device type.
        params: reuse these :class:`MixParams` instead of drawing (e.g. ``mix.params`` of another batch).
        inplace: write the mixed batch into ``x`` and return ``x`` (timm's in-place behaviour); default: ``x`` is
            not modified and a new tensor is returned.

    Returns:
        ``(x_mixed, mix)``: ``x_mixed`` like ``x``; ``mix`` a :class:`MixedBatch`.

    Example::

        >>> x_mixed, mix = regops.mix_batch(images, labels, mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
        >>> loss = regops.mix_cross_entropy(model(x_mixed), mix, label_smoothing=0.1)
    """
    x = _check_images(x)
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
    target = _check_labels(target, x.shape[0], num_classes, x.device)
    label_smoothing = _check_smoothing(label_smoothing)
    if params is None:
        cfg = _make_config(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam, partner)
        _rng.check_generator(generator, x.device)
        params = _sample_params(cfg, x, generator)
    x_mixed = _apply(x, params)
    if inplace:
        x_mixed = _write_back(x, x_mixed)
    mix = MixedBatch(
        target_a=target,
        target_b=target.index_select(0, params.partner),
        lam=params.lam.float(),
        params=params,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
    if masks is not None:
        if isinstance(masks, torch.Tensor):
            mix.masks, mix.masks_b = _mix_masks(masks, params, x)
        else:
            pairs = [_mix_masks(m, params, x) for m in masks]
            mix.masks, mix.masks_b = [p[0] for p in pairs], [p[1] for p in pairs]
    return x_mixed, mix


def _write_back(x: torch.Tensor, x_mixed: torch.Tensor) -> torch.Tensor:
    """timm's in-place contract: ``x`` holds the mixed batch afterwards (no autograd: inputs are data)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("regops: inplace=True mixes data batches; x requires grad (use manifold_mix, not in place)")
    with torch.no_grad():
        x.copy_(x_mixed)
    return x


def manifold_mix(
    h: torch.Tensor,
    mix: MixedBatch | MixParams,
) -> torch.Tensor:
    """Mix hidden activations ``h`` ``[B, ...]`` with the partners, lambdas and boxes of ``mix`` (manifold mixup).

    Differentiable: the gradient of ``h'_b = lam_b h_b + (1 - lam_b) h_p`` reaches both ``h_b`` and ``h_p``
    (the backward is the same kernel, transposed). Draw ``mix`` with :func:`mix_batch` at the layer you mix
    (or mix the input and reuse ``mix`` deeper with MixUp only). Float dtypes.

    Example::

        >>> _, mix = regops.mix_batch(h, labels, mixup_alpha=2.0)    # the draws (h is not changed)
        >>> logits = head(regops.manifold_mix(h, mix))
        >>> loss = regops.mix_cross_entropy(logits, mix)
    """
    params = mix.params if isinstance(mix, MixedBatch) else mix
    _validate.floating(h, "h")
    if h.dim() < 2 or h.shape[0] != params.partner.shape[0]:
        raise ValueError(f"regops: h must be [B, ...] with B = {params.partner.shape[0]}, got {tuple(h.shape)}")
    if bool((params.box[:, 1] > params.box[:, 0]).any()) and (h.dim() < 3):
        raise ValueError("regops: these parameters hold CutMix boxes; h needs >= 3 dims [B, ..., H, W]")
    return _apply(h, params)


def mixed_targets(mix: MixedBatch, num_classes: int, label_smoothing: float | None = None) -> torch.Tensor:
    """Dense float32 ``[B, num_classes]`` soft targets of ``mix`` (timm's ``mixup_target``) for losses needing them.

    Raises ValueError if a label of ``mix`` lies outside ``[0, num_classes)`` (as every other entry point does;
    scattering it would fail inside torch, or hit a device-side assert on a GPU).
    """
    if not isinstance(mix, MixedBatch):
        raise TypeError(f"regops: mix must be the MixedBatch returned by mix_batch, got {type(mix).__name__}")
    num_classes = _check_num_classes(num_classes)
    batch = mix.target_a.shape[0]
    _check_labels(mix.target_a, batch, num_classes, mix.target_a.device, "mix.target_a")
    _check_labels(mix.target_b, batch, num_classes, mix.target_a.device, "mix.target_b")
    s = mix.label_smoothing if label_smoothing is None else _check_smoothing(label_smoothing)
    w_self, w_other = mix.params.label_weights
    return _ref.mixed_one_hot(mix.target_a, mix.target_b, w_self, w_other, num_classes, s)


class Mixup:
    """Drop-in for ``timm.data.Mixup``: MixUp / CutMix per batch, pair or element, with dense soft targets.

    Same constructor, call and distributions as timm (``x, target = mixup(x, target)``): lambdas from
    ``Beta(alpha, alpha)``; with both MixUp and CutMix enabled each batch / element uses CutMix with probability
    ``switch_prob``; ``prob`` is the probability of mixing at all; CutMix boxes are squares of side ratio
    ``sqrt(1 - lam)`` centred uniformly and clipped (or, with ``cutmix_minmax``, rectangles with side ratios
    uniform in ``[min, max)``), and ``correct_lam`` resets lambda to the area left after clipping; partners
    are the flipped batch; targets are ``lam * y_a + (1 - lam) * y_b`` with one-hots smoothed to
    ``1 - s + s / C`` / ``s / C``.

    **In place or not:** timm's ``Mixup`` mixes ``x`` in place (and returns it); by default this one leaves ``x``
    untouched and returns the mixed batch as a new tensor, so code ported from timm that ignores the returned
    ``x`` (``mixup(x, y)`` then ``model(x)``) would train on unmixed images. Use the return value, or pass
    ``inplace=True`` (constructor or call) to write the mixed batch into ``x`` as timm does.

    Other differences, all deliberate: every draw is made with torch on ``x``'s device (``torch.manual_seed`` /
    ``generator``), not NumPy; all modes run one mixing kernel, with no per-sample Python loop and no host
    sync; odd batch sizes work (the middle
    sample of a flipped odd batch is left unmixed); ``partner='roll'|'random'`` are options; uint8 images are
    blended in float32 and rounded; for float32 images the outputs and targets equal timm's for the same draws.

    Example::

        >>> mixup = regops.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=1000)
        >>> x, soft = mixup(images, labels)           # soft: float32 [B, 1000]
        >>> loss = regops.soft_target_cross_entropy(model(x), soft)
    """

    def __init__(
        self,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        multi_label: bool = False,
        *,
        partner: str = "flip",
        generator: torch.Generator | None = None,
        inplace: bool = False,
    ) -> None:
        self.inplace = bool(inplace)
        self._cfg = _make_config(
            mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam, partner
        )
        self.mixup_alpha = self._cfg.mixup_alpha
        self.cutmix_alpha = self._cfg.cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        self.mix_prob = self._cfg.prob
        self.switch_prob = self._cfg.switch_prob
        self.mode = mode
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = _check_smoothing(label_smoothing)
        self.num_classes = _check_num_classes(num_classes)
        self.multi_label = bool(multi_label)
        self.partner = partner
        self.generator = generator
        self.mixup_enabled = True  # the train loop may switch mixing off (timm's --mixup-off-epoch)

    def sample_params(self, x: torch.Tensor) -> MixParams:
        """Draw the per-sample parameters for a batch shaped like ``x`` (on its device)."""
        x = _check_images(x)
        _rng.check_generator(self.generator, x.device)
        return _sample_params(replace(self._cfg, enabled=bool(self.mixup_enabled)), x, self.generator)

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, params: MixParams | None = None, inplace: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_mixed, soft_targets float32 [B, num_classes])``; ``params`` replaces the draws if given.

        ``inplace`` (default: the constructor's): write the mixed batch into ``x`` and return ``x`` (timm's
        behaviour); otherwise ``x`` is left as it was and a new tensor is returned.
        """
        x = _check_images(x)
        if self.multi_label:
            target = _validate.tensor(target, "target")
            if target.dim() != 2 or target.shape != (x.shape[0], self.num_classes):
                raise ValueError(
                    f"regops: multi-label mixup expects dense targets [B, num_classes] = [{x.shape[0]}, "
                    f"{self.num_classes}], got {tuple(target.shape)}"
                )
        else:
            target = _check_labels(target, x.shape[0], self.num_classes, x.device)
        if params is None:
            params = self.sample_params(x)
        x_mixed = _apply(x, params)
        if self.inplace if inplace is None else inplace:
            x_mixed = _write_back(x, x_mixed)
        w_self, w_other = params.label_weights
        if self.multi_label:
            s = self.label_smoothing
            y1 = target.float() * (1.0 - s) + 0.5 * s
            soft = y1 * w_self.unsqueeze(1) + y1.index_select(0, params.partner) * w_other.unsqueeze(1)
        else:
            target_b = target.index_select(0, params.partner)
            soft = _ref.mixed_one_hot(target, target_b, w_self, w_other, self.num_classes, self.label_smoothing)
        return x_mixed, soft


# ============================================================================================== torchvision v2
def _default_labels(inputs: Any) -> Any:
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[1]
    if isinstance(inputs, torch.Tensor):
        return inputs
    if not isinstance(inputs, dict):
        raise ValueError(
            "regops: with the default labels_getter the input must be a dict or a two-tuple whose second item "
            f"is a dict or a tensor, got {type(inputs).__name__}"
        )
    key = next((k for k in inputs if str(k).lower() == "labels"), None)
    key = key if key is not None else next((k for k in inputs if "label" in str(k).lower()), None)
    if key is None:
        raise ValueError("regops: could not find the labels in the sample; pass labels_getter=<callable>")
    return inputs[key]


def _tv_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(image-like types, unsupported types) of torchvision when it is installed."""
    try:
        import PIL.Image
        from torchvision import tv_tensors
    except ImportError:  # torchvision is optional: plain tensors still work
        return (), ()
    unsupported = (PIL.Image.Image, tv_tensors.BoundingBoxes, tv_tensors.Mask)
    unsupported += (tv_tensors.KeyPoints,) if hasattr(tv_tensors, "KeyPoints") else ()
    return (tv_tensors.Image, tv_tensors.Video), unsupported


class _BaseMixUpCutMix(torch.nn.Module):
    def __init__(
        self,
        *,
        alpha: float = 1.0,
        num_classes: int | None = None,
        labels_getter: str | Callable[[Any], Any] | None = "default",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.alpha = float(_check_number(alpha, "alpha"))
        if self.alpha <= 0:
            raise ValueError(f"regops: alpha must be > 0, got {self.alpha}")
        self.num_classes = None if num_classes is None else _check_num_classes(num_classes)
        if labels_getter == "default":
            self._labels_getter: Callable[[Any], Any] = _default_labels
        elif callable(labels_getter):
            self._labels_getter = labels_getter
        elif labels_getter is None:
            self._labels_getter = lambda _: None
        else:
            raise ValueError(f"regops: labels_getter must be 'default', a callable or None, got {labels_getter!r}")
        self.generator = generator

    def _lam(self, device) -> torch.Tensor:
        # torchvision draws Beta(alpha, alpha) from a float32 Dirichlet; the same call here gives the same lambda.
        conc = torch.tensor([[self.alpha, self.alpha]], device=device)
        return torch._sample_dirichlet(conc, generator=self.generator)[:, 0].double()

    def _params(self, x: torch.Tensor) -> MixParams:
        raise NotImplementedError

    def forward(self, *inputs: Any) -> Any:
        from torch.utils._pytree import tree_flatten, tree_unflatten

        inputs = inputs if len(inputs) > 1 else inputs[0]
        flat, spec = tree_flatten(inputs)
        image_types, unsupported = _tv_types()
        if unsupported and any(isinstance(t, unsupported) for t in flat):
            raise ValueError(f"regops: {type(self).__name__}() does not support PIL images, boxes, keypoints or masks")
        labels = self._labels_getter(inputs)
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"regops: the labels must be a tensor, got {type(labels).__name__}")
        if labels.dim() not in (1, 2):
            raise ValueError(
                f"regops: labels must be [B] indices or [B, num_classes] probabilities, got {tuple(labels.shape)}"
            )
        if labels.dim() == 2 and self.num_classes is not None and labels.shape[-1] != self.num_classes:
            raise ValueError(f"regops: 2-D labels have {labels.shape[-1]} classes, num_classes is {self.num_classes}")
        if labels.dim() == 1 and self.num_classes is None:
            raise ValueError("regops: num_classes must be given when labels are class indices (1-D)")
        has_image_type = any(isinstance(t, image_types) for t in flat) if image_types else False
        targets, pure_left = [], not has_image_type
        for i, t in enumerate(flat):
            if t is labels or not isinstance(t, torch.Tensor):
                continue
            if image_types and isinstance(t, image_types):
                targets.append(i)
            elif type(t) is torch.Tensor and pure_left:
                targets.append(i)
                pure_left = False
        if not targets:
            raise TypeError("regops: no image or video tensor found in the sample")
        first = flat[targets[0]]
        params = self._params(first)
        out = list(flat)
        for i in targets:
            t = flat[i]
            video = len(image_types) > 1 and isinstance(t, image_types[1])
            expected = 5 if video else 4
            if t.dim() != expected:
                raise ValueError(f"regops: expected a batched input with {expected} dims, got {t.dim()}")
            if t.shape[0] != labels.shape[0]:
                raise ValueError(f"regops: images have batch {t.shape[0]} but labels have {labels.shape[0]}")
            mixed = _apply(_check_images(t.as_subclass(torch.Tensor)), params)
            if image_types and isinstance(t, image_types):
                from torchvision import tv_tensors

                mixed = tv_tensors.wrap(mixed, like=t)
            out[i] = mixed
        label_index = next((i for i, t in enumerate(flat) if t is labels), None)
        if label_index is None:
            raise ValueError("regops: the labels returned by labels_getter are not part of the input")
        out[label_index] = self._mix_labels(labels, params)
        return tree_unflatten(out, spec)

    def _mix_labels(self, labels: torch.Tensor, params: MixParams) -> torch.Tensor:
        w_self, w_other = params.label_weights
        if labels.dim() == 1:
            labels = _check_labels(labels, labels.shape[0], self.num_classes, labels.device, "labels")
            return _ref.mixed_one_hot(
                labels, labels.index_select(0, params.partner), w_self, w_other, self.num_classes, 0.0
            )
        soft = labels if labels.dtype.is_floating_point else labels.float()
        return (soft.index_select(0, params.partner) * w_other.unsqueeze(1) + soft * w_self.unsqueeze(1)).to(soft.dtype)


class MixUp(_BaseMixUpCutMix):
    """torchvision v2 ``MixUp`` with regops' kernel: ``MixUp(alpha=1.0, num_classes=None, labels_getter='default')``.

    One ``lam ~ Beta(alpha, alpha)`` per call, partner ``roll(1, 0)`` (sample ``b`` with ``b - 1``),
    ``x' = lam x + (1 - lam) x_rolled``, labels one-hot (1-D) or probabilities (2-D) mixed the same way. On CPU
    with the default generator the draws are torchvision's own (same seed, same output); on a GPU they are made
    on the device. uint8 images are blended in float32 and rounded (torchvision rejects them).

    Example::

        >>> images, soft = regops.MixUp(num_classes=10)(images, labels)
    """

    def _params(self, x: torch.Tensor) -> MixParams:
        batch = x.shape[0]
        lam = self._lam(x.device).expand(batch)
        partner = _partners("roll", "batch", batch, x.device, None)
        return MixParams(
            lam=lam,
            partner=partner,
            box=torch.zeros(batch, 4, dtype=torch.long, device=x.device),
            use_cutmix=torch.zeros(batch, dtype=torch.bool, device=x.device),
        )


class CutMix(_BaseMixUpCutMix):
    """torchvision v2 ``CutMix`` with regops' kernel: ``CutMix(alpha=1.0, num_classes=None, labels_getter='default')``.

    One ``lam ~ Beta(alpha, alpha)`` per call; box centre ``(r_x, r_y)`` uniform, half-sides
    ``int(0.5 sqrt(1 - lam) W)``, ``int(0.5 sqrt(1 - lam) H)``, clipped; the box is pasted from the rolled batch
    and labels are mixed with the area-corrected lambda. Same seed, same output as torchvision on CPU.

    Example::

        >>> images, soft = regops.CutMix(num_classes=10)(images, labels)
    """

    def _params(self, x: torch.Tensor) -> MixParams:
        batch, device = x.shape[0], x.device
        height, width = x.shape[-2:]
        lam = self._lam(device)
        r_x = torch.randint(width, size=(1,), device=device, generator=self.generator)
        r_y = torch.randint(height, size=(1,), device=device, generator=self.generator)
        r = 0.5 * torch.sqrt(1.0 - lam)
        r_w_half, r_h_half = torch.floor(r * width).long(), torch.floor(r * height).long()
        x0, y0 = (r_x - r_w_half).clamp(min=0), (r_y - r_h_half).clamp(min=0)
        x1, y1 = (r_x + r_w_half).clamp(max=width), (r_y + r_h_half).clamp(max=height)
        box = torch.stack([y0, y1, x0, x1], dim=1).expand(batch, 4)
        lam_adjusted = 1.0 - ((x1 - x0) * (y1 - y0)).double() / (width * height)
        return MixParams(
            lam=lam_adjusted.expand(batch),
            partner=_partners("roll", "batch", batch, device, None),
            box=box.contiguous(),
            use_cutmix=torch.ones(batch, dtype=torch.bool, device=device),
        )
