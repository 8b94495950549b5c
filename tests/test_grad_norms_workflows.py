"""Per-example gradients in training workflows: functional parameter uses, batch_dim, BatchNorm, the vmap
fallback, accumulation within and across blocks, expected batch size, Poisson sampling, accounting, the rule
registry and the fix helper."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import regops
from regops import grad_norms as gn


def oracle_grads(model, args, y, kwargs=None):
    """Per-example gradients of the summed cross-entropy by torch.func (args batched in dim 0)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    kwargs = kwargs or {}

    def loss_n(p, *a):
        *xs, yn = a
        out = functional_call(model, p, tuple(x.unsqueeze(0) for x in xs), kwargs)
        return F.cross_entropy(out, yn.unsqueeze(0), reduction="sum")

    return vmap(grad(loss_n), in_dims=(None, *[0] * (len(args) + 1)))(params, *args, y)


def norms_of(grads):
    return {k: v.flatten(1).norm(dim=1) for k, v in grads.items()}


def run(model, args, y, reduction="sum", kwargs=None, **kw):
    model.zero_grad(set_to_none=True)
    with regops.per_sample_grad_norms(model, reduction, **kw) as norms:
        F.cross_entropy(model(*args, **(kwargs or {})), y, reduction=reduction).backward()
    return norms


def check(norms, expected):
    assert set(norms.per_param) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(norms.per_param[k], v, rtol=1e-9, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------------------ functional uses
class Functional(nn.Module):
    """Every functional form the recorder understands, on parameters of other modules or of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.w = nn.Parameter(torch.randn(5, 4))  # x @ w
        self.v = nn.Parameter(torch.randn(3, 4))  # x @ v.T, F.linear(x, v.t().t())
        self.scale = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(1, 4))
        self.ln = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.a.weight, self.a.bias))
        h = torch.tanh(h @ self.w) * self.scale - self.shift
        h = F.layer_norm(h, (4,), self.ln) + self.shift.expand(h.shape[0], -1)
        return h @ self.v.T + F.linear(h, self.v.to(h.dtype)) + torch.matmul(h, self.v.t())


def test_functional_parameter_uses_are_exact():
    torch.manual_seed(0)
    model = Functional().double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    expected = norms_of(oracle_grads(model, (x,), y))
    check(run(model, (x,), y), expected)
    check(run(model, (x,), y, "mean"), expected)


def test_unsupported_functional_use_raises_naming_the_parameter():
    class Einsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return torch.einsum("bd,dk->bk", self.lin(x), self.w)

    model = Einsum()
    with pytest.raises(ValueError, match=r"\['w'\].*einsum.*register_rule"):
        with regops.per_sample_grad_norms(model, "sum"):
            model(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\['lin.weight'\].*as the left operand"):
        with regops.per_sample_grad_norms(model, "sum"):
            model.lin.weight @ torch.randn(4, 3)
    # a penalty on a parameter inside the block has no per-example meaning: it raises too
    with pytest.raises(ValueError, match=r"\['w'\]"):
        with regops.per_sample_grad_norms(model, "sum"):
            model.w.square().sum()


# ------------------------------------------------------------------------------------------------ batch_dim
class SeqFirst(nn.Module):
    """Sequence-first layers ([T, B, d]) with a batch-first head, T == B so that sizes cannot tell them apart."""

    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):  # ids [B, T]
        h = self.emb(ids.t())  # [T, B, d]
        h = self.ln(h + self.mha(h, h, h, need_weights=False)[0])
        return self.head(h.mean(0))


def test_batch_dim_for_sequence_first_models():
    torch.manual_seed(0)
    model = SeqFirst().double()
    ids, y = torch.randint(0, 9, (4, 4)), torch.randint(0, 3, (4,))
    expected = norms_of(oracle_grads(model, (ids,), y))
    check(run(model, (ids,), y, batch_dim=1), expected)
    # batch-first reading of a sequence-first MultiheadAttention is refused, even where T == B hides it
    with pytest.raises(ValueError, match="batch_first=False but batch_dim=0"):
        regops.per_sample_grad_norms(model, "sum")
    with pytest.raises(ValueError, match="batch_dim must be 0"):
        regops.per_sample_grad_norms(model, "sum", batch_dim=2)


# ------------------------------------------------------------------------------------------------ BatchNorm
def bn_net(affine: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=affine), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)
    )


def test_batchnorm_eval_is_exact_and_train_is_refused():
    torch.manual_seed(0)
    model = bn_net().double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    model.train()
    model(x)  # running statistics away from their initial values
    model.eval()
    check(run(model, (x,), y), norms_of(oracle_grads(model, (x,), y)))
    for affine in (True, False):
        model = bn_net(affine).train()
        with pytest.raises(ValueError, match="couples the examples"):
            with regops.per_sample_grad_norms(model, "sum"):
                model(torch.randn(3, 2, 4, 4))
    with pytest.raises(ValueError, match="couples the examples"):
        with regops.per_sample_grad_norms(nn.Linear(2, 2), "sum"):
            F.batch_norm(torch.randn(3, 2), None, None, training=True)


def test_fix_model_swaps_batchnorm_and_reports():
    model = bn_net()
    fixed, changes = regops.fix_model(model)
    assert [str(c) for c in changes] == ["1: BatchNorm2d(4) -> GroupNorm(4, 4)"]
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(fixed[1], nn.GroupNorm)  # a copy by default
    assert regops.fix_model(nn.Linear(2, 2))[1] == []
    root, changes = regops.fix_model(nn.BatchNorm1d(48), max_groups=32)
    assert isinstance(root, nn.GroupNorm) and root.num_groups == 16 and len(changes) == 1
    same, _ = regops.fix_model(model, inplace=True)
    assert same is model and isinstance(model[1], nn.GroupNorm)
    with pytest.raises(ValueError, match="max_groups"):
        regops.fix_model(model, max_groups=0)


# ------------------------------------------------------------------------------------------------- vmap path
class Gated(nn.Module):
    """Keyword arguments, an unbatched tensor argument, a buffer, and a (tensor, dict) output."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(5))
        self.register_buffer("offset", torch.randn(5))

    def forward(self, x, mask, *, temperature, weight):
        h = torch.sigmoid(x * self.g / temperature + self.offset) * mask
        return h, {"aux": (h * weight).sum(-1)}


class UsesGated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gate, self.out = nn.Linear(4, 5), Gated(), nn.Linear(5, 3)

    def forward(self, x):
        mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], dtype=x.dtype)  # shared by all examples
        weight = torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype)[:, None] * mask  # one row per example
        h, extra = self.gate(self.inp(x), mask, temperature=2.0, weight=weight)
        return self.out(h) + extra["aux"][:, None]


def test_vmap_fallback_kwargs_unbatched_args_and_pytree_outputs():
    torch.manual_seed(0)
    model = UsesGated().double()
    # 6 examples: the shared mask's 5 entries do not look like a batch (a size equal to the batch would)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = norms_of(oracle_grads(model, (x,), y))
    check(run(model, (x,), y, unsupported="vmap"), expected)
    check(run(model, (x,), y), expected)  # and op by op


def test_vmap_fallback_refuses_randomness():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return F.dropout(x * self.s, 0.5, training=True)

    model = nn.Sequential(Noisy(), nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match="random numbers"):
        with regops.per_sample_grad_norms(model, "sum", unsupported="vmap") as norms:
            model(torch.randn(3, 4)).sum().backward()
        _ = norms.total


# ------------------------------------------------------------------------------------------- registry
def test_register_rule_teaches_a_new_layer():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.einsum("bd,d->bd", x, self.s)  # an op the recorder would refuse

    class ScaleRule(gn.LayerRule):
        def per_example_grads(self, module, x, g):
            return {"s": g * x}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    gn.register_rule(Scale, ScaleRule())
    try:
        assert isinstance(gn.rule_for(model[1]), ScaleRule)
        check(run(model, (x,), y), norms_of(oracle_grads(model, (x,), y)))
    finally:
        gn.layers._RULES.pop(Scale)
    assert "transformers.pytorch_utils.Conv1D" in gn.registered_rules()
    with pytest.raises(TypeError, match="LayerRule"):
        gn.register_rule(Scale, object())
    with pytest.raises(TypeError, match="nn.Module subclass"):
        gn.register_rule(int, ScaleRule())


# -------------------------------------------------------------------------------- accumulation and scaling
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def clipped_sum(grads, bound):
    sq = sum(g.flatten(1).square().sum(1) for g in grads.values())
    f = (bound / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", f, g) for k, g in grads.items()}


def test_dp_gradients_accumulate_across_blocks_and_use_expected_batch_size():
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 6, generator=gen, dtype=torch.float64) for n in (4, 3)]
    ys = [torch.randint(0, 3, (n,), generator=gen) for n in (4, 3)]
    expected = [clipped_sum(oracle_grads(model, (x,), y), 0.5) for x, y in zip(xs, ys, strict=True)]
    model.zero_grad(set_to_none=True)
    for x, y in zip(xs, ys, strict=True):  # two DP steps' worth of blocks, one optimizer step
        with regops.dp_clipping(model, 0.5, loss_reduction="mean", expected_batch_size=10):
            F.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (expected[0][k] + expected[1][k]) / 10)
    # sum reduction, existing gradient kept, as torch accumulates
    model.zero_grad(set_to_none=True)
    before = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        p.grad = before[k].clone()
    with regops.dp_clipping(model, 0.5, loss_reduction="sum"):
        F.cross_entropy(model(xs[0]), ys[0], reduction="sum").backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[k] + expected[0][k])


def test_noise_once_over_micro_batches_and_empty_poisson_batch():
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    expected = clipped_sum(oracle_grads(model, (x,), y), 0.5)
    model.zero_grad(set_to_none=True)
    with regops.dp_clipping(
        model,
        0.5,
        loss_reduction="mean",
        noise_multiplier=1.3,
        expected_batch_size=8,
        generator=torch.Generator().manual_seed(3),
    ) as clip:
        for i in (0, 3):
            F.cross_entropy(model(x[i : i + 3]), y[i : i + 3]).backward()
    assert clip.total.shape == (6,)
    noise = torch.Generator().manual_seed(3)
    for k, p in model.named_parameters():
        z = torch.randn(p.shape, generator=noise, dtype=torch.float32).double()
        torch.testing.assert_close(p.grad, (expected[k] + 1.3 * 0.5 * z) / 8, rtol=1e-6, atol=1e-7)
    # an empty batch (Poisson sampling) still takes its step: noise only
    model.zero_grad(set_to_none=True)
    with regops.dp_clipping(model, 0.5, loss_reduction="mean", noise_multiplier=1.0, expected_batch_size=8):
        pass
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="expected_batch_size"):
        with regops.dp_clipping(model, 0.5, loss_reduction="mean"):
            pass
    with pytest.raises(ValueError, match="expected_batch_size"):
        regops.dp_clipping(model, 0.5, loss_reduction="mean", expected_batch_size=0)


def test_poisson_batch_sampler():
    s = regops.PoissonBatchSampler(200, 0.05, steps=50, generator=torch.Generator().manual_seed(0))
    batches = list(s)
    again = list(regops.PoissonBatchSampler(200, 0.05, steps=50, generator=torch.Generator().manual_seed(0)))
    assert batches == again and len(batches) == len(s) == 50 and s.expected_batch_size == 10
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(set(sizes.tolist())) > 1  # sizes vary: Poisson, not fixed
    assert all(0 <= i < 200 for b in batches for i in b) and all(b == sorted(set(b)) for b in batches)
    assert abs(sizes.mean().item() - 10) < 5 * (200 * 0.05 * 0.95 / 50) ** 0.5  # 5 sigma
    assert len(regops.PoissonBatchSampler(10, 0.25)) == 4
    with pytest.raises(ValueError, match="sample_rate"):
        regops.PoissonBatchSampler(10, 0.0)


# ------------------------------------------------------------------------------------------------ accounting
def test_accounting_through_opacus():
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    for _ in range(200):
        ref.step(noise_multiplier=1.1, sample_rate=0.01)
    eps = gn.epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=200, delta=1e-5)
    assert eps == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    acc = regops.PrivacyAccountant("rdp")
    acc.step(1.1, 0.01, steps=200)
    assert acc.steps == 200 and acc.epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
    sigma = gn.noise_multiplier_for(eps, sample_rate=0.01, steps=200, delta=1e-5)
    assert gn.epsilon(sigma, 0.01, 200, 1e-5) <= eps * 1.01 and sigma == pytest.approx(1.1, rel=0.05)
    assert gn.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match="delta"):
        gn.epsilon(1.0, 0.01, 10, 0.0)
    with pytest.raises(ValueError, match="accountant"):
        gn.epsilon(1.0, 0.01, 10, 1e-5, accountant="moments")


def test_accounting_without_opacus_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(ImportError, match="pip install opacus"):
        gn.epsilon(1.0, 0.01, 10, 1e-5)
