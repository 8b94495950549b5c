r"""Per-layer math of data valuation, called by the layer rules of :mod:`regops.per_example._layers`.

Every rule gains two methods (defaults derived from ``per_example_grads``, overridden here for the layers
where a cheaper exact form exists):

* ``grad_dots(module, saved, g, saved2, g2, form) -> {local name: [B, B2]}``: inner products between the
  per-example gradients of two recorded calls (two batches, or two calls of a reused module);
* ``sq_grad_sum(module, saved, g) -> {local name: sum_n grad_n ** 2}``: the empirical Fisher diagonal's sum.

Linear (activations ``A`` ``[B, T, d]``, output gradients ``G`` ``[B, T, p]``):

* ``T = T2 = 1``: :math:`\langle g_i a_i^\top, g'_j a'^\top_j\rangle = (a_i\cdot a'_j)(g_i\cdot g'_j)`, two GEMMs;
* ghost: :math:`\sum_{t,s}(a_{it}\cdot a'_{js})(g_{it}\cdot g'_{js})` (``regops::valuation_cross_gram``);
* instantiate: build ``G_i^T A_i`` in chunks and multiply the flattened gradients;
* Fisher: ``T = 1``: one GEMM :math:`(G\odot G)^\top (A\odot A)`; sequences: ``regops::valuation_sq_grad_sum``.

Conv: the same on the unfolded patches, per group. Embedding: the ghost form with the id-equality Gram
:math:`[id_{it} = id'_{js} \ne pad]`; its Fisher sums the rows of each example's repeated ids first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from regops._core.dtypes import acc_dtype
from regops.per_example.ops import valuation_cross_gram, valuation_sq_grad_sum

# Bytes of scratch a chunked form may allocate at once.
_CHUNK_BYTES = 64 * 2**20


def flat_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, B2]`` inner products of per-example tensors ``x`` ``[B, ...]`` and ``y`` ``[B2, ...]``."""
    dtype = acc_dtype(x, y)
    return x.reshape(x.shape[0], -1).to(dtype) @ y.reshape(y.shape[0], -1).to(dtype).T


def dense_dots(p1: dict[str, torch.Tensor], p2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: [B, B2]}`` from two dicts of per-example gradients (the default of ``LayerRule.grad_dots``)."""
    return {k: flat_dots(v, p2[k]) for k, v in p1.items() if k in p2}


def sq_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum_n x_n ** 2`` of ``[B, ...]`` per-example tensors, accumulated in float32 (float64 stays)."""
    return x.to(acc_dtype(x)).square().sum(0)


def choose_dots_form(t: int, t2: int, p: int, d: int, b: int, b2: int) -> str:
    """Ghost iff its pair cost ``T T2 (d + p)`` is below the instantiate form's ``p d`` per pair plus the cost
    of building the gradients (``(B T + B2 T2) p d``) spread over the ``B B2`` pairs."""
    inst = p * d * (1.0 + t / max(1, b2) + t2 / max(1, b))
    return "ghost" if t * t2 * (d + p) <= inst else "instantiate"


# ----------------------------------------------------------------------------------------------- Linear
def _as3(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


def weight_dots(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor, form: str) -> torch.Tensor:
    """``[B, B2]`` ``<G_i^T A_i, G2_j^T A2_j>`` by ``form`` (a ``[B, T, d]``, g ``[B, T, p]``)."""
    dtype = acc_dtype(a, g, a2, g2)
    if a.shape[1] == 1 and a2.shape[1] == 1:  # rank one on both sides: (a_i . a'_j)(g_i . g'_j)
        return (a[:, 0].to(dtype) @ a2[:, 0].to(dtype).T).mul_(g[:, 0].to(dtype) @ g2[:, 0].to(dtype).T)
    if form == "ghost":
        return valuation_cross_gram(a, g, a2, g2)
    return _instantiate_dots(a, g, a2, g2, dtype)


def _instantiate_dots(a, g, a2, g2, dtype) -> torch.Tensor:
    p, d = g.shape[2], a.shape[2]
    step = max(1, _CHUNK_BYTES // max(1, p * d * (8 if dtype == torch.float64 else 4)))
    out = torch.empty(a.shape[0], a2.shape[0], dtype=dtype, device=a.device)
    for j0 in range(0, a2.shape[0], step):
        w2 = torch.bmm(g2[j0 : j0 + step].to(dtype).transpose(1, 2), a2[j0 : j0 + step].to(dtype)).flatten(1)
        for i0 in range(0, a.shape[0], step):
            w = torch.bmm(g[i0 : i0 + step].to(dtype).transpose(1, 2), a[i0 : i0 + step].to(dtype)).flatten(1)
            out[i0 : i0 + w.shape[0], j0 : j0 + w2.shape[0]] = w @ w2.T
    return out


def weight_sq_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[p, d]`` ``sum_n (G_n^T A_n)^2``: one GEMM for ``T = 1``, the tiled kernel for sequences."""
    if a.shape[1] == 1:
        dtype = acc_dtype(a, g)
        return g[:, 0].to(dtype).square().T @ a[:, 0].to(dtype).square()
    return valuation_sq_grad_sum(a, g)


def linear_dots_form(module, x, x2) -> str:
    t, t2 = math.prod(x.shape[1:-1]), math.prod(x2.shape[1:-1])
    p, d = module.weight.shape
    return choose_dots_form(t, t2, p, d, x.shape[0], x2.shape[0])


def _has_bias(module) -> bool:
    bias = getattr(module, "bias", None)
    return isinstance(bias, torch.Tensor) and bias.requires_grad


def linear_grad_dots(module, x, g, x2, g2, form) -> dict[str, torch.Tensor]:
    out = {}
    if module.weight.requires_grad:
        out["weight"] = weight_dots(_as3(x), _as3(g), _as3(x2), _as3(g2), form)
    if _has_bias(module):
        out["bias"] = flat_dots(_as3(g).sum(1), _as3(g2).sum(1))
    return out


def linear_sq_grad_sum(module, x, g, transposed: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    if module.weight.requires_grad:
        w = weight_sq_sum(_as3(x), _as3(g))
        out["weight"] = w.T if transposed else w  # Hugging Face's Conv1D stores W as [d, p]
    if _has_bias(module):
        out["bias"] = sq_sum(_as3(g).sum(1))
    return out


# ----------------------------------------------------------------------------------------------- Conv
def conv_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Unfold ``x`` ``[B, C, *S]`` to ``[B, groups, C/groups * prod(k), T]`` (T = output positions)."""
    nd = len(module.kernel_size)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):
        k, s, dil = module.kernel_size[i], module.stride[i], module.dilation[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    b, c = x.shape[:2]
    # x: [B, C, *S_out, *k] -> [B, C, *k, *S_out]
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    x = x.permute(perm)
    t = math.prod(x.shape[2 + nd :])
    return x.reshape(b, module.groups, (c // module.groups) * math.prod(module.kernel_size), t)


def conv_out_positions(module, spatial) -> int:
    pad = module._reversed_padding_repeated_twice
    t = 1
    for i, size in enumerate(spatial):
        j = len(spatial) - 1 - i  # the reversed padding list starts with the last dim
        total = size + pad[2 * j] + pad[2 * j + 1]
        k_eff = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        t *= max(0, (total - k_eff) // module.stride[i] + 1)
    return t


def _conv_ag(module, x, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``[B, G, T, D]`` patches and ``[B, G, T, O/G]`` output gradients."""
    a = conv_patches(module, x).transpose(2, 3)
    b = g.shape[0]
    gg = g.reshape(b, module.groups, module.out_channels // module.groups, -1).transpose(2, 3)
    return a, gg


def conv_dots_form(module, x, x2) -> str:
    t, t2 = conv_out_positions(module, x.shape[2:]), conv_out_positions(module, x2.shape[2:])
    d = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return choose_dots_form(t, t2, module.out_channels // module.groups, d, x.shape[0], x2.shape[0])


def conv_grad_dots(module, x, g, x2, g2, form) -> dict[str, torch.Tensor]:
    out = {}
    if module.weight.requires_grad:
        a, gg = _conv_ag(module, x, g)
        a2, gg2 = _conv_ag(module, x2, g2)
        out["weight"] = sum(weight_dots(a[:, k], gg[:, k], a2[:, k], gg2[:, k], form) for k in range(module.groups))
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = flat_dots(
            g.reshape(g.shape[0], g.shape[1], -1).sum(2), g2.reshape(g2.shape[0], g2.shape[1], -1).sum(2)
        )
    return out


def conv_sq_grad_sum(module, x, g) -> dict[str, torch.Tensor]:
    out = {}
    if module.weight.requires_grad:
        a, gg = _conv_ag(module, x, g)
        per_group = [weight_sq_sum(a[:, k], gg[:, k]) for k in range(module.groups)]  # [O/G, D] each
        out["weight"] = torch.cat(per_group, 0).reshape(module.weight.shape)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = sq_sum(g.reshape(g.shape[0], g.shape[1], -1).sum(2))
    return out


# ----------------------------------------------------------------------------------------------- Embedding
def _pad(module) -> int:
    pad = getattr(module, "padding_idx", None)
    return -1 if pad is None else int(pad)


def embedding_grad_dots(module, ids, g, ids2, g2, form) -> dict[str, torch.Tensor]:
    r""":math:`\sum_{t,s} [id_{it} = id'_{js} \ne pad]\,(g_{it}\cdot g'_{js})`, chunked over the first batch."""
    i1, i2 = ids.reshape(ids.shape[0], -1), ids2.reshape(ids2.shape[0], -1)
    g1, gg2 = g.reshape(i1.shape[0], i1.shape[1], -1), g2.reshape(i2.shape[0], i2.shape[1], -1)
    dtype = acc_dtype(g1, gg2)
    b, t = i1.shape
    b2, t2 = i2.shape
    out = torch.zeros(b, b2, dtype=dtype, device=g.device)
    if b == 0 or b2 == 0 or t == 0 or t2 == 0:
        return {"weight": out}
    g2f = gg2.reshape(b2 * t2, -1).to(dtype)
    ids2f = i2.reshape(-1)
    step = max(1, _CHUNK_BYTES // max(1, 2 * t * b2 * t2 * 8))
    for s in range(0, b, step):
        ic, gc = i1[s : s + step], g1[s : s + step]
        n = ic.shape[0]
        kg = gc.reshape(n * t, -1).to(dtype) @ g2f.T  # [n T, B2 T2]
        same = ic.reshape(-1, 1) == ids2f.reshape(1, -1)
        same &= (ic != _pad(module)).reshape(-1, 1)
        out[s : s + n] = kg.mul_(same).reshape(n, t, b2, t2).sum((1, 3))
    return {"weight": out}


def embedding_sq_grad_sum(module, ids, g) -> dict[str, torch.Tensor]:
    """Rows of repeated ids are summed within each example (keys ``n * V + id``), then squared and summed."""
    b = ids.shape[0]
    i1 = ids.reshape(b, -1)
    g1 = g.reshape(b, i1.shape[1], -1)
    dtype = acc_dtype(g1)
    v = module.weight.shape[0]
    keys = (torch.arange(b, device=ids.device)[:, None] * v + i1).reshape(-1)
    rows = g1.reshape(-1, g1.shape[-1]).to(dtype)
    keep = i1.reshape(-1) != _pad(module)
    keys, rows = keys[keep], rows[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    per_example = rows.new_zeros(uniq.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
    out = rows.new_zeros(v, rows.shape[1])
    return {"weight": out.index_add_(0, uniq % v, per_example.square_())}


# ----------------------------------------------------------------------------------------------- defaults
def _slice(saved, s: int, e: int, batch: int):
    if isinstance(saved, torch.Tensor):
        return saved[s:e] if saved.dim() and saved.shape[0] == batch else saved
    if isinstance(saved, tuple):
        return tuple(_slice(x, s, e, batch) for x in saved)
    return saved


def default_sq_grad_sum(rule, module, saved, g) -> dict[str, torch.Tensor]:
    """``sum_n grad_n ** 2`` from ``per_example_grads`` on chunks of examples (memory: one chunk's gradients;
    saved signals other than tensors, e.g. the torch.func fallback's, are processed whole)."""
    if not isinstance(g, torch.Tensor) or not isinstance(saved, (torch.Tensor, tuple)):
        return {k: sq_sum(v) for k, v in rule.per_example_grads(module, saved, g).items()}
    b = g.shape[0]
    params = getattr(module, "_parameters", None) or {}
    n_params = sum(p.numel() for p in params.values() if p is not None) or 1
    step = max(1, _CHUNK_BYTES // max(1, 8 * n_params))
    out: dict[str, torch.Tensor] = {}
    for s in range(0, b, step):
        grads = rule.per_example_grads(module, _slice(saved, s, s + step, b), g[s : s + step])
        for k, v in grads.items():
            out[k] = sq_sum(v) if k not in out else out[k] + sq_sum(v)
    return out
