"""Data valuation: per-example gradient inner products, TracIn, data scores, coherence, empirical Fisher, all
against a float64 per-example loop with torch.autograd; the Triton kernels against their references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops
from tests.zoo import ZOO, per_example_loop_grads


# ---------------------------------------------------------------------------------------------- models
class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d, bias=False)

    def forward(self, h):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v)


class Transformer(nn.Module):
    """Embedding (padding_idx), attention and MLP from Linear layers on [B, T, d], LayerNorm, RMSNorm."""

    def __init__(self, vocab: int = 13, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d), nn.RMSNorm(d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, classes)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(self.ln1(h))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(2, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x1, x2):
        return self.head(torch.cat([torch.relu(self.c1(x1)).mean(-1), self.gn(self.c2(x2)).mean((-1, -2))], 1))


def model_and_data(kind: str, batch: int, seed: int, dtype=torch.float64):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (batch,), generator=g)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 3))
        return model.to(dtype), torch.randn(batch, 7, generator=g, dtype=dtype), y
    if kind == "cnn":
        xs = (torch.randn(batch, 2, 9, generator=g, dtype=dtype), torch.randn(batch, 2, 5, 6, generator=g, dtype=dtype))
        return CNN().to(dtype), xs, y
    ids = torch.randint(0, 13, (batch, 6), generator=g)
    ids[0, -2:] = 0  # padding tokens
    ids[-1, :3] = 5  # repeated ids
    return Transformer().to(dtype), ids, y


def call(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


def index(x, i):
    return tuple(t[i : i + 1] for t in x) if isinstance(x, tuple) else x[i : i + 1]


def loop_grads(model, x, y, labels=None) -> torch.Tensor:
    """[B, P] per-example gradients of the per-example cross-entropy, one backward each (the oracle)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(y.shape[0]):
        loss = F.cross_entropy(call(model, index(x, i)), y[i : i + 1], reduction="sum")
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def mean_ce(out, y):
    return F.cross_entropy(out, y)


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def rel_close(got, expected, rel=1e-8):
    err = (got - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), (err, expected.abs().max().item())


# ---------------------------------------------------------------------------------------------- dots
@pytest.mark.parametrize("kind", ["mlp", "transformer", "cnn"])
@pytest.mark.parametrize("form", ["auto", "ghost", "instantiate"])
def test_dots_match_float64_loop(kind, form):
    model, x, y = model_and_data(kind, 5, 1)
    _, x2, y2 = model_and_data(kind, 3, 2)
    got = regops.per_sample_grad_dots(model, mean_ce, (x, y), (x2, y2), loss_reduction="mean", forms=form)
    expected = loop_grads(model, x, y) @ loop_grads(model, x2, y2).T
    assert got.shape == (5, 3) and got.dtype == torch.float64
    rel_close(got, expected)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_dots_diagonal_is_squared_norm_and_blocks_add_up(kind):
    model, x, y = model_and_data(kind, 4, 3)
    batch = (x, y)
    got = regops.per_sample_grad_dots(model, sum_ce, batch, batch, loss_reduction="sum")
    with regops.per_sample_grad_norms(model, "sum") as norms:
        sum_ce(model(x), y).backward()
    rel_close(got.diagonal(), norms.total**2, 1e-10)
    per_param = regops.per_sample_grad_dots(model, sum_ce, batch, batch, blocks="param", loss_reduction="sum")
    per_module = regops.per_sample_grad_dots(model, sum_ce, batch, batch, blocks="module", loss_reduction="sum")
    assert set(per_param) == {n for n, p in model.named_parameters() if p.requires_grad}
    rel_close(torch.stack(list(per_param.values())).sum(0), got, 1e-12)
    rel_close(torch.stack(list(per_module.values())).sum(0), got, 1e-12)
    for name, v in per_param.items():
        rel_close(v.diagonal(), norms.per_param_sq[name], 1e-10)


class _OutputShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of the tensors the ops under it compute (views left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_dots_compute_no_parameter_gradient_and_stream_the_blocks():
    """Each batch's backward stops at the recorded layers' outputs: no weight gradient is computed or held (a plain
    backward computes them all); the per-parameter blocks summed as they come give the loop's exact total."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 11), nn.ReLU(), nn.Linear(11, 13), nn.ReLU(), nn.Linear(13, 3)).double()
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 3, (5,))
    x2, y2 = torch.randn(4, 7, dtype=torch.float64), torch.randint(0, 3, (4,))
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    with _OutputShapes() as plain:
        mean_ce(model(x), y).backward()
    assert weights <= plain.shapes
    model.zero_grad(set_to_none=True)
    with _OutputShapes() as seen:  # whole batches: in chunks of 3 examples, [3, 13] activations look like a weight's
        got = regops.per_sample_grad_dots(model, mean_ce, (x, y), (x2, y2), loss_reduction="mean", chunk=5)
    assert not weights & seen.shapes, weights & seen.shapes
    assert all(p.grad is None for p in model.parameters())
    rel_close(got, loop_grads(model, x, y) @ loop_grads(model, x2, y2).T)
    per_param = regops.per_sample_grad_dots(model, mean_ce, (x, y), (x2, y2), blocks="param", loss_reduction="mean")
    rel_close(sum(per_param.values()), got, 1e-12)


def test_dots_sequence_linear_t_differs_and_frozen():
    """A Linear on [B, T, d] with a test batch of another length; frozen parameters leave the sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5)).double()
    model[0].bias.requires_grad_(False)

    def loss(out, y):
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")

    x, y = torch.randn(3, 7, 4, dtype=torch.float64), torch.randint(0, 5, (3, 7))
    x2, y2 = torch.randn(2, 4, 4, dtype=torch.float64), torch.randint(0, 5, (2, 4))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(xx, yy):
        return torch.stack(
            [
                torch.cat([g.flatten() for g in torch.autograd.grad(loss(model(xx[i : i + 1]), yy[i : i + 1]), params)])
                for i in range(xx.shape[0])
            ]
        )

    expected = grads(x, y) @ grads(x2, y2).T
    for form in ("ghost", "instantiate"):
        rel_close(
            regops.per_sample_grad_dots(model, loss, (x, y), (x2, y2), forms=form, loss_reduction="sum"), expected
        )


ZOO_DOTS = ["reused_mlp", "encoder", "tied_lm", "gpt2", "llama", "vit"]
ZOO_DOTS += ["opt", "t5", "swin", "convnext", "lstm_bidirectional_packed", "gru_seq_first", "cross_attention"]


@pytest.mark.parametrize("name", ZOO_DOTS)
def test_dots_and_fisher_zoo(name):
    """A Linear applied twice (cross terms between its calls), nn.TransformerEncoder (MultiheadAttention reads
    its projections functionally), a tied LM head F.linear(h, emb.weight), Hugging Face GPT-2 (Conv1D, tied
    head) and Llama, timm ViT; OPT's flattened rows, T5's relative-position bias, Swin's windows, ConvNeXt's layer
    scale, recurrent layers (packed, bidirectional, sequence-first) and cross-attention: exact against the loop."""
    entry = ZOO[name]
    model = entry.build(torch.float64)
    inputs, target = entry.batch(3, torch.Generator().manual_seed(0), torch.float64)
    inputs2, target2 = entry.batch(2, torch.Generator().manual_seed(1), torch.float64)

    def loss(out, y):
        return entry.loss(out if isinstance(out, torch.Tensor) else out.logits, y)

    got = regops.per_sample_grad_dots(model, loss, (inputs, target), (inputs2, target2), loss_reduction="sum")

    def flat(gs):
        return torch.stack([torch.cat([v.flatten() for v in g.values()]) for g in gs])

    g1 = flat(per_example_loop_grads(entry, model, inputs, target))
    rel_close(got, g1 @ flat(per_example_loop_grads(entry, model, inputs2, target2)).T)
    fisher = regops.empirical_fisher_diagonal(model, loss, [(inputs, target)], loss_reduction="sum")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rel_close(torch.cat([fisher[n].flatten() for n in names]), g1.square().mean(0))


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "vit", "resnet18"])
def test_zoo_dots_in_eval_mode_are_float64_exact(name):
    """The README's claim: in eval mode these models' gradient inner products equal the per-example loop's to the
    rounding of a float64 dot product, |error_ij| <= eps sqrt(P) |g_i| |g'_j| (P parameters): a float32 step
    anywhere, or a missed term, is orders of magnitude above it."""
    entry = ZOO[name]
    model = entry.build(torch.float64).eval()
    b1, b2 = (2, 1) if name == "resnet18" else (3, 2)  # ResNet-18: 11M parameters per loop gradient
    inputs, target = entry.batch(b1, torch.Generator().manual_seed(0), torch.float64)
    inputs2, target2 = entry.batch(b2, torch.Generator().manual_seed(1), torch.float64)

    def loss(out, y):
        return entry.loss(out if isinstance(out, torch.Tensor) else out.logits, y)

    got = regops.per_sample_grad_dots(model, loss, (inputs, target), (inputs2, target2), loss_reduction="sum")

    def flat(gs):
        return torch.stack([torch.cat([v.flatten() for v in g.values()]) for g in gs])

    g1 = flat(per_example_loop_grads(entry, model, inputs, target))
    g2 = flat(per_example_loop_grads(entry, model, inputs2, target2))
    bound = torch.finfo(torch.float64).eps * g1.shape[1] ** 0.5 * g1.norm(dim=1)[:, None] * g2.norm(dim=1)[None, :]
    err = (got - g1 @ g2.T).abs()
    assert (err <= bound).all(), (err / bound).max()


def test_tied_modules_sharing_a_parameter():
    """Embedding and a Linear head holding the same Parameter (as HF ties them): dense per-example sums."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(11, 6), nn.Linear(6, 11, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(6, 6), head).double()

    def loss(out, y):
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 11, (3, 5), generator=gen), torch.randint(0, 11, (3, 5), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.stack(
        [
            torch.cat([t.flatten() for t in torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]), params)])
            for i in range(3)
        ]
    )
    rel_close(regops.per_sample_grad_dots(model, loss, (x, y), (x, y), loss_reduction="sum"), g @ g.T)
    fisher = regops.empirical_fisher_diagonal(model, loss, [(x, y)], loss_reduction="sum")
    rel_close(torch.cat([fisher[n].flatten() for n, p in model.named_parameters()]), g.square().mean(0))


def test_dots_bad_input():
    model, x, y = model_and_data("mlp", 2, 0)
    with pytest.raises(ValueError, match="loss_reduction"):
        regops.per_sample_grad_dots(model, sum_ce, (x, y), (x, y), loss_reduction="avg")
    with pytest.raises(ValueError, match="blocks"):
        regops.per_sample_grad_dots(model, sum_ce, (x, y), (x, y), blocks="layer", loss_reduction="sum")
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        regops.per_sample_grad_dots(model, sum_ce, x, (x, y), loss_reduction="sum")
    with pytest.raises(ValueError, match="scalar"):
        regops.per_sample_grad_dots(model, lambda o, t: o, (x, y), (x, y), loss_reduction="sum")


# ---------------------------------------------------------------------------------------------- fisher
@pytest.mark.parametrize("kind", ["mlp", "transformer", "cnn"])
def test_empirical_fisher_matches_loop(kind):
    model, x, y = model_and_data(kind, 5, 4)
    loader = [(index_range(x, 0, 3), y[:3]), (index_range(x, 3, 5), y[3:])]
    fisher = regops.empirical_fisher_diagonal(model, mean_ce, loader, loss_reduction="mean")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(fisher) == names
    got = torch.cat([fisher[n].flatten() for n in names])
    rel_close(got, loop_grads(model, x, y).square().mean(0))
    for n, p in model.named_parameters():
        assert fisher[n].shape == p.shape and fisher[n].dtype == torch.float64


def index_range(x, s, e):
    return tuple(t[s:e] for t in x) if isinstance(x, tuple) else x[s:e]


def test_fisher_sequence_linear_and_sampled_labels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5)).double()

    def loss(out, y):
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)

    x, y = torch.randn(4, 7, 4, dtype=torch.float64), torch.randint(0, 5, (4, 7))
    y[0, :2] = -100
    gen = torch.Generator().manual_seed(5)
    sampled = regops.empirical_fisher_diagonal(
        model, loss, [(x, y)], labels="sampled", generator=gen, loss_reduction="sum"
    )
    # the same draw by hand: softmax of the logits, one multinomial call over all positions
    with torch.no_grad():
        probs = torch.softmax(model(x).reshape(-1, 5).float(), -1)
    drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).reshape(4, 7)
    drawn = torch.where(y == -100, y, drawn)
    params = list(model.parameters())
    for labels, result in (
        (drawn, sampled),
        (y, regops.empirical_fisher_diagonal(model, loss, [(x, y)], loss_reduction="sum")),
    ):
        g = torch.stack(
            [
                torch.cat(
                    [t.flatten() for t in torch.autograd.grad(loss(model(x[i : i + 1]), labels[i : i + 1]), params)]
                )
                for i in range(4)
            ]
        )
        rel_close(torch.cat([result[n].flatten() for n, _ in model.named_parameters()]), g.square().mean(0))
    with pytest.raises(ValueError, match="labels"):
        regops.empirical_fisher_diagonal(model, loss, [(x, y)], labels="model", loss_reduction="sum")


# ---------------------------------------------------------------------------------------------- scores
def test_data_scores_values_order_and_batch_size_independence():
    model, x, y = model_and_data("transformer", 6, 7)
    by2 = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2)]
    by4 = [(x[:4], y[:4]), (x[4:], y[4:])]
    s2 = regops.data_scores(model, sum_ce, by2, loss_reduction="sum")
    s4 = regops.data_scores(model, sum_ce, by4, loss_reduction="sum")
    g = loop_grads(model, x, y)
    rel_close(s2["grand"], g.norm(dim=1), 1e-10)
    with torch.no_grad():
        z = model(x)
    p = torch.softmax(z, -1)
    rel_close(s2["el2n"], (p - F.one_hot(y, 3)).norm(dim=1), 1e-12)
    rel_close(s2["loss"], F.cross_entropy(z, y, reduction="none"), 1e-12)
    rel_close(s2["entropy"], -(p * p.log()).sum(1), 1e-12)
    other = z.clone()
    other[torch.arange(6), y] = -math.inf
    rel_close(s2["margin"], z[torch.arange(6), y] - other.max(1).values, 1e-12)
    for k in s2:
        assert s2[k].shape == (6,)
        torch.testing.assert_close(s2[k], s4[k], rtol=1e-12, atol=1e-14)
    assert set(regops.data_scores(model, sum_ce, by2, ("el2n",))) == {"el2n"}
    with pytest.raises(ValueError, match="unknown scores"):
        regops.data_scores(model, sum_ce, by2, ("forgetting",), loss_reduction="sum")


def test_data_scores_average_over_seeds():
    loader = [
        (torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2]))
    ]

    def factory(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    trained = []
    avg = regops.data_scores(
        factory, sum_ce, loader, ("grand", "el2n"), seeds=[1, 2], train_fn=trained.append, loss_reduction="sum"
    )
    assert len(trained) == 2
    each = [regops.data_scores(factory(s), sum_ce, loader, ("grand", "el2n"), loss_reduction="sum") for s in (1, 2)]
    for k in avg:
        torch.testing.assert_close(avg[k], (each[0][k] + each[1][k]) / 2)
    with pytest.raises(TypeError, match="factory"):
        regops.data_scores(factory(1), sum_ce, loader, seeds=[1], loss_reduction="sum")


def test_gradient_coherence_matches_loop():
    model, x, y = model_and_data("cnn", 5, 8)
    loader = [(index_range(x, 0, 2), y[:2]), (index_range(x, 2, 5), y[2:])]
    c = regops.gradient_coherence(model, mean_ce, loader, loss_reduction="mean")
    g = loop_grads(model, x, y)
    mean_sq, sq_mean = g.square().sum(1).mean(), g.mean(0).square().sum()
    rel_close(c.coherence, sq_mean / mean_sq, 1e-10)
    rel_close(c.cov_trace, (g - g.mean(0)).square().sum(1).mean(), 1e-10)
    assert c.n == 5 and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- tracin
def test_tracin_dense_and_top_k_equal_the_hand_sum():
    model, x, y = model_and_data("mlp", 7, 9)
    _, xt, yt = model_and_data("mlp", 4, 10)
    ckpts, etas = [], [0.5, 0.25, 0.125]
    for c in range(3):
        torch.manual_seed(100 + c)
        ckpts.append({k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = 0
    for ckpt, eta in zip(ckpts, etas, strict=True):
        model.load_state_dict(ckpt)
        expected = expected + eta * loop_grads(model, x, y) @ loop_grads(model, xt, yt).T
    model.load_state_dict(before)
    train = [(x[:3], y[:3]), (x[3:], y[3:])]
    test = [(xt[:2], yt[:2]), (xt[2:], yt[2:])]
    dense = regops.tracin(model, sum_ce, train, test, ckpts, etas, progress=False, loss_reduction="sum")
    rel_close(dense, expected)
    loaders = [lambda m, c=c: m.load_state_dict(c) for c in ckpts]  # callables work as checkpoints too
    top = regops.tracin(model, sum_ce, train, test, loaders, etas, top_k=3, progress=False, loss_reduction="sum")
    vals, idx = expected.T.topk(3, dim=1)
    rel_close(top.proponents, vals)
    assert torch.equal(top.proponent_indices, idx)
    vals, idx = expected.T.topk(3, dim=1, largest=False)
    rel_close(top.opponents, vals)
    assert torch.equal(top.opponent_indices, idx)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="learning rates"):
        regops.tracin(model, sum_ce, train, test, ckpts, [0.1], progress=False, loss_reduction="sum")


# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.ops("valuation_cross_gram", "valuation_sq_grad_sum")
@pytest.mark.parametrize("kind", ["transformer", "cnn"])
def test_model_dots_and_fisher_with_kernels(kernel_target, kind):
    """float32 models on the target's device through its kernels (ghost dots, tiled Fisher) equal the reference
    backend on the CPU."""
    _, device = kernel_target
    model, x, y = model_and_data(kind, 3, 11, torch.float32)
    _, x2, y2 = model_and_data(kind, 2, 12, torch.float32)
    with regops.use_backend("torch"):
        expected = regops.per_sample_grad_dots(model, mean_ce, (x, y), (x2, y2), forms="ghost", loss_reduction="mean")
        fisher_ref = regops.empirical_fisher_diagonal(model, mean_ce, [(x, y)], loss_reduction="mean")

    def to(t):
        return tuple(v.to(device) for v in t) if isinstance(t, tuple) else t.to(device)

    model, x, y, x2, y2 = (to(t) for t in (model, x, y, x2, y2))
    got = regops.per_sample_grad_dots(model, mean_ce, (x, y), (x2, y2), forms="ghost", loss_reduction="mean")
    fisher = regops.empirical_fisher_diagonal(model, mean_ce, [(x, y)], loss_reduction="mean")
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=1e-4, atol=1e-5)
    for k, v in fisher_ref.items():
        torch.testing.assert_close(fisher[k].cpu(), v.cpu(), rtol=1e-4, atol=1e-6, msg=k)


def test_dots_and_fisher_on_the_torch_func_path():
    """A model with an op the tracker does not know: its per-example gradients by torch.func, exact."""
    from tests.per_example.test_tracking import Unknown

    torch.manual_seed(0)
    model = Unknown().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    x2, y2 = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    with pytest.warns(UserWarning, match="torch.func"):
        got = regops.per_sample_grad_dots(model, sum_ce, (x, y), (x2, y2), loss_reduction="sum")
        fisher = regops.empirical_fisher_diagonal(model, sum_ce, [(x, y)], loss_reduction="sum")
    g1, g2 = loop_grads(model, x, y), loop_grads(model, x2, y2)
    rel_close(got, g1 @ g2.T)
    rel_close(torch.cat([v.flatten() for v in fisher.values()]), g1.square().mean(0))
