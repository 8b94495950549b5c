"""Pure-PyTorch references for per-example gradient norms (CPU path, test oracle, benchmark baseline).

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
"""

from __future__ import annotations

import torch

# Bytes of scratch the instantiate / Gram forms may allocate at once; larger batches are processed in chunks.
_CHUNK_BYTES = 64 * 2**20


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _acc_dtype(a: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32


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
    dtype = _acc_dtype(a, g)
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
    dtype = _acc_dtype(a, g)
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
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
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
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
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
