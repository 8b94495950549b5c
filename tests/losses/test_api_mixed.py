"""The MixUp / CutMix losses and R-Drop's symmetric KL through their public functions: float64 math on every path,
gradcheck and double backward, low precision, no ``B x C`` tensor but the gradient, what autograd saves, torch's
composition, opcheck, torch.compile and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regops
from regops.testing import make_tensor

F64 = torch.float64


def test_mix_cross_entropy_gradcheck_and_low_precision():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (5,), generator=gen)
    _, mix = regops.mix_batch(torch.zeros(5, 2), y, mixup_alpha=1.0, mode="elem", generator=gen)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: regops.mix_cross_entropy(t, mix, 0.1), (z,), atol=1e-5)
    zb = z.detach().bfloat16().requires_grad_()
    loss = regops.mix_cross_entropy(zb, mix, 0.1)
    (g,) = torch.autograd.grad(loss, zb)
    assert g.dtype == torch.bfloat16
    ref = regops.mix_cross_entropy(zb.detach().double().requires_grad_(), mix, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def _allocation_sizes(fn) -> list[int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


def test_mix_cross_entropy_allocates_no_b_by_c_tensor_but_the_gradient():
    batch, classes = 512, 32768  # B x C is twice the reference's row block
    y = torch.randint(0, classes, (batch,))
    _, mix = regops.mix_batch(torch.zeros(batch, 2), y, mixup_alpha=1.0, mode="elem")
    z = torch.randn(batch, classes, requires_grad=True)
    bxc = batch * classes * 4
    forward_allocs = _allocation_sizes(lambda: regops.mix_cross_entropy(z, mix, 0.1))
    assert max(forward_allocs) <= bxc // 2
    loss = regops.mix_cross_entropy(z, mix, 0.1)
    backward_allocs = _allocation_sizes(lambda: torch.autograd.grad(loss, z))
    assert sum(1 for a in backward_allocs if a > bxc // 2) == 1  # the gradient itself


def test_mixed_losses_bad_input_raises_clear_errors():
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    _, mix = regops.mix_batch(x, y, num_classes=4)
    with pytest.raises(ValueError, match="classes"):
        regops.mix_cross_entropy(torch.randn(4, 5), mix)
    with pytest.raises(ValueError, match="rows"):
        regops.mix_cross_entropy(torch.randn(3, 4), mix)
    with pytest.raises(TypeError, match="MixedBatch"):
        regops.mix_cross_entropy(torch.randn(4, 4), y)
    with pytest.raises(ValueError, match="shape"):
        regops.soft_target_cross_entropy(torch.randn(4, 4), torch.rand(4, 5))
    with pytest.raises(ValueError, match="reduction"):
        regops.mix_binary_cross_entropy(torch.randn(4, 4), mix, reduction="none")
    with pytest.raises(ValueError, match="pos_weight"):
        regops.mix_binary_cross_entropy(torch.randn(4, 4), mix, pos_weight=torch.ones(3))


def _mix(batch=6, classes=9, seed=0, smoothing=0.1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (batch,), generator=g)
    _, mix = regops.mix_batch(torch.randn(batch, 3, 4, 4, generator=g), y, mixup_alpha=1.0, mode="elem",
                              label_smoothing=smoothing, generator=g)  # fmt: skip
    return mix, g


def _dense_float64_targets(mix, classes, smoothing):
    off, on = smoothing / classes, 1 - smoothing + smoothing / classes
    lam = mix.params.lam.view(-1, 1)
    ya = torch.full((len(lam), classes), off, dtype=F64).scatter_(1, mix.target_a[:, None], on)
    yb = torch.full((len(lam), classes), off, dtype=F64).scatter_(1, mix.target_b[:, None], on)
    return lam * ya + (1 - lam) * yb


def test_float64_logits_get_float64_math_in_every_mixed_loss():
    mix, g = _mix(seed=1)
    z = torch.randn(6, 9, dtype=F64, generator=g, requires_grad=True)
    t = _dense_float64_targets(mix, 9, 0.1)
    ce = regops.mix_cross_entropy(z, mix)
    ref = (-(t * torch.log_softmax(z, 1)).sum(1)).mean()
    torch.testing.assert_close(ce, ref, rtol=0, atol=1e-13)
    # binary CE with float64 weights: not rounded to float32
    w = torch.rand(9, dtype=F64, generator=g) + 1 / 3
    pw = torch.rand(9, dtype=F64, generator=g) + 1 / 3
    bce = regops.mix_binary_cross_entropy(z, mix, weight=w, pos_weight=pw)
    bref = F.binary_cross_entropy_with_logits(z, t, weight=w, pos_weight=pw)
    torch.testing.assert_close(bce, bref, rtol=0, atol=1e-13)
    gz = torch.autograd.grad(bce, z)[0]
    torch.testing.assert_close(gz, torch.autograd.grad(bref, z)[0], rtol=0, atol=1e-14)
    # soft-target CE: the gradient with respect to float64 targets is float64 math
    soft = t.clone().requires_grad_()
    st = regops.soft_target_cross_entropy(z, soft)
    st_ref = (-(soft * torch.log_softmax(z, 1)).sum(1)).mean()
    got, want = torch.autograd.grad(st, (z, soft)), torch.autograd.grad(st_ref, (z, soft))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_symmetric_kl_double_backward():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(2, 5, dtype=F64, generator=g, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, y: regops.symmetric_kl(x, y, reduction="none"), (a, b))

    def eager(x, y):
        lx, ly = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        return (0.5 * ((lx.exp() - ly.exp()) * (lx - ly)).sum(-1)).mean()

    v = torch.randn(2, 5, dtype=F64, generator=g)
    hvps = []
    for fn in (regops.symmetric_kl, eager):  # Hessian-vector product with respect to a
        (ga,) = torch.autograd.grad(fn(a, b), a, create_graph=True)
        hvps.append(torch.autograd.grad((ga * v).sum(), (a, b)))
    for x, y in zip(*hvps, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def _saved(fn):
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def _skl_torch(a, b):
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl_ab = F.kl_div(lb, la, log_target=True, reduction="none").sum(-1)  # KL(p_a || p_b)
    kl_ba = F.kl_div(la, lb, log_target=True, reduction="none").sum(-1)
    return 0.5 * (kl_ab + kl_ba)


def test_symmetric_kl_matches_torch_composition_with_grads():
    a = make_tensor((4, 3, 50), torch.float64, requires_grad=True, seed=1, low=-5, high=5)
    b = make_tensor((4, 3, 50), torch.float64, requires_grad=True, seed=2)
    for reduction in ("mean", "sum", "none"):
        ours = regops.symmetric_kl(a, b, reduction=reduction, class_dim=-1)
        ref = _skl_torch(a, b)
        ref = ref.mean() if reduction == "mean" else ref.sum() if reduction == "sum" else ref
        torch.testing.assert_close(ours, ref)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(ours, (a, b), g), torch.autograd.grad(ref, (a, b), g))
    assert torch.autograd.gradcheck(lambda x, y: regops.symmetric_kl(x, y, reduction="none"), (a[0], b[0]))
    assert regops.symmetric_kl(a, a, class_dim=-1).abs().item() < 1e-12


def test_symmetric_kl_memory_opcheck_compile_errors():
    a, b = torch.randn(8, 5000, requires_grad=True), torch.randn(8, 5000, requires_grad=True)
    loss, sizes = _saved(lambda: regops.symmetric_kl(a, b))
    assert sum(s for s, _ in sizes) <= 2 * a.numel() * 4 + 8 * 4 * 4 + 64  # the logits themselves + stats
    loss.backward()
    torch.library.opcheck(torch.ops.regops.symmetric_kl, (a, b))
    torch._dynamo.reset()
    f = torch.compile(lambda x, y: regops.symmetric_kl(x * 1, y), fullgraph=True)
    torch.testing.assert_close(f(a, b), _skl_torch(a, b).mean())
    with pytest.raises(ValueError, match="same shape and dtype"):
        regops.symmetric_kl(a, b[:, :10])
    with pytest.raises(ValueError, match="reduction"):
        regops.symmetric_kl(a, b, reduction="batchmean")
    with pytest.raises(ValueError, match="V > 0"):
        regops.symmetric_kl(torch.randn(2, 0), torch.randn(2, 0))
