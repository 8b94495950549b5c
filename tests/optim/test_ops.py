"""The optim ops' kernels against the reference: the C++ CPU kernel and the Triton kernel (interpreted on CPU) give
the reference's bits for every elementwise output (step, perturbation, axpby) in every dtype, and its sums to
rounding; the Gaussian noise is one stream whatever the backend or the split; opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch
from regops.optim import ops
from regops.optim import reference as ref

SHAPES = [(3, 5), (7,), (), (4, 3, 2), (0, 3), (5, 0), (1000,), (63, 65)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _backends() -> list[str]:
    out = []
    for backend in ("cpp", "triton"):
        if dispatch.why_not("optim_step", backend, torch.device("cpu")) is None:
            out.append(backend)
    return out


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def _hyper(method: str, noise: bool) -> torch.Tensor:
    values = [1e-2, 0.9, 0.999 if method == "adam" else 0.1, 1e-8, 0.1, 0.9, 2.0, 0.5 if noise else 0.0, 0.55, 0.7]
    return torch.tensor(values, dtype=torch.float64)


def _step_case(dtype, method, decay, ams=False, ema=False, restore=False, rows=False, clip=False, noise=False,
               scale=False, inf=None, maximize=False):  # fmt: skip
    """Inputs of one optim_step call (fresh tensors; seeded)."""
    g = torch.Generator().manual_seed(1)

    def like(positive=False):
        out = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        return [(t.abs() if positive else t).to(dtype) for t in out]

    params, grads = like(), like()
    n = len(params)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        params=params, grads=grads, state1=like(True), state2=like(True), state3=like(True) if ams else [],
        steps=[torch.tensor(float(k % 3), dtype=torch.float32) for k in range(n)], ema=like() if ema else [],
        anchors=like() if decay in ("l2sp", "ewc") else [], fishers=like(True) if decay == "ewc" else [],
        restore=like() if restore else [],
        row_scales=torch.rand(sum(ref.rows_of(p) for p in params), generator=g, dtype=torch.float64).to(acc)
        if rows else None,
        hyper=_hyper(method, noise), param_ids=list(range(3, 3 + n)), elem_offsets=[7 * k for k in range(n)],
        method=method, decay=decay, maximize=maximize, clip=clip,
        seed=torch.tensor([0x1234_5678_9ABC, 99], dtype=torch.int64) if noise else None,
        grad_scale=torch.tensor(4.0) if scale else None, found_inf=None if inf is None else torch.tensor(inf),
    )  # fmt: skip


def _run_step(backend: str, case: dict) -> list[torch.Tensor]:
    with regops.use_backend(backend):
        ops.step(*case.values())
    return [*case["params"], *case["state1"], *case["state2"], *case["state3"], *case["ema"], *case["steps"]]


STEP_CONFIGS = {
    "adamw": ("adam", "decoupled", {}),
    "adam amsgrad cautious grokfast": ("adam", "cautious", {"ams": True, "ema": True}),
    "adam l2sp agc clip": ("adam", "l2sp", {"rows": True, "clip": True}),
    "adam ewc noise scaled maximize": ("adam", "ewc", {"noise": True, "scale": True, "maximize": True}),
    "sgd coupled restore": ("sgd", "coupled", {"restore": True}),
    "nesterov decoupled grokfast noise": ("nesterov", "decoupled", {"ema": True, "noise": True}),
    "sgd skipped restore": ("sgd", "none", {"inf": 1.0, "restore": True}),
    "adam not skipped": ("adam", "decoupled", {"inf": 0.0, "scale": True}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_step_kernels_equal_reference_bit_for_bit(backend, dtype, config):
    method, decay, kw = STEP_CONFIGS[config]
    want = _run_step("torch", _step_case(dtype, method, decay, **kw))
    got = _run_step(backend, _step_case(dtype, method, decay, **kw))
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {k}: max diff {(a.double() - b.double()).abs().max()}"


def test_skipped_step_changes_nothing_but_the_restore(backend):
    case = _step_case(torch.float32, "adam", "decoupled", restore=True, ema=True, inf=1.0)
    before = [t.clone() for t in (*case["state1"], *case["state2"], *case["ema"], *case["steps"])]
    restore = [t.clone() for t in case["restore"]]
    _run_step(backend, case)
    after = [*case["state1"], *case["state2"], *case["ema"], *case["steps"]]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(torch.equal(p, r) for p, r in zip(case["params"], restore, strict=True))


def _lists(dtype, n_shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in n_shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("inf", [None, 0.0, 1.0])
def test_sam_perturb_equals_reference_bit_for_bit(backend, dtype, adaptive, inf):
    grads = _lists(dtype, seed=1)
    scales = torch.rand(len(SHAPES), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scales = scales.to(torch.float64 if dtype == torch.float64 else torch.float32)
    found = None if inf is None else torch.tensor(inf)
    out = {}
    for b in ("torch", backend):
        params = _lists(dtype)
        old_p, old_g = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
        with regops.use_backend(b):
            ops.sam_perturb(params, grads, old_p, old_g, scales, adaptive, found)
        out[b] = params + old_p + old_g
    assert all(torch.equal(a, b) for a, b in zip(out[backend], out["torch"], strict=True))
    if inf:
        assert all(torch.equal(a, b) for a, b in zip(out["torch"][: len(SHAPES)], _lists(dtype), strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter: 0 * inf, unused
@pytest.mark.parametrize("coeffs", [(1.3, -0.7), (0.0, 2.0), (1.0, 0.0)])
def test_axpby_equals_reference_bit_for_bit(backend, dtype, coeffs):
    x = _lists(dtype, seed=1)
    out = {}
    for b in ("torch", backend):
        y = _lists(dtype)
        y[0][0, 0] = float("inf")  # a zero coefficient does not read its operand (BLAS): c0 = 0 drops the inf
        with regops.use_backend(b):
            ops.axpby(y, x, torch.tensor(coeffs, dtype=torch.float64))
        out[b] = y
    assert all(torch.equal(a, b) for a, b in zip(out[backend], out["torch"], strict=True))
    assert torch.isfinite(out["torch"][0]).all() == (coeffs[0] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("with_b,with_w", [(False, False), (True, False), (False, True), (True, True)])
def test_dots_equal_reference(backend, dtype, rows, with_b, with_w):
    a, b, w = _lists(dtype), _lists(dtype, seed=1), _lists(dtype, seed=2)
    args = (a, b if with_b else [], w if with_w else [], rows)
    with regops.use_backend("torch"):
        want = ops.dots(*args)
    with regops.use_backend(backend):
        got = ops.dots(*args)
    assert got.shape == want.shape == (sum(ref.rows_of(x) for x in a) if rows else len(a), 3)
    assert got.dtype == want.dtype
    # sums in another order: a few ulps of the sum of magnitudes
    scale = ops.dots([x.abs() for x in a], [x.abs() for x in b] if with_b else [], args[2], rows)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert ((got - want).abs() <= tol * scale.abs() + 1e-30).all()


def test_gaussian_noise_is_one_stream_whatever_the_split():
    seed = torch.tensor([987654321, 5], dtype=torch.int64)
    whole = ref.gaussian_noise(seed, 7, 0, 1001)
    parts = torch.cat([ref.gaussian_noise(seed, 7, a, b - a) for a, b in ((0, 3), (3, 502), (502, 1001))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, ref.gaussian_noise(seed, 8, 0, 1001))  # another parameter, another stream
    big = ref.gaussian_noise(seed, 0, 0, 200_000)
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01


def test_noise_of_the_kernels_is_the_reference_noise(backend):
    """SGD at lr 1 with zero gradients: w moves by exactly -sigma z, z the reference stream at the shard offset."""
    p = [torch.zeros(37, dtype=torch.float32), torch.zeros(2, 9, dtype=torch.float32)]
    hyper = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0.25, 0.55, 0], dtype=torch.float64)
    seed = torch.tensor([42, 1000], dtype=torch.int64)
    steps = [torch.tensor(3.0), torch.tensor(3.0)]
    with regops.use_backend(backend):
        ops.step(p, [torch.zeros_like(t) for t in p], [], [], [], steps, [], [], [], [], None, hyper, [4, 9], [11, 0],
                 "sgd", "none", False, False, seed, None, None)  # fmt: skip
    sigma = ref.f32((0.25 / 4.0**0.55) ** 0.5)
    for t, pid, off in zip(p, (4, 9), (11, 0), strict=True):
        z = ref.gaussian_noise(seed, pid, off, t.numel()).reshape(t.shape)
        assert torch.equal(t, -(z * sigma))


def test_ops_pass_opcheck():
    case = _step_case(torch.float32, "adam", "ewc", ams=True, ema=True, rows=True, noise=True, scale=True, inf=0.0)
    torch.library.opcheck(ops.step.overload, tuple(case.values()))
    a, b = _lists(torch.float32), _lists(torch.float32, seed=1)
    torch.library.opcheck(ops.dots.overload, (a, b, [], True))
    olds = [torch.empty_like(t) for t in a]
    torch.library.opcheck(ops.sam_perturb.overload, (a, b, olds, [], torch.rand(len(a)), True, None))
    torch.library.opcheck(ops.axpby.overload, (a, b, torch.tensor([1.0, 0.5])))


def test_step_under_torch_compile_matches_eager():
    def run(case):
        ops.step(*case.values())
        return case["params"]

    want = run(_step_case(torch.float32, "adam", "decoupled", ema=True))
    got = torch.compile(run, fullgraph=True)(_step_case(torch.float32, "adam", "decoupled", ema=True))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_inplace_ops_bump_version_counters():
    p = [torch.randn(4, requires_grad=True)]
    y = (p[0] * p[0]).sum()  # saves p for backward
    with torch.no_grad():
        ops.axpby(p, [torch.ones(4)], torch.tensor([1.0, 1.0]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_bad_arguments_are_clear_errors(backend):
    case = _step_case(torch.float32, "adam", "decoupled")
    case["method"] = "adagrad"
    with regops.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="adagrad|method"):
        ops.step(*case.values())
    if backend == "cpp":
        case = _step_case(torch.float32, "adam", "decoupled")
        case["state1"] = case["state1"][:2]
        with regops.use_backend(backend), pytest.raises(RuntimeError, match="state1"):
            ops.step(*case.values())


def _radial_case(dtype):
    """Weights and gradients that take each path of the projection: every row orthogonal to its weights (channel
    view), only the whole tensor orthogonal (layer view), neither; and a vector (never projected)."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((6, 5), (4, 3, 2), (5, 7), (7,))]
    gs = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws]
    w, x = ws[0], gs[0]
    gs[0] = x - w * (x * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)
    w, x = ws[1], gs[1]
    gs[1] = x - w * (x * w).sum() / (w * w).sum()
    gs[2] = gs[2] + ws[2]  # a radial gradient: not scale-invariant
    return [w.to(dtype) for w in ws], [x.to(dtype) for x in gs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_adamp_projection_equals_the_reference(backend, dtype):
    """SGD at lr 1 without momentum: w moves by the projected gradient, as reference.radial_projection has it, on
    every backend (the row sums and the step are kernels; the projection is torch on their results)."""
    ws, gs = _radial_case(dtype)
    ratios = [ref.radial_projection(w, x, x, 0.1, 0.1, 1e-8)[1] for w, x in zip(ws, gs, strict=True)]
    assert [float(r) for r in ratios] == pytest.approx([0.1, 0.1, 1.0, 1.0], rel=1e-6)  # the case takes every path
    rows = [(w.double() * ref.radial_projection(w, x, x, 0.1, 0.1, 1e-8)[0]).sum(tuple(range(1, w.dim())))
            for w, x in zip(ws[:2], gs[:2], strict=True)]  # fmt: skip
    assert rows[0].abs().max() < 1e-5 and rows[1].abs().max() > 1e-3 > abs(float(rows[1].sum()))  # views differ
    params = [w.clone().requires_grad_() for w in ws]
    for p, x in zip(params, gs, strict=True):
        p.grad = x.clone()
    opt = regops.optim.SGD(params, lr=1.0, weight_decay=0.5, decay="decoupled", adamp=True)
    with regops.use_backend(backend):
        opt.step()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for p, w, x, r in zip(params, ws, gs, ratios, strict=True):
        want = w * (1 - 0.5 * r.to(dtype)) - ref.radial_projection(w, x, x, 0.1, 0.1, 1e-8)[0].to(dtype)
        torch.testing.assert_close(p.detach(), want, **tol)
