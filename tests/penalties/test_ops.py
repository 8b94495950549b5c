"""relu_l1, spectral_norms and orthogonality_penalty: against their definitions and autograd in float64, every
backend against the reference, statistics from the same pass, argument checks."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch
from regops.penalties import ops
from regops.testing import make_tensor


def _backends(op):
    out = ["torch"]
    if dispatch.triton_importable():
        out.append("triton")
    if dispatch.why_not(op, "cpp", torch.device("cpu")) is None:
        out.append("cpp")
    return out


# ------------------------------------------------------------------------------------------------ relu_l1
@pytest.mark.parametrize("backend", _backends("relu_l1"))
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.25])
def test_relu_l1_backward_is_g_plus_l1_times_derivative(backend, squared, threshold):
    x = make_tensor((3, 7, 33), torch.float64, requires_grad=True)
    g = make_tensor((3, 7, 33), torch.float64, seed=1)
    with regops.use_backend(backend):
        y, stats = regops.relu_l1(x, 0.3, squared=squared, threshold=threshold, return_stats=True)
        (dx,) = torch.autograd.grad(y, x, g)
    xd = x.detach()
    on = (xd > threshold).double()
    expected_y = xd * on * (xd if squared else 1)
    expected_dx = (g + 0.3) * on * (2 * xd if squared else 1)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(stats.token_active, on.mean(-1), rtol=0, atol=0)
    torch.testing.assert_close(stats.unit_active, on.reshape(-1, 33).mean(0), rtol=0, atol=0)
    torch.testing.assert_close(stats.activation_sum, expected_y.sum(), rtol=1e-13, atol=1e-13)


def test_relu_l1_is_relu_plus_l1_loss_gradient():
    """The fused gradient equals autograd of ``loss + l1 * relu(x).sum()``."""
    x = make_tensor((64, 48), torch.float64, requires_grad=True)
    g = make_tensor((64, 48), torch.float64, seed=2)
    (fused,) = torch.autograd.grad((regops.relu_l1(x, 1e-2) * g).sum(), x)
    a = torch.relu(x)
    (eager,) = torch.autograd.grad((a * g).sum() + 1e-2 * a.sum(), x)
    torch.testing.assert_close(fused, eager, rtol=1e-15, atol=1e-15)
    (plain,) = torch.autograd.grad((regops.relu_l1(x, 0.0) * g).sum(), x)
    (relu,) = torch.autograd.grad((torch.relu(x) * g).sum(), x)
    assert torch.equal(plain, relu)


@pytest.mark.parametrize("backend", [b for b in _backends("relu_l1") if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_relu_l1_kernels_match_reference(backend, dtype):
    x = make_tensor((65, 1000), dtype)
    g = make_tensor((65, 1000), dtype, seed=1)
    l1 = torch.tensor(0.01, dtype=torch.float64)
    for squared in (False, True):
        with regops.use_backend("torch"):
            ref = ops.relu_l1(x, l1, 0.1, squared, True)
            ref_dx = ops.relu_l1_backward(g, x, l1, 0.1, squared)
        with regops.use_backend(backend):
            out = ops.relu_l1(x, l1, 0.1, squared, True)
            dx = ops.relu_l1_backward(g, x, l1, 0.1, squared)
        for a, b in zip(out[:3], ref[:3], strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(out[3], ref[3], rtol=1e-5, atol=1e-3)
        assert torch.equal(dx, ref_dx)


def test_relu_l1_nan_passes_through_and_stats_off():
    x = torch.tensor([[float("nan"), -1.0, 2.0]])
    y = regops.relu_l1(x, 0.1)
    assert torch.isnan(y[0, 0]) and y[0, 1] == 0 and y[0, 2] == 2


def test_relu_l1_opcheck_gradcheck_and_runtime_l1():
    x = make_tensor((4, 6), torch.float64, requires_grad=True)
    l1 = torch.tensor(0.2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.regops.relu_l1.default, (x, l1, 0.0, True, True))
    assert torch.autograd.gradgradcheck(lambda t: regops.relu_l1(t, 0.2, squared=True), (x,))
    fn = torch.compile(lambda t, l: regops.relu_l1(t, l), fullgraph=True, backend="eager")
    a = torch.autograd.grad(fn(x, torch.tensor(0.5, dtype=torch.float64)).sum(), x)[0]
    b = torch.autograd.grad(fn(x, torch.tensor(0.1, dtype=torch.float64)).sum(), x)[0]
    torch.testing.assert_close(a - b, 0.4 * (x > 0).double())


def test_relu_l1_module_schedule_and_stats():
    act = regops.nn.ReLUL1(l1=0.5, track_stats=True)
    x = make_tensor((5, 8), torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act(x).sum(), x)
    torch.testing.assert_close(g, 1.5 * (x > 0).double())
    assert act.last_stats.unit_active.shape == (8,)
    act.l1 = 0.0
    (g,) = torch.autograd.grad(act(x).sum(), x)
    torch.testing.assert_close(g, (x > 0).double())


def test_relu_l1_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="l1 must be a non-negative"):
        regops.relu_l1(x, -1.0)
    with pytest.raises(ValueError, match="threshold"):
        regops.relu_l1(x, 0.1, threshold=-0.5)
    with pytest.raises(ValueError, match="at least one dimension"):
        regops.relu_l1(torch.tensor(1.0), 0.1)
    with pytest.raises(TypeError, match="l1 must be a number"):
        regops.relu_l1(x, "big")


# ------------------------------------------------------------------------------------------------ spectral norms
def _matrices(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (40, 30), (40, 30), (20, 50), (8, 2, 3, 3)]
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spectral_norms_within_1e_3_of_matrix_norm(backend):
    if backend == "triton" and not dispatch.triton_importable():
        pytest.skip("no Triton")
    ws = _matrices()
    exact = torch.stack([torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2) for w in ws])
    with regops.use_backend(backend):
        sig, state = regops.spectral_norms(ws, num_iters=300, generator=torch.Generator().manual_seed(1))
        assert ((sig - exact).abs() / exact).max() < 1e-3
        warm, _ = regops.spectral_norms(ws, state=state)  # one warm iteration stays converged
        assert ((warm - exact).abs() / exact).max() < 1e-3


def test_spectral_norms_float64_gradient_is_top_singular_pair():
    ws = [w.requires_grad_() for w in _matrices(torch.float64)[:4]]
    sig, _ = regops.spectral_norms(ws, num_iters=500, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(sig.sum(), ws)
    for w, g in zip(ws, grads, strict=True):
        exact = torch.linalg.matrix_norm(w, ord=2)
        (expected,) = torch.autograd.grad(exact, w)
        assert (g - expected).abs().max() < 1e-3
    assert sig.dtype == torch.float64


def test_spectral_norms_triton_matches_reference():
    pytest.importorskip("triton")
    ws = _matrices()[:3]
    v = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    with regops.use_backend("torch"):
        ref = ops.power_iteration(ws, v, 5)
    with regops.use_backend("triton"):
        out = ops.power_iteration(ws, v, 5)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_spectral_norms_errors():
    with pytest.raises(ValueError, match="non-empty sequence"):
        regops.spectral_norms([])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        regops.spectral_norms([torch.randn(4)])
    with pytest.raises(ValueError, match="num_iters"):
        regops.spectral_norms([torch.randn(4, 4)], num_iters=0)
    with pytest.raises(ValueError, match="state must be"):
        regops.spectral_norms([torch.randn(4, 4)], state=[])


# ------------------------------------------------------------------------------------------------ orthogonality
@pytest.mark.parametrize("shape", [(20, 45), (45, 20), (3, 16, 16), (2, 2, 7, 5)])
def test_orthogonality_penalty_and_gradient_equal_autograd(shape):
    w = make_tensor(shape, torch.float64, requires_grad=True)
    pen = regops.orthogonality_penalty(w)
    g = make_tensor(pen.shape, torch.float64, seed=3)
    (dw,) = torch.autograd.grad(pen, w, g)
    m, n = shape[-2:]
    gram = w @ w.mT if m <= n else w.mT @ w
    eye = torch.eye(min(m, n), dtype=torch.float64)
    expected = ((gram - eye) ** 2).sum((-2, -1))
    (expected_dw,) = torch.autograd.grad(expected, w, g)
    torch.testing.assert_close(pen, expected, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(dw, expected_dw, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(regops.orthogonality_penalty, (w[..., :4, :3].detach().requires_grad_(),))
    assert torch.autograd.gradgradcheck(regops.orthogonality_penalty, (w[..., :3, :4].detach().requires_grad_(),))


@pytest.mark.parametrize("shape", [(70, 130), (130, 70), (3, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_orthogonality_triton_tiles_match_reference(shape, dtype):
    pytest.importorskip("triton")
    w = make_tensor(shape, dtype, low=-0.2, high=0.2)
    with regops.use_backend("triton"):
        out = ops.orthogonality_penalty(w)
    ref = ops.orthogonality_penalty(w.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_orthogonality_errors_and_orthogonal_zero():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        regops.orthogonality_penalty(torch.randn(5))
    q, _ = torch.linalg.qr(torch.randn(30, 10, dtype=torch.float64))
    assert regops.orthogonality_penalty(q).abs() < 1e-24 + 1e-12
    assert regops.orthogonality_penalty(q.mT).abs() < 1e-12
