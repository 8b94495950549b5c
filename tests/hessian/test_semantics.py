"""Hessian estimates as a new user meets them: every standard loss on every engine, the bar of issue 11
(nn.Linear + nn.MSELoss, tiny HF GPT-2 with its default attention), detached GGN values, losses that reach no
param, frozen and mixed-dtype params, dropout in train mode, finite differences and their O(h^2) bias, the
linear operator and user probes.

Every random draw is seeded; statistical checks use 3 standard errors of estimates with 32+ probes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from regops import hessian as H

ENGINES = ("auto", "double_backward", "forward_over_reverse", "loop", "finite_difference")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat_hessian(model: nn.Module, loss_of_output, x) -> torch.Tensor:
    """Exact ``[N, N]`` Hessian w.r.t. the trainable params (autograd.functional.hessian, double backward)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    ps = tuple(p.detach() for _, p in named)

    def f(*q):
        return loss_of_output(torch.func.functional_call(model, dict(zip(names, q, strict=True)), (x,)))

    h = torch.autograd.functional.hessian(f, ps)
    return torch.cat(
        [torch.cat([h[i][j].reshape(ps[i].numel(), ps[j].numel()) for j in range(len(ps))], 1) for i in range(len(ps))]
    )


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


LOSSES = {
    "MSELoss": (nn.MSELoss(), "real"),
    "F.mse_loss": (lambda o, t: F.mse_loss(o, t), "real"),
    "MSELoss-sum": (nn.MSELoss(reduction="sum"), "real"),
    "CrossEntropyLoss": (nn.CrossEntropyLoss(label_smoothing=0.1), "class"),
    "BCEWithLogitsLoss": (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)), "prob"),
    "HuberLoss": (nn.HuberLoss(delta=0.7), "real"),
    "F.huber_loss": (lambda o, t: F.huber_loss(o, t, delta=0.7), "real"),
    "SmoothL1Loss": (nn.SmoothL1Loss(beta=0.7), "real"),
    "NLLLoss": (lambda o, t: F.nll_loss(F.log_softmax(o, -1), t), "class"),
    "SoftMarginLoss": (nn.SoftMarginLoss(), "sign"),
    "MultiMarginLoss": (nn.MultiMarginLoss(p=2, margin=2.0), "class"),
}
# torch's multi_margin_loss has no double backward: the exact reference uses its definition.
REFERENCE = {
    "MultiMarginLoss": lambda o, t: (
        ((2.0 - o.gather(1, t[:, None]) + o).clamp_min(0) ** 2).scatter(1, t[:, None], 0.0).sum(1).div(3).mean()
    )
}


def targets(kind: str, g: torch.Generator, n: int = 8) -> torch.Tensor:
    if kind == "class":
        return torch.randint(0, 3, (n,), generator=g)
    if kind == "prob":
        return torch.rand(n, 3, generator=g, dtype=torch.float64)
    if kind == "sign":
        return (torch.randint(0, 2, (n, 3), generator=g) * 2 - 1).double()
    return torch.randn(n, 3, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- losses x engines
@pytest.mark.parametrize("loss", LOSSES)
def test_every_engine_handles_every_standard_loss(loss):
    crit, kind = LOSSES[loss]
    model, g = mlp(), gen(1)
    x = torch.randn(8, 3, dtype=torch.float64, generator=g)
    y = targets(kind, g)
    ref = REFERENCE.get(loss, crit)
    full = flat_hessian(model, lambda out: ref(out, y), x)
    v = (torch.randint(0, 2, (3, full.shape[0]), generator=g) * 2 - 1).double()
    expected = ((v @ full) * v).sum(1)
    for hvp in ENGINES:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no engine falls back on a standard loss
            est = H.trace(model, crit, x, y, probes=v, hvp=hvp)
            diag = H.diagonal(model, crit, x, y, probes=v, hvp=hvp)
        tol = dict(rtol=1e-6, atol=1e-8) if hvp == "finite_difference" else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(est.samples, expected, **tol, msg=f"{loss} {hvp}")
        torch.testing.assert_close(diag.trace.samples, expected, **tol, msg=f"{loss} {hvp}")


def test_rewritten_losses_equal_torch():
    """Under twice_differentiable(), MSE, Huber, soft-margin and multi-margin are elementwise ops: same values."""
    g = gen(0)
    x, yr = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(5, 4, dtype=torch.float64, generator=g)
    yc, ys = torch.randint(0, 4, (5,), generator=g), (torch.randint(0, 2, (5, 4), generator=g) * 2 - 1).double()
    w, we = torch.rand(4, dtype=torch.float64, generator=g), torch.rand(5, 4, dtype=torch.float64, generator=g)
    calls = [lambda: F.mse_loss(x, yr, size_average=False)]
    for red in ("mean", "sum", "none"):
        calls += [
            lambda red=red: F.mse_loss(x, yr, reduction=red),
            lambda red=red: F.mse_loss(x, yr, reduction=red, weight=we),
            lambda red=red: F.huber_loss(x, yr, reduction=red, delta=0.6),
            lambda red=red: F.soft_margin_loss(x, ys, reduction=red),
            lambda red=red: F.multi_margin_loss(x[0], yc[:1], reduction=red),
        ]
        for p in (1, 2):
            for ww in (None, w):
                calls.append(lambda red=red, p=p, ww=ww: F.multi_margin_loss(x, yc, p, 0.7, ww, reduction=red))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # size_average is deprecated
        for call in calls:
            expected = call()
            with H.twice_differentiable():
                got = call()
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_bar_linear_mse_default_engine_within_five_stderr():
    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2)
    exact = torch.trace(flat_hessian(model, lambda out: F.mse_loss(out, y), x)).item()
    est = H.trace(model, nn.MSELoss(), x, y, generator=gen(0))
    assert abs(est.value - exact) < 5 * est.stderr
    est_f = H.trace(lambda p: F.mse_loss(x @ p["weight"].T + p["bias"], y), dict(model.named_parameters()))
    assert abs(est_f.value - exact) < 5 * est_f.stderr
    diag = H.diagonal(model, nn.MSELoss(), x, y, num_probes=32, generator=gen(1))
    # Linear + MSE: H is block diagonal per output, its diagonal is exact with Rademacher probes... up to the
    # weight-bias cross terms; compare against the exact diagonal within 5 stderr per coordinate.
    d_exact = torch.diagonal(flat_hessian(model, lambda out: F.mse_loss(out, y), x))
    d_est = torch.cat([diag.value["weight"].flatten(), diag.value["bias"]]).double()
    d_err = torch.cat([diag.stderr["weight"].flatten(), diag.stderr["bias"]]).double()
    assert torch.all((d_est - d_exact).abs() <= 5 * d_err + 1e-6)


# ---------------------------------------------------------------------------------------------- GGN
@pytest.mark.parametrize("kwargs", [{}, {"method": "mc"}, {"by": "param"}, {"loss": "mse"}, {"reduction": "sum"}])
def test_ggn_trace_is_detached(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    out = H.ggn_trace(model, x, y, generator=gen(0), **kwargs)
    values = out.values() if isinstance(out, dict) else [out]
    assert all(not v.requires_grad and v.grad_fn is None for v in values)
    for m in ("exact", "mc"):
        assert all(not v.requires_grad for v in H.ggn_diagonal(model, x, y, method=m, generator=gen(0)).values())


# ---------------------------------------------------------------------------------------------- errors
def test_loss_reaching_no_param_raises_everywhere():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda p: (other**3).sum()  # requires grad, but not through w
    for hvp in ENGINES:
        with pytest.raises(ValueError, match="does not depend on any of the given params"):
            H.trace(f, [w], num_probes=2, hvp=hvp)
        with pytest.raises(ValueError, match="does not depend on any of the given params"):
            H.diagonal(f, [w], num_probes=2, hvp=hvp)
    for hvp in ("double_backward", "loop", "finite_difference"):
        with pytest.raises(ValueError, match="does not depend on any of the given params"):
            H.trace(lambda: (other**3).sum(), [w], num_probes=2, hvp=hvp)
    with pytest.raises(ValueError, match="does not depend on any of the given params"):
        H.trace_penalty((other**3).sum(), [w])
    with pytest.raises(ValueError, match="does not depend on any of the given params"):
        H.trace_penalty(torch.tensor(1.0), [w])
    with pytest.raises(ValueError, match="does not depend on any of the given params"):
        H.HessianLinearOperator(f, [w]) @ torch.ones(3, dtype=torch.float64)
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="does not depend on any of the given params"):
        H.trace(model, lambda out, t: (other**2).sum(), torch.randn(4, 3), None, num_probes=2)
    # Linear in w: a true zero Hessian, not an error.
    est = H.trace(lambda p: (p[0] * other).sum(), [w], num_probes=2)
    assert est.value == 0.0


# ---------------------------------------------------------------------------------------------- frozen params
def test_frozen_params_are_left_out_in_every_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    crit = nn.MSELoss()
    kw = dict(num_probes=4, generator=None)
    ref = H.trace(model, crit, x, y, **{**kw, "generator": gen(0)})
    params = list(model.parameters())
    closure = lambda: crit(model(x), y)
    functional = lambda ps: crit(torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)
    names = [n for n, _ in model.named_parameters()]
    as_list = H.trace(closure, model.parameters(), **{**kw, "generator": gen(0)})
    as_func = H.trace(functional, params, **{**kw, "generator": gen(0)})  # frozen entry still passed to loss_fn
    as_dict = H.trace(
        lambda d: crit(torch.func.functional_call(model, d, (x,)), y),
        dict(model.named_parameters()),
        **{**kw, "generator": gen(0)},
    )
    for est in (as_list, as_func, as_dict):
        assert est.value == pytest.approx(ref.value, rel=1e-10)
    diag = H.diagonal(closure, params, num_probes=2)
    assert diag.value[1] is None and diag.value[0].shape == params[0].shape
    assert "0.bias" not in H.diagonal(model, crit, x, y, num_probes=2).value
    loss = crit(model(x), y)
    pen = H.trace_penalty(loss, model.parameters(), generator=gen(0))
    pen_ref = H.trace_penalty(crit(model(x), y), [p for p in params if p.requires_grad], generator=gen(0))
    assert pen.item() == pytest.approx(pen_ref.item(), rel=1e-10)
    op = H.HessianLinearOperator(closure, params)
    assert op.shape[0] == sum(p.numel() for p in params if p.requires_grad)


# ---------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("order", [0, 1])
def test_mixed_dtype_params_keep_their_precision(order):
    # A separable loss: H is diagonal, so v * Hv = diag(H) exactly for Rademacher probes; float64 entries must
    # come out at float64 precision whatever the order of params (float32 accumulation would be off by ~1e-7).
    a = torch.linspace(0.5, 1.5, 7, dtype=torch.float32).requires_grad_()
    b = (1.0 + 1e-9 * torch.arange(1, 6, dtype=torch.float64)).requires_grad_()
    params = [a, b] if order == 0 else [b, a]

    def f(ps):
        pa, pb = (ps[0], ps[1]) if order == 0 else (ps[1], ps[0])
        return (pa**3).sum().double() + (pb**4).sum() / 3.0

    diag = H.diagonal(f, params, num_probes=3, generator=gen(0))
    db = diag.value[1 - order] if order == 0 else diag.value[0]
    assert db.dtype == torch.float64
    exact_b = 4.0 * b.detach() ** 2
    torch.testing.assert_close(db, exact_b, rtol=1e-14, atol=0)
    da = diag.value[0] if order == 0 else diag.value[1]
    assert da.dtype == torch.float32
    torch.testing.assert_close(da, 6.0 * a.detach(), rtol=1e-6, atol=0)
    tr = H.trace(f, params, num_probes=3, generator=gen(0))
    assert tr.value == pytest.approx(exact_b.sum().item() + 6.0 * a.detach().double().sum().item(), rel=1e-7)


# ---------------------------------------------------------------------------------------------- dropout
def test_dropout_in_train_mode_is_one_fixed_mask_on_every_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double().train()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    crit = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    v = (torch.randint(0, 2, (4, n), generator=gen(1)) * 2 - 1).double()
    # Reference: the Hessian at the mask a plain forward draws from the same generator state.
    torch.manual_seed(5)
    loss = crit(model(x), y)
    after = torch.rand(1)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    expected = []
    for k in range(4):
        vk = torch.split(v[k], [p.numel() for p in params])
        hv = torch.autograd.grad(grads, params, [t.view_as(p) for t, p in zip(vk, params, strict=True)], True)
        expected.append(sum((t * h.flatten()).sum() for t, h in zip(vk, hv, strict=True)))
    expected = torch.stack(expected)
    for hvp in ENGINES:
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no vmap warning: vmap runs randomness="same"
            est = H.trace(model, crit, x, y, probes=v, hvp=hvp, probe_batch=2)
        tol = dict(rtol=1e-6, atol=1e-8) if hvp == "finite_difference" else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(est.samples, expected, **tol, msg=hvp)
        assert torch.rand(1).item() == after.item()  # the generator advanced as by one plain forward


# ---------------------------------------------------------------------------------------------- finite differences
def test_finite_difference_bias_is_order_h_squared():
    # L = sum w^4: (g(w + h v) - g(w - h v)) / 2h = Hv + 4 h^2 v^3 exactly, so with Rademacher probes every
    # term v^T Hv_fd is v^T H v + 4 h^2 N.
    w = torch.randn(50, dtype=torch.float64, generator=gen(0), requires_grad=True)
    exact = H.trace(lambda p: (p**4).sum(), w, num_probes=4, generator=gen(1), hvp="double_backward")
    for h in (1e-2, 2e-2, 4e-2):
        fd = H.trace(lambda p: (p**4).sum(), w, num_probes=4, generator=gen(1), hvp="finite_difference", fd_eps=h)
        torch.testing.assert_close(
            fd.samples - exact.samples, torch.full((4,), 4 * h * h * 50.0, dtype=torch.float64), rtol=1e-6, atol=0
        )
    # Default step: bias 4 h^2 N with h = eps^(1/3), and rounding well under it.
    fd = H.trace(lambda p: (p**4).sum(), w, num_probes=4, generator=gen(1), hvp="finite_difference")
    h = torch.finfo(torch.float64).eps ** (1 / 3)
    assert abs(fd.value - exact.value - 4 * h * h * 50) < 1e-6


def test_finite_difference_closure_restores_params_bit_for_bit():
    w = torch.randn(7, dtype=torch.float32, generator=gen(0), requires_grad=True)
    before = w.detach().clone()
    est = H.diagonal(lambda: (w.sin() * w).sum(), [w], num_probes=3, hvp="finite_difference", generator=gen(1))
    assert torch.equal(w.detach(), before)
    ref = H.diagonal(lambda: (w.sin() * w).sum(), [w], num_probes=3, hvp="double_backward", generator=gen(1))
    torch.testing.assert_close(est.value[0], ref.value[0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="fd_eps must be a positive number"):
        H.trace(lambda: (w**4).sum(), [w], hvp="finite_difference", fd_eps=0.0)


def test_finite_differences_need_only_first_derivatives():
    class NoDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z**3

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return g * 3 * z.detach() ** 2  # not differentiable again: grad has no graph to z

    w = torch.randn(5, dtype=torch.float64, generator=gen(0), requires_grad=True)
    f = lambda: torch.ops.aten.sin(NoDoubleBackward.apply(w)).sum()  # noqa: E731
    exact = H.trace(lambda: (w**3).sin().sum(), [w], num_probes=4, generator=gen(1))
    # Double backward through such a Function silently drops its second derivative; finite differences use
    # first derivatives only and see the true curvature.
    fd = H.trace(f, [w], num_probes=4, generator=gen(1), hvp="finite_difference")
    torch.testing.assert_close(fd.samples, exact.samples, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------- linear operator
def test_linear_operator_and_user_probes():
    model, g = mlp(), gen(2)
    x, y = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.randint(0, 3, (6,), generator=g)
    crit = nn.CrossEntropyLoss()
    full = flat_hessian(model, lambda out: crit(out, y), x)
    op = H.HessianLinearOperator(model, crit, x, y)
    n = full.shape[0]
    assert op.shape == (n, n) and op.dtype == torch.float64
    v = torch.randn(n, dtype=torch.float64, generator=g)
    m = torch.randn(n, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(op @ v, full @ v)
    torch.testing.assert_close(op.matvec(m), full @ m)
    torch.testing.assert_close(op.matmat(m), full @ m)
    np.testing.assert_allclose(op @ v.numpy(), (full @ v).numpy(), rtol=1e-10)
    parts = [
        t.view_as(p) for t, p in zip(v.split([p.numel() for p in model.parameters()]), model.parameters(), strict=True)
    ]
    hv = op.matvec(parts)
    torch.testing.assert_close(torch.cat([h.flatten() for h in hv]), full @ v)
    torch.testing.assert_close(op.to_dense(), full)
    # User probes: the same terms as the operator gives.
    probes = torch.randn(5, n, dtype=torch.float64, generator=g)
    est = H.trace(model, crit, x, y, probes=probes)
    torch.testing.assert_close(est.samples, ((probes @ full) * probes).sum(1))
    per_param = {
        name: p for name, p in zip(op.names, probes.split([p.numel() for p in model.parameters()], 1), strict=True)
    }
    shaped = {k: t.reshape(5, *dict(model.named_parameters())[k].shape) for k, t in per_param.items()}
    est2 = H.diagonal(model, crit, x, y, probes=shaped)
    torch.testing.assert_close(est2.trace.samples, est.samples)
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        H.trace(model, crit, x, y, probes=torch.randn(5, n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected a matrix"):
        op.matmat(torch.randn(n + 1, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- transformers
def test_bar_gpt2_default_attention_within_five_stderr_of_exact():
    from tests.zoo import ZOO

    entry = ZOO["gpt2"]
    model = entry.build(torch.float64)
    assert model.config._attn_implementation == "sdpa"
    ids, tgt = entry.batch(2, generator=gen(0))
    keep = ("transformer.h.1.attn.c_attn.bias", "transformer.h.0.ln_1.weight", "transformer.ln_f.bias")
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)  # the exact reference needs one double backward per coordinate
    crit = lambda logits, t: F.cross_entropy(logits.flatten(0, 1), t.flatten())  # noqa: E731

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, x):
            return self.lm(input_ids=x).logits

    est = H.trace(LM(), crit, ids, tgt, num_probes=48, generator=gen(1))
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(crit(model(input_ids=ids).logits, tgt), params, create_graph=True)
        flat = torch.cat([g.flatten() for g in grads])
        eye = torch.eye(n, dtype=torch.float64)
        rows = torch.autograd.grad(flat, params, eye, is_grads_batched=True, retain_graph=True)
    exact = torch.diagonal(torch.cat([r.reshape(n, -1) for r in rows], 1)).sum().item()
    assert 0 < est.stderr < 0.5 * abs(exact)  # an informative estimate, not a wide one that passes anyway
    assert abs(est.value - exact) < 5 * est.stderr, (est, exact)
    # trace_penalty needs the loss computed under twice_differentiable(); without it, a clear error.
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        H.trace_penalty(crit(model(input_ids=ids).logits, tgt), params, generator=gen(2))
    with H.twice_differentiable():
        loss = crit(model(input_ids=ids).logits, tgt)
    assert torch.isfinite(H.trace_penalty(loss, params, generator=gen(2)))


def test_finite_differences_on_regops_fused_ops_in_train_mode_hold_one_mask():
    from tests.zoo import ZOO

    entry = ZOO["regops_fused"]
    model = entry.build(torch.float64).train()
    model.p = 0.5
    x, y = entry.batch(6, generator=gen(0), dtype=torch.float64)
    crit = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    v = (torch.randint(0, 2, (2, n), generator=gen(1)) * 2 - 1).double()

    def fd(h):
        torch.manual_seed(7)
        return H.trace(model, crit, x, y, probes=v, hvp="finite_difference", fd_eps=h).samples

    # Both sides of every difference see the same masks, so the terms converge with the O(h^2) bias of central
    # differences: halving h divides the change by 4 (a mask redrawn between the sides would make them O(1/h)).
    a, b, c = fd(4e-3), fd(2e-3), fd(1e-3)
    ratio = (a - b) / (b - c)
    assert torch.all((ratio > 3.6) & (ratio < 4.4)), ratio
    torch.testing.assert_close(fd(1e-3), c, rtol=0, atol=0)  # the same mask from the same generator state
    # ... and the masks matter: the eval-mode Hessian is another matrix.
    model.eval()
    evaluated = H.trace(model, crit, x, y, probes=v, hvp="finite_difference", fd_eps=1e-4).samples
    assert not torch.allclose(evaluated, c, rtol=1e-2)


def test_dataloader_with_dropout_same_masks_on_every_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 3)).double().train()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    crit = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    v = (torch.randint(0, 2, (3, n), generator=gen(1)) * 2 - 1).double()
    results = {}
    for hvp in ("double_backward", "forward_over_reverse", "finite_difference"):
        torch.manual_seed(3)
        results[hvp] = H.trace(model, crit, loader, probes=v, hvp=hvp, probe_batch=1).samples
    torch.testing.assert_close(results["forward_over_reverse"], results["double_backward"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results["finite_difference"], results["double_backward"], rtol=1e-6, atol=1e-8)


def test_public_probes_reproduce_the_estimators_probes_with_frozen_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[2].weight.requires_grad_(False)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    vs = H.probes(model, 6, generator=gen(4))
    assert len(vs) == 3
    drawn = H.trace(model, nn.MSELoss(), x, y, num_probes=6, generator=gen(4))
    given = H.trace(model, nn.MSELoss(), x, y, probes=list(vs))
    torch.testing.assert_close(drawn.samples, given.samples, rtol=1e-12, atol=1e-14)
    fd = H.trace(model, nn.MSELoss(), x, y, num_probes=6, generator=gen(4), hvp="finite_difference")
    torch.testing.assert_close(fd.samples, drawn.samples, rtol=1e-6, atol=1e-8)  # one probe at a time, same ones
