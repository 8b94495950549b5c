"""The hessian family's references: the Philox probes and the fused probe accumulation in pure PyTorch, any device.

Each op's reference takes the op's arguments (the int64 ``[2]`` seed tensor: Philox key and first counter) and
returns its results; the C++ and Triton kernels match the probes bit for bit and the accumulation within rounding.

Probe stream. A call draws probes ``g = first_probe, ..., first_probe + K - 1`` over the parameters flattened and
concatenated into ``N`` numbers. Probe ``g``, position ``j`` has the logical index ``i = g * S + j``, where the row
stride ``S`` rounds ``N`` up so that every row starts on a Philox counter; any tiling of ``[K, N]`` then
regenerates the same bits:

* Rademacher (one bit per element, ``S = 128 ceil(N / 128)``): bit ``i % 32`` of word ``(i // 32) % 4`` of counter
  ``offset + i // 128``; ``v = -1`` where the bit is set, else ``+1``. One Philox evaluation feeds 128 elements.
* Gaussian (one word per element, ``S = 4 ceil(N / 4)``): counter ``offset + i // 4`` gives words ``w0..w3`` for
  elements ``4c .. 4c + 3``; each pair feeds Box-Muller, both outputs used:
  ``(z0, z1) = r (cos 2 pi u2, sin 2 pi u2)``, ``r = sqrt(-2 ln u1)``, ``u1 = ((w0 >> 8) + 1) 2^-24`` in ``(0, 1]``,
  ``u2 = (w1 >> 8) 2^-24`` in ``[0, 1)`` (and ``w2, w3`` for ``z2, z3``). ``ln``, ``cos`` and ``sin`` are float32
  polynomials built only from correctly rounded operations (+, -, *, /, sqrt) in a fixed order, so the Triton
  kernel (interpreter, and on a GPU where it is compiled without FMA contraction and with round-to-nearest
  division and square root) reproduces the reference bit for bit. Their error is a few float32 ulps;
  ``|z| <= 5.77`` (``u1 >= 2^-24``).
  The probes have mean 0 and unit variance per element (``E[v v^T] = I``): that is the normalisation under
  which ``E[v^T H v] = tr(H)`` and ``E[v * Hv] = diag(H)``, so estimates divide by the number of probes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from regops._core.dtypes import acc_dtype
from regops._core.philox import counter_words

DISTRIBUTIONS = ("rademacher", "gaussian")

# float32 constants, rounded once here so the reference and the kernel use the same values.
_F = lambda c: float(np.float32(c))
LN2 = _F(math.log(2.0))
SQRT2 = _F(math.sqrt(2.0))
TWO_PI = _F(2.0 * math.pi)
# 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), |s| <= 0.1716 for m in [1/sqrt2, sqrt2]
LOG_COEFFS = tuple(_F(1.0 / k) for k in (11, 9, 7, 5, 3))
# sin(x) = x (1 - x^2/3! + x^4/5! - ...), |x| <= pi/2
SIN_COEFFS = tuple(_F((-1) ** n / math.factorial(2 * n + 1)) for n in (7, 6, 5, 4, 3, 2, 1))
TWO_POW_M24 = _F(2.0**-24)


ELEMENTS_PER_COUNTER = {"rademacher": 128, "gaussian": 4}


def check_distribution(distribution: object) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"regops: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def row_stride(numel: int, distribution: str) -> int:
    """Logical elements per probe row: ``numel`` rounded up to whole Philox counters."""
    per = ELEMENTS_PER_COUNTER[check_distribution(distribution)]
    return (numel + per - 1) // per * per


def stream_start(seed: torch.Tensor, start: int, distribution: str) -> tuple[torch.Tensor, int]:
    """``(shifted, lead)``: the seed of a probe row that starts at the counter holding stream element ``start`` of
    row 0 of ``seed`` (element ``i`` comes from counter ``seed[1] + i // per``), and ``start``'s place in that row.
    Elements ``start ..`` of the stream are elements ``lead ..`` of the shifted row; nothing before is drawn."""
    per = ELEMENTS_PER_COUNTER[check_distribution(distribution)]
    lead = start % per
    shifted = seed.clone()
    shifted[1] += (start - lead) // per
    return shifted, lead


def stream_words(num_probes: int, numel: int, distribution: str) -> int:
    """32-bit words (4 per Philox counter) that ``num_probes`` probe rows consume, for advancing a generator."""
    return 4 * num_probes * row_stride(numel, distribution) // ELEMENTS_PER_COUNTER[distribution]


def log_unit(k: torch.Tensor) -> torch.Tensor:
    """``ln(k * 2^-24)`` for int64 ``k`` in ``[1, 2^24]``, in float32, from correctly rounded ops only."""
    u = k.to(torch.float32) * TWO_POW_M24
    bits = u.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > SQRT2
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e).to(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = s2 * LOG_COEFFS[0] + LOG_COEFFS[1]
    for c in LOG_COEFFS[2:]:
        p = p * s2 + c
    p = p * s2 + 1.0
    return e * LN2 + (s + s) * p


def _sin_poly(x: torch.Tensor) -> torch.Tensor:
    x2 = x * x
    p = x2 * SIN_COEFFS[0] + SIN_COEFFS[1]
    for c in SIN_COEFFS[2:]:
        p = p * x2 + c
    p = p * x2 + 1.0
    return x * p


def cos_sin_two_pi(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``2 pi k 2^-24`` for int64 ``k`` in ``[0, 2^24)``, float32, correctly rounded ops only."""
    u = k.to(torch.float32) * TWO_POW_M24
    t = torch.where(u >= 0.5, u - 1.0, u)  # [-0.5, 0.5), exact
    a = t.abs()
    # cos(2 pi t) = sin(2 pi (1/4 - |t|)); sin(2 pi t) = sin(2 pi t) for |t| <= 1/4, else sin(2 pi (sign(t)/2 - t)).
    # Every reduced argument is in [-1/4, 1/4] and computed exactly.
    bc = 0.25 - a
    bs = torch.where(a <= 0.25, t, torch.where(t > 0, 0.5 - t, -0.5 - t))
    return _sin_poly(bc * TWO_PI), _sin_poly(bs * TWO_PI)


def box_muller(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent standard normals (float32) from two 32-bit words (int64 tensors in ``[0, 2^32)``)."""
    # torch's float32 CPU sqrt is not always correctly rounded; float64 sqrt rounded to float32 is.
    r = torch.sqrt(log_unit((wa >> 8) + 1).to(torch.float64) * -2.0).to(torch.float32)
    c, s = cos_sin_two_pi(wb >> 8)
    return r * c, r * s


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``table[byte, j] = -1 if bit j of byte is set else +1``, shape ``[256, 8]``."""
    key = (dtype, device)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (1 - 2 * bits).to(dtype=dtype, device=device)
    return _SIGN_TABLES[key]


def probes(
    seed: torch.Tensor, first_probe: int, num_probes: int, numel: int, distribution: str, dtype: torch.dtype
) -> torch.Tensor:
    """Probe rows ``first_probe .. first_probe + num_probes - 1`` on the seed's device: a contiguous
    ``[num_probes, S]`` tensor whose first ``numel`` columns are the probes; ``S = row_stride(numel, distribution)``
    (the padding columns hold the stream's next values, so the rows need no trimming copy).

    Values are generated in float32 and rounded to ``dtype`` (Rademacher values are exact in every dtype).
    """
    key, offset = seed.tolist()
    device = seed.device
    stride = row_stride(numel, distribution)
    rows = first_probe + torch.arange(num_probes, dtype=torch.int64, device=device)
    per_counter = ELEMENTS_PER_COUNTER[distribution]
    n_counters = stride // per_counter
    counters = offset + rows[:, None] * n_counters + torch.arange(n_counters, dtype=torch.int64, device=device)
    words = counter_words(key, counters)  # [K, n_counters, 4]
    if distribution == "rademacher":
        # Element 128 c + 32 w + 8 b + j is bit 8 b + j of word w: bit j of byte b (little-endian bytes of the
        # word), looked up in a 256 x 8 table of signs -- one gather writes the probes.
        bytes_ = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1)  # [K, n_counters, 4, 4]
        return _sign_table(dtype, device).index_select(0, bytes_.reshape(-1)).reshape(num_probes, stride)
    else:
        z0, z1 = box_muller(words[..., 0], words[..., 1])
        z2, z3 = box_muller(words[..., 2], words[..., 3])
        out = torch.stack((z0, z1, z2, z3), dim=-1).reshape(num_probes, stride)
    return out.to(dtype)


def probe_dot(
    vs: list[torch.Tensor], hvs: list[torch.Tensor], with_diag: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused Hutchinson accumulation over a block of probes, for a list of parameters.

    Args:
        vs, hvs: per parameter, probes and Hessian-vector products ``[K, *shape_p]`` (one dtype).
        with_diag: also return the per-coordinate sums (else two empty tensors).

    Returns:
        ``dots [K, P]`` with ``dots[k, p] = <v_p[k], hv_p[k]>`` (per-parameter ``v^T H v``),
        ``diag [N] = sum_k v[k] * hv[k]`` and ``diag_sq [N] = sum_k (v[k] * hv[k])^2`` over the parameters
        flattened and concatenated, accumulated in float32 (float64 for float64 inputs).
    """
    acc = acc_dtype(vs[0])
    k = vs[0].shape[0]
    dots, diag, diag_sq = [], [], []
    for v, hv in zip(vs, hvs, strict=True):
        vf, hf = v.reshape(k, -1).to(acc), hv.reshape(k, -1).to(acc)
        dots.append((vf.unsqueeze(1) @ hf.unsqueeze(2)).reshape(k))
        if with_diag:
            prod = vf * hf
            diag.append(prod.sum(0))
            diag_sq.append((prod * prod).sum(0))
    empty = vs[0].new_zeros(0, dtype=acc)
    return (
        torch.stack(dots, dim=1),
        torch.cat(diag) if with_diag else empty,
        torch.cat(diag_sq) if with_diag else empty.clone(),
    )
