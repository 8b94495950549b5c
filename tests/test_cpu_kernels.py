"""The C++ CPU kernels (regops_cpu::<op>, backend "cpp") against the reference: the same bits for every mask and
every elementwise result, the reference's tolerance for reductions; odd sizes, every dtype, offsets near 2**32."""

from __future__ import annotations

import itertools

import pytest
import torch

import regops
from regops import _backend
from regops.reference import dropout as ref
from tests.backends import extension_expected

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEEDS_OFFSETS = ((987654321987, 0), (-5, 2**32 - 3), (2**62 + 11, 2**32 - 70))


# Skipped only where the extension cannot be built (no C++ compiler, or REGOPS_BUILD_EXT=0); anywhere else a
# missing or partial regops._C fails every test here (and test_extension_present.py says why).
pytestmark = pytest.mark.skipif(
    extension_expected() is None, reason="no C++ compiler, or REGOPS_BUILD_EXT=0: regops._C is not built here"
)
K = torch.ops.regops_cpu


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=2e-5, atol=2e-5),
    }.get(dtype, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_and_bitmask_bits_match_reference(dtype):
    for n, p, (seed, offset) in itertools.product((0, 1, 3, 63, 64, 65, 1000, 4097), (0.0, 0.3, 1.0), SEEDS_OFFSETS):
        x = torch.randn(n, dtype=dtype)
        assert torch.equal(K.dropout(x, p, seed, offset), ref.dropout(x, p, seed, offset)), (n, p, offset)
        y, bits = K.dropout_bitmask(x, p, seed, offset)
        y_ref, bits_ref = ref.dropout_bitmask(x, p, seed, offset)
        assert torch.equal(y, y_ref) and torch.equal(bits, bits_ref), (n, p, offset)
        scale = ref.dropout_scale(p)
        assert torch.equal(K.apply_bitmask(x, bits_ref, scale), ref.apply_bitmask(x, bits_ref, scale))


def test_dropout_reads_logical_order_of_non_contiguous_input():
    x = torch.randn(37, 29).t()
    assert torch.equal(K.dropout(x, 0.4, 3, 5), ref.dropout(x.contiguous(), 0.4, 3, 5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dropout_add_matches_reference(dtype):
    for shape, p, (seed, offset) in itertools.product(
        ((1, 1), (3, 5), (2, 3, 64), (7, 1001), (513, 3)), (0.0, 0.3, 1.0), SEEDS_OFFSETS[1:]
    ):
        x, res, b = (
            torch.randn(shape, dtype=dtype),
            torch.randn(shape, dtype=dtype),
            torch.randn(shape[-1], dtype=dtype),
        )
        for bias in (None, b):
            out = K.bias_dropout_add(x, bias, res, p, seed, offset)
            assert torch.equal(out, ref.bias_dropout_add(x, bias, res, p, seed, offset)), (shape, p)
        for has_bias in (False, True):
            dx, db = K.bias_dropout_add_backward(x, has_bias, p, seed, offset)
            dx_ref, db_ref = ref.bias_dropout_add_backward(x, has_bias, p, seed, offset)
            assert torch.equal(dx, dx_ref)
            assert (db is None) == (db_ref is None)
            if has_bias:
                assert db.dtype == db_ref.dtype
                torch.testing.assert_close(db, db_ref, **_tol(db.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_add_layer_norm_matches_reference(dtype):
    seed, offset = SEEDS_OFFSETS[2]
    for shape, p, rms, in_fp32, with_res, affine in itertools.product(
        ((1, 1), (5, 63), (2, 3, 100)), (0.0, 0.3), (False, True), (False, True), (False, True), (False, True)
    ):
        x, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        res = torch.randn(shape, dtype=dtype) if with_res else None
        w = torch.randn(shape[-1], dtype=dtype) if affine else None
        b = torch.randn(shape[-1], dtype=dtype) if affine else None
        got = K.dropout_add_layer_norm(x, res, w, b, p, 1e-5, rms, in_fp32, seed, offset)
        want = ref.dropout_add_layer_norm(x, res, w, b, p, 1e-5, rms, in_fp32, seed, offset)
        for g, e in zip(got, want, strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(got[1], want[1])  # s: elementwise, the same bits
        torch.testing.assert_close(got[0].double(), want[0].double(), **_tol(dtype))
        torch.testing.assert_close(got[2], want[2], **_tol(got[2].dtype))
        torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-5)
        ds = torch.randn(shape, dtype=want[1].dtype) if with_res else None
        args = (
            dy,
            ds,
            want[1],
            want[2],
            want[3],
            w,
            affine,
            p,
            rms,
            seed,
            offset,
            dtype,
            res.dtype if with_res else None,
        )
        for g, e in zip(
            K.dropout_add_layer_norm_backward(*args), ref.dropout_add_layer_norm_backward(*args), strict=True
        ):
            assert (g is None) == (e is None)
            if g is not None:
                assert g.dtype == e.dtype
                torch.testing.assert_close(g.double(), e.double(), **_tol(dtype if dtype != torch.float32 else g.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_sample_and_scale_rows_match_reference(dtype):
    seed, offset = SEEDS_OFFSETS[2]
    for shape, p, k in itertools.product(((1,), (3, 5), (7, 65), (2, 3, 67)), (0.0, 0.3, 1.0), (1, 3)):
        x = torch.randn(shape, dtype=dtype)
        got = K.multi_sample_dropout_mean(x, p, k, seed, offset)
        assert torch.equal(got, ref.multi_sample_mean_dropout(x, p, k, seed, offset)), (shape, p, k)
        scales = torch.rand(shape[0], dtype=ref.compute_dtype(dtype))
        for res in (None, torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=torch.float32)):
            assert torch.equal(K.scale_rows_add(x, scales, res), ref.scale_rows_add(x, scales, res)), (shape, res)


def test_nan_at_dropped_position_stays_nan():
    """Multiply semantics, as torch: y = x * (keep ? scale : 0), so a NaN or inf that is dropped gives NaN."""
    x = torch.full((4096,), float("nan"))
    keep = ref.row_keep_mask(1, 0, 1, 4096, 0.5).reshape(-1)
    assert not keep.all() and keep.any()
    assert K.dropout(x, 0.5, 1, 0).isnan().all()
    assert K.dropout_bitmask(x, 0.5, 1, 0)[0].isnan().all()
    assert K.apply_bitmask(x, ref.pack_bits(keep), 2.0).isnan().all()
    rows = x.reshape(1, -1)
    assert K.bias_dropout_add(rows, None, torch.zeros_like(rows), 0.5, 1, 0).isnan().all()
    assert K.bias_dropout_add_backward(rows, False, 0.5, 1, 0)[0].isnan().all()
    assert K.dropout_add_layer_norm(rows, None, None, None, 0.5, 1e-5, False, False, 1, 0)[1].isnan().all()
    inf = torch.full((64,), float("inf"))
    assert K.dropout(inf, 0.5, 1, 0).isnan().sum() == (~ref.keep_mask(1, 0, (64,), 0.5)).sum()


def test_results_do_not_depend_on_thread_count():
    x = torch.randn(3000, 70)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (
            K.bias_dropout_add_backward(x, True, 0.2, 9, 4),
            K.dropout_add_layer_norm(x, x, None, None, 0.2, 1e-5, False, False, 9, 4),
        )
        torch.set_num_threads(2)
        two = (
            K.bias_dropout_add_backward(x, True, 0.2, 9, 4),
            K.dropout_add_layer_norm(x, x, None, None, 0.2, 1e-5, False, False, 9, 4),
        )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(itertools.chain(*one), itertools.chain(*two), strict=True):
        assert torch.equal(a, b)


def test_bad_input_gets_a_clear_error():
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\]"):
        K.dropout(torch.randn(4), 1.5, 0, 0)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        K.dropout(torch.ones(4, dtype=torch.int32), 0.5, 0, 0)
    with pytest.raises(RuntimeError, match=r"uint8 \[ceil\(numel / 8\)\]"):
        K.apply_bitmask(torch.randn(20), torch.zeros(2, dtype=torch.uint8), 2.0)
    with pytest.raises(RuntimeError, match="bias must be"):
        K.bias_dropout_add(torch.randn(2, 3), torch.randn(4), torch.randn(2, 3), 0.5, 0, 0)


def test_ops_pick_the_cpp_backend_on_cpu_and_agree_with_the_reference(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    for op in (
        "dropout",
        "dropout_bitmask",
        "apply_bitmask",
        "bias_dropout_add",
        "bias_dropout_add_backward",
        "dropout_add_layer_norm",
        "dropout_add_layer_norm_backward",
        "multi_sample_dropout_mean",
        "scale_rows_add",
        "mix_apply",
        "nested_dropout",
    ):
        assert _backend.choose(op, cpu) == "cpp", op
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
    torch.library.opcheck(K.dropout, (x, 0.3, 5, 2**32 - 1))
    torch.library.opcheck(K.bias_dropout_add, (x, torch.randn(33), x, 0.3, 5, 7))
    torch.library.opcheck(torch.ops.regops.dropout, (x, torch.tensor(0.3, dtype=torch.float64), torch.tensor([5, 7])))
    fn = torch.compile(lambda t: regops.bias_dropout_add(t, None, t, 0.25), fullgraph=True, backend="eager")
    torch.manual_seed(1)
    out = fn(x)
    torch.manual_seed(1)
    assert torch.equal(out, regops.bias_dropout_add(x, None, x, 0.25))


# ----------------------------------------------------------------------------------------------- mix_apply
def _mix_args(shape, dtype, gen, channels_last=False):
    b = shape[0]
    if dtype == torch.uint8:
        x = (torch.rand(shape, generator=gen) * 300).to(dtype)
    else:
        x = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = torch.rand(b, generator=gen)
    wo = 1 - ws
    wo[::2] = 0.0  # partner not read
    ws[1::3] = 1.0
    partner = torch.randperm(b, generator=gen)
    height, width = (1, shape[-1]) if len(shape) == 2 else shape[-2:]
    y0 = torch.randint(0, height + 1, (b,), generator=gen)
    c0 = torch.randint(0, width + 1, (b,), generator=gen)
    y1 = y0 + (torch.rand(b, generator=gen) * (height + 1 - y0)).long()
    c1 = c0 + (torch.rand(b, generator=gen) * (width + 1 - c0)).long()
    return x, ws, wo, partner, torch.stack((y0, y1, c0, c1), dim=1)


@pytest.mark.parametrize("dtype", (*DTYPES, torch.uint8))
def test_mix_apply_bits_match_reference(dtype):
    from regops.reference import mix as mref

    gen = torch.Generator().manual_seed(5)
    cases = [((5, 7), False), ((3, 2, 5, 6), False), ((2, 5, 4), False), ((1, 1, 1, 1), False)]
    cases += [((6, 3, 40, 41), False), ((300, 3, 5, 7), False), ((4, 3, 9, 11), True), ((3, 5, 6, 7), True)]
    for shape, channels_last in cases:
        args = _mix_args(shape, dtype, gen, channels_last)
        got, want = K.mix_apply(*args), mref.mix_apply(*args)
        assert got.dtype == dtype and got.stride() == want.stride(), shape
        assert torch.equal(got, want), (shape, channels_last)


def test_mix_apply_does_not_read_an_unused_partner_and_checks_input():
    x = torch.randn(4, 3, 5, 5)
    x[1] = float("nan")
    ws, wo = torch.full((4,), 0.5), torch.zeros(4)
    partner, box = torch.tensor([1, 0, 3, 2]), torch.zeros(4, 4, dtype=torch.long)
    assert not K.mix_apply(x, ws, wo, partner, box)[0].isnan().any()
    with pytest.raises(RuntimeError, match=r"partner\[0\] = 4 is not in \[0, 4\)"):
        K.mix_apply(x, ws, wo, torch.tensor([4, 0, 3, 2]), box)
    bad_box = box.clone()
    bad_box[2] = torch.tensor([0, 6, 1, 2])
    with pytest.raises(RuntimeError, match="outside the"):
        K.mix_apply(x, ws, wo, partner, bad_box)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        K.mix_apply(x.to(torch.int32), ws, wo, partner, box)


def test_mix_apply_op_runs_cpp_with_gradient_opcheck_and_compile(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
    x, ws, wo, partner, box = _mix_args((5, 3, 6, 7), torch.float32, torch.Generator().manual_seed(2))
    op = torch.ops.regops.mix_apply
    xg = x.clone().requires_grad_()
    y = op(xg, ws, wo, partner, box)
    y.backward(torch.ones_like(y))
    with regops.use_backend("torch"):
        xr = x.clone().requires_grad_()
        y_ref = op(xr, ws, wo, partner, box)
        y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y, y_ref) and torch.equal(xg.grad, xr.grad)
    torch.library.opcheck(K.mix_apply, (x, ws, wo, partner, box))
    torch.library.opcheck(op, (x, ws, wo, partner, box))
    fn = torch.compile(lambda t: op(t, ws, wo, partner, box), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), y_ref)


# ----------------------------------------------------------------------------------------------- nested dropout
@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_dropout_bits_match_reference(dtype):
    cases = (((5, 7), 1), ((5, 7), -1), ((3, 4, 9), 1), ((9, 2, 3, 5), 2), ((1, 1), 1), ((130, 33), 1), ((4, 0), 1))
    for (shape, dim), p, (seed, offset) in itertools.product(cases, (1e-9, 0.05, 0.3, 1.0), SEEDS_OFFSETS):
        x = torch.randn(shape).to(dtype)
        got = K.nested_dropout(x, p, dim, seed, offset)
        assert torch.equal(got, ref.nested_dropout(x, p, dim, seed, offset)), (shape, dim, p, offset)
    x = torch.randn(4, 8)
    x[:, 5:] = float("nan")  # dropped units are multiplied by 0: NaN stays NaN, as in the reference
    assert torch.equal(K.nested_dropout(x, 0.5, 1, 3, 4).isnan(), ref.nested_dropout(x, 0.5, 1, 3, 4).isnan())
    with pytest.raises(RuntimeError, match="must not be the batch dim"):
        K.nested_dropout(x, 0.5, 0, 3, 4)


def test_nested_dropout_op_runs_cpp_with_gradient_opcheck_and_compile(monkeypatch):
    monkeypatch.delenv("REGOPS_BACKEND", raising=False)
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
    torch.library.opcheck(K.nested_dropout, (x.contiguous(), 0.2, 1, 5, 2**32 - 1))
    fn = torch.compile(lambda t: regops.nested_dropout(t, 0.2, dim=1), fullgraph=True, backend="eager")
    torch.manual_seed(3)
    assert torch.equal(fn(x), y_ref)
