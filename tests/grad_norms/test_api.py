"""Per-example gradient norms and DP clipping through the public functions: against torch.func in float64 and
float32, against clipping by hand, the contract of the block (p.grad untouched, forms, frozen parameters,
micro-batches) and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import regops
from regops import grad_norms as gn
from regops.testing import dp_noise
from tests.per_example.models import (
    TiedLM,
    hand_clip,
    loss_of,
    mlp,
    model_and_data,
    run_norms,
    vmap_grads,
    vmap_norms,
)


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


def test_backward_twice_raises():
    model = mlp()
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        with regops.per_sample_grad_norms(model, "sum"):
            loss = model(torch.randn(3, 7)).sum()
            loss.backward(retain_graph=True)
            loss.backward()


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
    params = dict(model.named_parameters())
    noises = dp_noise([p.shape for p in params.values()], torch.Generator().manual_seed(7))
    for k, z in zip(params, noises, strict=True):
        torch.testing.assert_close(out[0][k], out[1][k], rtol=0, atol=0)
        noise = z.to(dtype)
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
