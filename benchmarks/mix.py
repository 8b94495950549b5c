"""MixUp / CutMix: regops against timm (Mixup), torchvision v2 (MixUp, CutMix), a vectorised eager-PyTorch version
with the same draws, and its torch.compile. (The MixUp / CutMix losses are cases of benchmarks/losses.py.)

Cases (CPU sizes are the CPU bar's: Mixup elem at 128 x 3 x 224 x 224):
* ``mixup <mode>``: the whole ``x, target = mixup(x, target)`` call (draws + mixing + dense targets).
* ``mix kernel``: only the mixing of a fixed set of per-sample parameters (regops op vs eager vs compile).
* ``v2 MixUp`` / ``v2 CutMix``: regops.MixUp / regops.CutMix against torchvision.transforms.v2.
"""

from __future__ import annotations

import torch

import regops
from benchmarks.harness import Setup, case, compiled

IMAGES = {  # (device type, quick) -> (B, C, H, W)
    ("cpu", False): (128, 3, 224, 224),
    ("cpu", True): (16, 3, 64, 64),
    ("cuda", False): (256, 3, 224, 224),
    ("cuda", True): (64, 3, 128, 128),
}


def _try_import(name: str):
    """The peer module, or None when it is not installed (its variants are then rows that say so)."""
    try:
        return __import__(name, fromlist=["_"])
    except ModuleNotFoundError:
        return None


def _not_installed(name: str) -> str:
    return f"peer {name!r} is not installed"


timm_mixup = _try_import("timm.data.mixup")
tv2 = _try_import("torchvision.transforms.v2")


def _register(name: str, make, sizes: dict) -> None:
    for quick in (False, True):
        for device_type in ("cpu", "cuda"):
            shape = sizes[(device_type, quick)]
            params = "x".join(map(str, shape)) + (" quick" if quick else "")

            def factory(device, is_quick, quick=quick, device_type=device_type, shape=shape):
                if is_quick != quick or device.type != device_type:
                    return None
                return make(shape, device)

            case("mix", name, params, devices=(device_type,))(factory)


# ------------------------------------------------------------------------------------------------ mixing
def _images(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, 1000, (shape[0],), generator=gen).to(device)
    return x, y


def _eager_mix(x, w_self, w_other, partner, box):
    """The vectorised eager-PyTorch mix: a where over a broadcast box mask and the weighted partner."""
    view = (-1,) + (1,) * (x.dim() - 1)
    height, width = x.shape[-2:]
    hh = torch.arange(height, device=x.device).view(1, 1, height, 1)
    ww = torch.arange(width, device=x.device).view(1, 1, 1, width)
    b = box.view(-1, 4, 1, 1, 1)
    inside = (hh >= b[:, 0]) & (hh < b[:, 1]) & (ww >= b[:, 2]) & (ww < b[:, 3])
    xp = x[partner]
    return torch.where(inside, xp, x * w_self.view(view) + xp * w_other.view(view))


def _mixup_case(mode: str):
    def make(shape, device) -> Setup:
        x, y = _images(shape, device)
        kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1, num_classes=1000)
        ours = regops.Mixup(**kw)
        variants = {"regops": lambda: ours(x, y)}
        params = ours.sample_params(x)
        w_self, w_other = params.image_weights

        def eager():
            return _eager_mix(x, w_self, w_other, params.partner, params.box)

        variants["eager"] = eager
        skipped = {}
        if timm_mixup is None:
            skipped["timm"] = _not_installed("timm")
        elif shape[0] % 2:
            skipped["timm"] = "timm's Mixup takes even batch sizes only"
        else:
            theirs = timm_mixup.Mixup(**kw)
            x_timm = x.clone()  # timm mixes in place: it keeps mixing this copy (values stay bounded)
            variants["timm"] = lambda: theirs(x_timm, y)
        nbytes = 2 * x.numel() * x.element_size()
        return Setup(variants, bytes=nbytes, note="draws + mix + dense targets (eager: mix only)", skipped=skipped)

    return make


def _kernel_case(shape, device) -> Setup:
    x, _ = _images(shape, device)
    torch.manual_seed(0)
    params = regops.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem").sample_params(x)
    w_self, w_other = params.image_weights
    args = (w_self, w_other, params.partner, params.box)
    op = torch.ops.regops.mix_apply

    def eager():
        return _eager_mix(x, *args)

    variants = {"regops": lambda: op(x, *args), "eager": eager, "compile": compiled(_eager_mix_bound(x, args))}
    cl = x.contiguous(memory_format=torch.channels_last)
    variants["regops channels_last"] = lambda: op(cl, *args)
    return Setup(variants, bytes=2 * x.numel() * x.element_size(), note="elem params, half CutMix")


def _eager_mix_bound(x, args):
    fn = compiled(_eager_mix)
    return lambda: fn(x, *args)


def _v2_case(cls: str):
    def make(shape, device) -> Setup:
        x, y = _images(shape, device)
        ours = getattr(regops, cls)(alpha=1.0, num_classes=1000)
        variants = {"regops": lambda: ours(x, y)}
        skipped = {"torchvision": _not_installed("torchvision")} if tv2 is None else {}
        if tv2 is not None:
            theirs = getattr(tv2, cls)(alpha=1.0, num_classes=1000)
            variants["torchvision"] = lambda: theirs(x, y)
        return Setup(variants, bytes=2 * x.numel() * x.element_size(), skipped=skipped)

    return make


for _mode in ("elem", "pair", "batch"):
    _register(f"mixup {_mode}", _mixup_case(_mode), IMAGES)
_register("mix kernel", _kernel_case, IMAGES)
_register("v2 MixUp", _v2_case("MixUp"), IMAGES)
_register("v2 CutMix", _v2_case("CutMix"), IMAGES)
