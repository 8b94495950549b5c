"""bias_dropout_add and dropout_add_layer_norm: kernels vs reference, torch compositions, autograd, memory, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regops
from regops._core import dispatch
from regops._core.philox import keep_mask
from regops.dropout.reference import dropout_scale, row_keep_mask
from regops.testing import assert_close, assert_close_lowp, make_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHAPES = [(1, 1), (7, 5), (3, 64), (2, 3, 1000)]
SEED = torch.tensor([1234, 77])


def _p(v: float) -> torch.Tensor:
    """The ops take p as a 0-dim float64 tensor (a runtime value under torch.compile)."""
    return torch.tensor(v, dtype=torch.float64)


def _saved_bytes(fn):
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def _reference(fn, *args):
    with regops.use_backend("torch"):
        return fn(*args)


# ------------------------------------------------------------------------------------------------ row layout
def test_row_layout_equals_flat_stream_when_rows_are_whole_counters():
    assert torch.equal(row_keep_mask(5, 9, 6, 8, 0.3), keep_mask(5, 9, (6, 8), 0.3))
    rows = row_keep_mask(5, 9, 6, 7, 0.3)
    for r in range(6):  # row r starts at counter offset + r * ceil(7 / 4)
        assert torch.equal(rows[r], keep_mask(5, 9 + 2 * r, (7,), 0.3))


# ------------------------------------------------------------------------------------------------ bias_dropout_add
def _bda(x, b, r, p, seed):
    return torch.ops.regops.bias_dropout_add(x, b, r, _p(p), seed)


@pytest.mark.ops("bias_dropout_add", "bias_dropout_add_backward")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_dropout_add_kernel_matches_reference(kernel_target, dtype, shape):
    _, device = kernel_target
    x, r = make_tensor(shape, dtype, device, seed=1), make_tensor(shape, dtype, device, seed=2)
    b = make_tensor(shape[-1:], dtype, device, seed=3)
    g = make_tensor(shape, dtype, device, seed=4)
    for bias in (b, None):
        for p in (0.1, 0.9):
            out = _bda(x, bias, r, p, SEED)
            ref = _reference(_bda, x.cpu(), None if bias is None else bias.cpu(), r.cpu(), p, SEED)
            assert torch.equal(out.cpu(), ref), (p, bias is None)
            dx, db = torch.ops.regops.bias_dropout_add_backward(g, bias is not None, _p(p), SEED)
            dx_ref, db_ref = _reference(
                torch.ops.regops.bias_dropout_add_backward, g.cpu(), bias is not None, _p(p), SEED
            )
            assert torch.equal(dx.cpu(), dx_ref)
            assert db.shape == db_ref.shape
            assert_close(db.cpu(), db_ref, rtol=1e-5, atol=1e-5)


def test_bias_dropout_add_is_residual_plus_dropout_of_sum():
    x, r = make_tensor((6, 16), seed=1), make_tensor((6, 16), seed=2)
    b = make_tensor((16,), seed=3)
    composed = r + torch.ops.regops.dropout(x + b, _p(0.4), SEED)  # H % 4 == 0: same stream as plain dropout
    assert torch.equal(_bda(x, b, r, 0.4, SEED), composed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_dropout_add_gradients(dtype):
    shape = (5, 13)
    x = make_tensor(shape, dtype, requires_grad=True, seed=1)
    r = make_tensor(shape, dtype, requires_grad=True, seed=2)
    b = make_tensor((13,), dtype, requires_grad=True, seed=3)
    g = make_tensor(shape, dtype, seed=4)
    y = _bda(x, b, r, 0.3, SEED)
    dx, db, dr = torch.autograd.grad(y, (x, b, r), g)
    keep = row_keep_mask(1234, 77, 5, 13, 0.3)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    expected_dx = torch.where(keep, g.to(cd) * dropout_scale(0.3), 0.0)
    assert torch.equal(dx, expected_dx.to(dtype))
    assert_close(db, expected_dx.sum(0))
    assert torch.equal(dr, g)
    # the value itself, every dtype: residual + where(keep, (x + b) / (1 - p), 0) in the compute dtype, rounded once
    kept = (x.detach().to(cd) + b.detach().to(cd)) * dropout_scale(0.3)
    assert torch.equal(y, (torch.where(keep, kept, 0.0) + r.detach().to(cd)).to(dtype))


def test_bias_dropout_add_gradcheck():
    x = make_tensor((4, 7), torch.float64, requires_grad=True, seed=1)
    r = make_tensor((4, 7), torch.float64, requires_grad=True, seed=2)
    b = make_tensor((7,), torch.float64, requires_grad=True, seed=3)
    assert torch.autograd.gradcheck(lambda *t: _bda(*t, 0.3, SEED), (x, b, r))
    assert torch.autograd.gradcheck(lambda a, c: _bda(a, None, c, 0.3, SEED), (x, r))


def test_bias_dropout_add_saves_only_the_seed():
    x = torch.randn(256, 1024, requires_grad=True)
    r = torch.randn(256, 1024, requires_grad=True)
    b = torch.randn(1024, requires_grad=True)
    y, sizes = _saved_bytes(lambda: regops.bias_dropout_add(x, b, r, 0.1))
    assert sum(s for s, _ in sizes) <= 64, sizes
    y.sum().backward()
    assert x.grad is not None and b.grad is not None and r.grad is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_dropout_add_opcheck(dtype):
    rg = dtype != torch.bfloat16
    x, r = make_tensor((5, 33), dtype, requires_grad=rg), make_tensor((5, 33), dtype, requires_grad=rg, seed=1)
    b = make_tensor((33,), dtype, requires_grad=rg, seed=2)
    torch.library.opcheck(torch.ops.regops.bias_dropout_add, (x, b, r, _p(0.3), SEED))
    torch.library.opcheck(torch.ops.regops.bias_dropout_add, (x, None, r, _p(0.3), SEED))
    torch.library.opcheck(torch.ops.regops.bias_dropout_add_backward, (x.detach(), True, _p(0.3), SEED))


def test_bias_dropout_add_eval_statistics_and_compile():
    torch.manual_seed(20)
    x, r, b = torch.randn(64, 100), torch.randn(64, 100), torch.randn(100)
    torch.testing.assert_close(regops.bias_dropout_add(x, b, r, 0.5, training=False), r + x + b)
    gen = torch.Generator().manual_seed(21)
    y = regops.bias_dropout_add(torch.ones(512, 1000), None, torch.zeros(512, 1000), 0.25, generator=gen)
    assert abs((y != 0).double().mean().item() - 0.75) < 5 * (0.1875 / 512000) ** 0.5  # 5 sigma
    torch._dynamo.reset()
    f = torch.compile(lambda a, c, d: regops.bias_dropout_add(a * 2, c, d, 0.25), fullgraph=True)
    xg = x.clone().requires_grad_()
    torch.manual_seed(22)
    out = f(xg, b, r)
    out.sum().backward()
    kept = xg.grad != 0
    assert abs(kept.double().mean().item() - 0.75) < 5 * (0.1875 / kept.numel()) ** 0.5  # 5 sigma
    torch.testing.assert_close(out[kept], (r + (2 * x + b) * dropout_scale(0.25))[kept])
    torch.testing.assert_close(out[~kept], r[~kept])


def test_bias_dropout_add_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        regops.bias_dropout_add(x, None, torch.randn(4, 7), 0.1)
    # mixed dtypes follow torch's type promotion (as the unfused residual + dropout(x + bias))
    assert regops.bias_dropout_add(x, None, x.double(), 0.1).dtype == torch.float64
    with pytest.raises(ValueError, match="bias must have shape"):
        regops.bias_dropout_add(x, torch.randn(4), x, 0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        regops.bias_dropout_add(x, None, x, 1.5)
    with pytest.raises(TypeError, match="floating dtype"):
        regops.bias_dropout_add(x.long(), None, x, 0.1)
    with pytest.raises(ValueError, match="at least one dimension"):
        regops.bias_dropout_add(torch.tensor(1.0), None, torch.tensor(1.0), 0.1)


# ------------------------------------------------------------------------------------------------ + LayerNorm
def _daln(x, r, w, b, p, rms=False, fp32=False, seed=SEED):
    return torch.ops.regops.dropout_add_layer_norm(x, r, w, b, _p(p), 1e-5, rms, fp32, seed)


def _composition(x, r, w, b, p, rms, keep, eps=1e-5):
    """The unfused composition in x's dtype (float64 for the oracle): norm(where(keep, x/(1-p), 0) + r)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.where(keep, x.to(cd) * dropout_scale(p), 0.0).to(x.dtype) if p > 0 else x
    s = s + r if r is not None else s
    if rms:
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * (w if w is not None else 1)
        return (y + b if b is not None else y), s
    return F.layer_norm(s, s.shape[-1:], w, b, eps), s


CONFIGS = [  # (rms_norm, residual, weight, bias, residual_in_fp32)
    (False, True, True, True, False),
    (True, True, True, False, False),
    (False, False, False, False, False),
    (True, True, True, True, True),
]


@pytest.mark.ops("dropout_add_layer_norm", "dropout_add_layer_norm_backward")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (2, 3, 256)], ids=str)
def test_dropout_add_layer_norm_kernel_matches_reference(kernel_target, dtype, shape):
    _, device = kernel_target
    cols = shape[-1]
    x, res = make_tensor(shape, dtype, device, seed=1), make_tensor(shape, dtype, device, seed=2)
    w, b = make_tensor((cols,), dtype, device, seed=3), make_tensor((cols,), dtype, device, seed=4)
    dy = make_tensor(shape, dtype, device, seed=5)
    for rms, has_r, has_w, has_b, fp32 in CONFIGS:
        args = (x, res if has_r else None, w if has_w else None, b if has_b else None)
        cpu = tuple(t.cpu() if t is not None else None for t in args)
        w64 = None if args[2] is None else cpu[2].double()
        for p in (0.0, 0.3):
            out = _daln(*args, p, rms, fp32)
            ref = _reference(_daln, *cpu, p, rms, fp32)
            assert torch.equal(out[1].cpu(), ref[1]), "pre-norm sum differs"
            # the oracle: the same norm of the same stored sum s, in float64
            exact = _reference(_daln, ref[1].double(), None, w64, None if cpu[3] is None else cpu[3].double(), 0.0, rms)
            for name, a, e, x64 in zip(("y", "s", "mean", "rstd"), out, ref, exact, strict=True):
                _assert_derived(name, a, e, x64, n=cols)
            ds = make_tensor(shape, out[1].dtype, device, seed=6)
            res_dtype = res.dtype if has_r else None
            bwd = (dy, ds, out[1], out[2], out[3], args[2], has_b, _p(p), rms, SEED, dtype, res_dtype)
            got = torch.ops.regops.dropout_add_layer_norm_backward(*bwd)
            cpu_bwd = [t.cpu() if isinstance(t, torch.Tensor) else t for t in bwd]
            want = _reference(torch.ops.regops.dropout_add_layer_norm_backward, *cpu_bwd)
            exact_bwd = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in cpu_bwd]
            exact_bwd[3:5] = exact[2:4]  # float64 statistics of the float64 forward
            exact_bwd[10], exact_bwd[11] = torch.float64, (torch.float64 if has_r else None)
            exact_grads = _reference(torch.ops.regops.dropout_add_layer_norm_backward, *exact_bwd)
            for name, a, e, x64 in zip(("dx", "dres", "dw", "db"), got, want, exact_grads, strict=True):
                _assert_derived(name, a, e, x64, n=max(cols, x.numel() // cols))


def _assert_derived(name, got, ref, exact, n):
    """The kernel's error against the float64 oracle is at most twice the reference's own error (same dtype, same
    inputs) plus the rounding bound of an n-term sum in the compute dtype: 4 eps sqrt(n) max|exact|. In float64
    that is ~1e-14: a float32 computation anywhere fails it; in float32 a dropped term or wrong scale fails it."""
    if ref is None:
        assert got is None and exact is None, name
        return
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    if got.numel() == 0:
        return
    exact = exact.cpu().double()
    cd = torch.float64 if got.dtype == torch.float64 else torch.float32
    err = (got.cpu().double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    bound = 2 * err_ref + 4 * torch.finfo(cd).eps * n**0.5 * exact.abs().max().item()
    assert err <= bound, f"{name}: kernel error {err:.3g} > 2 x reference error {err_ref:.3g} + sum bound"


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_dropout_add_layer_norm_matches_composition_and_grads_float64(rms):
    shape, p = (6, 24), 0.25
    ts = [make_tensor(s, torch.float64, requires_grad=True, seed=i) for i, s in enumerate([shape, shape, (24,), (24,)])]
    keep = row_keep_mask(1234, 77, 6, 24, p)
    (y, s, _, _), (y_ref, s_ref) = _daln(*ts, p, rms), _composition(*ts, p, rms, keep)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)
    gy, gs = make_tensor(shape, torch.float64, seed=10), make_tensor(shape, torch.float64, seed=11)
    got = torch.autograd.grad((y, s), ts, (gy, gs))
    want = torch.autograd.grad((y_ref, s_ref), ts, (gy, gs))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.ops("dropout_add_layer_norm")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dropout_add_layer_norm_low_precision_rule(kernel_target, dtype):
    _, device = kernel_target
    shape, p = (8, 200), 0.2
    x, r = make_tensor(shape, dtype, device, seed=1), make_tensor(shape, dtype, device, seed=2)
    w, b = make_tensor((200,), dtype, device, seed=3), make_tensor((200,), dtype, device, seed=4)
    keep = row_keep_mask(1234, 77, 8, 200, p)
    y = _daln(x, r, w, b, p)[0]
    high = _composition(*(t.cpu().double() for t in (x, r, w, b)), p, False, keep)[0]
    low = _composition(*(t.cpu() for t in (x, r, w, b)), p, False, keep)[0]
    assert_close_lowp(y.cpu(), low, high)


def test_dropout_add_layer_norm_gradcheck():
    ts = [make_tensor(s, torch.float64, requires_grad=True, seed=i) for i, s in enumerate([(3, 9), (3, 9), (9,), (9,)])]
    for rms in (False, True):
        assert torch.autograd.gradcheck(lambda *t, rms=rms: _daln(*t, 0.3, rms)[:2], ts)
    assert torch.autograd.gradcheck(lambda a: _daln(a, None, None, None, 0.3)[0], ts[:1])


def test_dropout_add_layer_norm_saves_no_mask():
    x = torch.randn(64, 512, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(64, 512, dtype=torch.bfloat16, requires_grad=True)
    w, b = torch.ones(512, requires_grad=True), torch.zeros(512, requires_grad=True)
    y, sizes = _saved_bytes(lambda: regops.dropout_add_layer_norm(x, r, w, b, 0.1))
    assert all(dt not in (torch.bool, torch.uint8) for _, dt in sizes)
    n = x.numel()
    # s (bf16) + mean/rstd + weight + p + seed: nothing else of size N.
    assert sum(s for s, _ in sizes) <= 2 * n + 8 * 64 + 4 * 512 + 8 + 16, sizes
    y.float().sum().backward()
    assert x.grad is not None and r.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_add_layer_norm_opcheck(dtype):
    rg = dtype != torch.bfloat16
    x, r = make_tensor((4, 33), dtype, requires_grad=rg), make_tensor((4, 33), dtype, requires_grad=rg, seed=1)
    w, b = make_tensor((33,), dtype, requires_grad=rg, seed=2), make_tensor((33,), dtype, requires_grad=rg, seed=3)
    torch.library.opcheck(torch.ops.regops.dropout_add_layer_norm, (x, r, w, b, _p(0.3), 1e-5, False, False, SEED))
    torch.library.opcheck(torch.ops.regops.dropout_add_layer_norm, (x, None, w, None, _p(0.3), 1e-5, True, True, SEED))


def test_dropout_add_layer_norm_prenorm_residual_fp32_eval_and_compile():
    x, r = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    w, b = torch.randn(64), torch.randn(64)
    y, s = regops.dropout_add_layer_norm(x, r, w, b, 0.1, prenorm=True, residual_in_fp32=True, training=False)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(s, x.float() + r.float())
    torch.testing.assert_close(y, F.layer_norm(s, (64,), w, b).bfloat16())
    torch._dynamo.reset()
    f = torch.compile(lambda a, c: regops.dropout_add_layer_norm(a, c, w, b, 0.2, prenorm=True), fullgraph=True)
    xg = torch.randn(4, 64, requires_grad=True)
    y, s = f(xg, r.float())
    (y.sum() + s.sum()).backward()
    dropped = (s - r.float()) == 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(xg.grad == 0, dropped)


def test_dropout_add_layer_norm_module():
    m = regops.nn.DropoutAddLayerNorm(32, p=0.1, prenorm=True)
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y, s = m(x, r)
    assert y.shape == x.shape and s.shape == x.shape
    m.eval()
    y, s = m(x, r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (32,), m.weight, m.bias))
    assert regops.nn.DropoutAddLayerNorm(8, rms_norm=True).bias is None
    assert "rms_norm" in repr(regops.nn.DropoutAddLayerNorm(8, rms_norm=True))


def test_dropout_add_layer_norm_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual must have"):
        regops.dropout_add_layer_norm(x, torch.randn(4, 9), None, None, 0.1)
    with pytest.raises(ValueError, match="weight must have shape"):
        regops.dropout_add_layer_norm(x, None, torch.randn(7), None, 0.1)
    with pytest.raises(ValueError, match="H > 0"):
        regops.dropout_add_layer_norm(torch.randn(4, 0), None, None, None, 0.1)
    with pytest.raises(ValueError, match="eps"):
        regops.dropout_add_layer_norm(x, None, None, None, 0.1, eps=-1.0)
    with pytest.raises(TypeError, match="floating dtype"):
        regops.dropout_add_layer_norm(x, None, torch.ones(8, dtype=torch.int64), None, 0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (1000, 1024), (77, 4097)], ids=str)
def test_bias_dropout_add_cuda_extension_matches_reference_and_triton(dtype, shape):
    reason = dispatch.why_not("bias_dropout_add", "cuda", torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    x, r = make_tensor(shape, dtype, "cuda", seed=1), make_tensor(shape, dtype, "cuda", seed=2)
    b, g = make_tensor(shape[-1:], dtype, "cuda", seed=3), make_tensor(shape, dtype, "cuda", seed=4)
    for bias in (b, None):
        outs = {}
        for backend in ("cuda", "triton", "torch"):
            with regops.use_backend(backend):
                outs[backend] = (
                    _bda(x, bias, r, 0.3, SEED),
                    *torch.ops.regops.bias_dropout_add_backward(g, bias is not None, _p(0.3), SEED),
                )
        for backend in ("triton", "torch"):
            assert torch.equal(outs["cuda"][0], outs[backend][0]), backend
            assert torch.equal(outs["cuda"][1], outs[backend][1]), backend
            assert_close(outs["cuda"][2], outs[backend][2], rtol=1e-4, atol=1e-4)
    unaligned = make_tensor((shape[0] * shape[1] + 1,), dtype, "cuda")[1:].view(shape)
    with regops.use_backend("cuda"):
        out = _bda(unaligned, b, r, 0.3, SEED)
    assert torch.equal(out.cpu(), _reference(_bda, unaligned.cpu(), b.cpu(), r.cpu(), 0.3, SEED))
