"""Property tests: every public dropout-family function against its torch / timm counterpart.

Masks are random in both, so they are compared by their *semantics*, not their bits: each side's output must be
``x`` times that side's own mask (recovered by running the same call on ``ones`` with the same RNG state), the
gradient ``g`` times the same mask, and the mask must have the counterpart's structure (one draw per element,
per channel, per sample...). Both sides multiply, so a NaN or Inf at a dropped position gives NaN on both.
Where masks do not matter (eval, p = 0, p = 1, errors, dtypes, memory formats, aliasing) the results are
compared directly. Ranks 0-5, every float dtype, contiguous / channels_last / transposed / strided inputs,
NaN and +-Inf sprinkled in inputs and gradients, p at and near 0 and 1, eval mode, in-place.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regops
from regops.dropout.reference import dropout_scale

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPECIALS = (math.nan, math.inf, -math.inf)
P_VALUES = st.one_of(st.sampled_from([0.0, 1e-7, 0.3, 0.5, 1 - 1e-7, 1.0]), st.floats(0.0, 1.0))


# ------------------------------------------------------------------------------------------------ inputs
@st.composite
def cases(draw, min_rank: int = 0, max_rank: int = 5):
    rank = draw(st.integers(min_rank, max_rank))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank)))
    layouts = ["contiguous", "strided"] + (["transposed"] if rank >= 2 else [])
    layouts += ["channels_last"] if rank in (4, 5) else []
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from(DTYPES)),
        "layout": draw(st.sampled_from(layouts)),
        "p": draw(P_VALUES),
        "training": draw(st.booleans() | st.just(True)),
        "inplace": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "specials": draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=3)),
        "grad_specials": draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=2)),
    }


def make(shape, dtype, layout="contiguous", seed=0, specials=()) -> torch.Tensor:
    """A fresh tensor of logical values uniform(-2, 2) with NaN/Inf at some positions, in the given layout."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.empty(shape, dtype=torch.float64).uniform_(-2, 2, generator=gen)
    flat = base.view(-1)
    for i, v in specials:
        if flat.numel():
            flat[i % flat.numel()] = v
    t = base.to(dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided" and t.dim() >= 1:
        wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def same(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    """Equal values (NaN equal to NaN, -0 equal to 0), shape and dtype; exact unless a tolerance is given."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, equal_nan=True, **({"rtol": 0, "atol": 0} | tol))


def dense(t: torch.Tensor) -> bool:
    return torch.empty_like(t).stride() == t.stride()


def outcome(fn):
    """``(result, None)`` or ``(None, exception type)``; torch's deprecation warnings are not the point here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(), None
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            return None, type(e)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ mask structure
def torch_mask_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of the noise torch / timm draw (broadcast over the rest); None where torch refuses to draw.

    Written from torch's source (torch/nn/functional.py, aten/src/ATen/native/Dropout.cpp: make_feature_noise)
    and timm's drop_path; checked against torch's actual masks below (they must be constant where this says so).
    """
    r = len(shape)
    if name in ("dropout", "dropout_bitmask"):
        return shape
    if name == "drop_path":
        return (shape[0],) + (1,) * (r - 1)
    batched = {"dropout1d": r == 3, "dropout2d": True, "dropout3d": r == 5}[name]
    full = shape if batched else (1, *shape)
    if len(full) < 2:
        return None
    mask = full[:2] + (1,) * (len(full) - 2)
    return mask if batched else mask[1:]


def constant_outside(mask: torch.Tensor, mask_shape: tuple[int, ...]) -> bool:
    """Whether ``mask`` is constant along every dim where ``mask_shape`` is 1 (i.e. it broadcasts from it)."""
    if mask.numel() == 0:
        return True
    first = mask
    for d, size in enumerate(mask_shape):
        if size == 1:
            first = first.narrow(d, 0, 1)
    return torch.equal(mask, first.expand_as(mask))


# ------------------------------------------------------------------------------------------------ the comparison
MULTIPLY_OPS = {
    # name: (regops function, its torch / timm counterpart, minimum rank)
    "dropout": (regops.dropout, F.dropout, 0),
    "dropout_bitmask": (lambda x, p, t, i, **k: regops.dropout(x, p, t, i, mask_mode="bitmask", **k), F.dropout, 0),
    "dropout1d": (regops.dropout1d, F.dropout1d, 0),
    "dropout2d": (regops.dropout2d, F.dropout2d, 0),
    "dropout3d": (regops.dropout3d, F.dropout3d, 0),
    "drop_path": (lambda x, p, t, i, **k: regops.drop_path(x, p, t, **k), None, 1),
}


def _timm_drop_path(x, p, training, inplace):
    from timm.layers import drop_path

    return drop_path(x, p, training)


def check_multiply_op(name: str, case: dict) -> None:
    ours, theirs, _ = MULTIPLY_OPS[name]
    theirs = theirs or _timm_drop_path
    shape, dtype, layout, p, training, inplace = (
        case[k] for k in ("shape", "dtype", "layout", "p", "training", "inplace")
    )
    new_x = lambda: make(shape, dtype, layout, case["seed"], case["specials"])
    gen = torch.Generator()

    def run_ours(x, **kw):
        gen.manual_seed(case["seed"])
        return ours(x, p, training, kw.get("inplace", False), generator=gen)

    def run_theirs(x, **kw):
        torch.manual_seed(case["seed"])
        return theirs(x, p, training, kw.get("inplace", False))

    # Errors: the same exception type, or both succeed.
    y_r, err_r = outcome(lambda: run_ours(new_x()))
    y_t, err_t = outcome(lambda: run_theirs(new_x()))
    assert err_r == err_t, f"{name}{shape}: regops raised {err_r}, torch raised {err_t}"
    if err_t is not None:
        return

    x = new_x()
    m_t = run_theirs(torch.ones_like(x))  # torch's noise: 0 or 1/(1-p) in x's dtype (its mask applied to ones)
    m_r = run_ours(torch.ones(shape))  # ours in float32: 0 or the float32 scale
    cd = compute_dtype(dtype)

    # Each side is x times its own mask: NaN/Inf at a dropped position gives NaN on both.
    same(y_t, x * m_t)
    same(y_r, (x.to(cd) * m_r.to(cd)).to(dtype))
    # Same structure: one draw per element / channel / sample, as torch.
    mask_shape = torch_mask_shape(name, shape) if training and 0 < p < 1 else shape
    assert constant_outside(m_t, mask_shape), "the structure oracle disagrees with torch"
    assert constant_outside(m_r, mask_shape), f"{name}{shape}: regops' mask is not shared like torch's"
    # Same zero pattern where masks do not matter: eval, p = 0 (identity) and p = 1 (x * 0).
    if not training or p in (0.0, 1.0) or x.numel() == 0:
        same(y_r, y_t)
    # Aliasing and layout: the input itself (or a view of it) exactly when torch returns one; else x's layout.
    assert (y_r.data_ptr() == x.data_ptr()) == (y_t.data_ptr() == x.data_ptr()) or x.numel() == 0
    if dense(x) and x.numel() and y_t.data_ptr() != x.data_ptr():
        assert y_r.stride() == y_t.stride(), f"{name}{shape} {layout}: strides {y_r.stride()} vs {y_t.stride()}"

    if inplace and name != "drop_path":  # timm's drop_path has no in-place form
        xi_r, xi_t = new_x(), new_x()
        out_r, out_t = run_ours(xi_r, inplace=True), run_theirs(xi_t, inplace=True)
        assert out_r.data_ptr() == xi_r.data_ptr() and out_t.data_ptr() == xi_t.data_ptr()
        same(xi_r, y_r)
        same(xi_t, y_t)
        return

    # Gradient: g times the same mask (NaN/Inf in g at a dropped position gives NaN too).
    g = make(shape, dtype, "contiguous", case["seed"] + 1, case["grad_specials"])
    xr, xt = new_x().requires_grad_(), new_x().requires_grad_()
    (dx_r,) = torch.autograd.grad(run_ours(xr), xr, g, allow_unused=True)
    (dx_t,) = torch.autograd.grad(run_theirs(xt), xt, g, allow_unused=True)
    if dx_t is None or dx_r is None:  # identity returned: no graph on either side
        assert dx_t is None and dx_r is None
        return
    same(dx_t, g * m_t)
    same(dx_r, (g.to(cd) * m_r.to(cd)).to(dtype))


@pytest.mark.parametrize("name", [n for n in MULTIPLY_OPS if n != "drop_path"])
@SETTINGS
@given(case=cases())
def test_dropout_family_matches_torch(name, case):
    check_multiply_op(name, case)


@SETTINGS
@given(case=cases(min_rank=1))
def test_drop_path_matches_timm(case):
    pytest.importorskip("timm")
    check_multiply_op("drop_path", case)


@SETTINGS
@given(case=cases(), dims=st.lists(st.integers(-6, 5), max_size=3))
def test_shared_dropout_is_x_times_a_broadcast_mask(case, dims):
    shape, dtype, p = case["shape"], case["dtype"], case["p"]
    rank = max(len(shape), 1)
    dims = [d for d in dims if -rank <= d < rank]
    gen = torch.Generator()
    x = make(shape, dtype, case["layout"], case["seed"], case["specials"])
    gen.manual_seed(case["seed"])
    y = regops.shared_dropout(x, p, dims, case["training"], generator=gen)
    gen.manual_seed(case["seed"])
    m = regops.shared_dropout(torch.ones(shape), p, dims, case["training"], generator=gen)
    cd = compute_dtype(dtype)
    same(y, (x.to(cd) * m.to(cd)).to(dtype))
    mask_shape = tuple(1 if i in {d % rank for d in dims} else s for i, s in enumerate(shape))
    assert constant_outside(m, mask_shape)
    if dense(x) and y.data_ptr() != x.data_ptr():
        assert y.stride() == torch.empty_like(x).stride()


# ------------------------------------------------------------------------------------------------ fused ops
@SETTINGS
@given(case=cases(min_rank=1, max_rank=4), dtypes=st.tuples(st.sampled_from(DTYPES), st.sampled_from(DTYPES)))
def test_bias_dropout_add_matches_the_unfused_composition(case, dtypes):
    shape, dtype, p, training = case["shape"], case["dtype"], case["p"], case["training"]
    bias_dtype, res_dtype = dtypes
    x = make(shape, dtype, case["layout"], case["seed"], case["specials"])
    b = make(shape[-1:], bias_dtype, seed=case["seed"] + 2)
    r = make(shape, res_dtype, seed=case["seed"] + 3)
    out_dtype = torch.promote_types(torch.promote_types(dtype, bias_dtype), res_dtype)
    gen = torch.Generator()

    def ours(x, b, r, ones=False):
        gen.manual_seed(case["seed"])
        return regops.bias_dropout_add(x, b, r, p, training, generator=gen)

    def theirs(x, b, r):
        torch.manual_seed(case["seed"])
        return r + F.dropout(x + b, p, training)

    y_r, y_t = ours(x, b, r), theirs(x, b, r)
    assert y_r.dtype == y_t.dtype == out_dtype and y_r.shape == y_t.shape
    m_r = ours(torch.ones(shape), None, torch.zeros(shape))  # the row-layout mask, float32 0 or scale
    torch.manual_seed(case["seed"])
    m_t = F.dropout(torch.ones_like(x + b), p, training)
    cd = compute_dtype(out_dtype)
    same(y_t, r + (x + b) * m_t)
    if not training or p == 0.0:
        same(y_r, y_t)  # dropout is the identity: exactly torch's unfused residual + (x + bias)
    else:
        same(y_r, (r.to(cd) + (x.to(cd) + b.to(cd)) * m_r.to(cd)).to(out_dtype))  # fused: one rounding
    if p == 1.0:
        tol = {"rtol": 1e-2, "atol": 1e-2} if out_dtype in (torch.float16, torch.bfloat16) else {}
        same(y_r, y_t, **tol)

    g = make(shape, out_dtype, seed=case["seed"] + 4, specials=case["grad_specials"])
    xs = [t.detach().clone().requires_grad_() for t in (x, b, r)]
    dx, db, dr = torch.autograd.grad(ours(*xs), xs, g)
    same(dx, (g.to(cd) * m_r.to(cd)).to(out_dtype).to(dtype))
    same(dr, g.to(res_dtype))
    expected_db = (g.to(cd) * m_r.to(cd)).reshape(math.prod(shape[:-1]), shape[-1]).sum(0).to(bias_dtype)
    same(db, expected_db, **({"rtol": 1e-2, "atol": 1e-2} if bias_dtype in (torch.float16, torch.bfloat16) else {}))


def _layer_norm64(s, w, b, rms, eps=1e-5):
    s = s.double()
    if rms:
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = (s - s.mean(-1, keepdim=True)) * torch.rsqrt(s.var(-1, unbiased=False, keepdim=True) + eps)
    return y * w.double() + b.double()


@SETTINGS
@given(case=cases(min_rank=1, max_rank=4), rms=st.booleans(), with_residual=st.booleans())
def test_dropout_add_layer_norm_matches_the_unfused_composition(case, rms, with_residual):
    shape, dtype, p, training = case["shape"], case["dtype"], case["p"], case["training"]
    if shape[-1] == 0:
        return  # rejected with a clear error (tested elsewhere); torch's layer_norm over 0 columns is NaN
    x = make(shape, dtype, case["layout"], case["seed"], case["specials"]).requires_grad_()
    r = make(shape, dtype, seed=case["seed"] + 3) if with_residual else None
    w, b = make(shape[-1:], dtype, seed=5), make(shape[-1:], dtype, seed=6)
    gen = torch.Generator().manual_seed(case["seed"])
    y = regops.dropout_add_layer_norm(x, r, w, b, p, rms_norm=rms, training=training, generator=gen)
    gen.manual_seed(case["seed"])
    m = regops.bias_dropout_add(torch.ones(shape), None, torch.zeros(shape), p, training, generator=gen)
    # The composition in float64 with the same mask; the pre-norm sum is rounded to its storage dtype first.
    x64 = x.detach().double().requires_grad_()
    exact = x64 * m.double() + (r.double() if r is not None else 0)
    stored = exact.detach().to(dtype).double()  # the pre-norm sum as stored (rounded), gradient of the exact one
    s = torch.where(torch.isfinite(stored), exact + (stored - exact.detach()), exact)
    y64 = _layer_norm64(s, w, b, rms)
    # two roundings to the dtype (the stored sum, the output) plus an H-term sum in the compute dtype
    eps_c = torch.finfo(compute_dtype(dtype)).eps
    bound = 2 * torch.finfo(dtype).eps + 8 * eps_c * shape[-1] ** 0.5
    tol = {"rtol": bound, "atol": bound}
    same(y, y64.to(dtype), **tol)  # NaN pattern exact: a NaN/Inf anywhere in a row makes the row NaN
    if not training or p == 0.0:  # dropout is the identity: torch's own layer_norm of x + r
        ref = F.layer_norm((x.detach() + (r if r is not None else 0)).double(), shape[-1:], w.double(), b.double())
        if rms:
            ref = _layer_norm64(x.detach() + (r if r is not None else 0), w, b, True)
        same(y, ref.to(dtype), **tol)
    g = make(shape, dtype, seed=case["seed"] + 4, specials=case["grad_specials"])
    (dx,) = torch.autograd.grad(y, x, g)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    # rows whose output is finite: the gradient's NaNs exactly where float64 autograd has them; a row whose output
    # is NaN (a NaN or Inf in its sum): NaN everywhere, dropped positions included (NaN * 0, as torch multiplies)
    rows_ok = torch.isfinite(y64).reshape(-1, shape[-1]).all(1)
    dxr, dx64r = dx.reshape(-1, shape[-1]), dx64.reshape(-1, shape[-1])
    assert torch.equal(dxr[rows_ok].isnan(), dx64r[rows_ok].isnan())
    assert dxr[~rows_ok].isnan().all()
    finite = torch.isfinite(dx64)
    same(dx[finite], dx64[finite].to(dtype), **tol)


@SETTINGS
@given(case=cases(), k=st.integers(1, 4))
def test_multi_sample_dropout_matches_the_mean_of_torch_dropouts(case, k):
    shape, dtype, p, training = case["shape"], case["dtype"], case["p"], case["training"]
    x = make(shape, dtype, case["layout"], case["seed"], case["specials"])
    gen = torch.Generator().manual_seed(case["seed"])
    y = regops.multi_sample_dropout(x, p, k, training, generator=gen)
    gen.manual_seed(case["seed"])
    m = regops.multi_sample_dropout(torch.ones(shape), p, k, training, generator=gen)  # mean of the K masks
    cd = compute_dtype(dtype)
    full = m.max() if m.numel() else 0  # count = K where no sample dropped (m is count * scale / K)
    some_dropped = m.to(cd) < (dropout_scale(p) if training and p > 0 else 1.0) * (1 - 1e-6)
    if training and p == 1.0:  # the scale is 0: every sample dropped every element
        some_dropped = torch.ones_like(some_dropped)
    expected = x.to(cd) * m.to(cd)
    expected = torch.where(some_dropped & ~torch.isfinite(x.to(cd)), math.nan, expected).to(dtype)
    same(y, expected)
    del full
    # torch's composition has the same NaN/Inf rule: NaN where x is NaN, or Inf and some sample dropped it.
    torch.manual_seed(case["seed"])
    ones = torch.ones_like(x)
    masks = [F.dropout(ones, p, training) for _ in range(k)]
    torch.manual_seed(case["seed"])
    y_t = torch.stack([F.dropout(x, p, training) for _ in range(k)]).mean(0)
    dropped_t = torch.stack([mk == 0 for mk in masks]).any(0) if masks[0].numel() else torch.zeros(shape, dtype=bool)
    assert torch.equal(y_t.isnan(), x.isnan() | (x.isinf() & dropped_t))
    assert torch.equal(y.isnan(), x.isnan() | (x.isinf() & some_dropped))
    if not training or p in (0.0, 1.0):
        same(y, y_t.to(dtype), **({"rtol": 1e-2, "atol": 1e-2} if dtype != torch.float64 else {"rtol": 1e-12}))


# ------------------------------------------------------------------------------------------------ signatures, p types
def test_drop_path_signature_is_timms():
    timm_layers = pytest.importorskip("timm.layers")
    import inspect

    ours = list(inspect.signature(regops.drop_path).parameters.values())[:4]
    theirs = list(inspect.signature(timm_layers.drop_path).parameters.values())
    assert [(a.name, a.default) for a in ours] == [(a.name, a.default) for a in theirs]
    x = torch.randn(4, 3)
    assert regops.drop_path(x, 0.5) is x  # training defaults to False, as timm


@pytest.mark.parametrize("fn", [regops.dropout, regops.dropout2d, regops.shared_dropout, regops.multi_sample_dropout])
def test_p_types_as_torch(fn):
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 3, 4, 5)
    call = (lambda p: fn(x, p, 2)) if fn is regops.multi_sample_dropout else (lambda p: fn(x, p))
    for p in (np.float32(0.0), np.float64(0.0), np.int64(0), torch.tensor(0.0), 0):
        assert torch.equal(call(p), x)
    assert torch.equal(call(np.float32(1.0)), x * 0)
    assert torch.equal(call(False), x) and torch.equal(call(True), x * 0)  # torch takes a bool as 0 or 1
    assert torch.equal(call(np.bool_(True)), x * 0)
    with pytest.raises(TypeError, match="must be a number"):
        call("0.5")
    with pytest.raises(TypeError, match="requires grad"):
        call(torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        call(np.float32(1.5))
