"""Hessian estimators on the real tiny models of tests/zoo.py, with every standard loss, against exact
double-backward references.

For each model and loss, the estimators are run on given probes (``probes=``): their per-probe terms
``v_k^T H v_k`` are then deterministic and must equal the reference, computed independently by plain autograd
(``grad(create_graph=True)`` then one ``grad`` of ``g . v`` per probe) with attention on the math backend. The
models are float64, so exact engines agree to rounding and finite differences to their O(h^2) bias.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import regops
from tests.zoo import ZOO

MODELS = ("gpt2", "bert", "vit", "resnet18", "regops_fused")
LOSSES = ("mse", "cross_entropy", "bce_with_logits", "huber", "nll")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Forward(nn.Module):
    """A zoo model as ``module(inputs) -> [M, C]`` logits (sequence models: one row per token)."""

    def __init__(self, entry, model: nn.Module):
        super().__init__()
        self.entry, self.model = entry, model

    def forward(self, inputs):
        out = self.entry.forward(self.model, inputs)
        return out.reshape(-1, out.shape[-1])


def criterion(name: str):
    return {
        "mse": nn.MSELoss(),
        "cross_entropy": nn.CrossEntropyLoss(),
        "bce_with_logits": nn.BCEWithLogitsLoss(),
        "huber": nn.HuberLoss(delta=0.5),
        "nll": lambda out, t: F.nll_loss(F.log_softmax(out, -1), t),
    }[name]


def targets_for(name: str, logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    m, c = logits.shape
    if name in ("cross_entropy", "nll"):
        return torch.randint(0, c, (m,), generator=g)
    if name == "bce_with_logits":
        return torch.rand(m, c, generator=g, dtype=logits.dtype)
    return torch.randn(m, c, generator=g, dtype=logits.dtype)


@functools.cache
def build(name: str):
    """(model for the estimator, model for the reference, inputs, logits); float64, eval mode. Built once per
    module (the estimators never modify the models)."""
    entry = ZOO[name]
    model = Forward(entry, entry.build(torch.float64)).eval()
    inputs, _ = entry.batch(2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if name == "resnet18":  # 11M parameters: the Hessian w.r.t. the last block's norms and the head (rest frozen)
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(("model.layer4.1.bn", "model.fc.")))
    reference = model
    if name == "regops_fused":  # the fused ops have no double backward: the reference is the torch composition
        reference = copy.deepcopy(model)
        reference.model.fused = False
    with torch.no_grad():
        logits = model(inputs)
    return model, reference, inputs, logits


def setup(name: str, loss: str):
    """(model for the estimator, model for the reference, inputs, targets)."""
    model, reference, inputs, logits = build(name)
    return model, reference, inputs, targets_for(loss, logits, torch.Generator().manual_seed(2))


def probes_for(model: nn.Module, k: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randint(0, 2, (k, *p.shape), generator=g).to(p.dtype) * 2 - 1
        for p in model.parameters()
        if p.requires_grad
    ]


def reference_terms(model: nn.Module, crit, inputs, targets, vs: list[torch.Tensor]) -> torch.Tensor:
    """``v_k^T H v_k`` by plain double backward (math attention)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):
        loss = crit(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    terms = []
    for k in range(vs[0].shape[0]):
        hv = torch.autograd.grad(grads, params, [v[k] for v in vs], retain_graph=True, allow_unused=True)
        terms.append(sum((v[k] * h).sum() for v, h in zip(vs, hv, strict=True) if h is not None))
    return torch.stack(terms)


def has_double_backward(model, crit, inputs, targets) -> bool:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(crit(model(inputs), targets), params, create_graph=True)
    try:
        torch.autograd.grad(sum(g.sum() for g in grads), params, allow_unused=True)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", MODELS)
def test_default_engine_matches_exact_double_backward(name, loss):
    model, reference, inputs, targets = setup(name, loss)
    crit = criterion(loss)
    vs = probes_for(model)
    expected = reference_terms(reference, crit, inputs, targets, vs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = regops.hessian.trace(model, crit, inputs, targets, probes=vs)
    fell_back = [str(c.message) for c in caught if "falling back to finite_difference" in str(c.message)]
    if name == "regops_fused" and not has_double_backward(model, crit, inputs, targets):
        assert fell_back and est.engine == "finite_difference"  # auto says so and uses central differences
        torch.testing.assert_close(est.samples, expected, rtol=1e-5, atol=1e-6)
    else:
        # custom ops with a double backward but no forward-mode rule take the batched double backward
        exact = "double_backward" if name == "regops_fused" else "forward_over_reverse"
        assert not fell_back and est.engine == exact
        torch.testing.assert_close(est.samples, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("hvp", ["double_backward", "forward_over_reverse", "loop", "finite_difference"])
def test_every_engine_on_gpt2_with_default_attention(hvp):
    model, reference, inputs, targets = setup("gpt2", "cross_entropy")
    assert model.model.config._attn_implementation == "sdpa"  # the fused kernel, with no double backward
    crit = criterion("cross_entropy")
    vs = probes_for(model)
    expected = reference_terms(reference, crit, inputs, targets, vs)
    est = regops.hessian.trace(model, crit, inputs, targets, probes=vs, hvp=hvp)
    tol = dict(rtol=1e-5, atol=1e-6) if hvp == "finite_difference" else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(est.samples, expected, **tol)


def test_fused_ops_model_explicit_engines():
    model, reference, inputs, targets = setup("regops_fused", "cross_entropy")
    crit = criterion("cross_entropy")
    vs = probes_for(model)
    expected = reference_terms(reference, crit, inputs, targets, vs)
    est = regops.hessian.trace(model, crit, inputs, targets, probes=vs, hvp="finite_difference")
    torch.testing.assert_close(est.samples, expected, rtol=1e-5, atol=1e-6)
    if not has_double_backward(model, crit, inputs, targets):
        with pytest.raises(RuntimeError, match="no double backward.*finite_difference"):
            regops.hessian.trace(model, crit, inputs, targets, probes=vs, hvp="loop")
        with pytest.raises(RuntimeError, match="no double backward.*differentiable curvature penalty"):
            regops.hessian.trace_penalty(crit(model(inputs), targets), model)
