"""Parameter uses outside the rules' modules, the batch through sequence-first models, BatchNorm, the torch.func
fallback and the rule registry, against torch.func's per-example gradients in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import regops
from regops import per_example as pe


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


def test_any_op_on_a_parameter_is_exact_and_a_penalty_is_refused():
    """An op no rule covers (``einsum`` on a parameter, a parameter as the left operand of ``@``) is exact by
    ``vmap`` of its ``vjp`` over the examples; a parameter used outside the model's forward where it cannot be
    attributed (a penalty added to the loss) raises, naming it; one whose gradient arrives through no recorded use
    raises when the norms are read."""

    class Einsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(4, 3))
            self.v = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            h = torch.tanh(self.lin(x))
            return torch.einsum("bd,dk->bk", h, self.w) + (self.v @ h.T).T

    torch.manual_seed(0)
    model = Einsum().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    check(run(model, (x,), y), norms_of(oracle_grads(model, (x,), y)))
    with pytest.raises(ValueError, match=r"\['w'\].*outside the model's forward"):
        with regops.per_sample_grad_norms(model, "sum"):
            (F.cross_entropy(model(x), y, reduction="sum") + model.w.square().sum()).backward()
    with pytest.raises(RuntimeError, match=r"\['w'\] received gradients through a use regops did not see"):
        with regops.per_sample_grad_norms(model, "sum") as norms:
            model.w.square().sum().backward()
        _ = norms.total


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


class SeqInput(nn.Module):
    """:class:`SeqFirst` taking sequence-first ids ``[T, B]``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids.t())


def test_batch_dim_is_the_inputs_and_sequence_first_layers_are_followed():
    """The examples are declared once, at the inputs (``batch_dim``, default 0), and followed through a transpose to
    sequence-first layers (``nn.MultiheadAttention(batch_first=False)`` and its ``[T * B, E]`` out-projection) with
    ``T == B``; a model whose inputs are sequence-first takes ``batch_dim=1``."""
    torch.manual_seed(0)
    model = SeqFirst().double()
    ids, y = torch.randint(0, 9, (4, 4)), torch.randint(0, 3, (4,))
    expected = norms_of(oracle_grads(model, (ids,), y))
    check(run(model, (ids,), y), expected)
    got = run(SeqInput(model), (ids.t().contiguous(),), y, batch_dim=1)
    check(_renamed(got, "inner."), expected)
    with pytest.raises(ValueError, match="batch_dim must be an int >= 0"):
        regops.per_sample_grad_norms(model, "sum", batch_dim=-1)


def _renamed(norms, prefix: str):
    class View:
        per_param = {k[len(prefix) :]: v for k, v in norms.per_param.items()}

    return View()


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
        weight = torch.sigmoid(x.sum(-1, keepdim=True)) * mask  # one row per example, from its own input
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


def test_register_rule_teaches_a_new_layer():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.einsum("bd,d->bd", x, self.s)  # an op the recorder would refuse

    class ScaleRule(pe.LayerRule):
        def per_example_grads(self, module, x, g):
            return {"s": g * x}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    pe.register_rule(Scale, ScaleRule())
    try:
        assert isinstance(pe.rule_for(model[1]), ScaleRule)
        check(run(model, (x,), y), norms_of(oracle_grads(model, (x,), y)))
    finally:
        pe._rules._RULES.pop(Scale)
    assert "transformers.pytorch_utils.Conv1D" in pe.registered_rules()
    with pytest.raises(TypeError, match="LayerRule"):
        pe.register_rule(Scale, object())
    with pytest.raises(TypeError, match="nn.Module subclass"):
        pe.register_rule(int, ScaleRule())
