"""MixUp and CutMix: the draws made on the batch's device, one mixing op for every mode, index labels kept.

Public API: :class:`Mixup` (drop-in for ``timm.data.Mixup``; ``inplace=True`` for timm's in-place mixing),
:func:`mix_batch` + :class:`MixedBatch` (for the losses that work from index labels, :mod:`regops.losses`),
:func:`mixed_targets`, :func:`manifold_mix`, :class:`MixParams`. The torchvision v2 modules :class:`MixUp` /
:class:`CutMix` are in :mod:`regops.mix.nn`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from regops._core import rng, validate
from regops.mix import reference as ref
from regops.mix._params import (
    MixParams,
    apply_params,
    check_images,
    check_labels,
    check_num_classes,
    check_smoothing,
    host_one_hot,
    make_config,
    sample_params,
    spatial,
)

__all__ = ["MixParams", "MixedBatch", "Mixup", "manifold_mix", "mix_batch", "mixed_targets"]


def _mix_masks(masks: torch.Tensor, params: MixParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float masks are mixed like the images; integer label maps get the boxes pasted (and their partners' maps)."""
    validate.tensor(masks, "masks")
    if masks.dim() < 2 or masks.shape[0] != x.shape[0] or spatial(masks) != spatial(x):
        raise ValueError(
            f"regops: masks must be [B, ..., H, W] with the batch's B, H, W; got {tuple(masks.shape)} for a batch "
            f"of shape {tuple(x.shape)}"
        )
    if masks.device != x.device:
        raise ValueError(f"regops: masks are on {masks.device} but the batch is on {x.device}")
    if masks.dtype.is_floating_point:
        return apply_params(masks, params), None
    if masks.dtype == torch.bool or masks.dtype.is_complex:
        raise TypeError(f"regops: masks must be float (mixed) or integer label maps, got {masks.dtype}")
    height, width = spatial(masks)
    m4 = ref.as_nchw(masks)
    partner_maps = m4.index_select(0, params.partner)
    pasted = torch.where(ref.box_mask(params.box, height, width), partner_maps, m4)
    return pasted.reshape(masks.shape), partner_maps.reshape(masks.shape)


@dataclass
class MixedBatch:
    """What `mix_batch` did to a batch, for losses that work from index labels (built by `mix_batch`).

    Args:
        target_a: int64 ``[B]``, each sample's own label.
        target_b: int64 ``[B]``, its partner's label (``target_a[partner]``).
        lam: float32 ``[B]``, the weight of ``target_a`` (CutMix: the area left to the sample).
        params: the `MixParams` (partner, boxes) used, to mix anything else the same way.
        label_smoothing: default smoothing for `mix_cross_entropy` / `mix_binary_cross_entropy`.
        num_classes: the class count the labels were checked against (or ``None``).
        masks: the mixed ``masks`` (if any were given): float masks blended like the images, integer label
            maps with the partner's map pasted in each CutMix box.
        masks_b: for integer label maps, the partner's maps (``None`` for float masks). A pixel's label is
            ``masks`` with weight ``mask_lam`` and ``masks_b`` with weight ``1 - mask_lam``.

    Example::

        >>> x, mix = regops.mix_batch(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), mixup_alpha=1.0)
        >>> mix.target_a.tolist(), mix.target_b.tolist()  # flipped partners
        ([0, 1, 2, 3], [3, 2, 1, 0])
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

    Same keyword arguments and distributions as `Mixup` (timm's ``Mixup``). Sample ``b`` is mixed with
    ``p = partner[b]`` (``'flip'``: ``B - 1 - b`` as timm; ``'roll'``: ``b - 1`` as torchvision; ``'random'``: a
    random permutation, a random pairing in ``'pair'`` mode)::

        MixUp:   x'_b = lam_b x_b + (1 - lam_b) x_p                 lam_b ~ Beta(mixup_alpha, mixup_alpha)
        CutMix:  x'_b = x_b with box_b pasted from x_p,  lam_b = 1 - area(box_b) / (H W)

    Train with `mix_cross_entropy` (``lam CE(y_a) + (1 - lam) CE(y_b)``), which never builds a ``B x C``
    target. Every draw is made on ``x``'s device with ``generator`` (default: torch's), and the mixing is one
    kernel launch; ``x`` is not modified (unless ``inplace=True``: timm mixes in place).

    Args:
        x: ``[B, ..., H, W]`` (CutMix boxes on the last two dims) or ``[B, D]`` (MixUp only); float32/16,
            bfloat16, float64 or uint8 (blended in float32, rounded half to even); NCHW or channels_last (kept).
        target: int ``[B]`` class indices.
        mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam: as `Mixup`.
        label_smoothing: stored in ``mix`` as the losses' default.
        num_classes: if given, labels are checked to lie in ``[0, num_classes)``.
        partner: ``'flip'``, ``'roll'`` or ``'random'``.
        masks: a tensor or list of tensors ``[B, ..., H, W]`` (dense labels) mixed with the same lambdas and boxes.
        generator: ``torch.Generator`` on ``x``'s device type.
        params: reuse these `MixParams` instead of drawing (e.g. ``mix.params`` of another batch).
        inplace: write the mixed batch into ``x`` and return ``x`` (timm's in-place behaviour); default: ``x`` is
            not modified and a new tensor is returned.

    Returns:
        ``(x_mixed, mix)``: ``x_mixed`` like ``x``; ``mix`` a `MixedBatch`.

    Example::

        >>> images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
        >>> x_mixed, mix = regops.mix_batch(images, labels, mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
        >>> loss = regops.mix_cross_entropy(model(x_mixed), mix, label_smoothing=0.1)
        >>> x_mixed.shape, loss.shape
        (torch.Size([4, 3, 8, 8]), torch.Size([]))
    """
    x = check_images(x)
    if num_classes is not None:
        num_classes = check_num_classes(num_classes)
    target = check_labels(target, x.shape[0], num_classes, x.device)
    label_smoothing = check_smoothing(label_smoothing)
    if params is None:
        cfg = make_config(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam, partner)
        rng.check_generator(generator, x.device)
        params = sample_params(cfg, x, generator)
    x_mixed = apply_params(x, params)
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
    (the backward is the same kernel, transposed). Draw ``mix`` with `mix_batch` at the layer you mix
    (or mix the input and reuse ``mix`` deeper with MixUp only). Float dtypes.

    Args:
        h: hidden activations ``[B, ...]``, a float dtype; the batch dim first.
        mix: the draws of `mix_batch` (a `MixedBatch` or its `MixParams`) for the same ``B``.

    Returns:
        The mixed activations, shape and dtype of ``h`` (``h`` itself is not changed).

    Example::

        >>> h, labels, head = torch.randn(4, 16), torch.tensor([0, 1, 2, 3]), torch.nn.Linear(16, 5)
        >>> _, mix = regops.mix_batch(h, labels, mixup_alpha=2.0)  # the draws (h is not changed)
        >>> logits = head(regops.manifold_mix(h, mix))
        >>> loss = regops.mix_cross_entropy(logits, mix)
        >>> logits.shape
        torch.Size([4, 5])
    """
    params = mix.params if isinstance(mix, MixedBatch) else mix
    validate.floating(h, "h")
    if h.dim() < 2 or h.shape[0] != params.partner.shape[0]:
        raise ValueError(f"regops: h must be [B, ...] with B = {params.partner.shape[0]}, got {tuple(h.shape)}")
    if bool((params.box[:, 1] > params.box[:, 0]).any()) and (h.dim() < 3):
        raise ValueError("regops: these parameters hold CutMix boxes; h needs >= 3 dims [B, ..., H, W]")
    return apply_params(h, params)


def mixed_targets(mix: MixedBatch, num_classes: int, label_smoothing: float | None = None) -> torch.Tensor:
    """Dense float32 ``[B, num_classes]`` soft targets of ``mix`` (timm's ``mixup_target``) for losses needing them.

    Raises ValueError if a label of ``mix`` lies outside ``[0, num_classes)`` (as every other entry point does;
    scattering it would fail inside torch, or hit a device-side assert on a GPU).

    Args:
        mix: the `MixedBatch` returned by `mix_batch`.
        num_classes: ``C``, the number of classes.
        label_smoothing: smoothing of each one-hot target; default: the value ``mix`` was drawn with.

    Returns:
        Float32 tensor ``[B, num_classes]``: ``lam * onehot(target_a) + (1 - lam) * onehot(target_b)``, smoothed.

    Example::

        >>> _, mix = regops.mix_batch(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]), mixup_alpha=1.0)
        >>> soft = regops.mixed_targets(mix, num_classes=5)
        >>> soft.shape, torch.allclose(soft.sum(1), torch.ones(4))
        (torch.Size([4, 5]), True)
    """
    if not isinstance(mix, MixedBatch):
        raise TypeError(f"regops: mix must be the MixedBatch returned by mix_batch, got {type(mix).__name__}")
    num_classes = check_num_classes(num_classes)
    batch = mix.target_a.shape[0]
    check_labels(mix.target_a, batch, num_classes, mix.target_a.device, "mix.target_a")
    check_labels(mix.target_b, batch, num_classes, mix.target_a.device, "mix.target_b")
    s = mix.label_smoothing if label_smoothing is None else check_smoothing(label_smoothing)
    w_self, w_other = mix.params.label_weights
    return ref.mixed_one_hot(mix.target_a, mix.target_b, w_self, w_other, num_classes, s)


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

    Args:
        mixup_alpha: MixUp's ``Beta(alpha, alpha)`` parameter (0: off).
        cutmix_alpha: CutMix's ``Beta(alpha, alpha)`` parameter (0: off).
        cutmix_minmax: ``(min, max)`` side ratios of CutMix rectangles instead of ``cutmix_alpha``'s squares.
        prob: the probability of mixing a batch (or pair, or element) at all.
        switch_prob: with both enabled, the probability of CutMix instead of MixUp.
        mode: ``"batch"``, ``"pair"`` or ``"elem"``: one draw per batch, per pair of samples, or per sample.
        correct_lam: reset lambda to the area left after clipping a CutMix box.
        label_smoothing: smoothing of the one-hot targets.
        num_classes: ``C`` of the soft targets.
        multi_label: the targets are already ``[B, C]`` (multi-label) rather than class indices.
        partner: ``"flip"`` (timm's), ``"roll"`` or ``"random"``.
        generator: a ``torch.Generator`` on the images' device for every draw.
        inplace: write the mixed batch into ``x`` (as timm does).

    Example::

        >>> images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> mixup = regops.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=10)
        >>> x, soft = mixup(images, labels)  # soft: float32 [B, 10]
        >>> loss = regops.soft_target_cross_entropy(x.flatten(1)[:, :10], soft)
        >>> soft.shape, soft.dtype
        (torch.Size([4, 10]), torch.float32)
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
        self._cfg = make_config(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam, partner)
        self._cfg_off = replace(self._cfg, enabled=False)  # mixup_enabled = False: the draws, nothing mixed
        self.mixup_alpha = self._cfg.mixup_alpha
        self.cutmix_alpha = self._cfg.cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        self.mix_prob = self._cfg.prob
        self.switch_prob = self._cfg.switch_prob
        self.mode = mode
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = check_smoothing(label_smoothing)
        self.num_classes = check_num_classes(num_classes)
        self.multi_label = bool(multi_label)
        self.partner = partner
        self.generator = generator
        self.mixup_enabled = True  # the train loop may switch mixing off (timm's --mixup-off-epoch)

    def sample_params(self, x: torch.Tensor) -> MixParams:
        """Draw the per-sample parameters for a batch shaped like ``x`` (on its device)."""
        x = check_images(x)
        rng.check_generator(self.generator, x.device)
        return sample_params(self._cfg if self.mixup_enabled else self._cfg_off, x, self.generator)

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, params: MixParams | None = None, inplace: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_mixed, soft_targets float32 [B, num_classes])``; ``params`` replaces the draws if given.

        ``inplace`` (default: the constructor's): write the mixed batch into ``x`` and return ``x`` (timm's
        behaviour); otherwise ``x`` is left as it was and a new tensor is returned.
        """
        x = check_images(x)
        if self.multi_label:
            target = validate.tensor(target, "target")
            if target.dim() != 2 or target.shape != (x.shape[0], self.num_classes):
                raise ValueError(
                    f"regops: multi-label mixup expects dense targets [B, num_classes] = [{x.shape[0]}, "
                    f"{self.num_classes}], got {tuple(target.shape)}"
                )
        else:
            target = check_labels(target, x.shape[0], self.num_classes, x.device)
        if params is None:
            params = self.sample_params(x)
        x_mixed = apply_params(x, params)
        if self.inplace if inplace is None else inplace:
            x_mixed = _write_back(x, x_mixed)
        if self.multi_label:
            w_self, w_other = params.label_weights
            s = self.label_smoothing
            y1 = target.float() * (1.0 - s) + 0.5 * s
            soft = y1 * w_self.unsqueeze(1) + y1.index_select(0, params.partner) * w_other.unsqueeze(1)
        else:
            target_b = target.index_select(0, params.partner)
            if params._host is not None:
                soft = host_one_hot(params._host, target, target_b, self.num_classes, self.label_smoothing)
            else:
                w_self, w_other = params.label_weights
                soft = ref.mixed_one_hot(target, target_b, w_self, w_other, self.num_classes, self.label_smoothing)
        return x_mixed, soft
