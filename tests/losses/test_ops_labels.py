"""``regops::label_cross_entropy``, the op behind ``regops.cross_entropy`` with integer labels: every backend
against the reference, the same bits as ``regops::cross_entropy`` on the targets the general path builds (then
reduced, forward and backward), out-of-range labels, an all-ignored batch, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch
from regops._core.dtypes import acc_dtype
from regops.losses import ops
from regops.losses import reference as R
from regops.losses._options import LossOptions
from regops.losses._targets import label_targets, reduce_rows
from tests.losses.helpers import F64, grad_of

OPS = ("label_cross_entropy", "label_cross_entropy_backward")
_OPTIONS = [LossOptions(), LossOptions(0.1), LossOptions(0.1, 0.2, 0.01, 0.3, 0.0, 3.0, 0.9)]


def _inputs(dtype, seed, ignore=True, class_weight=False):
    g = torch.Generator().manual_seed(seed)
    n, k = 7, 13
    x = (3 * torch.randn(n, k, generator=g)).to(dtype)
    y = torch.randint(0, k, (n,), generator=g)
    if ignore:
        y[1] = y[4] = -100
    cw = (torch.rand(k, generator=g, dtype=acc_dtype(dtype)) + 0.5) if class_weight else None
    return x, y, cw


def _general_path(x, y, cw, options, reduction):
    """What regops.cross_entropy computed for labels before this op: targets, regops::cross_entropy, reduction."""
    tg = label_targets(y, x.shape[1], acc_dtype(x), -100, cw)
    rows = ops.cross_entropy(x, tg.index, tg.tweight, tg.row_weight, tg.class_weight, options, False)[0]
    return reduce_rows(rows, reduction, tg.denominator, rows.shape)


@pytest.mark.ops(*OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("class_weight", [False, True])
def test_kernels_match_reference(kernel_target, dtype, reduction, class_weight):
    _, device = kernel_target
    x, y, cw = _inputs(dtype, 1, class_weight=class_weight)
    opts = _OPTIONS[2].values()
    dev = (x.to(device), y.to(device), None if cw is None else cw.to(device))
    out = ops.label_cross_entropy(*dev, -100, opts, reduction)
    ref = R.label_cross_entropy(x, y, cw, -100, opts, reduction)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    assert out[0].shape == ref[0].shape == ((7,) if reduction == "none" else ())
    torch.testing.assert_close(out[0].cpu(), ref[0], **tol)
    torch.testing.assert_close(out[1][:, 0].cpu(), ref[1][:, 0], **tol)  # lse: what the backward reads
    up = torch.randn(ref[0].shape, dtype=acc_dtype(dtype), generator=torch.Generator().manual_seed(2))
    gk = ops.label_cross_entropy_backward(up.to(device), *dev, ref[1].to(device), ref[2].to(device), -100, opts,
                                          reduction)  # fmt: skip
    gr = R.label_cross_entropy_backward(up, x, y, cw, ref[1], ref[2], -100, opts, reduction)
    assert gk.dtype == dtype
    if dtype == torch.bfloat16:  # both round once from float32: at most one bf16 ulp apart
        assert bool(((gk.cpu().float() - gr.float()).abs() <= gr.float().abs() * 2**-7 + 1e-6).all())
    else:
        torch.testing.assert_close(gk.cpu(), gr, **tol)


@pytest.mark.ops(*OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("options", range(len(_OPTIONS)))
def test_same_bits_as_the_general_path(kernel_target, dtype, options):
    """regops.cross_entropy of labels (this op) gives the losses and gradients of regops::cross_entropy on the
    targets the general path builds, reduced by the same ops, bit for bit: ignored rows, class weights, reductions."""
    _, device = kernel_target
    opts = _OPTIONS[options]
    kw = dict(label_smoothing=opts.smoothing, maxsup=opts.maxsup, z_loss=opts.z_loss,
              confidence_penalty=opts.confidence, softcap=opts.softcap or None, logit_scale=opts.scale)  # fmt: skip
    for seed, (ignore, has_cw) in enumerate([(False, False), (True, False), (True, True), (False, True)]):
        x, y, cw = _inputs(dtype, seed, ignore, has_cw)
        x, y, cw = x.to(device), y.to(device), None if cw is None else cw.to(device)
        for reduction in ("mean", "sum", "none"):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            loss = regops.cross_entropy(xa, y, weight=cw, reduction=reduction, **kw)
            expected = _general_path(xb, y, cw, opts.values(), reduction)
            up = torch.rand(loss.shape, dtype=loss.dtype, device=device) + 0.5
            assert torch.equal(loss, expected), (seed, reduction)
            assert torch.equal(grad_of((loss * up).sum(), xa), grad_of((expected * up).sum(), xb)), (seed, reduction)


@pytest.mark.ops(*OPS)
def test_all_ignored_gives_zero_and_out_of_range_labels(kernel_target):
    _, device = kernel_target
    x = torch.randn(3, 5, device=device, requires_grad=True)
    for reduction in ("mean", "sum"):
        loss = regops.cross_entropy(x, torch.full((3,), -100, device=device), reduction=reduction)
        assert loss.item() == 0.0
        assert not grad_of(loss, x).any()
    bad = torch.tensor([0, 5, 1], device=device)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="class index 5, outside"):
            regops.cross_entropy(x, bad)
    else:  # no host sync on a GPU: the row gives NaN
        assert torch.isnan(regops.cross_entropy(x, bad, reduction="none")[1])


@pytest.mark.ops(*OPS, backends=("cpp",))
def test_public_function_reaches_the_cpp_derivative(kernel_target):
    assert dispatch.native_autograd(ops.label_cross_entropy)
    with regops.use_backend("torch"):
        assert not dispatch.native_autograd(ops.label_cross_entropy)


def test_opcheck_and_compile():
    x, y, cw = _inputs(torch.float32, 3, class_weight=True)
    x.requires_grad_()
    opts = _OPTIONS[2].values()
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.regops.label_cross_entropy, (x, y, cw, -100, opts, reduction))

    def f(x, y):
        return regops.cross_entropy(x * 1.0, y, weight=cw, label_smoothing=0.1, z_loss=1e-3)

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x, y), f(x, y))
    assert torch.equal(grad_of(compiled(x, y), x), grad_of(f(x, y), x))
