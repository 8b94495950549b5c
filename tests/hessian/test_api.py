"""The hessian family's public functions: estimators against the exact Hessian of small networks (every call
form, engine and grouping; early stopping; DataLoaders), Hutch++/XTrace, the vmap fallbacks, the closed-form
head, the training penalty, the Gauss-Newton curvature, and clear errors for bad input.

Every random draw is seeded, so every statistical assertion is deterministic.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops

DIST = ("rademacher", "gaussian")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: one thread avoids OpenMP spin-waiting when the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- helpers
def mlp(act: type[nn.Module] = nn.Tanh, sizes=(4, 6, 3), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def data(n: int = 16, d: int = 4, c: int = 3, seed: int = 1):
    g = gen(seed)
    return torch.randn(n, d, dtype=torch.float64, generator=g), torch.randint(0, c, (n,), generator=g)


def exact_hessian_blocks(model: nn.Module, loss_of_logits, x) -> tuple[list[str], list[torch.Tensor]]:
    """Diagonal blocks ``H_pp`` (as ``[numel, numel]``) of the exact Hessian, from autograd."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps):
        return loss_of_logits(torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)))

    hess = torch.autograd.functional.hessian(f, params)
    return names, [hess[i][i].reshape(p.numel(), p.numel()) for i, p in enumerate(params)]


def exact_trace(model, loss_of_logits, x) -> float:
    _, blocks = exact_hessian_blocks(model, loss_of_logits, x)
    return sum(torch.trace(b).item() for b in blocks)


def quadratic(n: int = 120, top=(100.0, 60.0, 30.0, 15.0), tail: float = 0.1, seed: int = 0):
    """``0.5 x^T A x`` whose Hessian ``A`` has a few dominant eigenvalues."""
    g = gen(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    lam = torch.cat(
        [torch.tensor(top, dtype=torch.float64), tail * torch.rand(n - len(top), dtype=torch.float64, generator=g)]
    )
    a = (u * lam) @ u.T
    x = torch.randn(n, dtype=torch.float64, generator=g).requires_grad_()
    return (lambda p: 0.5 * p @ a @ p), x, a, lam.sum().item()


# ---------------------------------------------------------------------------------------------- trace vs exact
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_trace_within_five_stderr_of_exact(act):
    model = mlp(act)
    x, y = data()
    crit = nn.CrossEntropyLoss()
    exact = exact_trace(model, lambda z: crit(z, y), x)
    est = regops.hessian.trace(model, crit, x, y, num_probes=300, generator=gen(2))
    assert est.num_matvecs == 300 and est.method == "hutchinson" and est.samples.shape == (300,)
    assert abs(est.value - exact) <= 5 * est.stderr, (est, exact)
    assert est.stderr < 0.2 * abs(exact)


def test_hvp_engines_agree_and_are_exact_on_a_quadratic():
    model = mlp(nn.Tanh)
    x, y = data()
    crit = nn.CrossEntropyLoss()
    values = {
        hvp: regops.hessian.trace(model, crit, x, y, num_probes=20, probe_batch=7, hvp=hvp, generator=gen(4)).value
        for hvp in ("double_backward", "forward_over_reverse", "loop", "auto")
    }
    first = values["loop"]
    for hvp, value in values.items():
        assert value == pytest.approx(first, rel=1e-10), hvp
    # Rademacher probes are exact on a diagonal Hessian
    w = torch.randn(30, dtype=torch.float64, generator=gen(0)).requires_grad_()
    est = regops.hessian.trace(lambda p: (p**4).sum() / 12, w, num_probes=3, generator=gen(1))
    assert est.value == pytest.approx((w.detach() ** 2).sum().item(), rel=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-9)


def test_trace_by_param_and_module():
    model = mlp(nn.Tanh, sizes=(4, 5, 5, 3))
    x, y = data()
    crit = nn.CrossEntropyLoss()
    names, blocks = exact_hessian_blocks(model, lambda z: crit(z, y), x)
    whole = regops.hessian.trace(model, crit, x, y, num_probes=300, generator=gen(5))
    per_param = regops.hessian.trace(model, crit, x, y, num_probes=300, by="param", generator=gen(5))
    per_module = regops.hessian.trace(model, crit, x, y, num_probes=300, by="module", generator=gen(5))
    assert list(per_param) == names and list(per_module) == ["0", "2", "4"]
    assert sum(e.value for e in per_param.values()) == pytest.approx(whole.value, rel=1e-9)
    assert sum(e.value for e in per_module.values()) == pytest.approx(whole.value, rel=1e-9)
    for name, block in zip(names, blocks, strict=True):
        exact = torch.trace(block).item()
        assert abs(per_param[name].value - exact) <= 5 * per_param[name].stderr + 1e-12, name
    for module in per_module:
        exact = sum(torch.trace(b).item() for n, b in zip(names, blocks, strict=True) if n.startswith(module + "."))
        assert abs(per_module[module].value - exact) <= 5 * per_module[module].stderr + 1e-12, module


def test_function_forms_and_dict_params():
    g = gen(0)
    a = torch.randn(6, 6, dtype=torch.float64, generator=g)
    a = a @ a.T
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    exact = torch.trace(a).item() + 2.0 * 3
    tuple_form = regops.hessian.trace(
        lambda p: 0.5 * p[0] @ a @ p[0] + 1.5 * (p[1] ** 2).sum(), [w, b], num_probes=64, generator=gen(1)
    )
    dict_form = regops.hessian.trace(
        lambda p: 0.5 * p["w"] @ a @ p["w"] + 1.5 * (p["b"] ** 2).sum(),
        {"w": w, "b": b},
        num_probes=64,
        generator=gen(1),
    )
    closure = regops.hessian.trace(
        lambda: 0.5 * w @ a @ w + 1.5 * (b**2).sum(), [w, b], num_probes=64, generator=gen(1)
    )
    assert tuple_form.value == pytest.approx(dict_form.value) == pytest.approx(closure.value)
    assert abs(tuple_form.value - exact) <= 5 * tuple_form.stderr
    # a parameter the loss is linear in contributes zero curvature
    lin = regops.hessian.trace(lambda p: (p[0] ** 2).sum() + p[1].sum(), [w, b], num_probes=4, generator=gen(1))
    assert lin.value == pytest.approx(12.0)


def test_tol_stops_early():
    model = mlp(nn.Tanh)
    x, y = data()
    est = regops.hessian.trace(
        model, nn.CrossEntropyLoss(), x, y, num_probes=2000, probe_batch=10, tol=0.1, generator=gen(6)
    )
    assert est.num_matvecs < 2000 and est.num_matvecs % 10 == 0
    assert est.relative_stderr < 0.1
    full = regops.hessian.trace(
        model, nn.CrossEntropyLoss(), x, y, num_probes=est.num_matvecs, probe_batch=10, generator=gen(6)
    )
    assert full.value == pytest.approx(est.value, rel=1e-9)  # same probes, same prefix


def test_dataloader_form_averages_over_batches():
    model = mlp(nn.Tanh)
    x, y = data(n=24)
    crit = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    full = regops.hessian.trace(model, crit, x, y, num_probes=40, generator=gen(7))
    batched = regops.hessian.trace(model, crit, loader, num_probes=40, generator=gen(7))
    # equal batches of a mean loss: the mean of the batch Hessians is the full-batch Hessian; same probes
    assert batched.value == pytest.approx(full.value, rel=1e-9)
    # unequal batches are weighted by size
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    diag_b = regops.hessian.diagonal(model, crit, loader, num_probes=40, generator=gen(7))
    diag_f = regops.hessian.diagonal(model, crit, x, y, num_probes=40, generator=gen(7))
    for name in diag_f.value:
        torch.testing.assert_close(diag_b.value[name], diag_f.value[name])


# ---------------------------------------------------------------------------------------------- diagonal
def test_diagonal_converges_to_exact():
    model = mlp(nn.Tanh)
    x, y = data()
    crit = nn.CrossEntropyLoss()
    names, blocks = exact_hessian_blocks(model, lambda z: crit(z, y), x)
    exact = torch.cat([torch.diagonal(b) for b in blocks])

    def error(m: int, distribution: str = "rademacher") -> tuple[float, torch.Tensor, torch.Tensor]:
        est = regops.hessian.diagonal(
            model, crit, x, y, num_probes=m, distribution=distribution, probe_batch=512, generator=gen(8)
        )
        assert list(est.value) == names
        got = torch.cat([est.value[n].flatten() for n in names])
        err = torch.cat([est.stderr[n].flatten() for n in names])
        return (got - exact).norm().item(), got, err

    e16, _, _ = error(16)
    e256, _, _ = error(256)
    e1024, got, err = error(1024)
    assert e256 < 0.5 * e16 and e1024 < 0.6 * e256
    assert ((got - exact).abs() <= 4 * err + 1e-9).float().mean() > 0.97
    g256, _, _ = error(256, "gaussian")
    g4096, _, _ = error(4096, "gaussian")
    assert g4096 < 0.4 * g256


def test_diagonal_shapes_and_trace_from_same_probes():
    w = torch.randn(3, 4, dtype=torch.float64, generator=gen(0), requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen(1), requires_grad=True)
    est = regops.hessian.diagonal(
        lambda p: (p[0] ** 4).sum() / 12 + (p[1] ** 3).sum(), (w, b), num_probes=8, generator=gen(2)
    )
    assert isinstance(est.value, tuple) and est.value[0].shape == (3, 4) and est.value[1].shape == (4,)
    torch.testing.assert_close(est.value[0], w.detach() ** 2)  # diagonal Hessian: exact with Rademacher
    torch.testing.assert_close(est.value[1], 6 * b.detach())
    assert est.trace.value == pytest.approx(est.value[0].sum().item() + est.value[1].sum().item())
    assert est.num_matvecs == 8


# ---------------------------------------------------------------------------------------------- Hutch++ / XTrace
@pytest.mark.parametrize("distribution", DIST)
def test_hutchpp_and_xtrace_beat_hutchinson_at_equal_matvecs(distribution):
    f, x, _, exact = quadratic()
    errors = {m: [] for m in ("hutchinson", "hutch++", "xtrace")}
    for seed in range(12):
        for method in errors:
            est = regops.hessian.trace(
                f, x, num_probes=30, method=method, distribution=distribution, generator=gen(seed)
            )
            assert est.num_matvecs == 30 and est.method == method
            errors[method].append(abs(est.value - exact))
    rms = {m: math.sqrt(sum(e * e for e in v) / len(v)) for m, v in errors.items()}
    assert rms["hutch++"] < 0.2 * rms["hutchinson"], rms
    assert rms["xtrace"] < 0.2 * rms["hutchinson"], rms


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_hutchpp_xtrace_unbiased_and_exact_for_low_rank(method):
    f, x, _, exact = quadratic(n=60, top=(5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.2), tail=1.0, seed=3)
    values = [regops.hessian.trace(f, x, num_probes=12, method=method, generator=gen(s)).value for s in range(80)]
    v = torch.tensor(values, dtype=torch.float64)
    assert abs(v.mean().item() - exact) <= 5 * v.std().item() / math.sqrt(len(values))
    # rank-4 Hessian with a sketch of >= 4 directions: exact
    g = gen(9)
    u, _ = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64, generator=g))
    a = (u * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ u.T
    w = torch.zeros(40, dtype=torch.float64, requires_grad=True)
    est = regops.hessian.trace(lambda p: 0.5 * p @ a @ p, w, num_probes=18, method=method, generator=gen(1))
    assert est.value == pytest.approx(10.0, rel=1e-8)


# ---------------------------------------------------------------------------------------------- vmap fallback
def test_falls_back_where_vmap_cannot_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().train()
    x, y = data()
    crit = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="falling back"):
        fwd = regops.hessian.trace(model, crit, x, y, num_probes=8, hvp="forward_over_reverse", generator=gen(0))
    loop = regops.hessian.trace(model, crit, x, y, num_probes=8, hvp="loop", generator=gen(0))
    assert fwd.value == pytest.approx(loop.value, rel=1e-8)

    class CubeGrad(torch.autograd.Function):  # its backward calls .item(): batched double backward cannot run it
        @staticmethod
        def forward(ctx, g, z):
            ctx.save_for_backward(g, z)
            return 3 * g * z**2

        @staticmethod
        def backward(ctx, gg):
            g, z = ctx.saved_tensors
            scale = 1.0 if math.isfinite(gg.sum().item()) else 0.0
            return gg * 3 * z**2 * scale, gg * 6 * g * z * scale

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z**3

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return CubeGrad.apply(g, z)

    w = torch.randn(5, dtype=torch.float64, generator=gen(2), requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = regops.hessian.trace(
            lambda: Cube.apply(w).sum(), [w], num_probes=4, hvp="double_backward", generator=gen(3)
        )
    assert any("falling back to loop" in str(c.message) for c in caught)
    assert est.value == pytest.approx(6 * w.detach().sum().item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------- head
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_head_diagonal_is_exact(reduction):
    g = gen(0)
    feats = torch.randn(10, 5, dtype=torch.float64, generator=g)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=g)
    bias = torch.randn(4, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 4, (10,), generator=g)
    targets[3] = -100

    def loss(w, b):
        return F.cross_entropy(feats @ w.T + b, targets, reduction=reduction, label_smoothing=0.1)

    hw, hb = torch.autograd.functional.hessian(loss, (weight, bias))
    dw, db = regops.hessian.linear_head_diagonal(feats, weight, bias, targets=targets, reduction=reduction)
    torch.testing.assert_close(dw, torch.diagonal(hw[0].reshape(20, 20)).reshape(4, 5))
    torch.testing.assert_close(db, torch.diagonal(hb[1]))
    tr = regops.hessian.linear_head_trace(feats, weight, bias, targets=targets, reduction=reduction)
    assert tr.item() == pytest.approx(dw.sum().item() + db.sum().item())
    dw_nb, db_nb = regops.hessian.linear_head_diagonal(feats, weight, targets=targets, reduction=reduction)
    assert db_nb is None
    hw_nb = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(feats @ w.T, targets, reduction=reduction), weight
    )
    torch.testing.assert_close(dw_nb, torch.diagonal(hw_nb.reshape(20, 20)).reshape(4, 5))


def test_linear_head_diagonal_differentiable_and_matches_hutchinson():
    g = gen(1)
    feats = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: regops.hessian.linear_head_diagonal(f, w)[0], (feats, weight))
    x = feats.detach()
    targets = torch.randint(0, 2, (6,), generator=g)
    est = regops.hessian.diagonal(
        lambda p: F.cross_entropy(x @ p[0].T, targets), [weight], num_probes=400, generator=gen(2)
    )
    exact, _ = regops.hessian.linear_head_diagonal(x, weight.detach())
    assert ((est.value[0] - exact).abs() <= 5 * est.stderr[0] + 1e-9).all()


# ---------------------------------------------------------------------------------------------- penalty
def test_trace_penalty_value_and_gradient():
    w = torch.randn(7, dtype=torch.float64, generator=gen(0), requires_grad=True)
    loss = (w**4).sum() / 12  # H = diag(w^2): tr(H) = |w|^2, exact with Rademacher probes
    penalty = regops.hessian.trace_penalty(loss, [w], num_probes=2, generator=gen(1))
    assert penalty.item() == pytest.approx((w.detach() ** 2).sum().item())
    (grad,) = torch.autograd.grad(penalty, w)
    torch.testing.assert_close(grad, 2 * w.detach())
    # on a network: the same value as the estimator with the same probes, and it backpropagates
    model = mlp(nn.Tanh)
    x, y = data()
    loss = F.cross_entropy(model(x), y)
    pen = regops.hessian.trace_penalty(loss, model, num_probes=3, generator=gen(4))
    est = regops.hessian.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=3, generator=gen(4))
    assert pen.item() == pytest.approx(est.value, rel=1e-9)
    (loss + 0.1 * pen).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- progress, errors
def test_progress_bar(capsys):
    model = mlp(nn.Tanh)
    x, y = data()
    regops.hessian.trace(
        model, nn.CrossEntropyLoss(), x, y, num_probes=6, probe_batch=2, progress=True, generator=gen(0)
    )
    assert "hessian trace" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors():
    w = torch.randn(3, requires_grad=True)
    frozen = torch.randn(3)
    f = lambda p: (p[0] ** 3).sum()
    with pytest.raises(ValueError, match="none of params requires grad"):
        regops.hessian.trace(lambda p: (p[0] ** 3).sum(), [frozen])
    with pytest.raises(ValueError, match="regops: the loss must be a scalar"):
        regops.hessian.trace(lambda p: p[0] ** 3, [w])
    with pytest.raises(ValueError, match="regops: the loss must be a scalar"):
        regops.hessian.trace(lambda p: p[0] ** 3, [w], hvp="forward_over_reverse")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_probes must be >= 1"):
            regops.hessian.trace(f, [w], num_probes=bad)
        with pytest.raises(ValueError, match="num_probes must be"):
            regops.hessian.diagonal(f, [w], num_probes=bad)
        with pytest.raises(ValueError, match="num_probes must be"):
            regops.hessian.trace_penalty((w**3).sum(), [w], num_probes=bad)
    with pytest.raises(TypeError, match="num_probes must be an int"):
        regops.hessian.trace(f, [w], num_probes=2.5)
    with pytest.raises(ValueError, match="method must be one of"):
        regops.hessian.trace(f, [w], method="power")
    with pytest.raises(ValueError, match="distribution must be one of"):
        regops.hessian.trace(f, [w], distribution="uniform")
    with pytest.raises(ValueError, match="tol must be a positive"):
        regops.hessian.trace(f, [w], tol=-1.0)
    with pytest.raises(ValueError, match="needs num_probes >= 4"):
        regops.hessian.trace(f, [w], num_probes=3, method="xtrace")
    with pytest.raises(ValueError, match="need method='hutchinson'"):
        regops.hessian.trace(f, [w], method="hutch++", by="param")
    with pytest.raises(ValueError, match="params is empty"):
        regops.hessian.trace(f, [])
    with pytest.raises(ValueError, match="none of params requires grad"):
        regops.hessian.trace(f, [torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="does not depend on any of the given params"):
        regops.hessian.trace(lambda p: torch.tensor(1.0), [w])
    with pytest.raises(ValueError, match="needs a loss_fn that takes the parameters"):
        regops.hessian.trace(lambda: (w**3).sum(), [w], hvp="forward_over_reverse")
    with pytest.raises(RuntimeError, match="distributed=True needs an initialised"):
        regops.hessian.trace(f, [w], distributed=True)
    with pytest.raises(ValueError, match="must agree on d"):
        regops.hessian.linear_head_diagonal(torch.randn(4, 3), torch.randn(2, 5))


# ---------------------------------------------------------------------------------------------- Gauss-Newton
def exact_ggn(model: nn.Module, x: torch.Tensor, loss: str, reduction: str) -> tuple[torch.Tensor, list[str]]:
    """Full GGN ``w sum_n J_n^T Lambda_n J_n`` from per-example Jacobians (small models only)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def out_n(ps, xn):
        return torch.func.functional_call(model, ps, (xn.unsqueeze(0),))[0]

    jac = torch.func.vmap(torch.func.jacrev(out_n), in_dims=(None, 0))(params, x)  # {name: [B, C, *shape]}
    j = torch.cat([jac[n].flatten(2) for n in names], dim=2)  # [B, C, P]
    z = model(x).detach()
    if loss == "cross_entropy":
        p = torch.softmax(z, -1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        w = 1 / x.shape[0] if reduction == "mean" else 1.0
    else:
        lam = 2 * torch.eye(z.shape[1], dtype=z.dtype).expand(x.shape[0], -1, -1)
        w = 1 / z.numel() if reduction == "mean" else 1.0
    return w * torch.einsum("bcp,bcd,bdq->pq", j, lam, j), names


def test_ggn_trace_equals_exact_hessian_for_relu():
    model = mlp(nn.ReLU, sizes=(4, 7, 6, 3))
    x, y = data()
    crit = nn.CrossEntropyLoss()
    names, blocks = exact_hessian_blocks(model, lambda z: crit(z, y), x)
    exact = sum(torch.trace(b).item() for b in blocks)
    got = regops.hessian.ggn_trace(model, x, y)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(exact, rel=1e-10)
    per_param = regops.hessian.ggn_trace(model, x, y, by="param")
    for name, block in zip(names, blocks, strict=True):
        assert per_param[name].item() == pytest.approx(torch.trace(block).item(), rel=1e-9, abs=1e-12)
    diag = regops.hessian.ggn_diagonal(model, x, y, chunk_size=5)
    for name, block in zip(names, blocks, strict=True):
        torch.testing.assert_close(diag[name].flatten(), torch.diagonal(block), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("loss", "reduction"), [("cross_entropy", "mean"), ("cross_entropy", "sum"), ("mse", "mean"), ("mse", "sum")]
)
def test_ggn_matches_jacobian_definition_on_tanh(loss, reduction):
    model = mlp(nn.Tanh, sizes=(4, 6, 3))
    x, y = data(n=10)
    g, names = exact_ggn(model, x, loss, reduction)
    targets = y if loss == "cross_entropy" else torch.randn(10, 3, dtype=torch.float64)
    got = regops.hessian.ggn_trace(model, x, targets, loss=loss, reduction=reduction)
    assert got.item() == pytest.approx(torch.trace(g).item(), rel=1e-10)
    diag = regops.hessian.ggn_diagonal(model, x, targets, loss=loss, reduction=reduction)
    torch.testing.assert_close(torch.cat([diag[n].flatten() for n in names]), torch.diagonal(g))
    if loss == "cross_entropy" and reduction == "mean":
        # tanh: the GGN is not the Hessian, and Hutchinson estimates the Hessian, not the GGN
        hess = exact_trace(model, lambda z: F.cross_entropy(z, y), x)
        assert abs(got.item() - hess) > 0.05 * abs(hess)
        est = regops.hessian.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=400, generator=gen(3))
        assert abs(est.value - hess) <= 5 * est.stderr


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_monte_carlo_is_unbiased(loss):
    model = mlp(nn.Tanh, sizes=(4, 6, 3))
    x, y = data(n=10)
    targets = y if loss == "cross_entropy" else torch.randn(10, 3, dtype=torch.float64)
    exact = regops.hessian.ggn_trace(model, x, targets, loss=loss).item()
    exact_diag = regops.hessian.ggn_diagonal(model, x, targets, loss=loss)
    n = 300
    traces = torch.stack(
        [regops.hessian.ggn_trace(model, x, targets, loss=loss, method="mc", generator=gen(s)) for s in range(n)]
    )
    assert abs(traces.mean().item() - exact) <= 5 * traces.std().item() / math.sqrt(n)
    diags = [regops.hessian.ggn_diagonal(model, x, targets, loss=loss, method="mc", generator=gen(s)) for s in range(n)]
    for name, ex in exact_diag.items():
        samples = torch.stack([d[name] for d in diags])
        z = (samples.mean(0) - ex) / (samples.std(0) / math.sqrt(n) + 1e-12)
        assert (z.abs() <= 4.5).all(), name


def test_ggn_trace_matches_backpack_in_float32():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    x, y = torch.randn(32, 20, generator=gen(0)), torch.randint(0, 5, (32,), generator=gen(1))
    got = regops.hessian.ggn_trace(model, x, y)
    ext = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss())(ext(x), y)
    with backpack.backpack(DiagGGNExact()):
        loss.backward()
    expected = sum(p.diag_ggn_exact.sum() for p in model.parameters())
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_ggn_bad_inputs():
    model = mlp(nn.Tanh)
    x, y = data()
    with pytest.raises(ValueError, match="loss must be one of"):
        regops.hessian.ggn_trace(model, x, y, loss="nll")
    with pytest.raises(ValueError, match="reduction must be one of"):
        regops.hessian.ggn_trace(model, x, y, reduction="none")
    with pytest.raises(ValueError, match="method must be one of"):
        regops.hessian.ggn_diagonal(model, x, y, method="hutchinson")
    with pytest.raises(ValueError, match=r"logits of shape \[B, C\]"):
        regops.hessian.ggn_trace(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)).double(), x, y)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        regops.hessian.ggn_trace(lambda t: t, x, y)
    with pytest.raises(ValueError, match="targets must have the batch size"):
        regops.hessian.ggn_trace(model, x, y[:3])
