"""torchvision v2's ``MixUp`` and ``CutMix`` transforms on regops' mixing op (same seed, same output on CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from regops.mix import reference as ref
from regops.mix._params import (
    MixParams,
    apply_params,
    check_images,
    check_labels,
    check_num_classes,
    check_number,
    partners,
)

__all__ = ["CutMix", "MixUp"]


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
        self.alpha = float(check_number(alpha, "alpha"))
        if self.alpha <= 0:
            raise ValueError(f"regops: alpha must be > 0, got {self.alpha}")
        self.num_classes = None if num_classes is None else check_num_classes(num_classes)
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
            mixed = apply_params(check_images(t.as_subclass(torch.Tensor)), params)
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
            labels = check_labels(labels, labels.shape[0], self.num_classes, labels.device, "labels")
            return ref.mixed_one_hot(
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

    Args:
        alpha: the ``Beta(alpha, alpha)`` parameter, > 0 (keyword-only, as all arguments).
        num_classes: ``C``, needed for 1-D integer labels.
        labels_getter: ``"default"`` (the second element of a tuple input, or a ``"labels"`` key), a callable
            that finds the labels in the input, or None (no labels).
        generator: a ``torch.Generator`` for the draw.

    Example::

        >>> images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> images, soft = regops.MixUp(num_classes=10)(images, labels)
        >>> images.shape, soft.shape
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 10]))
    """

    def _params(self, x: torch.Tensor) -> MixParams:
        batch = x.shape[0]
        lam = self._lam(x.device).expand(batch)
        partner = partners("roll", "batch", batch, x.device, None)
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

    Args:
        alpha: the ``Beta(alpha, alpha)`` parameter, > 0 (keyword-only, as all arguments).
        num_classes: ``C``, needed for 1-D integer labels.
        labels_getter: ``"default"`` (the second element of a tuple input, or a ``"labels"`` key), a callable
            that finds the labels in the input, or None (no labels).
        generator: a ``torch.Generator`` for the draw.

    Example::

        >>> images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> images, soft = regops.CutMix(num_classes=10)(images, labels)
        >>> images.shape, soft.shape
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 10]))
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
            partner=partners("roll", "batch", batch, device, None),
            box=box.contiguous(),
            use_cutmix=torch.ones(batch, dtype=torch.bool, device=device),
        )
