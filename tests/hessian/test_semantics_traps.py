"""Hessian estimates a new user runs give the exact answer or say how far off they are: every activation of
torch.nn, Hugging Face's ACT2FN and timm's layers runs exactly on every engine (no silent finite differences),
finite differences report their error, Hutch++/XTrace take any probe count, an unmet tol warns, and a shuffling
DataLoader gives one fixed operator."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regops

H = regops.hessian
F64 = torch.float64
ENGINES = ("double_backward", "forward_over_reverse", "loop", "auto")


def _exact_hardsigmoid(x):
    """An independent exact form (torch's own has no second derivative to compare with)."""
    return torch.where((x > -3) & (x < 3), x / 6 + 0.5, (x >= 3).to(x.dtype))


class _Ref(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _torch_activations() -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """name -> (activation, independent reference for the exact Hessian or None: the activation itself)."""
    acts = {
        "ReLU": nn.ReLU(), "ReLU6": nn.ReLU6(), "Hardtanh": nn.Hardtanh(-2.0, 1.5), "Hardswish": nn.Hardswish(),
        "SiLU": nn.SiLU(), "Mish": nn.Mish(), "GELU": nn.GELU(), "GELU-tanh": nn.GELU("tanh"), "ELU": nn.ELU(),
        "SELU": nn.SELU(), "CELU": nn.CELU(0.7), "Softplus": nn.Softplus(2.0, 1.0), "LogSigmoid": nn.LogSigmoid(),
        "LeakyReLU": nn.LeakyReLU(0.1), "PReLU": nn.PReLU(), "Threshold": nn.Threshold(0.1, 0.5),
        "Softshrink": nn.Softshrink(), "Hardshrink": nn.Hardshrink(), "Tanhshrink": nn.Tanhshrink(),
        "Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(), "Softsign": nn.Softsign(), "Softmax": nn.Softmax(-1),
        "LogSoftmax": nn.LogSoftmax(-1), "Softmin": nn.Softmin(-1), "GLU": nn.GLU(),
        "SiLU-inplace": nn.SiLU(inplace=True), "Hardswish-inplace": nn.Hardswish(inplace=True),
    }  # fmt: skip
    out = {k: (v, None) for k, v in acts.items()}
    out["Hardsigmoid"] = (nn.Hardsigmoid(), _Ref(_exact_hardsigmoid))
    out["Hardsigmoid-inplace"] = (nn.Hardsigmoid(inplace=True), _Ref(_exact_hardsigmoid))
    out["RReLU-eval"] = (nn.RReLU(0.1, 0.3).eval(), nn.LeakyReLU(0.2))
    out["RReLU-eval-inplace"] = (nn.RReLU(0.1, 0.3, inplace=True).eval(), nn.LeakyReLU(0.2))
    return out


def _hf_activations() -> dict[str, tuple[nn.Module, nn.Module | None]]:
    try:
        from transformers.activations import ACT2FN
    except ImportError:
        return {}
    names = ("gelu_new", "gelu_fast", "quick_gelu", "gelu_pytorch_tanh", "gelu_accurate", "relu2", "laplace", "mish")
    return {f"hf-{n}": (ACT2FN[n], None) for n in names if n in ACT2FN}


def _timm_activations() -> dict[str, tuple[nn.Module, nn.Module | None]]:
    try:
        import timm.layers.activations as ta
        import timm.layers.activations_me as tme
    except ImportError:
        return {}
    out = {}
    for mod, names in ((ta, ("HardSwish", "HardSigmoid", "HardMish", "Swish", "Mish", "GELUTanh", "QuickGELU")),
                       (tme, ("HardSwishMe", "HardSigmoidMe", "HardMishMe", "SwishMe", "MishMe"))):  # fmt: skip
        for n in names:
            if hasattr(mod, n):
                out[f"timm-{n}"] = (getattr(mod, n)(), None)
    return out


ACTIVATIONS = {**_torch_activations(), **_hf_activations(), **_timm_activations()}


def _dense_hessian(model: nn.Module, x, y) -> torch.Tensor:
    params = dict(model.named_parameters())
    names = list(params)

    def loss(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(p.detach() for p in params.values()))
    sizes = [p.numel() for p in params.values()]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                      for i in range(len(names))])  # fmt: skip


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_gives_the_exact_hessian_on_every_engine(name):
    act, ref_act = ACTIVATIONS[name]
    torch.manual_seed(1)
    width = 3 if name == "GLU" else 6
    model = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(width, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(8, 4, dtype=F64, generator=g)  # pre-activations on both sides of every kink
    y = torch.randint(0, 3, (8,), generator=g)
    reference = model if ref_act is None else nn.Sequential(model[0], ref_act, model[2])
    exact = _dense_hessian(reference, x, y)
    for engine in ENGINES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = H.HessianLinearOperator(model, nn.CrossEntropyLoss(), x, y, hvp=engine)
            dense = op.to_dense()
        assert op.engine != "finite_difference", (name, engine)
        assert op.fd_error is None
        # timm's *Me layers are autograd Functions without forward-mode rules: forward-over-reverse falls back to
        # batched double backward (exact), with a warning; nothing else may fall back
        fell_back = [w for w in caught if "falling back" in str(w.message)]
        assert not fell_back or (name.endswith("Me") and engine in ("forward_over_reverse", "auto")), fell_back
        torch.testing.assert_close(dense, exact, rtol=1e-10, atol=1e-12, msg=f"{name} {engine}")


def test_hardsigmoid_net_trace_is_exact_per_probe():
    """A squeeze-excitation gate (MobileNetV3's) with pre-activations near the kinks: hvp='auto' used to fall
    back to float32 finite differences (per-probe values 26% off). Now every engine gives the exact terms."""
    torch.manual_seed(0)

    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Linear(8, 4), nn.Linear(4, 8)
            self.act, self.gate, self.head = nn.Hardswish(), nn.Hardsigmoid(), nn.Linear(8, 5)

        def forward(self, x):
            h = self.act(self.conv(x))
            s = self.gate(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
            return self.head((h * s[:, :, None, None]).mean((2, 3)))

    model = SE()
    x, y = 4 * torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        est = H.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=6, generator=torch.Generator().manual_seed(0))
    assert est.engine == "forward_over_reverse" and est.fd_error is None
    m64 = SE().double()
    m64.load_state_dict(model.state_dict())
    m64.gate = _Ref(_exact_hardsigmoid)
    vs = torch.cat([p.flatten(1) for p in H.probes(model, 6, generator=torch.Generator().manual_seed(0))], 1)
    exact = H.HessianLinearOperator(m64, nn.CrossEntropyLoss(), x.double(), y, hvp="double_backward")
    want = (vs.double() * exact.matmat(vs.double().T).T).sum(1)
    torch.testing.assert_close(est.samples.double(), want, rtol=1e-4, atol=1e-5)


class _OnceDifferentiable(torch.autograd.Function):
    """tanh with a first-order-only backward: the model has no double backward."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_finite_differences_report_their_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _Ref(_OnceDifferentiable.apply), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.warns(RuntimeWarning, match=r"estimated relative error of H v \d"):
        est = H.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=4)
    assert est.engine == "finite_difference" and 0 < est.fd_error < 1e-2
    # smooth loss: the Richardson estimate is within 10x of the true error of H v. At ReLU kinks a step that
    # crosses one changes the difference by O(1): the estimate flags the non-smoothness (large), though it can
    # over- or understate the error of a given product
    for act, band in ((nn.Tanh(), True), (nn.ReLU(), False)):
        model = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 3))
        v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1))
        op = H.HessianLinearOperator(model, nn.CrossEntropyLoss(), x, y, hvp="finite_difference")
        hv = op @ v
        exact = H.HessianLinearOperator(model, nn.CrossEntropyLoss(), x, y, hvp="double_backward") @ v
        actual = ((hv - exact).norm() / exact.norm()).item()
        if band:
            assert actual / 10 <= op.fd_error <= 10 * actual, (actual, op.fd_error)
        else:
            assert op.fd_error > 0.05, (actual, op.fd_error)


def test_sketches_take_any_probe_count_and_record_the_cap():
    """XTrace with more than 2N probes crashed in linalg.inv; on a rank-deficient Hessian (a linear head) even
    fewer did."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()  # N = 8, Hessian rank 4
    x, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    exact = torch.trace(H.HessianLinearOperator(model, nn.CrossEntropyLoss(), x, y).to_dense()).item()
    for method in ("xtrace", "hutch++"):
        for m in (12, 16, 18, 40):
            est = H.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=m, method=method)
            assert est.probe_cap == 16 and est.num_matvecs <= min(m, 16)
            assert est.value == pytest.approx(exact, rel=1e-10), (method, m)
    full = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # N = 26
    exact = torch.trace(H.HessianLinearOperator(full, nn.CrossEntropyLoss(), x, y).to_dense()).item()
    est = H.trace(full, nn.CrossEntropyLoss(), x, y, num_probes=20, method="xtrace")
    assert est.num_matvecs == 20 and abs(est.value - exact) < 4 * est.stderr + 1e-9


def test_unmet_tol_warns_with_what_it_would_take():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    with pytest.warns(RuntimeWarning, match=r"tol=0.01 not reached: the trace has a relative standard error"):
        est = H.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=200, tol=0.01)
    assert est.num_matvecs == 200 and est.relative_stderr > 0.01
    with pytest.warns(RuntimeWarning, match="tol=0.001 not reached: the diagonal"):
        H.diagonal(model, nn.CrossEntropyLoss(), x, y, num_probes=4, tol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        est = H.trace(model, nn.CrossEntropyLoss(), x, y, num_probes=1000, tol=0.05)
    assert est.relative_stderr < 0.05 and est.num_matvecs < 1000


def test_a_shuffling_loader_gives_one_fixed_operator():
    """Every product walks the loader again: with a shuffling sampler (and drop_last, and dropout) each probe
    batch saw other examples, so the 'Hessian' was not one matrix. The first pass's batches are replayed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 2)).double()
    x, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, drop_last=True)
    op = H.HessianLinearOperator(model, nn.CrossEntropyLoss(), loader, probe_batch=4)
    dense = op.to_dense()  # 32 products in 8 passes over the loader
    torch.testing.assert_close(dense, dense.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.matmat(torch.eye(op.shape[0], dtype=F64)), dense, rtol=1e-12, atol=1e-12)
