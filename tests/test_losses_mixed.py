"""The mixed / soft-target losses and R-Drop's symmetric KL in the losses family: float64 math on every path,
launch grids within CUDA's limits for 2**20 rows (computed on meta tensors, nothing launched), double backward
of symmetric_kl, and the old import paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regops
from regops._core import launch
from regops.reference import losses as R

F64 = torch.float64
MIXED_LOSS_OPS = tuple(
    f"{name}{part}"
    for name in ("mix_cross_entropy", "soft_target_cross_entropy", "mix_binary_cross_entropy")
    for part in ("", "_backward")
)


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


@pytest.mark.ops(*MIXED_LOSS_OPS)
@pytest.mark.parametrize("name", ["mix_cross_entropy", "soft_target_cross_entropy", "mix_binary_cross_entropy"])
def test_mixed_loss_kernels_compute_float64_in_float64(kernel_target, name):
    _, device = kernel_target
    mix, g = _mix(seed=2)
    z = torch.randn(6, 9, dtype=F64, generator=g)
    soft = torch.rand(6, 9, dtype=F64, generator=g)
    lam = mix.params.lam
    w = torch.rand(9, dtype=F64, generator=g)
    args = {
        "mix_cross_entropy": (z, mix.target_a, mix.target_b, lam, 0.1),
        "soft_target_cross_entropy": (z, soft),
        "mix_binary_cross_entropy": (z, mix.target_a, mix.target_b, lam, 0.1, None, w, w),
    }[name]
    out = regops._backend.implementation(name, device)(*[a.to(device) if torch.is_tensor(a) else a for a in args])
    ref = getattr(R, name)(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,), strict=True):
        assert a.dtype == F64
        torch.testing.assert_close(a.cpu(), b, rtol=1e-13, atol=1e-13)
    grad = torch.randn(6, dtype=F64, generator=g)
    bwd_args = {
        "mix_cross_entropy": lambda r: (grad, z, r[1], *args[1:]),
        "soft_target_cross_entropy": lambda r: (grad, z, r[1], soft),
        "mix_binary_cross_entropy": lambda r: (grad, *args),
    }[name](ref if isinstance(ref, tuple) else None)
    gk = regops._backend.implementation(f"{name}_backward", device)(
        *[a.to(device) if torch.is_tensor(a) else a for a in bwd_args]
    )
    torch.testing.assert_close(gk.cpu(), getattr(R, f"{name}_backward")(*bwd_args), rtol=1e-13, atol=1e-13)


def test_loss_and_mix_grids_stay_within_cuda_limits_for_2_pow_20_rows():
    from regops.kernels import losses as KL
    from regops.kernels import mix as KM
    from regops.kernels import symmetric_kl as KS

    n, c = 1 << 20, 1000
    meta = dict(device="meta")
    z = torch.empty(n, c, **meta)
    ab = torch.empty(n, dtype=torch.long, **meta)
    lam = torch.empty(n, **meta)
    with launch.recording() as launches:
        loss, lse = KL.mix_cross_entropy(z, ab, ab, lam, 0.1)
        KL.mix_cross_entropy_backward(lam, z, lse, ab, ab, lam, 0.1)
        loss, stats = KL.soft_target_cross_entropy(z, z)
        KL.soft_target_cross_entropy_backward(lam, z, stats, z)
        KL.mix_binary_cross_entropy(z, ab, ab, lam, 0.1, 0.2, None, None)
        KL.mix_binary_cross_entropy_backward(lam, z, ab, ab, lam, 0.1, 0.2, None, None)
        loss, stats = KS.symmetric_kl(z, z)
        KS.symmetric_kl_backward(lam, z, z, stats)
        images = torch.empty(n, 3, 8, 8, **meta)  # a batch of 2**20 images
        w = torch.empty(n, **meta)
        box = torch.empty(n, 4, dtype=torch.long, **meta)
        KM.mix_apply(images, w, w, ab, box)
        KM.mix_apply_backward(images, w, w, ab, box)
    assert len(launches) == 10
    for lc in launches:
        launch.check_grid(lc.grid, lc.kernel)
    assert launches[-1].meta["enable_fp_fusion"] is False  # the mix kernel rounds like the reference on a GPU


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
