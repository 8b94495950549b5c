"""Per-example gradient norms and DP clipping: vs torch.func, vs clipping by hand, kernels vs references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import regops
from regops import grad_norms as gn
from regops.reference import grad_norms as ref

# ---------------------------------------------------------------------------------------------- models


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


# ----------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("form", ["ghost", "instantiate", "auto"])
def test_norms_match_vmap_float64(kind, reduction, form):
    model, xs, y = model_and_data(kind)
    norms = run_norms(model, xs, y, reduction, forms=form)
    expected = vmap_norms(model, xs, y)
    assert set(norms.per_param) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(norms.per_param[name], value, rtol=1e-9, atol=1e-12, msg=name)
    total = torch.stack([v.square() for v in expected.values()]).sum(0).sqrt()
    torch.testing.assert_close(norms.total, total, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_norms_float32_within_1e4(kind):
    model, xs, y = model_and_data(kind, torch.float32, batch=4)
    norms = run_norms(model, xs, y, "mean")
    model64, xs64, _ = model_and_data(kind, torch.float64, batch=4)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    xs64 = tuple(x.double() if x.is_floating_point() else x for x in xs)
    expected = vmap_norms(model64, xs64, y)
    for name, value in expected.items():
        assert norms.per_param[name].dtype == torch.float32
        torch.testing.assert_close(norms.per_param[name].double(), value, rtol=1e-4, atol=1e-6, msg=name)


def test_p_grad_is_the_ordinary_gradient():
    model, xs, y = model_and_data("transformer")
    model.zero_grad()
    loss_of(model(*xs), y, "mean").backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    run_norms(model, xs, y, "mean")
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[k], rtol=0, atol=0)


def test_per_module_and_forms_mapping():
    model, xs, y = model_and_data("mlp")
    norms = run_norms(model, xs, y, forms={"0": "ghost", "2": "instantiate"})
    expected = vmap_norms(model, xs, y)
    per_module = norms.per_module
    torch.testing.assert_close(per_module["0"], (expected["0.weight"] ** 2 + expected["0.bias"] ** 2).sqrt())
    with pytest.raises(ValueError, match="form must be one of"):
        regops.per_sample_grad_norms(model, "sum", forms="fast")
    with pytest.raises(ValueError, match="unknown"):
        regops.per_sample_grad_norms(model, "sum", forms={"nope": "ghost"})


def test_frozen_parameters_are_skipped():
    model, xs, y = model_and_data("transformer")
    model.emb.weight.requires_grad_(False)
    model.blocks[0].fc1.bias.requires_grad_(False)
    norms = run_norms(model, xs, y)
    expected = vmap_norms(model, xs, y)
    assert "emb.weight" not in norms.per_param and "blocks.0.fc1.bias" not in norms.per_param
    for name, value in expected.items():
        torch.testing.assert_close(norms.per_param[name], value)


def test_sequence_linear_token_mean_loss():
    """A mean over B*T tokens is the "mean" reduction with the per-example token mean as the example loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5)).double()
    x, y = torch.randn(3, 7, 4, dtype=torch.float64), torch.randint(0, 5, (3, 7))
    with regops.per_sample_grad_norms(model, "mean") as norms:
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, xn, yn):
        return F.cross_entropy(functional_call(model, p, (xn,)), yn)

    grads = vmap(grad(loss_n), in_dims=(None, 0, 0))(params, x, y)
    for k, v in grads.items():
        torch.testing.assert_close(norms.per_param[k], v.flatten(1).norm(dim=1))


def test_inplace_activation_after_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    norms = run_norms(model, (x,), y)
    for k, v in vmap_norms(model, (x,), y).items():
        torch.testing.assert_close(norms.per_param[k], v)


# --------------------------------------------------------------------------------------- shared params
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


def test_tied_and_reused_parameters_are_exact():
    torch.manual_seed(0)
    model = TiedLM().double()
    ids, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4,))
    ids[0, 0] = 1
    for reduction in ("sum", "mean"):
        norms = run_norms(model, (ids,), y, reduction)
        expected = vmap_norms(model, (ids,), y)
        assert set(norms.per_param) == set(expected) == {"emb.weight", "mix.weight", "mix.bias"}
        for k, v in expected.items():
            torch.testing.assert_close(norms.per_param[k], v, msg=k)


def test_parameter_used_only_outside_its_module_is_exact():
    class Outside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(x, self.lin.weight, self.lin.bias)

    torch.manual_seed(0)
    model = Outside().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    norms = run_norms(model, (x,), y)
    for k, v in vmap_norms(model, (x,), y).items():
        torch.testing.assert_close(norms.per_param[k], v, msg=k)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors():
    model = mlp()
    with pytest.raises(ValueError, match="loss_reduction"):
        regops.per_sample_grad_norms(model, "none")
    with pytest.raises(TypeError, match="loss_reduction='sum'"):
        regops.per_sample_grad_norms(model)
    with pytest.raises(TypeError, match="loss_reduction='sum'"):
        regops.dp_clipping(model, 1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        regops.per_sample_grad_norms(torch.randn(3), "sum")
    with pytest.raises(ValueError, match="no batch dimension"):
        with regops.per_sample_grad_norms(model, "sum"):
            model(torch.randn(7))
    with regops.per_sample_grad_norms(model, "sum") as norms:  # two forwards: two micro-batches
        model(torch.randn(4, 7)).sum().backward()
        model(torch.randn(3, 7)).sum().backward()
    assert norms.micro_batch_sizes == [4, 3] and norms.total.shape == (7,)
    norms = regops.per_sample_grad_norms(model, "sum")
    with norms:
        pass
    with pytest.raises(RuntimeError, match="no forward pass"):
        _ = norms.total
    with pytest.raises(RuntimeError, match="entered once"):
        with norms:
            pass
    emb = nn.Embedding(5, 3, scale_grad_by_freq=True)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        with regops.per_sample_grad_norms(emb, "sum"):
            emb(torch.tensor([[1, 2]]))


def test_reshaped_batch_is_rejected():
    class Flattens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x).reshape(-1, 4))

    model = Flattens()
    with pytest.raises(ValueError, match="batch in dim 0"):
        with regops.per_sample_grad_norms(model, "sum"):
            model(torch.randn(2, 3, 4))


def test_backward_twice_raises():
    model = mlp()
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        with regops.per_sample_grad_norms(model, "sum"):
            loss = model(torch.randn(3, 7)).sum()
            loss.backward(retain_graph=True)
            loss.backward()


def test_module_without_rule_is_exact_op_by_op_or_by_vmap():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.randn(5, dtype=torch.float64))
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.lin(torch.sin(x * self.s))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5).double(), Scale())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = vmap_norms(model, (x,), y)
    for unsupported in ("error", "vmap"):  # "x * self.s" is seen op by op; or the module goes through vmap
        norms = run_norms(model, (x,), y, unsupported=unsupported)
        for k, v in expected.items():
            torch.testing.assert_close(norms.per_param[k], v, msg=k)


# --------------------------------------------------------------------------------------- low precision
def capture_linear_signals(model: nn.Module):
    """Forward hooks on every nn.Linear: its input and, through a hook on its output, the gradient reaching it."""
    signals: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod, inputs, out, name=name):
                signals[name] = {"a": inputs[0].detach()}
                out.register_hook(lambda g: signals[name].__setitem__("g", g.detach()))

            handles.append(module.register_forward_hook(hook))
    return signals, handles


@pytest.mark.parametrize("form", ["ghost", "instantiate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_norms_accumulate_in_float32(dtype, form):
    """A bf16/fp16 model: every Linear weight's and bias's norm is the float64 norm of the layer's own
    low-precision signals (the same run's inputs A and output gradients G) within the float32 rounding bound of the
    sums it takes: ghost (a_t.a_s)(g_t.g_s) or instantiated G^T A, and sum_t g_t for the bias. A sum in bf16/fp16
    anywhere misses that bound by orders of magnitude. The other parameters (embedding, norms), whose signals are
    the same low-precision forward's: within twice the error torch.func's per-example gradients in that dtype make
    plus one rounding of the dtype."""
    model, xs, y = model_and_data("transformer", torch.float32, batch=4)
    model64 = Transformer().double()
    model64.load_state_dict({k: v.to(dtype).double() for k, v in model.state_dict().items()})
    model = model.to(dtype)
    signals, handles = capture_linear_signals(model)
    norms = run_norms(model, xs, y, "sum", forms=form)
    for h in handles:
        h.remove()
    eps = torch.finfo(torch.float32).eps
    for name, sig in signals.items():
        a, g = sig["a"].double(), sig["g"].double()
        a, g = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])  # [B, T, d], [B, T, p]
        t, d, p = a.shape[1], a.shape[2], g.shape[2]
        scale = (g.norm(dim=2) * a.norm(dim=2)).sum(1)  # sum_t |g_t||a_t|: bounds every term the sums add
        exact = torch.einsum("btp,btd->bpd", g, a).flatten(1).norm(dim=1)
        got = norms.per_param[f"{name}.weight"]
        assert got.dtype == torch.float32
        # squared norm within (d + p + T^2) eps scale^2; the norm within that over (got + exact)
        bound = (d + p + t * t) * eps * scale.square() / (got.double() + exact)
        assert ((got.double() - exact).abs() <= bound).all(), (name, (got.double() - exact).abs() / bound)
        if f"{name}.bias" in norms.per_param:
            got_b, exact_b = norms.per_param[f"{name}.bias"].double(), g.sum(1).norm(dim=1)
            bound_b = t * eps * g.norm(dim=2).sum(1)
            assert ((got_b - exact_b).abs() <= bound_b).all(), (name, (got_b - exact_b).abs() / bound_b)
    expected, lowp = vmap_norms(model64, xs, y), vmap_norms(model, xs, y)
    linear = {f"{n}.{w}" for n in signals for w in ("weight", "bias")}
    for k, v in expected.items():
        if k in linear:
            continue
        got = norms.per_param[k]
        assert got.dtype == torch.float32
        err, err_ref = ((t.double() - v).abs().max().item() / v.abs().max().item() for t in (got, lowp[k]))
        assert err <= 2 * err_ref + torch.finfo(dtype).eps / 2, (k, err, err_ref)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_autocast_bfloat16(kind):
    """Under bf16 autocast the norms carry the forward's bf16 rounding, as torch.func's per-example gradients under
    the same autocast do: regops' error against the float32 model's exact norms is at most twice theirs plus one
    bf16 rounding (2^-8)."""
    model, xs, y = model_and_data(kind, torch.float32, batch=4)
    with regops.per_sample_grad_norms(model, "sum") as norms:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*xs)
        loss_of(out.float(), y).backward()
    expected = vmap_norms(model, xs, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowp = vmap_norms(model, xs, y)
    for k, v in expected.items():
        assert norms.per_param[k].dtype == torch.float32
        got, ref = norms.per_param[k], lowp[k]
        err, err_ref = ((t.double() - v).abs().max().item() / v.abs().max().item() for t in (got, ref))
        assert err <= 2 * err_ref + 2**-8, (k, err, err_ref)


# ----------------------------------------------------------------------------------------- DP clipping
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


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_clipped_sum_equals_hand_clipping(kind, reduction, per_layer):
    model, xs, y = model_and_data(kind)
    grads = vmap_grads(model, xs, y)
    norms = run_norms(model, xs, y, reduction, retain_signals=True)
    med = norms.total.median().item()
    groups = None
    if per_layer:
        groups = [[n for n, _ in e.params.values()] for e in norms._rec.entries]
        med = min(norms.per_module.values(), key=lambda v: v.median()).median().item()
    regops.clip_per_sample_(norms, max_norm=med, per_layer=per_layer)
    expected = hand_clip(grads, med, groups)
    b = xs[0].shape[0]
    for k, p in model.named_parameters():
        want = expected[k] / b if reduction == "mean" else expected[k]
        torch.testing.assert_close(p.grad, want, msg=k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_noise_uses_generator_and_scale(dtype):
    model, xs, y = model_and_data("mlp", dtype)
    grads = vmap_grads(model, xs, y)
    out = []
    for _ in range(2):
        norms = run_norms(model, xs, y, "mean", retain_signals=True)
        regops.clip_per_sample_(norms, max_norm=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(7))
        out.append({k: p.grad.clone() for k, p in model.named_parameters()})
    expected = hand_clip(grads, 0.5)
    gen = torch.Generator().manual_seed(7)
    for k, p in model.named_parameters():
        torch.testing.assert_close(out[0][k], out[1][k], rtol=0, atol=0)
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(dtype)
        torch.testing.assert_close(out[0][k], (expected[k] + noise * 2.0 * 0.5) / 5, rtol=1e-5, atol=1e-6)


def test_clip_per_layer_bounds_mapping_and_errors():
    model, xs, y = model_and_data("mlp")
    grads = vmap_grads(model, xs, y)
    norms = run_norms(model, xs, y, "sum", retain_signals=True)
    regops.clip_per_sample_(norms, {"0": 0.1, "2": 0.2, "4": 0.3}, per_layer=True)
    for label, bound in {"0": 0.1, "2": 0.2, "4": 0.3}.items():
        names = [f"{label}.weight", f"{label}.bias"]
        expected = hand_clip({k: grads[k] for k in names}, bound)
        for k in names:
            torch.testing.assert_close(dict(model.named_parameters())[k].grad, expected[k])
    with pytest.raises(ValueError, match="retain_signals"):
        regops.clip_per_sample_(run_norms(model, xs, y), 1.0)
    with pytest.raises(ValueError, match="per_layer=True"):
        regops.clip_per_sample_(norms, {"0": 1.0})
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        regops.clip_per_sample_(norms, 0.0)
    with pytest.raises(TypeError, match="per_sample_grad_norms"):
        regops.clip_per_sample_(model, 1.0)


def test_clip_tied_parameters():
    torch.manual_seed(0)
    model = TiedLM().double()
    ids, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4,))
    grads = vmap_grads(model, (ids,), y)
    norms = run_norms(model, (ids,), y, "sum", retain_signals=True)
    regops.clip_per_sample_(norms, max_norm=norms.total.median().item())
    expected = hand_clip(grads, norms.total.median().item())
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], msg=k)


# --------------------------------------------------------------------------------------- reusable core
def test_per_sample_squared_norms_of_pseudo_losses():
    model, xs, y = model_and_data("transformer")
    signals = [torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model.zero_grad(set_to_none=True)
    res = gn.per_sample_squared_norms(model, lambda: model(*xs), lambda out: signals)
    assert all(p.grad is None for p in model.parameters())
    params = {k: v.detach() for k, v in model.named_parameters()}
    for s, r in zip(signals, res, strict=True):

        def pseudo(p, xn, sn):
            return (functional_call(model, p, (xn.unsqueeze(0),))[0] * sn).sum()

        grads = vmap(grad(pseudo), in_dims=(None, 0, 0))(params, xs[0], s)
        for k, v in grads.items():
            torch.testing.assert_close(r[k], v.flatten(1).square().sum(1), msg=k)


# ------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 4, 6), (2, 17, 9, 3), (2, 150, 5, 3)])
def test_reference_forms_agree(shape):
    b, t, d, p = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, p, generator=gen, dtype=torch.float64)
    expected = torch.einsum("btp,btd->bpd", g, a).flatten(1).square().sum(1)
    torch.testing.assert_close(ref.gram_sq_norms(a, g), expected)
    torch.testing.assert_close(ref.instantiate_sq_norms(a, g), expected)
    # non-contiguous views and chunking
    torch.testing.assert_close(ref.gram_sq_norms(a.transpose(1, 2).contiguous().transpose(1, 2), g), expected)


def test_reference_chunking(monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_BYTES", 64)
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(5, 4, 3, generator=gen), torch.randn(5, 4, 2, generator=gen)
    expected = torch.einsum("btp,btd->bpd", g, a).flatten(1).square().sum(1)
    torch.testing.assert_close(ref.gram_sq_norms(a, g), expected)
    torch.testing.assert_close(ref.instantiate_sq_norms(a, g), expected)
    ids = torch.randint(0, 4, (5, 4), generator=gen)
    torch.testing.assert_close(ref.embedding_gram_sq_norms(ids, g, 1), ref.embedding_sq_norms(ids, g, 1))


@pytest.mark.parametrize("padding_idx", [-1, 0])
def test_reference_embedding_forms(padding_idx):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (4, 9), generator=gen)
    g = torch.randn(4, 9, 3, generator=gen, dtype=torch.float64)
    dense = torch.zeros(4, 5, 3, dtype=torch.float64)
    keep = (ids != padding_idx).unsqueeze(-1).double()
    dense.scatter_add_(1, ids.unsqueeze(-1).expand_as(g), g * keep)
    expected = dense.flatten(1).square().sum(1)
    torch.testing.assert_close(ref.embedding_sq_norms(ids, g, padding_idx), expected)
    torch.testing.assert_close(ref.embedding_gram_sq_norms(ids, g, padding_idx), expected)


def test_ops_opcheck_and_compile():
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 2, generator=gen)
    ids = torch.randint(0, 4, (3, 5), generator=gen)
    torch.library.opcheck(torch.ops.regops.grad_norms_gram, (a, g))
    torch.library.opcheck(torch.ops.regops.grad_norms_instantiate, (a, g))
    torch.library.opcheck(torch.ops.regops.grad_norms_embedding_gram, (ids, g, 0))

    @torch.compile(fullgraph=True, backend="eager")
    def f(a, g, ids):
        return gn.gram_sq_norms(a, g) + gn.instantiate_sq_norms(a, g) + gn.embedding_gram_sq_norms(ids, g, 0)

    expected = 2 * ref.gram_sq_norms(a, g) + ref.embedding_gram_sq_norms(ids, g, 0)
    torch.testing.assert_close(f(a, g, ids), expected)


# ---------------------------------------------------------------------------------------------------- kernels
KERNEL_SHAPES = [(2, 1, 3, 5), (3, 7, 5, 3), (2, 70, 33, 17)]


@pytest.mark.ops("grad_norms_gram", "grad_norms_instantiate", "grad_norms_embedding_gram")
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_match_reference(kernel_target, shape, dtype, poison_empty):
    _, device = kernel_target
    b, t, d, p = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a64 = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    g64 = torch.randn(b, t, p, generator=gen, dtype=torch.float64)
    # a transposed (non-contiguous) view of the activations, as the unfolded convolutions give
    a = a64.to(dtype).transpose(1, 2).contiguous().transpose(1, 2).to(device)
    g = g64.to(dtype).to(device)
    exact = ref.gram_sq_norms(a64, g64)
    ref_lowp = ref.gram_sq_norms(a.cpu(), g.cpu()).double()
    for got in (gn.gram_sq_norms(a, g), gn.instantiate_sq_norms(a, g)):
        assert got.dtype == torch.float32 and got.shape == (b,)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double().cpu(), exact, rtol=1e-5, atol=1e-5)
        else:  # inputs are exactly representable; only fp32 accumulation order differs from the reference
            torch.testing.assert_close(got.double().cpu(), ref_lowp, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 5, (b, t), generator=gen).to(device)
    got = gn.embedding_gram_sq_norms(ids, g, 2)
    torch.testing.assert_close(
        got.double().cpu(), ref.embedding_sq_norms(ids.cpu(), g.cpu(), 2).double(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.ops("grad_norms_gram", "grad_norms_instantiate")
def test_kernels_zero_size(kernel_target):
    _, device = kernel_target
    a, g = torch.randn(0, 4, 3, device=device), torch.randn(0, 4, 2, device=device)
    assert gn.gram_sq_norms(a, g).shape == (0,)
    assert gn.instantiate_sq_norms(a, g).shape == (0,)


@pytest.mark.ops("grad_norms_gram", "grad_norms_instantiate", "grad_norms_embedding_gram")
@pytest.mark.parametrize("kind", ["transformer", "cnn"])
@pytest.mark.parametrize("form", ["ghost", "instantiate"])
def test_model_norms_with_kernels(kernel_target, kind, form):
    """The model and its data on the target's device (the kernels run there), the reference on the CPU."""
    _, device = kernel_target
    model, xs, y = model_and_data(kind, torch.float32, batch=3)
    with regops.use_backend("torch"):
        reference = {k: v.clone() for k, v in run_norms(model, xs, y, "mean", forms=form).per_param.items()}
    model, xs, y = model.to(device), tuple(x.to(device) for x in xs), y.to(device)
    got = run_norms(model, xs, y, "mean", forms=form)
    for k, v in reference.items():
        assert got.per_param[k].device.type == device.type
        torch.testing.assert_close(got.per_param[k].cpu(), v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "bias-free"])
def test_dp_clipping_block_matches_hand_clipping(kind):
    if kind == "bias-free":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
        xs, y = (torch.randn(5, 7, dtype=torch.float64),), torch.randint(0, 3, (5,))
    else:
        model, xs, y = model_and_data(kind)
    grads = vmap_grads(model, xs, y)
    bound = 0.7 * torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt().median().item()
    model.zero_grad(set_to_none=True)
    with regops.dp_clipping(model, max_norm=bound, loss_reduction="sum") as clip:
        loss_of(model(*xs), y).backward()
        # autograd skipped the Linear/Conv weight gradients: the block rebuilds them from the signals
        assert all(m.weight.grad is None for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    expected = hand_clip(grads, bound)
    for k, p in model.named_parameters():
        assert p.requires_grad
        torch.testing.assert_close(p.grad, expected[k], msg=k)
    assert clip.clip_factors.shape == (xs[0].shape[0],)
    assert clip.total.shape == (xs[0].shape[0],)


def test_dp_clipping_validates_and_restores_on_error():
    model = mlp()
    with pytest.raises(ValueError, match="max_norm"):
        regops.dp_clipping(model, max_norm=-1.0, loss_reduction="mean")
    with pytest.raises(ValueError, match="noise_multiplier"):
        regops.dp_clipping(model, max_norm=1.0, loss_reduction="mean", noise_multiplier=-0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with regops.dp_clipping(model, max_norm=1.0, loss_reduction="mean"):
            model(torch.randn(3, 7))
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())
