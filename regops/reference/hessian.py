"""Pure-PyTorch references for the hessian family: Philox probes, the fused probe accumulation, the closed-form
softmax cross-entropy head.

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


def _sign_table(dtype: torch.dtype, device) -> torch.Tensor:
    """``table[byte, j] = -1 if bit j of byte is set else +1``, shape ``[256, 8]``."""
    key = (dtype, torch.device(device) if device is not None else torch.device("cpu"))
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (1 - 2 * bits).to(dtype=dtype, device=key[1])
    return _SIGN_TABLES[key]


def probes(
    seed: int,
    offset: int,
    first_probe: int,
    num_probes: int,
    numel: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Probe rows ``first_probe .. first_probe + num_probes - 1``: a contiguous ``[num_probes, S]`` tensor whose
    first ``numel`` columns are the probes; ``S = row_stride(numel, distribution)`` (the padding columns hold
    the stream's next values, so the rows need no trimming copy).

    Values are generated in float32 and rounded to ``dtype`` (Rademacher values are exact in every dtype).
    """
    stride = row_stride(numel, distribution)
    rows = first_probe + torch.arange(num_probes, dtype=torch.int64, device=device)
    per_counter = ELEMENTS_PER_COUNTER[distribution]
    n_counters = stride // per_counter
    counters = offset + rows[:, None] * n_counters + torch.arange(n_counters, dtype=torch.int64, device=device)
    words = counter_words(seed, counters)  # [K, n_counters, 4]
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


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    acc = accumulate_dtype(vs[0].dtype)
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


def softmax_ce_linear_head_diagonal(
    features: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact Hessian diagonal of ``sum_i w_i CE(W h_i + b, y_i)`` with respect to ``W`` and ``b``.

    The Hessian of softmax cross-entropy w.r.t. the logits is ``diag(p_i) - p_i p_i^T`` whatever the target
    distribution, and ``z_i = W h_i + b`` is linear, so ``H_W = sum_i w_i (diag p_i - p_i p_i^T) (x) h_i h_i^T`` and

    .. math:: \operatorname{diag}(H_W) = (P \odot (1 - P))^\top \operatorname{diag}(w) (H \odot H),
              \qquad \operatorname{diag}(H_b) = \sum_i w_i\, p_i \odot (1 - p_i)

    Args:
        features: ``[B, d]`` head inputs ``h_i``; logits: ``[B, C]``; weights: ``[B]`` per-example loss weights
            (``1/B`` for a mean, 0 for ignored examples).

    Returns:
        ``(diag_W [C, d], diag_b [C])`` in float32 (float64 for float64 inputs).
    """
    acc = torch.promote_types(accumulate_dtype(features.dtype), accumulate_dtype(logits.dtype))
    p = torch.softmax(logits.to(acc), dim=-1)
    curv = p * (1.0 - p) * weights.to(acc)[:, None]
    h = features.to(acc)
    return curv.T @ (h * h), curv.sum(0)
