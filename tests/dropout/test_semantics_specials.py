"""torch's semantics on every path: NaN/Inf in every kernel, rank rules, double backward, drop-in friction."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import regops
from regops.testing import make_tensor

# NaN/Inf inputs are the point here: numpy (under the Triton interpreter) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEED = torch.tensor([4321, 99])


def _p(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _with_specials(shape, dtype, device="cpu", seed=0) -> torch.Tensor:
    """Random values with NaN, +Inf and -Inf spread over the tensor (every few elements)."""
    x = make_tensor(shape, torch.float64, seed=seed)
    flat = x.view(-1)
    flat[0::7], flat[3::11], flat[5::13] = math.nan, math.inf, -math.inf
    return x.to(dtype=dtype, device=device)


def _reference(op, *args):
    with regops.use_backend("torch"):
        return op(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------ NaN/Inf in kernels
def test_the_bar_nan_stays_nan_like_torch():
    nan = torch.full((1000,), math.nan)
    assert regops.dropout(nan, 0.5).isnan().all() and F.dropout(nan, 0.5).isnan().all()
    assert regops.dropout(nan, 1.0).isnan().all() and F.dropout(nan, 1.0).isnan().all()
    x = torch.tensor([math.inf, -math.inf, 2.0, -2.0])
    _same(regops.dropout(x, 1.0), F.dropout(x, 1.0))  # Inf * 0 = NaN, finite * 0 = +-0


def _check_calls(calls) -> None:
    for op, args in calls:
        out, ref = op(*args), _reference(op, *args)
        outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
        for a, e in zip(outs, refs, strict=True):
            _same(a, e)


@pytest.mark.ops("dropout", "bias_dropout_add", "bias_dropout_add_backward")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_kernels_multiply_nan_and_inf_like_the_reference(kernel_target, dtype):
    """Bit-identical to the reference with NaN/Inf in the inputs and gradients (the ops with CUDA kernels too)."""
    _, device = kernel_target
    ops = torch.ops.regops
    x = _with_specials((5, 37), dtype, device, seed=1)
    g = _with_specials((5, 37), dtype, device, seed=2)
    r, b = make_tensor((5, 37), dtype, device, seed=3), make_tensor((37,), dtype, device, seed=4)
    p = _p(0.4)
    _check_calls([(ops.dropout, (x, p, SEED)), (ops.bias_dropout_add, (x, b, r, p, SEED))])
    dx, db = ops.bias_dropout_add_backward(g, True, p, SEED)
    dx_ref, db_ref = _reference(ops.bias_dropout_add_backward, g, True, p, SEED)
    _same(dx, dx_ref)
    # the bias gradient is a column sum (its order is the kernel's): NaN columns exactly, the others within twice the
    # reference's own error against float64 plus the rounding bound of a 5-term sum
    db64 = _reference(ops.bias_dropout_add_backward, g.double(), True, p, SEED)[1]
    db = db.cpu()
    assert db.dtype == db_ref.dtype and torch.equal(db.isnan(), db_ref.isnan()) and db_ref.isnan().any()
    finite = ~db_ref.isnan()
    assert torch.equal(db[finite].isinf(), db_ref[finite].isinf())
    finite &= ~db_ref.isinf()
    err, err_ref = ((t[finite].double() - db64[finite]).abs().max().item() for t in (db, db_ref))
    eps = torch.finfo(db.dtype).eps
    assert err <= 2 * err_ref + 4 * eps * 5**0.5 * db64[finite].abs().max().item(), (err, err_ref)
    # the multiply model itself: NaN where x is NaN, or +-Inf at a dropped position; never a hidden NaN
    y = ops.dropout(x, p, SEED).cpu()
    dropped = ops.dropout(torch.ones_like(x), p, SEED).cpu() == 0
    xc = x.cpu()
    assert dropped.any() and (xc.isinf() & dropped).any() and (xc.isnan() & ~dropped).any()
    assert torch.equal(y.isnan(), xc.isnan() | (xc.isinf() & dropped))


@pytest.mark.ops(
    "dropout_bitmask", "apply_bitmask", "dropout_add_layer_norm", "scale_rows_add", "multi_sample_dropout_mean"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_and_structured_kernels_multiply_nan_and_inf_like_the_reference(kernel_target, dtype):
    """The same for the bitmask mode, drop path and multi-sample dropout, bit for bit; the normalized output of
    dropout_add_layer_norm: NaN exactly on the rows with a NaN or Inf, the finite rows within the derived bound."""
    _, device = kernel_target
    ops = torch.ops.regops
    x = _with_specials((5, 37), dtype, device, seed=1)
    g = _with_specials((5, 37), dtype, device, seed=2)
    r, b = make_tensor((5, 37), dtype, device, seed=3), make_tensor((37,), dtype, device, seed=4)
    p = _p(0.4)
    _check_calls(
        [
            (ops.dropout_bitmask, (x, p, SEED)),
            (ops.drop_path, (x, r, p, True, SEED)),
            (ops.multi_sample_dropout_mean, (x, p, 3, SEED)),
        ]
    )
    y, bits = ops.dropout_bitmask(x, p, SEED)
    _same(ops.apply_bitmask(g, bits, p), _reference(ops.apply_bitmask, g, bits, p))
    # LayerNorm: specials in rows 0 and 3 only, so the other rows are real numbers to compare
    special_rows = torch.tensor([True, False, False, True, False])
    xl = torch.where(special_rows[:, None].to(device), x, make_tensor((5, 37), dtype, device, seed=5))
    out = ops.dropout_add_layer_norm(xl, r, b, b, p, 1e-5, False, False, SEED)
    ref = _reference(ops.dropout_add_layer_norm, xl, r, b, b, p, 1e-5, False, False, SEED)
    exact = _reference(ops.dropout_add_layer_norm, ref[1].double(), None, b.double(), b.double(), _p(0.0), 1e-5, False,
                       False, SEED)  # fmt: skip
    _same(out[1], ref[1])  # the pre-norm sum: bit for bit, NaN/Inf included
    for a, e, x64 in zip(out[::2], ref[::2], exact[::2], strict=True):  # y and mean (rstd: NaN rows likewise)
        a = a.cpu()
        rows = a.reshape(5, -1)
        assert torch.equal(rows.isnan(), e.reshape(5, -1).isnan())
        assert rows[special_rows].isnan().all() and not rows[~special_rows].isnan().any()
        finite = ~special_rows
        err = (a.reshape(5, -1)[finite].double() - x64.reshape(5, -1)[finite]).abs().max().item()
        err_ref = (e.reshape(5, -1)[finite].double() - x64.reshape(5, -1)[finite]).abs().max().item()
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        scale = x64.reshape(5, -1)[finite].abs().max().item()
        assert err <= 2 * err_ref + 4 * torch.finfo(cd).eps * 37**0.5 * scale, (err, err_ref)


def test_daln_backward_keeps_nan_of_the_gradient_at_dropped_positions():
    x = torch.randn(4, 8, requires_grad=True)
    y = regops.dropout_add_layer_norm(x, None, None, None, 0.5, generator=torch.Generator().manual_seed(0))
    g = torch.full_like(y, math.nan)
    (dx,) = torch.autograd.grad(y, x, g)
    assert dx.isnan().all()  # torch's dropout backward multiplies: NaN * 0 = NaN


def test_nested_dropout_multiplies_too():
    x = torch.full((64, 6), math.inf)
    y = regops.nested_dropout(x, 0.5, generator=torch.Generator().manual_seed(0))
    nan = y.isnan()  # dropped units (a suffix of each row): Inf * 0 = NaN, as torch's multiply gives
    assert torch.equal(nan, torch.arange(6) >= (~nan).sum(1, keepdim=True)) and nan.any()
    assert (y[~nan] == math.inf).all()


def test_module_p_set_to_a_tensor():
    m = regops.nn.Dropout(0.5)
    m.p = torch.tensor(0.0)
    x = torch.randn(8)
    assert torch.equal(m(x), x)
    f = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert torch.equal(f(x), x)
    m.p.fill_(1.0)
    assert torch.equal(f(x), x * 0)


# ------------------------------------------------------------------------------------------------ rank rules
@pytest.mark.parametrize("name", ["dropout1d", "dropout2d", "dropout3d"])
def test_channel_dropout_rank_rules_are_torchs(name):
    """Ranks 0-6 and every p class: same exception type, and the mask varies exactly where torch's does."""
    ours, theirs = getattr(regops, name), getattr(F, name)
    for rank in range(7):
        shape = ((16, 16) + (3,) * 4)[:rank]  # enough draws that a varying dim always shows it
        for p, training in ((0.5, True), (1.0, True), (0.0, True), (0.5, False)):
            x = torch.ones(shape)
            torch.manual_seed(rank)
            with warnings.catch_warnings(record=True) as w_t:
                warnings.simplefilter("always")
                try:
                    y_t, e_t = theirs(x, p, training), None
                except RuntimeError as e:
                    y_t, e_t = None, type(e)
            with warnings.catch_warnings(record=True) as w_r:
                warnings.simplefilter("always")
                try:
                    y_r, e_r = ours(x, p, training, generator=torch.Generator().manual_seed(rank)), None
                except RuntimeError as e:
                    y_r, e_r = None, type(e)
            assert e_r == e_t, (name, rank, p, training)
            assert [str(w.message) for w in w_r] == [str(w.message) for w in w_t], (name, rank)
            if y_t is None:
                continue
            assert y_r.shape == y_t.shape
            for d in range(rank):  # a dim along which torch's mask varies must vary in ours, and vice versa
                varies = lambda y, d=d: bool((y.amax(d) != y.amin(d)).any())
                assert varies(y_r) == varies(y_t), (name, rank, d)


def test_shared_dropout_on_a_0_dim_tensor():
    x = torch.tensor(3.0)
    for dims in ((), 0, -1, (0,)):
        y = regops.shared_dropout(x, 0.5, dims, generator=torch.Generator().manual_seed(1))
        assert y.shape == () and y.item() in (0.0, 6.0)
    with pytest.raises(ValueError, match="dims must be ints"):
        regops.shared_dropout(x, 0.5, 1)


# ------------------------------------------------------------------------------------------------ double backward
def test_double_backward_of_the_fused_ops_gradgradcheck():
    gen = torch.Generator()
    x, r = make_tensor((2, 5), torch.float64, seed=1), make_tensor((2, 5), torch.float64, seed=2)
    w, b = make_tensor((5,), torch.float64, seed=3), make_tensor((5,), torch.float64, seed=4)
    ts = [t.requires_grad_() for t in (x, r, w, b)]

    def bda(x, r, b):
        gen.manual_seed(1)
        return regops.bias_dropout_add(x, b, r, 0.4, generator=gen).pow(2)

    assert torch.autograd.gradgradcheck(bda, (ts[0], ts[1], ts[3]))
    for rms in (False, True):

        def daln(x, r, w, b, rms=rms):
            gen.manual_seed(2)
            return regops.dropout_add_layer_norm(x, r, w, b, 0.3, rms_norm=rms, prenorm=True, generator=gen)

        assert torch.autograd.gradgradcheck(daln, ts)
        # the differentiable backward used for create_graph equals the fused one
        gy = make_tensor((2, 5), torch.float64, seed=5)
        fused = torch.autograd.grad(daln(*ts)[0], ts, gy)
        graph = torch.autograd.grad(daln(*ts)[0], ts, gy, create_graph=True)
        for a, e in zip(graph, fused, strict=True):
            torch.testing.assert_close(a, e)


def test_eval_mode_is_the_identity_and_has_every_derivative():
    """In float64, so the third-order sums compare to the float64 rounding of the same math (float32's cancellation
    in a Hessian-vector product of a cube would need a tolerance that hides real differences)."""
    x = make_tensor((3, 8), torch.float64, requires_grad=True, seed=1)
    b, r = make_tensor((8,), torch.float64, seed=2), make_tensor((3, 8), torch.float64, seed=3)
    y = regops.bias_dropout_add(x, b, r, 0.5, training=False)
    assert torch.equal(y, r + (x + b))
    w = make_tensor((8,), torch.float64, requires_grad=True, seed=4)
    y = regops.dropout_add_layer_norm(x, r, w, None, 0.5, training=False)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, F.layer_norm(x + r, (8,), w, None), **tol)
    (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), x)  # a Hessian-vector product through the eval-mode op
    (gx_t,) = torch.autograd.grad(F.layer_norm(x + r, (8,), w, None).pow(3).sum(), x, create_graph=True)
    torch.testing.assert_close(hx, torch.autograd.grad(gx_t.sum(), x)[0], **tol)


# ------------------------------------------------------------------------------------------------ drop-in friction
def test_bias_dropout_add_under_autocast_promotes_like_the_composition():
    lin = torch.nn.Linear(8, 8)
    bias, res = torch.randn(8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(torch.randn(3, 8))
        assert h.dtype == torch.bfloat16
        y = regops.bias_dropout_add(h, bias, res, 0.1)
        y_eval = regops.bias_dropout_add(h, bias, res, 0.1, training=False)
        assert y.dtype == (res + F.dropout(h + bias, 0.1)).dtype == torch.float32
    assert torch.equal(y_eval, res + (h + bias))
    y.sum().backward()
    assert lin.weight.grad is not None


def test_patch_keeps_hooks_state_and_handles():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Dropout1d(0.1))
    calls = []
    h_fwd = model[1].register_forward_hook(lambda m, i, o: calls.append(("fwd", type(m).__module__)))
    model[1].register_forward_pre_hook(lambda m, i: calls.append(("pre", type(m).__module__)))
    model[1].register_forward_hook(lambda m, a, k, o: calls.append(("kw", None)), with_kwargs=True)
    model[1].note = "kept"
    model[1].register_buffer("counter", torch.zeros(1))
    model.eval()
    handle = regops.patch(model)
    assert len(handle) == 2 and isinstance(model[1], regops.nn.Dropout)
    assert model[1].note == "kept" and "counter" in dict(model[1].named_buffers()) and not model[1].training
    model(torch.randn(2, 4))
    assert [c[0] for c in calls] == ["pre", "fwd", "kw"] and calls[0][1] == "regops.dropout.nn"
    h_fwd.remove()  # a handle taken before the swap still removes the hook from the replacement
    calls.clear()
    model(torch.randn(2, 4))
    assert [c[0] for c in calls] == ["pre", "kw"]
    model[1].p = 0.25  # a p schedule applied while patched
    handle.revert()
    assert type(model[1]) is torch.nn.Dropout and model[1].p == 0.25


@pytest.mark.filterwarnings("ignore:dropout2d")
@pytest.mark.parametrize(
    "fn",
    [
        lambda x: regops.dropout(x, 0.5),
        lambda x: regops.dropout(x, 0.5, mask_mode="bitmask"),
        lambda x: regops.dropout2d(x, 0.5),
        lambda x: regops.drop_path(x, 0.5, training=True),
        lambda x: regops.multi_sample_dropout(x, 0.5, 2),
        lambda x: regops.bias_dropout_add(x, None, torch.zeros_like(x), 0.5),
    ],
)
def test_memory_format_is_kept(fn):
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    y = fn(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.stride() == x.stride()
    x3 = torch.randn(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d)
    assert fn(x3).is_contiguous(memory_format=torch.channels_last_3d)
