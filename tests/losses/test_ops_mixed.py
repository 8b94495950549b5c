"""The mixed / soft-target losses' and symmetric KL's kernels (Triton under the interpreter on CPU, Triton on a GPU)
against the references, float64 computed in float64, launch grids for 2**20 rows; opcheck; mixing and the losses
under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import launch
from regops.losses import ops
from regops.losses import reference_mixed as RM
from regops.losses import triton as TR
from regops.mix import ops as mix_ops
from regops.testing import make_tensor

F64 = torch.float64
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
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


def _example_params(batch: int, height: int, width: int, seed: int = 0) -> regops.MixParams:
    torch.manual_seed(seed)
    return regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", partner="random").sample_params(
        torch.zeros(batch, 1, height, width)
    )


def _reference(fn, *args):
    with regops.use_backend("torch"):
        return fn(*args)


@pytest.mark.ops(*MIXED_LOSS_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_cols", [1, 37, 300])
def test_loss_kernels_match_reference(kernel_target, dtype, n_cols):
    _, device = kernel_target
    gen = torch.Generator().manual_seed(n_cols)
    rows = 5
    z = (3 * torch.randn(rows, n_cols, generator=gen)).to(device=device, dtype=dtype)
    ta = torch.randint(0, n_cols, (rows,), generator=gen).to(device)
    tb = torch.randint(0, n_cols, (rows,), generator=gen).to(device)
    tb[0] = ta[0]
    lam = torch.rand(rows, generator=gen).to(device)
    g = torch.randn(rows, generator=gen).to(device)
    soft = torch.rand(rows, n_cols, generator=gen).to(device=device, dtype=dtype)
    w, pw = torch.rand(n_cols, generator=gen).to(device), (3 * torch.rand(n_cols, generator=gen)).to(device)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    cases = [
        (
            "mix_cross_entropy",
            (z, ta, tb, lam, 0.1),
            lambda out: ("mix_cross_entropy_backward", (g, z, out[1], ta, tb, lam, 0.1)),
        ),
        (
            "soft_target_cross_entropy",
            (z, soft),
            lambda out: ("soft_target_cross_entropy_backward", (g, z, out[1], soft)),
        ),
        (
            "mix_binary_cross_entropy",
            (z, ta, tb, lam, 0.1, 0.2, w, pw),
            lambda out: ("mix_binary_cross_entropy_backward", (g, z, ta, tb, lam, 0.1, 0.2, w, pw)),
        ),
        (
            "mix_binary_cross_entropy",
            (z, ta, tb, lam, 0.0, None, None, None),
            lambda out: ("mix_binary_cross_entropy_backward", (g, z, ta, tb, lam, 0.0, None, None, None)),
        ),
    ]
    for name, args, backward in cases:
        kernel_out = getattr(ops, name)(*args)
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        ref_out = getattr(RM, name)(*cpu)
        for k, r in zip(
            kernel_out if isinstance(kernel_out, tuple) else [kernel_out],
            ref_out if isinstance(ref_out, tuple) else [ref_out],
            strict=True,
        ):
            torch.testing.assert_close(k.cpu(), r, **tol)
        bname, bargs = backward(ref_out if isinstance(ref_out, tuple) else None)
        bargs = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in bargs)
        kb = getattr(ops, bname)(*bargs)
        rb = getattr(RM, bname)(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in bargs])
        torch.testing.assert_close(kb.cpu().float(), rb.float(), **tol)


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
    out = getattr(ops, name)(*[a.to(device) if torch.is_tensor(a) else a for a in args])
    ref = getattr(RM, name)(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,), strict=True):
        assert a.dtype == F64
        torch.testing.assert_close(a.cpu(), b, rtol=1e-13, atol=1e-13)
    grad = torch.randn(6, dtype=F64, generator=g)
    bwd_args = {
        "mix_cross_entropy": lambda r: (grad, z, r[1], *args[1:]),
        "soft_target_cross_entropy": lambda r: (grad, z, r[1], soft),
        "mix_binary_cross_entropy": lambda r: (grad, *args),
    }[name](ref if isinstance(ref, tuple) else None)
    gk = getattr(ops, f"{name}_backward")(*[a.to(device) if torch.is_tensor(a) else a for a in bwd_args])
    torch.testing.assert_close(gk.cpu(), getattr(RM, f"{name}_backward")(*bwd_args), rtol=1e-13, atol=1e-13)


@pytest.mark.ops("symmetric_kl", "symmetric_kl_backward")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (2, 2, 20000)], ids=str)
def test_symmetric_kl_kernel_matches_reference(kernel_target, dtype, shape):
    _, device = kernel_target
    a, b = make_tensor(shape, dtype, device, seed=1, low=-6, high=6), make_tensor(shape, dtype, device, seed=2)
    cols = shape[-1]
    a2, b2 = a.reshape(-1, cols), b.reshape(-1, cols)
    loss, stats = torch.ops.regops.symmetric_kl(a2, b2)
    loss_ref, stats_ref = _reference(torch.ops.regops.symmetric_kl, a2.cpu(), b2.cpu())
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype != torch.float64 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(loss.cpu(), loss_ref, **tol)
    g = make_tensor((a2.shape[0],), loss.dtype, device, seed=5)
    ga, gb = torch.ops.regops.symmetric_kl_backward(g, a2, b2, stats)
    ga_ref, gb_ref = _reference(torch.ops.regops.symmetric_kl_backward, g.cpu(), a2.cpu(), b2.cpu(), stats_ref)
    gtol = {"rtol": 1e-2, "atol": 1e-4} if dtype in (torch.float16, torch.bfloat16) else tol
    torch.testing.assert_close(ga.cpu(), ga_ref, **gtol)
    torch.testing.assert_close(gb.cpu(), gb_ref, **gtol)


def test_mixed_loss_and_symmetric_kl_grids_stay_within_cuda_limits_for_2_pow_20_rows():
    n, c = 1 << 20, 1000
    meta = dict(device="meta")
    z = torch.empty(n, c, **meta)
    ab = torch.empty(n, dtype=torch.long, **meta)
    lam = torch.empty(n, **meta)
    with launch.recording() as launches:
        loss, lse = TR.mix_cross_entropy(z, ab, ab, lam, 0.1)
        TR.mix_cross_entropy_backward(lam, z, lse, ab, ab, lam, 0.1)
        loss, stats = TR.soft_target_cross_entropy(z, z)
        TR.soft_target_cross_entropy_backward(lam, z, stats, z)
        TR.mix_binary_cross_entropy(z, ab, ab, lam, 0.1, 0.2, None, None)
        TR.mix_binary_cross_entropy_backward(lam, z, ab, ab, lam, 0.1, 0.2, None, None)
        loss, stats = TR.symmetric_kl(z, z)
        TR.symmetric_kl_backward(lam, z, z, stats)
    assert len(launches) == 8
    for lc in launches:
        launch.check_grid(lc.grid, lc.kernel)


def _op_samples():
    z = torch.randn(4, 9, requires_grad=True)
    ta, tb, lam = torch.tensor([0, 3, 8, 1]), torch.tensor([1, 8, 3, 0]), torch.rand(4)
    soft = torch.rand(4, 9, requires_grad=True)
    w = torch.rand(9)
    return [
        (torch.ops.regops.mix_cross_entropy.default, (z, ta, tb, lam, 0.1)),
        (torch.ops.regops.soft_target_cross_entropy.default, (z, soft)),
        (torch.ops.regops.mix_binary_cross_entropy.default, (z, ta, tb, lam, 0.1, 0.3, w, None)),
        (torch.ops.regops.mix_binary_cross_entropy.default, (z, ta, tb, lam, 0.0, None, None, w)),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    p = _example_params(4, 6, 6, seed=3)
    w_self, w_other = p.image_weights
    ta, tb, lam = torch.tensor([0, 3, 8, 1]), torch.tensor([1, 8, 3, 0]), torch.rand(4)
    mix = regops.MixedBatch(ta, tb, lam, p)

    def step(x, z):
        mixed = mix_ops.mix_apply(x, w_self, w_other, p.partner, p.box)
        return mixed.sum() + regops.mix_cross_entropy(z, mix, 0.1) + regops.soft_target_cross_entropy(z, z.softmax(1))

    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    z = torch.randn(4, 9, requires_grad=True)
    eager = step(x, z)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, z)
    torch.testing.assert_close(compiled, eager)
    gx, gz = torch.autograd.grad(compiled, (x, z))
    ex, ez = torch.autograd.grad(step(x, z), (x, z))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gz, ez)
