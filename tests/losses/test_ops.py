"""The regularized cross-entropy's kernels (Triton under the interpreter on CPU, Triton on a GPU) against the
reference: every option, class weights, softcap, mixed pairs and top-k targets, several vocabulary blocks per row
and vocabularies above 2**17; the linear form; opcheck and torch.compile; launch grids for 2**20 rows."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import launch
from regops._core.dtypes import acc_dtype
from regops.losses import ops
from regops.losses import reference as R
from regops.losses import triton as TR
from regops.losses._options import LossOptions
from tests.losses.helpers import F64, data, grad_of

_KERNEL_CASES = [  # (J, decoupled, class weights, softcap)
    (1, 0.0, False, 0.0),
    (1, 0.0, True, 4.0),
    (2, 0.5, False, 0.0),
    (2, 0.5, True, 3.0),
    (4, 0.0, False, 0.0),
]


@pytest.mark.ops("cross_entropy", "cross_entropy_backward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("case", range(len(_KERNEL_CASES)))
def test_kernels_match_reference(kernel_target, dtype, case):
    _, device = kernel_target
    n_targets, dec, has_cw, cap = _KERNEL_CASES[case]
    g = torch.Generator().manual_seed(case)
    n, k = 5, 37
    acc = acc_dtype(dtype)
    x = (3 * torch.randn(n, k, generator=g)).to(dtype)
    idx = torch.randint(0, k, (n, n_targets), generator=g)
    idx[0, -1] = idx[0, 0]
    tw = torch.rand(n, n_targets, generator=g, dtype=acc)
    rw = torch.rand(n, generator=g, dtype=acc)
    rw[1] = 0
    cw = (torch.rand(k, generator=g, dtype=acc) + 0.5) if has_cw else None
    opts = LossOptions(0.1, 0.2, 0.01, 0.3, dec, cap, 0.9).values()
    cpu = (idx, tw, rw, cw)
    dev = tuple(None if t is None else t.to(device) for t in cpu)
    out = ops.cross_entropy(x.to(device), *dev, opts, True)
    ref = R.cross_entropy(x, *cpu, opts, True)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, **tol)
    g_up = torch.randn(n, generator=g, dtype=acc)
    gk = ops.cross_entropy_backward(g_up.to(device), x.to(device), *dev, ref[1].to(device), ref[2].to(device), opts)
    gr = R.cross_entropy_backward(g_up, x, *cpu, ref[1], ref[2], opts)
    assert gk.dtype == dtype
    if dtype == torch.bfloat16:  # both round once from float32: at most one bf16 ulp apart
        assert bool(((gk.cpu().float() - gr.float()).abs() <= gr.float().abs() * 2**-7 + 1e-6).all())
    else:
        torch.testing.assert_close(gk.cpu(), gr, **tol)


@pytest.mark.ops("cross_entropy", "cross_entropy_backward", backends=("triton",))
def test_kernel_public_api_and_blocked_vocabulary(kernel_target):
    """Through the op (autograd), several vocabulary blocks per row, with ignore_index and statistics."""
    _, device = kernel_target
    x, y, _ = data(n=6, k=50, seed=12, dtype=torch.float32)
    y[2] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, maxsup=0.1, confidence_penalty=0.05, return_stats=True)
    real = TR._block
    try:
        TR._block = lambda n_cols, dev: 16  # 4 blocks per row
        loss, st = regops.cross_entropy(x.detach().to(device).requires_grad_(), y.to(device), **kw)
        xd = x.detach().to(device).requires_grad_()
        loss = regops.cross_entropy(xd, y.to(device), **kw)[0]
        gk = grad_of(loss, xd)
    finally:
        TR._block = real
    with regops.use_backend("torch"):
        loss_r, st_r = regops.cross_entropy(x, y, **kw)
        gr = grad_of(loss_r, x)
    torch.testing.assert_close(loss.cpu(), loss_r)
    torch.testing.assert_close(gk.cpu(), gr)
    for a, b in zip(st, st_r, strict=True):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.ops("cross_entropy", "cross_entropy_backward", backends=("triton",))
def test_kernel_vocabulary_above_2_pow_17(kernel_target, monkeypatch):
    _, device = kernel_target
    if device.type == "cpu":  # the interpreter: one big block per row is cheapest
        monkeypatch.setattr(TR, "_block", lambda n_cols, dev: 1 << 18)
    k = (1 << 17) + 3
    g = torch.Generator().manual_seed(18)
    x = torch.randn(2, k, generator=g)
    y = torch.tensor([5, k - 1])
    kw = dict(label_smoothing=0.1, z_loss=1e-3, maxsup=0.1, return_stats=True)
    xd = x.to(device).requires_grad_()
    loss, st = regops.cross_entropy(xd, y.to(device), **kw)
    gk = grad_of(loss, xd)
    with regops.use_backend("torch"):
        xr = x.clone().requires_grad_()
        loss_r, st_r = regops.cross_entropy(xr, y, **kw)
        gr = grad_of(loss_r, xr)
    tol = dict(rtol=1e-5, atol=1e-5)  # float32 sums over 131k terms in different orders
    torch.testing.assert_close(loss.cpu(), loss_r, **tol)
    torch.testing.assert_close(gk.cpu(), gr, **tol)
    for a, b in zip(st, st_r, strict=True):
        torch.testing.assert_close(a.cpu(), b, **tol)


def test_launch_grids_stay_within_cuda_limits_for_2_pow_20_rows():
    n, k = 1 << 20, 128256
    x = torch.empty(n, k, device="meta", dtype=torch.bfloat16)
    idx = torch.empty(n, 2, device="meta", dtype=torch.long)
    tw = torch.empty(n, 2, device="meta")
    rw = torch.empty(n, device="meta")
    opts = LossOptions(0.1, 0.0, 1e-4, 0.0, 0.5, 0.0, 1.0).values()
    with launch.recording() as launches:
        loss, stats, amax = TR.cross_entropy(x, idx, tw, rw, None, opts, True)
        TR.cross_entropy_backward(rw, x, idx, tw, rw, None, stats, amax, opts)
    assert [lc.kernel for lc in launches] == ["ce_fwd_kernel", "ce_bwd_kernel"]
    for lc in launches:
        launch.check_grid(lc.grid)
        assert lc.grid == (n,)


@pytest.mark.ops("linear_cross_entropy", "linear_cross_entropy_backward", "linear_cross_entropy_with_grad")
def test_linear_cross_entropy_gradcheck_and_kernels(kernel_target):
    _, device = kernel_target
    g = torch.Generator().manual_seed(14)
    h = torch.randn(3, 4, dtype=F64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=F64, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (3,), generator=g)
    with regops.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda h, w: regops.linear_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=0.01, reduction="none"),
            (h, w),
        )
        ref = regops.linear_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=0.01)
        gref = torch.autograd.grad(ref, (h, w))
    hd, wd = h.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_()
    out = regops.linear_cross_entropy(hd, wd, y.to(device), label_smoothing=0.1, z_loss=0.01)
    got = torch.autograd.grad(out, (hd, wd))
    torch.testing.assert_close(out.cpu(), ref)
    for a, c in zip(got, gref, strict=True):
        torch.testing.assert_close(a.cpu(), c)


def test_opcheck_and_compile():
    x, y, g = data(n=4, k=7, seed=15, dtype=torch.float32)
    idx = y[:, None]
    tw = torch.ones(4, 1)
    rw = torch.ones(4)
    opts = LossOptions(0.1, 0.1, 1e-3, 0.1, 0.0, 5.0, 1.0).values()
    torch.library.opcheck(torch.ops.regops.cross_entropy, (x, idx, tw, rw, torch.rand(7), opts, True))
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(7, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.regops.linear_cross_entropy, (h, w, torch.randn(7), idx, tw, rw, None, opts, False))
    torch.library.opcheck(torch.ops.regops.linear_cross_entropy_with_grad, (h, w, None, idx, tw, rw, None, opts, True))

    def f(x, y):
        return regops.cross_entropy(x * 1.0, y, label_smoothing=0.1, z_loss=1e-3, ignore_index=3)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, y), f(x, y))
    torch.testing.assert_close(grad_of(compiled(x, y), x), grad_of(f(x, y), x))
