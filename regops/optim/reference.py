"""Pure-PyTorch references of the optim ops: the per-tensor math, one tensor at a time (the test oracle, and the CPU
implementation where regops._C is not built).

Every op takes lists of tensors (one entry per parameter) and writes its in-place outputs. Arithmetic runs in
``acc_dtype`` (float64 for float64 tensors, else float32) and is rounded once to the stored dtype; the order of the
operations is torch's own (``torch.optim.AdamW``'s lerp, ``addcmul`` and ``addcdiv``) with every product and sum
rounded on its own: the C++ and Triton kernels (built without FMA contraction) give the same bits, and torch's
optimizers (whose vectorized loops fuse some of them into FMAs) agree to an ulp per operation. Per-tensor scalars
(bias corrections, the noise scale) are computed on the host in float64 from the step counts, as torch's
non-capturable optimizers compute them; the kernels compute the same values on the device.

The step's order, per element (each stage only where enabled):

1. ``w`` = the restored parameter (``restore``: SAM's unperturbed copy) or the parameter; ``g`` = the gradient,
   divided by ``grad_scale``, negated for ``maximize``;
2. gradient filters: ``g *= row_scales[row]`` (adaptive gradient clipping, factors from :func:`dots`);
   ``g = clamp(g, -c, c)`` (coordinate-wise clipping); Grokfast ``ema = alpha ema + (1 - alpha) g``,
   ``g = g + lamb ema`` (``ema`` starts at the first gradient); annealed noise ``g = g + sigma_t z``,
   ``sigma_t^2 = eta / (1 + t)^gamma`` with ``t`` the steps taken before this one;
3. coupled decay: ``g += wd w`` (``"coupled"``), ``g += wd (w - anchor)`` (``"l2sp"``),
   ``g += wd F (w - anchor)`` (``"ewc"``);
4. the base update ``u`` (Adam with bias correction and optional AMSGrad; SGD with momentum, dampening, Nesterov);
5. decoupled decay: ``w *= 1 - lr wd`` (``"decoupled"``), only where ``u w >= 0`` (``"cautious"``); ``w -= lr u``.

A nonzero ``found_inf`` skips everything but the restore: parameters, states and step counts keep their values.

Gaussian noise: parameter ``k`` (``param_ids``), element ``e`` of the whole parameter (``elem_offsets`` gives a
shard's first element) takes Philox counter ``offset + k * 2**40 + e // 4`` of the call's seed and the Box-Muller
pair of its word pair (regops' Hessian probe convention): ``z`` depends on (seed, k, e) only, never on sharding,
chunking or the backend.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from regops._core.dtypes import acc_dtype
from regops._core.philox import counter_words
from regops.hessian.reference import box_muller

# hyper: one float64 vector per call, read on the device by the kernels (no recompilation per value).
H_LR, H_BETA1, H_BETA2, H_EPS, H_WD, H_GF_ALPHA, H_GF_LAMB, H_NOISE_ETA, H_NOISE_GAMMA, H_CLIP = range(10)
H_MOMENTUM, H_DAMPENING = H_BETA1, H_BETA2  # SGD's hyper-parameters in Adam's slots
HYPER_SIZE = 10
# AdamP's radial projection, appended where a group enables it (the step kernels read the first HYPER_SIZE only)
H_ADAMP_DELTA, H_ADAMP_WD_RATIO, H_ADAMP_EPS = range(HYPER_SIZE, HYPER_SIZE + 3)

METHODS = ("adam", "sgd", "nesterov")
DECAYS = ("none", "coupled", "decoupled", "cautious", "l2sp", "ewc")
# Philox counters reserved per parameter for its noise (2**42 elements); parameter ids stay below 2**21.
NOISE_PARAM_COUNTERS = 1 << 40
MAX_PARAM_ID = 1 << 21

# per-tensor scalars of a step (float64 [n, 5]): see step_scalars
S_STEP_SIZE, S_BC2_SQRT, S_FIRST, S_SIGMA, S_DECAY = range(5)
SCALARS = 5


def check_modes(method: str, decay: str) -> None:
    if method not in METHODS:
        raise ValueError(f"regops: optim_step method must be one of {METHODS}, got {method!r}")
    if decay not in DECAYS:
        raise ValueError(f"regops: optim_step decay must be one of {DECAYS}, got {decay!r}")


def rows_of(t: torch.Tensor) -> int:
    """Rows of ``t`` for row-wise reductions: the units along dim 0 for a matrix or higher, else one row."""
    return int(t.shape[0]) if t.dim() > 1 else 1


def _as_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.reshape(rows, t.numel() // rows if rows else 0)


# ------------------------------------------------------------------------------------------------ reductions
def dots(a: list[torch.Tensor], b: list[torch.Tensor], w: list[torch.Tensor], rows: bool) -> torch.Tensor:
    """``[R, 3]`` sums per tensor (``rows=False``: R = len(a)) or per row (``rows=True``: R = sum of
    :func:`rows_of`): ``sum (|w| a)^2`` (``sum a^2`` without ``w``), ``sum a b`` and ``sum b^2`` (0 without ``b``).
    Accumulated in ``acc_dtype`` of all the tensors."""
    cd = acc_dtype(*a, *b, *w)
    out = []
    for i, x in enumerate(a):
        r = rows_of(x) if rows else 1
        xc = x.to(cd)
        xw = w[i].to(cd).abs() * xc if w else xc
        zero = torch.zeros(r, dtype=cd, device=x.device)
        cols = [_as_rows(xw * xw, r).sum(1)]
        if b:
            y = b[i].to(cd)
            cols += [_as_rows(xc * y, r).sum(1), _as_rows(y * y, r).sum(1)]
        else:
            cols += [zero, zero]
        out.append(torch.stack(cols, 1))
    return torch.cat(out) if out else torch.zeros(0, 3, dtype=cd)


# ------------------------------------------------------------------------------------------------ SAM
def _skipped(found_inf: torch.Tensor | None) -> bool:
    return found_inf is not None and float(found_inf) != 0.0


def sam_perturb(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    old_params: list[torch.Tensor],
    old_grads: list[torch.Tensor],
    scales: torch.Tensor,
    adaptive: bool,
    found_inf: torch.Tensor | None,
) -> None:
    """``old_params = w``, ``old_grads = g`` (when given), then ``w += scales[i] g`` (``w^2 scales[i] g`` for
    ``adaptive``: ASAM's ``T_w^2``). A nonzero ``found_inf`` leaves ``w`` as it is (the backups are still taken)."""
    skip = _skipped(found_inf)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        old_params[i].copy_(p)
        if old_grads:
            old_grads[i].copy_(g)
        if skip:
            continue
        cd = acc_dtype(p, g)
        wc, s = p.to(cd), scales[i].to(cd)
        e = (wc * wc) * g.to(cd) * s if adaptive else g.to(cd) * s
        p.copy_(wc + e)


def axpby(y: list[torch.Tensor], x: list[torch.Tensor], coeffs: torch.Tensor) -> None:
    """``y = c0 y + c1 x`` for every pair, ``coeffs = [c0, c1]`` (GSAM's decomposition, LookSAM's reuse). As in
    BLAS, a zero coefficient does not read its operand: ``c0 = 0`` overwrites ``y`` even where it holds inf or NaN."""
    for yi, xi in zip(y, x, strict=True):
        cd = acc_dtype(yi, xi)
        c0, c1 = (float(v) for v in coeffs.to(cd).tolist())
        zero = torch.zeros((), dtype=cd, device=yi.device)
        yi.copy_((yi.to(cd) * c0 if c0 != 0 else zero) + (xi.to(cd) * c1 if c1 != 0 else zero))


# ------------------------------------------------------------------------------------------------ the step
def f32(x: float) -> float:
    """``x`` rounded to float32 (as a Python float)."""
    return float(np.float32(x))


def step_scalars(hyper: list[float], step: float, method: str) -> list[float]:
    """The per-tensor scalars of a step from the hyper-parameters and the tensor's step count before it:
    ``[step_size, sqrt(bias_correction2), first, sigma, decay_factor]`` (float64, torch's formulas)."""
    lr, wd, t = hyper[H_LR], hyper[H_WD], step + 1.0
    if method == "adam":
        step_size = lr / (1.0 - hyper[H_BETA1] ** t)
        bc2_sqrt = (1.0 - hyper[H_BETA2] ** t) ** 0.5
    else:
        step_size, bc2_sqrt = lr, 1.0
    eta, gamma = hyper[H_NOISE_ETA], hyper[H_NOISE_GAMMA]
    sigma = f32(math.sqrt(eta / (1.0 + step) ** gamma)) if eta > 0 else 0.0
    return [step_size, bc2_sqrt, 1.0 if step == 0 else 0.0, sigma, 1.0 - lr * wd]


def device_step_scalars(hyper: torch.Tensor, steps: list[torch.Tensor], method: str) -> torch.Tensor:
    """:func:`step_scalars` of every tensor as one float64 ``[n, SCALARS]`` tensor on the device, from device
    tensors (no host synchronisation: capturable), for kernels that cannot call ``pow``."""
    old = torch.stack(steps).to(torch.float64)
    h = hyper.to(torch.float64)
    t = old + 1.0
    lr, wd = h[H_LR], h[H_WD]
    if method == "adam":
        step_size = lr / (1.0 - h[H_BETA1] ** t)
        bc2_sqrt = (1.0 - h[H_BETA2] ** t) ** 0.5
    else:
        step_size, bc2_sqrt = lr.expand_as(old), torch.ones_like(old)
    eta = h[H_NOISE_ETA]
    sigma = (eta.clamp(min=0.0) / (1.0 + old) ** h[H_NOISE_GAMMA]).sqrt().to(torch.float32).to(torch.float64)
    first = (old == 0).to(torch.float64)
    return torch.stack([step_size, bc2_sqrt, first, sigma, (1.0 - lr * wd).expand_as(old)], 1)


def gaussian_noise(seed: torch.Tensor, param_id: int, elem_offset: int, numel: int, device=None) -> torch.Tensor:
    """Standard normals (float32 ``[numel]``) of parameter ``param_id``'s elements ``elem_offset ..`` (see the
    module docstring): element ``e`` takes ``z_(e % 4)`` of the Box-Muller pairs of counter ``e // 4``."""
    key, offset = (int(v) for v in seed.tolist())
    e = elem_offset + torch.arange(numel, dtype=torch.int64, device=device)
    words = counter_words(key, offset + param_id * NOISE_PARAM_COUNTERS + e // 4)
    j = e % 4
    pair = (j // 2 * 2)[:, None]
    zc, zs = box_muller(words.gather(1, pair)[:, 0], words.gather(1, pair + 1)[:, 0])
    return torch.where(j % 2 == 0, zc, zs)


def _filtered_grad(i, w, g, cd, hyper, sc, ema, row_scales, row_base, clip, seed, param_ids, elem_offsets):
    """Stages 2 of the module docstring on ``g`` (acc dtype), updating ``ema[i]``."""
    if row_scales is not None:
        r = rows_of(w)
        factor = row_scales[row_base : row_base + r].to(cd)
        g = (_as_rows(g, r) * factor[:, None]).reshape(g.shape)
    if clip:
        c = hyper[H_CLIP]
        g = g.clamp(-c, c)
    if ema:
        alpha, lamb = hyper[H_GF_ALPHA], hyper[H_GF_LAMB]
        prev = g if sc[S_FIRST] else ema[i].to(cd)
        e = prev * alpha + g * (1.0 - alpha)
        ema[i].copy_(e)
        g = g + e * lamb
    if seed is not None:
        z = gaussian_noise(seed, param_ids[i], elem_offsets[i], g.numel(), g.device).reshape(g.shape)
        g = g + (z * sc[S_SIGMA]).to(cd)
    return g


def _coupled(g, w, decay, wd, anchor, fisher, cd):
    if decay == "coupled":
        return g + w * wd
    if decay == "l2sp":
        return g + (w - anchor.to(cd)) * wd
    if decay == "ewc":
        return g + (fisher.to(cd) * (w - anchor.to(cd))) * wd
    return g


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root (torch's vectorized CPU sqrt is off by an ulp now and then; CUDA's and
    numpy's are exact)."""
    if x.device.type != "cpu":
        return x.sqrt()
    return torch.from_numpy(np.asarray(np.sqrt(x.detach().contiguous().numpy())))


def lerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """``torch.lerp``'s formula, with two roundings where torch's vectorized loop fuses them into one FMA (so that
    every backend can round exactly as this does)."""
    if abs(weight) < 0.5:
        return a + (b - a) * weight
    return b - (b - a) * (1.0 - weight)


def cautious_mask(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``u w >= 0`` from signs (a product could underflow to -0 with opposite signs)."""
    return (u == 0) | (w == 0) | ((u > 0) == (w > 0))


def optim_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state1: list[torch.Tensor],
    state2: list[torch.Tensor],
    state3: list[torch.Tensor],
    steps: list[torch.Tensor],
    ema: list[torch.Tensor],
    anchors: list[torch.Tensor],
    fishers: list[torch.Tensor],
    restore: list[torch.Tensor],
    row_scales: torch.Tensor | None,
    hyper: torch.Tensor,
    param_ids: list[int],
    elem_offsets: list[int],
    method: str,
    decay: str,
    maximize: bool,
    clip: bool,
    seed: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """One optimizer step over every tensor (see the module docstring). ``state1``/``state2``/``state3``: Adam's
    ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` (``state3`` empty without AMSGrad), or SGD's momentum buffers
    (``state1``; empty without momentum). ``steps``: float32 0-dim counts, incremented."""
    check_modes(method, decay)
    if _skipped(found_inf):
        for p, r in zip(params, restore, strict=False):
            p.copy_(r)
        return
    h = [float(v) for v in hyper.tolist()]
    gs = float(grad_scale) if grad_scale is not None else None
    row_base = 0
    for i, p in enumerate(params):
        cd = acc_dtype(p)
        sc = step_scalars(h, float(steps[i]), method)
        w = (restore[i] if restore else p).to(cd)
        g = grads[i].to(cd)
        if gs is not None:
            g = g / gs
        if maximize:
            g = -g
        g = _filtered_grad(i, w, g, cd, h, sc, ema, row_scales, row_base, clip, seed, param_ids, elem_offsets)
        row_base += rows_of(p)
        g = _coupled(g, w, decay, h[H_WD], anchors[i] if anchors else None, fishers[i] if fishers else None, cd)
        if method == "adam":
            b1, b2, eps = h[H_BETA1], h[H_BETA2], h[H_EPS]
            m = lerp(state1[i].to(cd), g, 1.0 - b1)
            v = state2[i].to(cd) * b2 + ((1.0 - b2) * g) * g
            state1[i].copy_(m)
            state2[i].copy_(v)
            if state3:
                v = torch.maximum(state3[i].to(cd), v)
                state3[i].copy_(v)
            denom = sqrt(v) / sc[S_BC2_SQRT] + eps
            u = m
        else:
            if state1:
                mom, damp = h[H_MOMENTUM], h[H_DAMPENING]
                buf = g if sc[S_FIRST] else state1[i].to(cd) * mom + g * (1.0 - damp)
                state1[i].copy_(buf)
                g = g + buf * mom if method == "nesterov" else buf
            u = g
        if decay == "decoupled":
            w = w * sc[S_DECAY]
        elif decay == "cautious":
            w = torch.where(cautious_mask(u, w), w * sc[S_DECAY], w)
        step = u * -sc[S_STEP_SIZE]
        p.copy_(w + (step / denom if method == "adam" else step))
        steps[i].add_(1)


# ------------------------------------------------------------------------------------------------ AdamP
def radial_projection(
    w: torch.Tensor, g: torch.Tensor, u: torch.Tensor, delta: float, wd_ratio: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdamP's projection of one update ``u`` of weights ``w`` with gradient ``g`` (Heo et al., ICLR 2021), in
    ``acc_dtype``, decided on the device: channel-wise (rows along dim 0), else layer-wise, where every
    ``|cos(g, w)|`` of the view is below ``delta / sqrt(view's row size)``, ``u`` loses its component along the
    view's unit weights ``w / (|w| + eps)``. Returns the update and the decay's ratio (``wd_ratio`` where projected,
    else 1; a 0-dim tensor). Vectors and empty tensors are returned as they are."""
    cd = acc_dtype(w, g, u)
    w, g, u = w.to(cd), g.to(cd), u.to(cd)
    one = torch.ones((), dtype=cd, device=w.device)
    if w.dim() < 2 or w.numel() == 0:
        return u, one
    done = torch.zeros((), dtype=torch.bool, device=w.device)
    out = u
    for rows in (w.shape[0], 1):
        wv, gv, uv = _as_rows(w, rows), _as_rows(g, rows), _as_rows(u, rows)
        wn, gn = wv.norm(dim=1), gv.norm(dim=1)
        cos = (gv * wv).sum(1).abs() / (gn.clamp(min=eps) * wn.clamp(min=eps))
        hit = ~done & (cos.max() < delta / math.sqrt(wv.shape[1]))
        unit = wv / (wn + eps)[:, None]
        projected = (uv - unit * (unit * uv).sum(1, keepdim=True)).reshape(u.shape)
        out = torch.where(hit, projected, out)
        done = done | hit
    return out, torch.where(done, one * wd_ratio, one)
