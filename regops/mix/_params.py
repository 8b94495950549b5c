"""The per-sample mixing parameters: the draws behind them, their application (one ``regops::mix_apply``), and the
checks the mix family's entry points share.

Every random number (Beta lambdas, switch / apply coins, box centres and sizes, random partners) is drawn with
torch on the input's device (honouring ``torch.manual_seed`` or a ``generator``), then turned into per-sample
parameters (:class:`MixParams`: lambda, partner index, box) by vectorised code that follows timm's ``Mixup`` rule by
rule. Nothing goes to the host, nothing loops over the batch.
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from regops._core import validate
from regops.mix import ops
from regops.mix import reference as ref

MODES = ("batch", "pair", "elem")
PARTNERS = ("flip", "roll", "random")
IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)


class HostDraw(NamedTuple):
    """Batch mode's one draw on the host: ``lam`` (float64, what every sample but ``lone`` has), the samples mixed
    with themselves (``lam`` 1), and float32 ``weights`` ``[4, B]``: the image weights then the label weights."""

    lam: float
    lone: list[int]
    weights: torch.Tensor


@dataclass(frozen=True)
class MixParams:
    """Per-sample mixing parameters: what the kernel needs, nothing random left (``MixedBatch.params``).

    Args:
        lam: float64 ``[B]``, the weight of sample ``b``'s own label (after CutMix area correction); 1 = unmixed.
        partner: int64 ``[B]``, a permutation: sample ``b`` is mixed with ``partner[b]``.
        box: int64 ``[B, 4]``, ``(y0, y1, x0, x1)`` half-open on the last two dims, pasted from the partner
            (all zeros for MixUp samples and unmixed samples).
        use_cutmix: bool ``[B]``, the sample is a CutMix sample (image weights 1 / 0 outside its box).

    Example::

        >>> _, mix = regops.mix_batch(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), mixup_alpha=1.0)
        >>> mix.params.partner.shape, mix.params.box.shape
        (torch.Size([4]), torch.Size([4, 4]))
    """

    lam: torch.Tensor
    partner: torch.Tensor
    box: torch.Tensor
    use_cutmix: torch.Tensor
    # batch mode's draw made on the host: the weights filled from it and the numbers behind them
    _host: HostDraw | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def image_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(w_self, w_other)``: ``lam``, ``1 - lam`` for MixUp samples, ``1``, ``0`` for CutMix samples."""
        if self._host is not None:
            return self._host.weights[0], self._host.weights[1]
        w_self = torch.where(self.use_cutmix, 1.0, self.lam).float()
        w_other = torch.where(self.use_cutmix, 0.0, torch.rsub(self.lam, 1.0)).float()
        return w_self, w_other

    @property
    def label_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(lam, 1 - lam)``, each rounded once from float64 (as timm's float32 target arithmetic)."""
        if self._host is not None:
            return self._host.weights[2], self._host.weights[3]
        return self.lam.float(), torch.rsub(self.lam, 1.0).float()


@dataclass(frozen=True)
class Config:
    mixup_alpha: float
    cutmix_alpha: float
    cutmix_minmax: tuple[float, float] | None
    prob: float
    switch_prob: float
    mode: str
    correct_lam: bool
    partner: str
    enabled: bool = True


def check_number(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"regops: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"regops: {name} must not be NaN")
    return value


def make_config(
    mixup_alpha: float,
    cutmix_alpha: float,
    cutmix_minmax: Sequence[float] | None,
    prob: float,
    switch_prob: float,
    mode: str,
    correct_lam: bool,
    partner: str,
) -> Config:
    mixup_alpha = check_number(mixup_alpha, "mixup_alpha")
    cutmix_alpha = check_number(cutmix_alpha, "cutmix_alpha")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"regops: alphas must be >= 0 (0 disables), got {mixup_alpha=}, {cutmix_alpha=}")
    minmax = None
    if cutmix_minmax is not None:
        if not isinstance(cutmix_minmax, Sequence) or len(cutmix_minmax) != 2:
            raise ValueError(f"regops: cutmix_minmax must be a pair (min, max), got {cutmix_minmax!r}")
        lo, hi = (check_number(v, "cutmix_minmax") for v in cutmix_minmax)
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
    return Config(
        mixup_alpha,
        cutmix_alpha,
        minmax,
        validate.probability(prob, "prob"),
        validate.probability(switch_prob, "switch_prob"),
        mode,
        bool(correct_lam),
        partner,
    )


def partners(kind: str, mode: str, batch: int, device, generator) -> torch.Tensor:
    if kind == "flip":
        return torch.arange(batch - 1, -1, -1, device=device)
    idx = torch.arange(batch, device=device)
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


@dataclass
class Draws:
    """The raw random numbers of one call (float64 ``[n]``; Python floats from :func:`draw_on_host`), in the units
    timm's NumPy draws use."""

    apply: torch.Tensor | float  # U[0,1): mix iff < prob
    switch: torch.Tensor | float  # U[0,1): CutMix iff < switch_prob (when both are enabled)
    lam_mixup: torch.Tensor | float | None  # Beta(mixup_alpha)
    lam_cutmix: torch.Tensor | float | None  # Beta(cutmix_alpha)
    u_y: torch.Tensor | float  # box position (centre for alpha boxes, corner for min/max boxes)
    u_x: torch.Tensor | float
    u_h: torch.Tensor | float  # box size (min/max boxes only)
    u_w: torch.Tensor | float


def draw(cfg: Config, n: int, device, generator) -> Draws:
    """Two RNG calls for the whole call: the six uniforms of each sample, then both Betas (``Beta(a, a)`` is the
    first coordinate of ``Dirichlet(a, a)``; one Dirichlet draw takes every enabled alpha)."""
    apply, switch, u_y, u_x, u_h, u_w = torch.rand(6, n, dtype=torch.float64, device=device, generator=generator)
    alphas = [a for a in (cfg.mixup_alpha, cfg.cutmix_alpha) if a > 0]
    conc = torch.full((len(alphas), n, 2), alphas[0], dtype=torch.float64, device=device)
    if len(alphas) == 2:
        conc[1] = alphas[1]
    lams = iter(torch._sample_dirichlet(conc, generator=generator)[:, :, 0])
    return Draws(
        apply=apply,
        switch=switch,
        lam_mixup=next(lams) if cfg.mixup_alpha > 0 else None,
        lam_cutmix=next(lams) if cfg.cutmix_alpha > 0 else None,
        u_y=u_y,
        u_x=u_x,
        u_h=u_h,
        u_w=u_w,
    )


_BLOCK = 32


def _uniforms(generator: torch.Generator | None) -> Callable[[], float]:
    """Uniform doubles in ``[0, 1)`` from ``generator``, one per call, drawn in blocks (one generator call per
    block); a generator's ``__next__``: the cheapest call per number."""

    def numbers() -> Iterator[float]:
        while True:
            yield from torch.rand(_BLOCK, dtype=torch.float64, generator=generator).tolist()

    return numbers().__next__


def _log_gamma(alpha: float, u: Callable[[], float]) -> float:
    """The log of a ``Gamma(alpha, 1)`` draw: Marsaglia and Tsang's method (normals by Box-Muller), and for
    ``alpha < 1`` ``Gamma(alpha + 1) U^(1 / alpha)``, in logs so that tiny draws do not underflow to 0."""
    boost = 0.0
    if alpha < 1.0:
        boost = math.log(1.0 - u()) / alpha
        alpha += 1.0
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = math.sqrt(-2.0 * math.log(1.0 - u())) * math.cos(2.0 * math.pi * u())
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        if math.log(1.0 - u()) < 0.5 * x * x + d - d * v + d * math.log(v):
            return math.log(d) + math.log(v) + boost


def _beta(alpha: float, u: Callable[[], float]) -> float:
    """A ``Beta(alpha, alpha)`` draw: ``G_a / (G_a + G_b)`` of two Gamma draws."""
    t = _log_gamma(alpha, u)
    t = _log_gamma(alpha, u) - t
    return 0.0 if t > 700.0 else 1.0 / (1.0 + math.exp(t))


def draw_on_host(cfg: Config, generator: torch.Generator | None) -> Draws:
    """Batch mode's one draw on the host (CPU generator), as Python floats: the six uniforms of :func:`draw`,
    then the Beta lambda of the kind the switch picks, from one block of uniforms (one generator call; another
    only if the Gamma rejections use it up)."""
    u = _uniforms(generator)
    apply, switch, u_y, u_x, u_h, u_w = u(), u(), u(), u(), u(), u()
    # only the lambda the switch picks is drawn (as timm): the other stays None
    cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or switch < cfg.switch_prob)
    return Draws(
        apply=apply,
        switch=switch,
        lam_mixup=None if cutmix else _beta(cfg.mixup_alpha, u),
        lam_cutmix=_beta(cfg.cutmix_alpha, u) if cutmix else None,
        u_y=u_y,
        u_x=u_x,
        u_h=u_h,
        u_w=u_w,
    )


def _floor_index(u: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """A uniform integer in ``[0, n)`` from ``u`` in ``[0, 1)`` (``numpy.random.randint(0, n)``)."""
    return torch.floor(u * n).long()


def _minmax_sides(minmax: tuple[float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """The box-side ranges ``[lo, hi)`` of ``cutmix_minmax`` boxes (timm's ``int(size * min)``, ``int(size * max)``)."""
    lo_h, hi_h = int(height * minmax[0]), int(height * minmax[1])
    lo_w, hi_w = int(width * minmax[0]), int(width * minmax[1])
    if lo_h >= hi_h or lo_w >= hi_w:
        raise ValueError(
            f"regops: cutmix_minmax={minmax} gives an empty box-size range on a {height}x{width} "
            f"image (int(size * min) must be < int(size * max))"
        )
    return lo_h, hi_h, lo_w, hi_w


def _params_from_draws(cfg: Config, draws: Draws, height: int, width: int) -> tuple[torch.Tensor, ...]:
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
        lo_h, hi_h, lo_w, hi_w = _minmax_sides(cfg.cutmix_minmax, height, width)
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


def _params_on_host(cfg: Config, draws: Draws, height: int, width: int) -> tuple[float, bool, tuple[int, ...]]:
    """:func:`_params_from_draws` for the one draw of batch mode (:func:`draw_on_host`, Python floats), with the
    same IEEE double operations, so the same results: ``(lam, cut, box)``."""
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = draws.switch < cfg.switch_prob
        lam = draws.lam_cutmix if use_cutmix else draws.lam_mixup
    elif cfg.mixup_alpha > 0:
        use_cutmix, lam = False, draws.lam_mixup
    else:
        use_cutmix, lam = True, draws.lam_cutmix
    if not (draws.apply < cfg.prob and cfg.enabled):
        lam = 1.0
    if cfg.cutmix_minmax is not None:
        lo_h, hi_h, lo_w, hi_w = _minmax_sides(cfg.cutmix_minmax, height, width)
    if not (use_cutmix and lam != 1.0):
        return lam, False, (0, 0, 0, 0)
    if cfg.cutmix_minmax is not None:
        cut_h = lo_h + math.floor(draws.u_h * (hi_h - lo_h))
        cut_w = lo_w + math.floor(draws.u_w * (hi_w - lo_w))
        y0 = math.floor(draws.u_y * (height - cut_h + 1))
        x0 = math.floor(draws.u_x * (width - cut_w + 1))
        y1, x1 = y0 + cut_h, x0 + cut_w
    else:
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = math.floor(ratio * height), math.floor(ratio * width)
        cy, cx = math.floor(draws.u_y * height), math.floor(draws.u_x * width)
        y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
        x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    if cfg.correct_lam or cfg.cutmix_minmax is not None:
        lam = 1.0 - float((y1 - y0) * (x1 - x0)) / float(height * width)
    return lam, True, (y0, y1, x0, x1)


def _batch_params_on_host(cfg: Config, batch: int, partner: torch.Tensor, height: int, width: int, generator):
    """Batch mode's :class:`MixParams` from its one draw made on the host (CPU tensors, eager): a handful of tensors
    filled from Python numbers, the image and label weights among them (float32, rounded once from float64)."""
    lam, cut, box = _params_on_host(cfg, draw_on_host(cfg, generator), height, width)
    # samples mixed with themselves (the middle one of an odd batch under 'flip'): lam 1, no box
    if cfg.partner == "random":
        alone = partner == torch.arange(batch)
        lone = alone.nonzero().flatten().tolist() if bool(alone.any()) else []
    else:
        lone = [batch // 2] if (cfg.partner == "flip" and batch % 2) or batch == 1 else []
    lam_t = _host_tensor("d", [lam] * batch, torch.float64)
    use_cutmix = _host_tensor("b", [cut] * batch, torch.bool)
    box_t = _host_tensor("q", box * batch, torch.long).view(batch, 4)
    # rows: w_self, w_other (images: lam, 1 - lam for MixUp, 1, 0 for CutMix), lam, 1 - lam (labels), each number
    # rounded once to float32
    rows = (1.0 if cut else lam, 0.0 if cut else 1.0 - lam, lam, 1.0 - lam)
    weights = _host_tensor("f", [v for v in rows for _ in range(batch)], torch.float32).view(4, batch)
    if lone:
        lam_t[lone] = 1.0
        use_cutmix[lone] = False
        box_t[lone] = 0
        weights[:, lone] = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    params = MixParams(lam=lam_t, partner=partner, box=box_t, use_cutmix=use_cutmix)
    object.__setattr__(params, "_host", HostDraw(lam, lone, weights))
    return params


def _host_tensor(code: str, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``values`` through an ``array.array`` of type ``code`` (C casts: float32 ``"f"`` rounds each
    double once, as ``torch.tensor`` does): a fraction of ``torch.tensor``'s cost, which converts element by element;
    the tensor keeps the array alive."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array(code, values), dtype=dtype)


def _f32(*xs: float) -> list[float]:
    """``xs`` rounded to float32. A float32 sum or product of float32 numbers is the double one rounded so: the
    double rounding is innocuous (53 >= 2 * 24 + 2 bits)."""
    return array.array("f", xs).tolist()


def host_one_hot(host: HostDraw, target: torch.Tensor, target_b: torch.Tensor, num_classes: int, smoothing: float):
    """:func:`regops.mix.reference.mixed_one_hot` for batch mode's draw on the host, bit for bit: its per-sample
    numbers (the same for every sample but the lone ones) computed here in float32, leaving a fill, a compare and
    two scatters to tensors."""
    off, on, ws, wo = _f32(*ref.smoothing_values(num_classes, smoothing), host.lam, 1.0 - host.lam)
    ws_off, wo_off, ws_on, wo_on, off_wo, off_ws = _f32(ws * off, wo * off, ws * on, on * wo, off * wo, off * ws)
    # at_a_same: target == target_b, where the scatter at target_b is overwritten
    base, at_a_same, at_a, at_b = _f32(ws_off + wo_off, ws_on + wo_on, ws_on + off_wo, off_ws + wo_on)
    out = torch.full((target.shape[0], num_classes), base, device=target.device)
    values = torch.where(target == target_b, at_a_same, at_a)
    if host.lone:  # mixed with itself: weights 1 and 0
        out[host.lone] = off
        values[host.lone] = on
    out.scatter_(1, target_b.unsqueeze(1), at_b)
    return out.scatter_(1, target.unsqueeze(1), values.unsqueeze(1))


def spatial(x: torch.Tensor) -> tuple[int, int]:
    return (1, x.shape[1]) if x.dim() == 2 else (x.shape[-2], x.shape[-1])


def sample_params(cfg: Config, x: torch.Tensor, generator: torch.Generator | None) -> MixParams:
    batch = x.shape[0]
    height, width = spatial(x)
    device = x.device
    if cfg.cutmix_alpha > 0 and x.dim() < 3:
        raise ValueError(f"regops: CutMix needs inputs with >= 3 dims [B, ..., H, W], got shape {tuple(x.shape)}")
    partner = partners(cfg.partner, cfg.mode, batch, device, generator)
    n = 1 if cfg.mode == "batch" else batch
    dtensor_input = validate.is_dtensor(x)
    if cfg.mode == "batch" and device.type == "cpu" and not dtensor_input and not torch.compiler.is_compiling():
        return _batch_params_on_host(cfg, batch, partner, height, width, generator)
    lam, cut, box = _params_from_draws(cfg, draw(cfg, n, device, generator), height, width)
    if dtensor_input:
        from regops.mix import dtensor  # imports torch.distributed.tensor: only for DTensor inputs

        partner, lam, cut, box = dtensor.sync_draws(x, partner, lam, cut, box)
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


def apply_params(x: torch.Tensor, params: MixParams) -> torch.Tensor:
    """``x`` mixed by ``params``: one ``regops::mix_apply`` (on the shard, for a DTensor)."""
    w_self, w_other = params.image_weights
    if validate.is_dtensor(x):
        from regops.mix import dtensor  # imports torch.distributed.tensor: only for DTensor inputs

        return dtensor.mix_apply(x, w_self, w_other, params.partner, params.box)
    return ops.mix_apply(x, w_self, w_other, params.partner, params.box)


# ------------------------------------------------------------------------------------------------ checks
def check_images(x: Any, name: str = "x") -> torch.Tensor:
    x = validate.tensor(x, name)
    if x.dtype not in IMAGE_DTYPES:
        raise TypeError(f"regops: {name} must be float32/16, bfloat16, float64 or uint8, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"regops: {name} must be a batch [B, ...] with >= 2 dims, got shape {tuple(x.shape)}")
    return x


def check_labels(target: Any, batch: int, num_classes: int | None, device, name: str = "target") -> torch.Tensor:
    target = validate.tensor(target, name)
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


def check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"regops: num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def check_smoothing(value: Any, name: str = "label_smoothing") -> float:
    value = check_number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"regops: {name} must be in [0, 1], got {value}")
    return value
