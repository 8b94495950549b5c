"""Small models and the torch.func oracles shared by the per-example, grad_norms and valuation tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import regops


class Attention(nn.Module):
    """Single-head self-attention built from Linear layers (so every parameter is a supported layer's)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out(att @ v)


class Block(nn.Module):
    def __init__(self, d: int, norm: type = nn.LayerNorm) -> None:
        super().__init__()
        self.ln1, self.attn = norm(d), Attention(d)
        self.ln2, self.fc1, self.fc2 = norm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 13, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.blocks = nn.Sequential(Block(d), Block(d, nn.RMSNorm))
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(ids)).mean(1))


class CNN(nn.Module):
    """Every conv kind: 1d/2d/3d, stride, padding (int, 'same', reflect, circular), dilation, groups."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.c1b = nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=2, padding_mode="circular")
        self.c2 = nn.Conv2d(2, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
        self.gn = nn.GroupNorm(3, 6)
        self.c2b = nn.Conv2d(6, 4, 3, padding=1, groups=2, padding_mode="reflect", bias=False)
        self.c3 = nn.Conv3d(1, 3, 2, stride=(1, 2, 1), padding=(0, 1, 1))
        self.head = nn.Linear(4 + 4 + 3, 3)

    def forward(self, x1, x2, x3):
        h1 = self.c1b(torch.relu(self.c1(x1))).mean(-1)
        h2 = self.c2b(torch.tanh(self.gn(self.c2(x2)))).mean((-1, -2))
        h3 = self.c3(x3).mean((-1, -2, -3))
        return self.head(torch.cat([h1, h2, h3], 1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 3))


def model_and_data(kind: str, dtype=torch.float64, batch: int = 5):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (batch,), generator=g)
    if kind == "mlp":
        return mlp().to(dtype), (torch.randn(batch, 7, generator=g, dtype=dtype),), y
    if kind == "cnn":
        xs = (
            torch.randn(batch, 2, 11, generator=g, dtype=dtype),
            torch.randn(batch, 2, 7, 8, generator=g, dtype=dtype),
            torch.randn(batch, 1, 3, 5, 4, generator=g, dtype=dtype),
        )
        return CNN().to(dtype), xs, y
    ids = torch.randint(0, 13, (batch, 6), generator=g)
    ids[0, -2:] = 0  # padding tokens
    ids[1, :3] = 5  # repeated ids
    return Transformer().to(dtype), (ids,), y


def loss_of(out, y, reduction="sum"):
    return F.cross_entropy(out, y, reduction=reduction)


def vmap_norms(model, xs, y) -> dict[str, torch.Tensor]:
    """The oracle: per-example gradients of the per-example loss by torch.func, then their norms."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_n(p, *args):
        *xn, yn = args
        out = functional_call(model, p, tuple(x.unsqueeze(0) for x in xn))
        return loss_of(out, yn.unsqueeze(0))

    grads = vmap(grad(loss_n), in_dims=(None, *[0] * (len(xs) + 1)))(params, *xs, y)
    return {k: v.reshape(v.shape[0], -1).norm(dim=1) for k, v in grads.items()}


def vmap_grads(model, xs, y) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_n(p, *args):
        *xn, yn = args
        return loss_of(functional_call(model, p, tuple(x.unsqueeze(0) for x in xn)), yn.unsqueeze(0))

    return vmap(grad(loss_n), in_dims=(None, *[0] * (len(xs) + 1)))(params, *xs, y)


def run_norms(model, xs, y, reduction="sum", **kw):
    model.zero_grad(set_to_none=True)
    with regops.per_sample_grad_norms(model, reduction, **kw) as norms:
        loss_of(model(*xs), y, reduction).backward()
    return norms


class TiedLM(nn.Module):
    """Embedding tied to the output Linear, and one Linear applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=1)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.emb(ids)))))
        return self.head(h.mean(1))


def hand_clip(grads: dict[str, torch.Tensor], max_norm: float, groups: list[list[str]] | None = None):
    """sum_n min(1, C / (||g_n|| + eps)) g_n, flat or per group."""
    groups = groups or [list(grads)]
    out = {}
    for names in groups:
        sq = sum(grads[k].flatten(1).square().sum(1) for k in names)
        factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for k in names:
            out[k] = torch.einsum("b,b...->...", factor, grads[k])
    return out


def loop_norms(model: nn.Module, x: torch.Tensor, loss) -> dict[str, torch.Tensor]:
    """The oracle for any model and per-example loss ``loss(model(x_n))``: one backward per example."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss(model(x[i : i + 1])), list(params.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads, strict=True)])
    return {k: torch.stack([r[j].norm() for r in rows]) for j, k in enumerate(params)}


def run_norms_loss(model: nn.Module, x: torch.Tensor, loss, **kw):
    """``per_sample_grad_norms`` of ``loss(model(x))`` (a sum over examples)."""
    model.zero_grad(set_to_none=True)
    with regops.per_sample_grad_norms(model, "sum", **kw) as norms:
        loss(model(x)).backward()
    return norms
