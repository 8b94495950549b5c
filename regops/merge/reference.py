"""The merge family's references: one chunk of a merge in pure PyTorch on the shared Philox stream, any device.

A chunk is a flat slice ``[first, first + n)`` of one tensor of the state dict. Every random draw is a function of
(the delta's seed, global element index), every magnitude trim of (threshold, cut, global element index), so the
merged tensor is the same whatever the chunking. The C++ and Triton kernels match these bit for bit.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype
from regops._core.philox import keep_threshold, random_words
from regops._core.validate import probability_value

KEEPS = ("all", "random", "magnitude")
COMBINES = ("sum", "total", "frequency")


def chunk_words(key: int, offset: int, first: int, n: int, device=None) -> torch.Tensor:
    """The stream's words (int64) of the flat elements ``[first, first + n)``: element ``i`` takes word ``i % 4``
    of counter ``offset + i // 4``."""
    phase = first % 4
    return random_words(key, offset + first // 4, (phase + n,), device)[phase:]


def merge_uniform(seed: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """Uniforms ``(word >> 1) * 2**-31`` (float64, exact, in ``[0, 1)``) of the flat elements ``[first, first + n)``."""
    key, offset = seed.tolist()
    return (chunk_words(key, offset, first, n, seed.device) >> 1).to(torch.float64) * 2.0**-31


def merge_chunk(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    seeds: torch.Tensor,
    thresholds: torch.Tensor,
    cuts: torch.Tensor,
    density: torch.Tensor,
    first: int,
    keep: str,
    combine: str,
    finetuned: bool,
    rescale: bool,
) -> torch.Tensor:
    """``base + combine_k(w_k, keep_k(delta_k))`` for one chunk, in float32 (float64 for float64), rounded once.

    ``delta_k = deltas[k] - base`` when ``finetuned``. ``keep``: ``"all"``; ``"random"`` (DARE: kept iff the
    word's top 31 bits exceed ``keep_threshold(1 - density)``, i.e. with probability ``density``, and scaled by
    ``1/density`` when ``rescale``); ``"magnitude"`` (kept iff ``|delta| > t_k``, or ``|delta| == t_k`` and the
    global index is below ``cut_k``). ``combine``: ``"sum"`` (``sum_k w_k s_k``) or TIES' sign election by
    ``"total"`` (sign of ``sum_k s_k``) or ``"frequency"`` (sign of ``sum_k sign(s_k)``) followed by the disjoint
    mean ``sum_k [sign(s_k) = e] w_k s_k / max(1, sum_k [sign(s_k) = e])``.
    """
    if keep not in KEEPS or combine not in COMBINES:
        raise ValueError(f"regops: merge_chunk keep must be one of {KEEPS} and combine one of {COMBINES}")
    cd = acc_dtype(base)
    b = base.to(cd)
    n = base.numel()
    dens = probability_value(density, "density")
    w, t, c = weights.tolist(), thresholds.tolist(), cuts.tolist()
    sd = seeds.reshape(-1, 2).tolist()
    index = first + torch.arange(n, device=base.device) if keep == "magnitude" else None
    kept_values = []
    for k, d in enumerate(deltas):
        delta = d.to(cd) - b if finetuned else d.to(cd)
        if keep == "random":
            words = chunk_words(sd[k][0], sd[k][1], first, n, base.device)
            kept = (words >> 1) > keep_threshold(1.0 - dens)
            delta = delta * (kept.to(cd) * (1.0 / dens if rescale else 1.0))
        elif keep == "magnitude":
            a = delta.abs()
            kept = (a > t[k]) | ((a == t[k]) & (index < c[k]))
            delta = delta * kept.to(cd)
        kept_values.append(delta)
    acc = torch.zeros_like(b)
    if combine == "sum":
        for k, s in enumerate(kept_values):
            acc = acc + s * w[k]
        return (b + acc).to(base.dtype)
    e = torch.zeros_like(b)
    for s in kept_values:
        e = e + (s if combine == "total" else torch.sign(s))
    elected = torch.where(e >= 0, 1.0, -1.0).to(cd)
    count = torch.zeros_like(b)
    for k, s in enumerate(kept_values):
        agree = torch.sign(s) == elected
        acc = acc + torch.where(agree, s * w[k], 0.0)
        count = count + agree.to(cd)
    return (b + acc / count.clamp(min=1)).to(base.dtype)


def della_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities (float64) of rows ``[rows, cols]`` of magnitudes: ranked within each row
    (ascending, ties in index order), ``q = density - epsilon + 2 * epsilon * (rank - 1) / (cols - 1)`` (``density``
    for a one-element row): larger magnitudes are kept more often."""
    rows, cols = magnitudes.shape
    if cols == 1:
        return torch.full_like(magnitudes, density, dtype=torch.float64)
    order = torch.sort(magnitudes, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=magnitudes.device).expand(rows, cols))
    return (density - epsilon) + ranks.to(torch.float64) * (2.0 * epsilon / (cols - 1))
