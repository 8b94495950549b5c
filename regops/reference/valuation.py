r"""Pure-PyTorch references for data valuation: cross-example Gram products and summed squared gradients.

For a Linear-like layer, example ``i`` of one batch has activations ``A_i`` (``[T, d]``) and output gradients
``G_i`` (``[T, p]``), so its weight gradient is ``G_i^T A_i``. Between example ``i`` of a batch and example
``j`` of another batch (activations ``A'_j`` ``[T', d]``, output gradients ``G'_j`` ``[T', p]``),

.. math:: \langle G_i^\top A_i,\, G'^\top_j A'_j\rangle_F
          = \sum_{t,s} (a_{it}\cdot a'_{js})\,(g_{it}\cdot g'_{js})
          = \langle A_i A'^\top_j,\, G_i G'^\top_j\rangle_F ,

the *cross Gram* (ghost) form: cost ``T T' (d + p)`` per pair, no ``p x d`` gradient. The summed squared
gradient (empirical Fisher diagonal) is ``sum_i (G_i^T A_i)^{\odot 2}`` (``[p, d]``).

Both return float32 whatever the input dtype (float64 for float64 inputs); scratch is chunked to a budget.
"""

from __future__ import annotations

import torch

# Bytes of scratch one chunk may allocate.
_CHUNK_BYTES = 64 * 2**20


def _acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _check(a: torch.Tensor, g: torch.Tensor, name: str) -> None:
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"regops: {name} needs activations [B, T, d] and output gradients [B, T, p] with the same B and T, "
            f"got {tuple(a.shape)} and {tuple(g.shape)}"
        )


def cross_gram_dots(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``[B, B2]`` inner products ``<G_i^T A_i, G2_j^T A2_j>`` by the cross Gram form.

    Args:
        a: ``[B, T, d]`` activations of the first batch; g: ``[B, T, p]`` its output gradients.
        a2: ``[B2, T2, d]``; g2: ``[B2, T2, p]``: the second batch (``T2`` may differ from ``T``).

    Returns:
        ``[B, B2]`` float32 (float64 if any input is float64).
    """
    _check(a, g, "cross_gram_dots")
    _check(a2, g2, "cross_gram_dots")
    if a.shape[2] != a2.shape[2] or g.shape[2] != g2.shape[2]:
        raise ValueError(f"regops: cross_gram_dots feature sizes differ: {tuple(a.shape)} vs {tuple(a2.shape)}")
    dtype = _acc_dtype(a, g, a2, g2)
    b, t = a.shape[:2]
    b2, t2 = a2.shape[:2]
    out = torch.zeros(b, b2, dtype=dtype, device=a.device)
    if b == 0 or b2 == 0 or t == 0 or t2 == 0:
        return out
    # Two [bi*T, bj*T2] scratch matrices per chunk.
    per_pair = 2 * t * t2 * (8 if dtype == torch.float64 else 4)
    bj = max(1, min(b2, _CHUNK_BYTES // max(1, per_pair)))
    bi = max(1, min(b, _CHUNK_BYTES // max(1, per_pair * bj)))
    for j0 in range(0, b2, bj):
        a2c = a2[j0 : j0 + bj].to(dtype)
        g2c = g2[j0 : j0 + bj].to(dtype)
        nj = a2c.shape[0]
        a2f, g2f = a2c.reshape(nj * t2, -1), g2c.reshape(nj * t2, -1)
        for i0 in range(0, b, bi):
            ac = a[i0 : i0 + bi].to(dtype)
            gc = g[i0 : i0 + bi].to(dtype)
            ni = ac.shape[0]
            ka = ac.reshape(ni * t, -1) @ a2f.T
            ka.mul_(gc.reshape(ni * t, -1) @ g2f.T)
            out[i0 : i0 + ni, j0 : j0 + nj] = ka.reshape(ni, t, nj, t2).sum((1, 3))
    return out


def sq_grad_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[p, d]`` sum over examples of the squared per-example weight gradients ``(G_i^T A_i)^2``.

    Args:
        a: ``[B, T, d]`` activations; g: ``[B, T, p]`` output gradients.

    Returns:
        ``[p, d]`` float32 (float64 for float64 inputs). ``T = 1`` is one GEMM ``(G*G)^T (A*A)``.
    """
    _check(a, g, "sq_grad_sum")
    dtype = _acc_dtype(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    if t == 1:
        return (g[:, 0].to(dtype).square()).T @ a[:, 0].to(dtype).square()
    out = torch.zeros(p, d, dtype=dtype, device=a.device)
    step = max(1, _CHUNK_BYTES // max(1, p * d * (8 if dtype == torch.float64 else 4)))
    for s in range(0, b, step):
        per_example = torch.bmm(g[s : s + step].to(dtype).transpose(1, 2), a[s : s + step].to(dtype))
        out += per_example.square_().sum(0)
    return out
