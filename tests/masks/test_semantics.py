"""lora_dropout is F.linear(regops.dropout(x, p), A) with the same mask bits, saves nothing of x's size but x, and
keeps the expected fraction; regops.nn.LoRALinear; the swap of PEFT's LoRA Linear gives PEFT's outputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import regops
from regops.testing import make_tensor


def _composition(x, A, p, seed):
    torch.manual_seed(seed)
    return F.linear(regops.dropout(x, p), A)


@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 37), (1, 1)])
def test_float64_equals_linear_of_dropout_forward_and_grads(shape):
    x = make_tensor(shape, torch.float64, requires_grad=True)
    A = make_tensor((6, shape[-1]), torch.float64, seed=1, requires_grad=True)
    g = make_tensor((*shape[:-1], 6), torch.float64, seed=2)
    torch.manual_seed(11)
    y = regops.lora_dropout(x, A, 0.3)
    dx, dA = torch.autograd.grad(y, (x, A), g)
    y_ref = _composition(x, A, 0.3, 11)
    dx_ref, dA_ref = torch.autograd.grad(y_ref, (x, A), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dA, dA_ref, rtol=1e-13, atol=1e-13)


def test_generator_reproduces_and_matches_dropout():
    x = make_tensor((33, 20), torch.float64)
    A = make_tensor((4, 20), torch.float64, seed=1)
    a = regops.lora_dropout(x, A, 0.5, generator=torch.Generator().manual_seed(3))
    b = regops.lora_dropout(x, A, 0.5, generator=torch.Generator().manual_seed(3))
    c = F.linear(regops.dropout(x, 0.5, generator=torch.Generator().manual_seed(3)), A)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


def test_saves_nothing_of_x_size_but_x():
    x = make_tensor((64, 48), torch.float32, requires_grad=True)
    A = make_tensor((8, 48), torch.float32, seed=1, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = regops.lora_dropout(x, A, 0.2)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in big)
    assert sum(t.numel() for t in saved if t.numel() < x.numel()) <= A.numel() + 3  # A, p, 2 seed words
    y.sum().backward()
    # PEFT's composition keeps a dropped copy (and torch's mask) of x's size for lora_A's backward
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(F.dropout(x, 0.2), A)
    assert (
        sum(t.numel() for t in saved if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
        >= 2 * x.numel()
    )


def test_keep_fraction_and_unbiased():
    n = 1 << 16
    x = torch.ones(n, 1, dtype=torch.float64)
    A = torch.ones(1, 1, dtype=torch.float64)
    for p in (0.1, 0.5):
        y = regops.lora_dropout(x, A, p, generator=torch.Generator().manual_seed(5))
        kept = (y != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)


def test_eval_and_p_zero_are_linear():
    x, A = make_tensor((5, 8)), make_tensor((3, 8), seed=1)
    assert torch.equal(regops.lora_dropout(x, A, 0.5, training=False), F.linear(x, A))
    assert torch.equal(regops.lora_dropout(x, A, 0.0), F.linear(x, A))


def test_compiles_fullgraph_with_runtime_p():
    x, A = make_tensor((5, 8)), make_tensor((3, 8), seed=1)
    fn = torch.compile(lambda x, A, p: regops.lora_dropout(x, A, p), fullgraph=True, backend="eager")
    torch.manual_seed(0)
    a = fn(x, A, torch.tensor(0.3, dtype=torch.float64))
    torch.manual_seed(0)
    assert torch.equal(a, regops.lora_dropout(x, A, 0.3))


# ------------------------------------------------------------------------------------------------ LoRALinear
def test_lora_linear_forward_merge_and_training():
    base = torch.nn.Linear(16, 10, dtype=torch.float64)
    layer = regops.nn.LoRALinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=0.25)
    torch.nn.init.normal_(layer.lora_B)
    x = make_tensor((3, 16), torch.float64)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    expected = base(x) + F.linear(F.linear(regops.dropout(x, 0.25), layer.lora_A), layer.lora_B) * 2.0
    torch.testing.assert_close(y, expected, rtol=1e-13, atol=1e-13)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.merged()(x), rtol=1e-12, atol=1e-12)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert "r=4" in repr(layer)
    with pytest.raises(ValueError, match="r must"):
        regops.nn.LoRALinear(4, 4, r=0)


# ------------------------------------------------------------------------------------------------ PEFT
def _peft_model(dropout=0.1, **cfg):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).double()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"], **cfg)
    model = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    return model


def _with_regops_dropout(model):
    """PEFT's own forward, its dropout modules replaced by regops.nn.Dropout (the same mask as lora_dropout)."""
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for key, d in drops.items():
                if type(d) is torch.nn.Dropout:
                    drops[key] = regops.nn.Dropout.from_module(d)
    return model


def test_peft_swap_gives_peft_outputs_and_gradients():
    from peft.tuners.lora.layer import Linear as PeftLinear

    model = _peft_model()
    reference = _with_regops_dropout(copy.deepcopy(model))
    handle = regops.patch(model)
    swapped = [m for m in model.modules() if isinstance(m, regops.nn.PeftLoRALinear)]
    assert len(swapped) == 2 and all(isinstance(m, PeftLinear) for m in swapped)
    model.train(), reference.train()
    x = make_tensor((9, 12), torch.float64)
    torch.manual_seed(4)
    y = model(x)
    torch.manual_seed(4)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    grads = torch.autograd.grad(y.sum(), [p for p in model.parameters() if p.requires_grad])
    grads_ref = torch.autograd.grad(y_ref.sum(), [p for p in reference.parameters() if p.requires_grad])
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    model.eval()
    torch.testing.assert_close(model(x), reference.eval()(x), rtol=1e-13, atol=1e-13)
    model.merge_adapter()  # PEFT's methods keep working on the swapped modules
    torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)
    model.unmerge_adapter()
    handle.revert()
    assert not any(isinstance(m, regops.nn.PeftLoRALinear) for m in model.modules())


def test_peft_swap_leaves_unsupported_cases_to_peft():
    model = _peft_model(use_dora=True)
    reference = _with_regops_dropout(copy.deepcopy(model))
    regops.patch(model)
    x = make_tensor((4, 12), torch.float64)
    torch.manual_seed(2)
    y = model(x)
    torch.manual_seed(2)
    torch.testing.assert_close(y, reference(x), rtol=1e-13, atol=1e-13)


def test_peft_swap_without_dropout():
    model = _peft_model(dropout=0.0)
    reference = copy.deepcopy(model)
    regops.patch(model)
    x = make_tensor((4, 12), torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-13, atol=1e-13)
