"""The dropout family's C++ CPU kernels (registered on the regops:: operators for the CPU key) against the
reference: the same bits for every mask and every elementwise result, the reference's tolerance for reductions;
odd sizes, every dtype, offsets near 2**32, thread counts."""

from __future__ import annotations

import itertools

import pytest
import torch

import regops
from regops._core import dispatch
from regops._core.dtypes import acc_dtype
from regops.dropout import ops
from regops.dropout import reference as ref
from regops.testing import prob
from regops.testing import seed as S
from tests.backends import extension_expected

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEEDS_OFFSETS = ((987654321987, 0), (-5, 2**32 - 3), (2**62 + 11, 2**32 - 70))
CPU = torch.device("cpu")
OPS = (
    "dropout",
    "dropout_bitmask",
    "apply_bitmask",
    "bias_dropout_add",
    "bias_dropout_add_backward",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_backward",
    "multi_sample_dropout_mean",
    "scale_rows_add",
    "nested_dropout",
)

# Skipped only where the extension cannot be built (no C++ compiler, or REGOPS_BUILD_EXT=0); anywhere else a
# missing or partial regops._C fails every test here (and tests/test_extension_present.py says why).
pytestmark = pytest.mark.skipif(
    extension_expected() is None, reason="no C++ compiler, or REGOPS_BUILD_EXT=0: regops._C is not built here"
)


@pytest.fixture(autouse=True)
def _cpp():
    """Every op call below runs the C++ kernel (an error if the extension lacks it)."""
    with regops.use_backend("cpp"):
        yield


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=2e-5, atol=2e-5),
    }.get(dtype, dict(rtol=2e-2, atol=2e-2))


def test_every_op_of_the_family_has_its_cpp_kernel_and_is_chosen_on_cpu():
    with regops.use_backend(None):
        for op in OPS:
            assert dispatch.choose(op, CPU) == "cpp", op


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_and_bitmask_bits_match_reference(dtype):
    for n, p, (key, offset) in itertools.product((0, 1, 3, 63, 64, 65, 1000, 4097), (0.0, 0.3, 1.0), SEEDS_OFFSETS):
        x, s, pt = torch.randn(n, dtype=dtype), S(key, offset), prob(p)
        assert torch.equal(ops.dropout(x, pt, s), ref.dropout(x, pt, s)), (n, p, offset)
        y, bits = ops.dropout_bitmask(x, pt, s)
        y_ref, bits_ref = ref.dropout_bitmask(x, pt, s)
        assert torch.equal(y, y_ref) and torch.equal(bits, bits_ref), (n, p, offset)
        assert torch.equal(ops.apply_bitmask(x, bits_ref, pt), ref.apply_bitmask(x, bits_ref, pt))


def test_dropout_reads_logical_order_of_non_contiguous_input():
    x = torch.randn(37, 29).t()
    assert torch.equal(ops.dropout(x, prob(0.4), S(3, 5)), ref.dropout(x.contiguous(), prob(0.4), S(3, 5)).t().t())


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dropout_add_matches_reference(dtype):
    for shape, p, (key, offset) in itertools.product(
        ((1, 1), (3, 5), (2, 3, 64), (7, 1001), (513, 3)), (0.0, 0.3, 1.0), SEEDS_OFFSETS[1:]
    ):
        x, res = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        b = torch.randn(shape[-1], dtype=dtype)
        s, pt = S(key, offset), prob(p)
        for bias in (None, b):
            out = ops.bias_dropout_add(x, bias, res, pt, s)
            assert torch.equal(out, ref.bias_dropout_add(x, bias, res, pt, s)), (shape, p)
        for has_bias in (False, True):
            dx, db = ops.bias_dropout_add_backward(x, has_bias, pt, s)
            dx_ref, db_ref = ref.bias_dropout_add_backward(x, has_bias, pt, s)
            assert torch.equal(dx, dx_ref)
            assert db.dtype == db_ref.dtype and db.shape == db_ref.shape
            torch.testing.assert_close(db, db_ref, **_tol(db.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_add_layer_norm_matches_reference(dtype):
    s = S(*SEEDS_OFFSETS[2])
    for shape, p, rms, in_fp32, with_res, affine in itertools.product(
        ((1, 1), (5, 63), (2, 3, 100)), (0.0, 0.3), (False, True), (False, True), (False, True), (False, True)
    ):
        x, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        res = torch.randn(shape, dtype=dtype) if with_res else None
        w = torch.randn(shape[-1], dtype=dtype) if affine else None
        b = torch.randn(shape[-1], dtype=dtype) if affine else None
        got = ops.dropout_add_layer_norm(x, res, w, b, prob(p), 1e-5, rms, in_fp32, s)
        want = ref.dropout_add_layer_norm(x, res, w, b, prob(p), 1e-5, rms, in_fp32, s)
        for g, e in zip(got, want, strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(got[1], want[1])  # s: elementwise, the same bits
        torch.testing.assert_close(got[0].double(), want[0].double(), **_tol(dtype))
        torch.testing.assert_close(got[2], want[2], **_tol(got[2].dtype))
        torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-5)
        ds = torch.randn(shape, dtype=want[1].dtype) if with_res else None
        args = (dy, ds, want[1], want[2], want[3], w, affine, prob(p), rms, s, dtype, res.dtype if with_res else None)
        got = ops.dropout_add_layer_norm_backward(*args)
        for g, e in zip(got, ref.dropout_add_layer_norm_backward(*args), strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(g.double(), e.double(), **_tol(dtype if dtype != torch.float32 else g.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_broadcast_gradient_gives_the_bits_of_its_contiguous_copy(dtype):
    """A gradient that is one value at every index (what ``.sum()`` and ``.mean()`` hand back) is read without
    being copied out: every kernel that takes gradients gives the bits it gives for the contiguous copy."""
    s, pt = S(*SEEDS_OFFSETS[2]), prob(0.3)

    def kernels(g, scales, total, mean, rstd):
        return (
            ops.dropout(g, pt, s),
            ops.drop_path(g, None, pt, True, s),
            ops.drop_path(g, None, pt, False, s),
            ops.scale_rows_add(g, scales, None),
            *ops.bias_dropout_add_backward(g, True, pt, s),
            ops.dropout_add_layer_norm_backward(g, None, total, mean, rstd, None, False, pt, False, s, dtype, None)[0],
        )

    for shape in ((1, 5), (3, 5), (2, 3, 67), (4, 1, 6)):
        scales = torch.rand(shape[0]).to(acc_dtype(dtype))
        _, total, mean, rstd = ref.dropout_add_layer_norm(torch.randn(shape, dtype=dtype), None, None, None, pt,
                                                          1e-5, False, False, s)  # fmt: skip
        stats = (scales, total, mean, rstd)
        g = torch.tensor(1.75, dtype=dtype).expand(shape)
        for got, want in zip(kernels(g, *stats), kernels(g.contiguous(), *stats), strict=True):
            assert got.is_contiguous() and torch.equal(got, want), shape
        assert torch.equal(ops.dropout(g, pt, s), ref.dropout(g.contiguous(), pt, s))


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_sample_and_scale_rows_match_reference(dtype):
    s = S(*SEEDS_OFFSETS[2])
    for shape, p, k in itertools.product(((1,), (3, 5), (7, 65), (2, 3, 67)), (0.0, 0.3, 1.0), (1, 3)):
        x = torch.randn(shape, dtype=dtype)
        got = ops.multi_sample_dropout_mean(x, prob(p), k, s)
        assert torch.equal(got, ref.multi_sample_dropout_mean(x, prob(p), k, s)), (shape, p, k)
        scales = torch.rand(shape[0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for res in (None, torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=torch.float32)):
            assert torch.equal(ops.scale_rows_add(x, scales, res), ref.scale_rows_add(x, scales, res)), (shape, res)


def test_nan_at_dropped_position_stays_nan():
    """Multiply semantics, as torch: y = x * (keep ? scale : 0), so a NaN or inf that is dropped gives NaN."""
    x, half, s = torch.full((4096,), float("nan")), prob(0.5), S(1, 0)
    keep = ref.row_keep_mask(1, 0, 1, 4096, 0.5).reshape(-1)
    assert not keep.all() and keep.any()
    assert ops.dropout(x, half, s).isnan().all()
    assert ops.dropout_bitmask(x, half, s)[0].isnan().all()
    assert ops.apply_bitmask(x, ref.pack_bits(keep), half).isnan().all()
    rows = x.reshape(1, -1)
    assert ops.bias_dropout_add(rows, None, torch.zeros_like(rows), half, s).isnan().all()
    assert ops.bias_dropout_add_backward(rows, False, half, s)[0].isnan().all()
    assert ops.dropout_add_layer_norm(rows, None, None, None, half, 1e-5, False, False, s)[1].isnan().all()
    inf = torch.full((64,), float("inf"))
    assert ops.dropout(inf, half, s).isnan().sum() == (~ref.keep_mask(1, 0, (64,), 0.5)).sum()


def test_results_do_not_depend_on_thread_count():
    x, p, s = torch.randn(3000, 70), prob(0.2), S(9, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (
            ops.bias_dropout_add_backward(x, True, p, s),
            ops.dropout_add_layer_norm(x, x, None, None, p, 1e-5, False, False, s),
        )
        torch.set_num_threads(2)
        two = (
            ops.bias_dropout_add_backward(x, True, p, s),
            ops.dropout_add_layer_norm(x, x, None, None, p, 1e-5, False, False, s),
        )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(itertools.chain(*one), itertools.chain(*two), strict=True):
        assert torch.equal(a, b)


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        ops.dropout(torch.randn(4), prob(1.5), S(0, 0))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.dropout(torch.ones(4, dtype=torch.int32), prob(0.5), S(0, 0))
    with pytest.raises(RuntimeError, match=r"uint8 \[ceil\(numel / 8\)\]"):
        ops.apply_bitmask(torch.randn(20), torch.zeros(2, dtype=torch.uint8), prob(0.5))
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.bias_dropout_add(torch.randn(2, 3), torch.randn(4), torch.randn(2, 3), prob(0.5), S(0, 0))
    with pytest.raises(RuntimeError, match="seed must be"):
        ops.dropout(torch.randn(4), prob(0.5), torch.tensor([1, 2, 3]))


def test_public_function_runs_the_cpp_kernel_and_agrees_with_the_reference():
    x = torch.randn(8, 33, requires_grad=True)
    torch.manual_seed(0)
    y = regops.dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    with regops.use_backend("torch"):
        x_ref = x.detach().clone().requires_grad_()
        torch.manual_seed(0)
        y_ref = regops.dropout(x_ref, 0.3)
        y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)


def test_opcheck_and_compile():
    x = torch.randn(5, 33)
    torch.library.opcheck(ops.dropout.overload, (x, prob(0.3), S(5, 2**32 - 1)))
    torch.library.opcheck(ops.bias_dropout_add.overload, (x, torch.randn(33), x, prob(0.3), S(5, 7)))
    fn = torch.compile(lambda t: regops.bias_dropout_add(t, None, t, 0.25), fullgraph=True, backend="eager")
    torch.manual_seed(1)
    out = fn(x)
    torch.manual_seed(1)
    assert torch.equal(out, regops.bias_dropout_add(x, None, x, 0.25))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_dropout_bits_match_reference(dtype):
    cases = (((5, 7), 1), ((5, 7), -1), ((3, 4, 9), 1), ((9, 2, 3, 5), 2), ((1, 1), 1), ((130, 33), 1), ((4, 0), 1))
    for (shape, dim), p, (key, offset) in itertools.product(cases, (1e-9, 0.05, 0.3, 1.0), SEEDS_OFFSETS):
        x, s = torch.randn(shape).to(dtype), S(key, offset)
        got = ops.nested_dropout(x, prob(p), dim, s)
        assert torch.equal(got, ref.nested_dropout(x, prob(p), dim, s)), (shape, dim, p, offset)
    x = torch.randn(4, 8)
    x[:, 5:] = float("nan")  # dropped units are multiplied by 0: NaN stays NaN, as in the reference
    got, want = ops.nested_dropout(x, prob(0.5), 1, S(3, 4)), ref.nested_dropout(x, prob(0.5), 1, S(3, 4))
    assert torch.equal(got.isnan(), want.isnan())
    with pytest.raises(RuntimeError, match="must not be the batch dim"):
        ops.nested_dropout(x, prob(0.5), 0, S(3, 4))


def test_nested_dropout_public_function_gradient_layout_opcheck_and_compile():
    x = torch.randn(6, 5, 7).transpose(1, 2)  # non-contiguous: the output keeps x's layout

    def run(t):
        torch.manual_seed(3)
        t = t.clone().requires_grad_()
        y = regops.nested_dropout(t, 0.2, dim=1)
        y.backward(torch.ones_like(y))
        return y, t.grad

    y, g = run(x)
    with regops.use_backend("torch"):
        y_ref, g_ref = run(x)
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref) and y.stride() == y_ref.stride()
    torch.library.opcheck(ops.nested_dropout.overload, (x.contiguous(), prob(0.2), 1, S(5, 2**32 - 1)))
    fn = torch.compile(lambda t: regops.nested_dropout(t, 0.2, dim=1), fullgraph=True, backend="eager")
    torch.manual_seed(3)
    assert torch.equal(fn(x), y_ref)


NATIVE_AUTOGRAD = ("dropout", "bias_dropout_add", "dropout_add_layer_norm", "drop_path")


def test_hot_ops_take_their_derivative_from_cpp_and_it_equals_the_python_formula():
    """With the extension, the dispatcher runs the C++ derivative (no Python between the public function and the
    kernels); the Python formula (without the extension, and under a forced Python backend) gives the same bits,
    first and second order."""
    with regops.use_backend(None):
        regops.dropout(torch.ones(2), 0.5)  # loads the extension
        for name in NATIVE_AUTOGRAD:
            assert dispatch.native_autograd(dispatch.declared(name)), name
    gen = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((6, 40), (6, 40), 40, 40))
    calls = {
        "dropout": lambda t: (regops.dropout(t[0], 0.3),),
        "bias_dropout_add": lambda t: (regops.bias_dropout_add(t[0], t[2], t[1], 0.3),),
        "dropout_add_layer_norm": lambda t: regops.dropout_add_layer_norm(t[0], t[1], t[3], t[2], 0.3, prenorm=True),
        "drop_path": lambda t: (regops.drop_path_add(t[0], t[1], 0.3, training=True),),
    }
    for name, call in calls.items():
        results = []
        for backend in (None, "torch"):
            inputs = [v.clone().requires_grad_() for v in (x, r, b, w)]
            with regops.use_backend(backend):
                torch.manual_seed(1)
                outs = call(inputs)
                weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape) for o in outs]
                loss = sum((o * o * c).sum() for o, c in zip(outs, weights, strict=True))
                grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
                used = [g for g in grads if g is not None]
                second = torch.autograd.grad(sum((g * g).sum() for g in used), inputs, allow_unused=True)
            results.append((outs, grads, second))
        (o1, g1, s1), (o2, g2, s2) = results
        for a, e in zip((*o1, *g1, *s1), (*o2, *g2, *s2), strict=True):
            assert (a is None) == (e is None), name
            if a is not None:
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)
