"""The cross-entropy kernels row by row against the reference: every option on its own and all together, every
logits dtype, class weights, ignored rows, duplicate and top-k targets, odd shapes (one class, one row, no row,
vocabularies that are not a multiple of the kernels' lanes), thread counts, non-finite logits; and the C++
derivative against the Python formula through the public function."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch
from regops._core.dtypes import acc_dtype
from regops.losses import ops
from regops.losses import reference as R
from regops.losses._options import LossOptions
from tests.losses.helpers import F64, grad_of

OPS = ("cross_entropy", "cross_entropy_backward")
DTYPES = [torch.float32, F64, torch.float16, torch.bfloat16]
# One option at a time, then all of them (decoupled needs a mixed pair: J = 2).
OPTIONS = {
    "plain": LossOptions(),
    "smoothing": LossOptions(smoothing=0.1),
    "maxsup": LossOptions(maxsup=0.2),
    "z_loss": LossOptions(z_loss=0.01),
    "confidence": LossOptions(confidence=0.3),
    "decoupled": LossOptions(decoupled=0.5),
    "softcap": LossOptions(softcap=4.0),
    "scale": LossOptions(scale=0.7),
    "all": LossOptions(0.1, 0.2, 0.01, 0.3, 0.5, 3.0, 0.9),
}
# The gradient is rounded once to the logits' dtype: both sides agree to one unit in the last place of it.
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _inputs(n, k, j, dtype, *, class_weight, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    x = (scale * torch.randn(n, k, generator=g)).to(dtype)
    idx = torch.randint(0, k, (n, j), generator=g)
    tw = torch.rand(n, j, generator=g, dtype=acc)
    rw = torch.rand(n, generator=g, dtype=acc) + 0.5
    if n > 1:  # an ignored row, as the public functions pass it: class 0, weights 0
        idx[1], tw[1], rw[1] = 0, 0.0, 0.0
    if n > 2 and j > 1:
        idx[2, 1] = idx[2, 0]  # a pair with the same class twice
    cw = (torch.rand(k, generator=g, dtype=acc) + 0.5) if class_weight else None
    up = torch.randn(n, generator=g, dtype=acc)
    return x, (idx, tw, rw, cw), up


def _tolerance(dtype):
    # float64: both sides sum the same terms in different orders; float32 likewise, over at most ~1000 terms
    # of size ~1 (softmax sums, entropies): a few float32 units of the result.
    return dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)


def _check(x, targets, up, opts, want_stats, dtype):
    out = ops.cross_entropy(x, *targets, opts, want_stats)
    ref = R.cross_entropy(x, *targets, opts, want_stats)
    tol = _tolerance(dtype)
    torch.testing.assert_close(out[0], ref[0], **tol)
    torch.testing.assert_close(out[1], ref[1], **tol)
    assert torch.equal(out[2], ref[2])
    gk = ops.cross_entropy_backward(up, x, *targets, ref[1], ref[2], opts)
    gr = R.cross_entropy_backward(up, x, *targets, ref[1], ref[2], opts)
    assert gk.dtype == dtype and gk.shape == x.shape
    if dtype in ULP:
        gk, gr = gk.float(), gr.float()
        assert bool(((gk - gr).abs() <= gr.abs() * ULP[dtype] + 1e-6).all()), (gk - gr).abs().max()
    else:
        torch.testing.assert_close(gk, gr, **tol)


@pytest.mark.ops(*OPS, backends=("cpp",))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("class_weight", [False, True])
def test_each_option_and_all_together(kernel_target, dtype, option, class_weight):
    opts = OPTIONS[option].values()
    j = 2 if OPTIONS[option].decoupled else 1
    x, targets, up = _inputs(7, 37, j, dtype, class_weight=class_weight, seed=len(option) + class_weight)
    for want_stats in (False, True):
        _check(x, targets, up, opts, want_stats, dtype)


@pytest.mark.ops(*OPS, backends=("cpp",))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("n", "k", "j"), [(1, 1, 1), (3, 1, 2), (1, 17, 1), (5, 2, 2), (4, 1003, 4), (33, 16, 3)])
def test_odd_shapes(kernel_target, dtype, n, k, j):
    opts = OPTIONS["all"].values() if j >= 2 else LossOptions(0.1, 0.2, 0.01, 0.3).values()
    x, targets, up = _inputs(n, k, j, dtype, class_weight=True, seed=n * k + j)
    _check(x, targets, up, opts, True, dtype)


@pytest.mark.ops(*OPS, backends=("cpp",))
def test_no_rows_and_strided_inputs(kernel_target):
    opts = OPTIONS["all"].values()
    x, targets, up = _inputs(0, 5, 2, torch.float32, class_weight=False, seed=1)
    loss, stats, argmax = ops.cross_entropy(x, *targets, opts, True)
    assert loss.shape == (0,) and stats.shape == (0, R.N_STATS) and argmax.shape == (0,)
    assert ops.cross_entropy_backward(up, x, *targets, stats, argmax, opts).shape == (0, 5)
    x, (idx, tw, rw, cw), up = _inputs(6, 9, 2, F64, class_weight=True, seed=2)
    strided = torch.randn(9, 6, dtype=F64).t()  # a transposed view: the kernels read it as a [6, 9] matrix
    strided.copy_(x)
    _check(strided, (idx.t().contiguous().t(), tw, rw[::1], cw), up, opts, True, F64)


@pytest.mark.ops(*OPS, backends=("cpp",))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(kernel_target, dtype):
    """Rows split over threads (tasks of ~32K elements): every row is one thread's, so the bits are the same."""
    opts = OPTIONS["all"].values()
    x, targets, up = _inputs(300, 301, 2, dtype, class_weight=True, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            loss, stats, argmax = ops.cross_entropy(x, *targets, opts, True)
            grad = ops.cross_entropy_backward(up, x, *targets, stats, argmax, opts)
            results.append((loss, stats, argmax, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.ops(*OPS, backends=("cpp",))
@pytest.mark.parametrize("option", ["plain", "smoothing", "all"])
def test_non_finite_logits_behave_as_the_reference(kernel_target, option):
    """NaN, +inf and -inf logits (off and on the target, a whole row of -inf): NaN where the reference has NaN,
    infinities where it has them, the same numbers elsewhere."""
    opts = OPTIONS[option].values()
    j = 2 if OPTIONS[option].decoupled else 1
    x, targets, up = _inputs(7, 10, j, torch.float32, class_weight=False, seed=4)
    idx = targets[0]
    idx[0, 0], idx[3, 0], idx[4, 0] = 5, 2, 0
    x[0, 3] = float("nan")
    x[2, 4] = float("inf")
    x[3, 7] = float("-inf")  # off the target
    x[4, 0] = float("-inf")  # on the target (and in column 0)
    x[5] = float("-inf")
    for want_stats in (False, True):
        out = ops.cross_entropy(x, *targets, opts, want_stats)
        ref = R.cross_entropy(x, *targets, opts, want_stats)
        for a, b in zip(out, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
        gk = ops.cross_entropy_backward(up, x, *targets, ref[1], ref[2], opts)
        gr = R.cross_entropy_backward(up, x, *targets, ref[1], ref[2], opts)
        torch.testing.assert_close(gk, gr, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.ops(*OPS, backends=("cpp",))
def test_kernels_reject_malformed_arguments(kernel_target):
    x, (idx, tw, rw, cw), up = _inputs(3, 5, 1, torch.float32, class_weight=False, seed=5)
    opts = LossOptions().values()
    with pytest.raises(IndexError, match="outside"):
        ops.cross_entropy(x, idx + 5, tw, rw, cw, opts, False)
    with pytest.raises(RuntimeError, match="options"):
        ops.cross_entropy(x, idx, tw, rw, cw, opts[:3], False)
    with pytest.raises(RuntimeError, match="mixed pair"):
        ops.cross_entropy(x, idx, tw, rw, cw, LossOptions(decoupled=0.5).values(), False)


@pytest.mark.ops(*OPS, backends=("cpp",))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_public_function_with_the_cpp_derivative(kernel_target, dtype):
    """regops.cross_entropy through the C++ derivative (no Python autograd) equals the reference through the
    Python formula: ignored labels, class and token weights, statistics, every reduction."""
    assert dispatch.native_autograd(ops.cross_entropy)
    g = torch.Generator().manual_seed(6)
    x = (3 * torch.randn(2, 9, 5, generator=g)).to(dtype)
    y = torch.randint(0, 9, (2, 5), generator=g)
    y[0, 1] = y[1, 4] = -100
    w = torch.rand(9, generator=g, dtype=dtype) + 0.5
    tok = torch.rand(2, 5, generator=g, dtype=dtype)
    kw = dict(weight=w, token_weight=tok, label_smoothing=0.1, z_loss=1e-2, maxsup=0.1, confidence_penalty=0.05)
    for reduction in ("mean", "sum", "none"):
        xk = x.clone().requires_grad_()
        loss, st = regops.cross_entropy(xk, y, reduction=reduction, return_stats=True, **kw)
        gk = grad_of(loss.sum(), xk)
        with regops.use_backend("torch"):
            assert not dispatch.native_autograd(ops.cross_entropy)
            xr = x.clone().requires_grad_()
            loss_r, st_r = regops.cross_entropy(xr, y, reduction=reduction, return_stats=True, **kw)
            gr = grad_of(loss_r.sum(), xr)
        tol = _tolerance(dtype)
        torch.testing.assert_close(loss, loss_r, **tol)
        torch.testing.assert_close(gk, gr, **tol)
        for a, b in zip(st, st_r, strict=True):
            torch.testing.assert_close(a, b, **tol)
