"""Pure-PyTorch references of the per-example engine's operators (the CPU path, the test oracle, the benchmark
baseline): per-example squared gradient norms, and the inner products and summed squares of data valuation.

Every layer's per-example weight gradient is a sum of rank-1 terms: for example ``n`` with activations
``A_n`` (``[T, d]``, one row per position) and output gradients ``G_n`` (``[T, p]``),

.. math:: \\nabla_W \\ell_n = G_n^\\top A_n, \\qquad
          \\|G_n^\\top A_n\\|_F^2 = \\sum_{t,t'} (a_t \\cdot a_{t'})(g_t \\cdot g_{t'})
                                 = \\langle A_n A_n^\\top,\\, G_n G_n^\\top \\rangle_F .

The *ghost* (Gram) form evaluates the right-hand side (cost ``T^2 (d + p)`` per example, memory ``T^2``);
the *instantiate* form builds ``G_n^T A_n`` (cost ``T d p``, memory ``d p``). Both return float32 ``[B]``
squared norms whatever the input dtype (low-precision inputs are accumulated in float32).

Embedding: ``A_n`` is the one-hot matrix of the token ids, so ``A_n A_n^T = [id_t = id_t']`` and the
instantiated gradient only has the rows of the ids that occur in the example.

Between example ``i`` of one batch and example ``j`` of another (activations ``A'_j`` ``[T', d]``, output
gradients ``G'_j`` ``[T', p]``), the *cross Gram* form gives the inner product of their weight gradients without
any ``p x d`` gradient (cost ``T T' (d + p)`` per pair):

.. math:: \\langle G_i^\\top A_i,\\, G'^\\top_j A'_j\\rangle_F
          = \\sum_{t,s} (a_{it}\\cdot a'_{js})\\,(g_{it}\\cdot g'_{js}) ,

and the summed squared gradient (the empirical Fisher diagonal's sum) is ``sum_i (G_i^T A_i)^2`` (``[p, d]``).
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype

# Bytes of scratch the instantiate / Gram forms may allocate at once; larger batches are processed in chunks.
_CHUNK_BYTES = 64 * 2**20


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _chunk_len(batch: int, elems_per_example: int) -> int:
    """Examples per chunk so that ``elems_per_example`` float32 scratch per example stays under the budget."""
    return max(1, _CHUNK_BYTES // max(1, 4 * elems_per_example))


def gram_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Ghost form: ``sum((A_n A_n^T) * (G_n G_n^T))`` per example.

    Args:
        a: ``[B, T, d]`` activations (any strides; float32/float16/bfloat16/float64).
        g: ``[B, T, p]`` output gradients.

    Returns:
        ``[B]`` squared Frobenius norms of ``G_n^T A_n`` in float32 (float64 for float64 inputs).
    """
    dtype = acc_dtype(a, g)
    batch, t = a.shape[0], a.shape[1]
    if t == 1:  # rank-1 gradient: ||a||^2 ||g||^2, no Gram at all
        return _f32(a).square().sum((1, 2)).to(dtype) * _f32(g).square().sum((1, 2)).to(dtype)
    out = torch.empty(batch, dtype=dtype, device=a.device)
    step = _chunk_len(batch, 2 * t * t)
    for s in range(0, batch, step):
        ac, gc = a[s : s + step].to(dtype), g[s : s + step].to(dtype)
        out[s : s + ac.shape[0]] = _gram_chunk(ac, gc)
    return out


# Row-block height of the symmetric Gram: long sequences compute only the upper block triangle.
_GRAM_BLOCK = 64


def _gram_chunk(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``<A A^T, G G^T>`` per example. Both Grams are symmetric: for ``T > 1.5 * block`` each row block
    ``i`` is multiplied only with the columns ``>= i`` (``k (k + 1) / 2`` of the ``k^2`` blocks, 3/4 of the
    flops at ``k = 2``) and the off-diagonal blocks count twice."""
    t = a.shape[1]
    if t <= 3 * _GRAM_BLOCK // 2:
        return torch.bmm(a, a.transpose(1, 2)).mul_(torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    total = None
    for i0 in range(0, t, _GRAM_BLOCK):
        i1 = min(i0 + _GRAM_BLOCK, t)
        prod = torch.bmm(a[:, i0:i1], a[:, i0:].transpose(1, 2))
        prod.mul_(torch.bmm(g[:, i0:i1], g[:, i0:].transpose(1, 2)))
        part = 2 * prod.sum((1, 2)) - prod[:, :, : i1 - i0].sum((1, 2))
        total = part if total is None else total + part
    return total


def instantiate_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Instantiate form: ``||G_n^T A_n||_F^2`` per example, building ``G_n^T A_n`` a chunk at a time.

    Same arguments and result as :func:`gram_sq_norms`.
    """
    dtype = acc_dtype(a, g)
    batch, d, p = a.shape[0], a.shape[2], g.shape[2]
    out = torch.empty(batch, dtype=dtype, device=a.device)
    step = _chunk_len(batch, d * p)
    for s in range(0, batch, step):
        ac, gc = a[s : s + step].to(dtype), g[s : s + step].to(dtype)
        grads = torch.bmm(gc.transpose(1, 2), ac)
        out[s : s + grads.shape[0]] = grads.square_().sum((1, 2))
    return out


def embedding_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Squared norm of each example's Embedding weight gradient, summing the rows of repeated ids.

    Args:
        ids: ``[B, T]`` integer token ids.
        g: ``[B, T, d]`` gradients of the looked-up rows.
        padding_idx: tokens with this id get no gradient (as torch's Embedding); ``-1`` for none.

    Returns:
        ``[B]`` float32 (float64 for float64 ``g``) ``sum_v ||sum_{t: id_t = v} g_t||^2``.
    """
    dtype = acc_dtype(g)
    batch, t = ids.shape
    n = torch.arange(batch, device=ids.device).repeat_interleave(t)
    flat_ids = ids.reshape(-1)
    rows = g.reshape(batch * t, -1)
    if padding_idx >= 0:
        keep = flat_ids != padding_idx
        n, flat_ids, rows = n[keep], flat_ids[keep], rows[keep]
    vocab = int(flat_ids.max().item()) + 1 if flat_ids.numel() else 1
    keys, inverse = torch.unique(n * vocab + flat_ids, return_inverse=True)
    summed = torch.zeros(keys.numel(), rows.shape[1], dtype=dtype, device=g.device)
    summed.index_add_(0, inverse, rows.to(dtype))
    out = torch.zeros(batch, dtype=dtype, device=g.device)
    return out.index_add_(0, torch.div(keys, vocab, rounding_mode="floor"), summed.square_().sum(1))


def embedding_gram_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Ghost form of :func:`embedding_sq_norms`: ``sum_{t,t'} [id_t = id_t' != pad] (g_t . g_t')``."""
    dtype = acc_dtype(g)
    batch, t = ids.shape
    out = torch.empty(batch, dtype=dtype, device=g.device)
    step = _chunk_len(batch, t * t)
    for s in range(0, batch, step):
        ic, gc = ids[s : s + step], g[s : s + step].to(dtype)
        same = ic[:, :, None] == ic[:, None, :]
        if padding_idx >= 0:
            same &= (ic != padding_idx)[:, :, None]
        gg = torch.bmm(gc, gc.transpose(1, 2))
        out[s : s + gc.shape[0]] = (gg * same).sum((1, 2))
    return out


# ----------------------------------------------------------------------------------------------- valuation
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
    dtype = acc_dtype(a, g, a2, g2)
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
    dtype = acc_dtype(a, g)
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
