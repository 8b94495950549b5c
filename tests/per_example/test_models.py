"""The engine on small models: in-place activations, tied and reused parameters, parameters used outside their
module, modules without a rule, low precision and autocast (derived tolerances), and the kernels inside a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops
from tests.per_example.models import (
    TiedLM,
    Transformer,
    loop_norms,
    loss_of,
    model_and_data,
    run_norms,
    run_norms_loss,
    vmap_norms,
)


def test_inplace_activation_after_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    norms = run_norms(model, (x,), y)
    for k, v in vmap_norms(model, (x,), y).items():
        torch.testing.assert_close(norms.per_param[k], v)


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


def test_reshaped_batch_is_followed():
    """Layers applied to the ``[B * T, d]`` rows of a flattened batch get their rows grouped per example (a reshape
    keeps the examples' order), exact against the per-example loop; with ``T == B`` nothing can be read from
    sizes."""

    class Flattens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.ln(self.a(x).reshape(-1, 4))  # [B * T, 4]
            return self.b(torch.tanh(h)).view(x.shape[0], -1, 2)

    torch.manual_seed(0)
    model = Flattens().double()
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    norms = run_norms_loss(model, x, lambda out: out.square().sum())
    expected = loop_norms(model, x, lambda out: out.square().sum())
    for k, v in expected.items():
        torch.testing.assert_close(norms.per_param[k], v, rtol=1e-10, atol=1e-12, msg=k)


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
