"""regops::global_mask_apply (one shard of a dropout-family op, mask by global element index), in one process:
a shard's result is the single-process result restricted to its box, for every family layout; the Triton kernel
is bit-identical to the reference; opcheck, gradcheck, compile, int64 indices, errors."""

from __future__ import annotations

import sys

import pytest
import torch

import regops
from regops._core.dtensor import contiguous_strides
from regops._core.dtypes import acc_dtype
from regops._core.validate import is_dtensor
from regops.dropout import reference as R
from regops.dropout import triton as T
from regops.dropout.ops import global_mask_apply
from regops.testing import make_tensor, prob

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
P = 0.3
KEY, OFFSET = 0x1234_5678_9ABC, 2**32 - 3  # the offset crosses a 32-bit boundary inside the call
SEED = torch.tensor([KEY, OFFSET])
GLOBAL = (7, 5, 6)
# (offset, local shape) boxes of GLOBAL: a row shard, a middle-dim shard, a last-dim shard, a corner, all, empty
BOXES = [
    ((4, 0, 0), (3, 5, 6)),
    ((0, 2, 0), (7, 2, 6)),
    ((0, 0, 3), (7, 5, 3)),
    ((1, 3, 5), (4, 1, 1)),
    ((0, 0, 0), GLOBAL),
    ((2, 0, 0), (0, 5, 6)),
]


def _slices(box):
    start, shape = box
    return tuple(slice(o, o + n) for o, n in zip(start, shape, strict=True))


def _layout(box, strides):
    start, _ = box
    return [sum(o * w for o, w in zip(start, strides, strict=True)), *strides]


def _row_strides(shape):
    padded = [*shape[:-1], 4 * R.row_counters(shape[-1])]
    return [*contiguous_strides(padded)[:-1], 1]


def _family_cases(x, res, bias):
    """(name, single-process result on the full tensor, kwargs of the shard op, word strides)."""
    scale = R.dropout_scale(P)
    full = contiguous_strides(x.shape)
    mask_shape = [x.shape[0], 1, x.shape[2]]
    shared = [0 if m == 1 else s for m, s in zip(mask_shape, contiguous_strides(mask_shape), strict=True)]
    unit = R.dropout(torch.ones(mask_shape, dtype=acc_dtype(x)), prob(P), SEED)
    path = R.dropout(torch.ones(x.shape[0], dtype=acc_dtype(x)), prob(P), SEED)
    step = R.multi_sample_counters(x.numel())
    factor = R.float_round(scale / 3)
    return [
        ("dropout", R.dropout(x, prob(P), SEED), dict(scale=scale, mode=R.MODE_WHERE), full),
        ("shared", (x.to(unit.dtype) * unit).to(x.dtype), dict(scale=scale, mode=R.MODE_MUL), shared),
        (
            "drop_path_add",
            R.scale_rows_add(x, path, res),
            dict(scale=scale, mode=R.MODE_MUL, residual=res),
            [1, 0, 0],
        ),
        (
            "multi_sample",
            R.multi_sample_dropout_mean(x, prob(P), 3, SEED),
            dict(scale=factor, mode=R.MODE_MULTI, num_samples=3, step=step),
            full,
        ),
        (
            "bias_dropout_add",
            R.bias_dropout_add(x, bias, res, prob(P), SEED),
            dict(scale=scale, mode=R.MODE_WHERE, residual=res, bias=bias),
            _row_strides(x.shape),
        ),
    ]


def _shard(x, box, layout, kw, seed=SEED):
    sl = _slices(box)
    res = kw.get("residual")
    bias = kw.get("bias")
    return global_mask_apply(
        x[sl],
        res[sl] if res is not None else None,
        bias[sl[-1]] if bias is not None else None,
        P,
        kw["scale"],
        kw["mode"],
        kw.get("num_samples", 1),
        kw.get("step", 0),
        layout,
        seed,
    )


@pytest.mark.parametrize("box", BOXES, ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_shard_is_the_single_process_result_restricted_to_its_box(box, dtype):
    x, res = make_tensor(GLOBAL, dtype, seed=1), make_tensor(GLOBAL, dtype, seed=2)
    bias = make_tensor(GLOBAL[-1:], dtype, seed=3)
    with regops.use_backend("torch"):
        for name, want, kw, strides in _family_cases(x, res, bias):
            got = _shard(x, box, _layout(box, strides), kw)
            assert torch.equal(got, want[_slices(box)]), name


# A global shape whose rows are multiples of 4 words: most of its boxes take the kernel's aligned path (one
# Philox evaluation per four elements); the last box starts mid-counter and does not.
GLOBAL_ALIGNED = (6, 4, 8)
BOXES_ALIGNED = [((3, 0, 0), (3, 4, 8)), ((0, 2, 0), (6, 2, 8)), ((0, 0, 4), (6, 4, 4)), ((1, 1, 2), (4, 3, 6))]


@pytest.mark.ops("global_mask_apply")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [GLOBAL, GLOBAL_ALIGNED], ids=["unaligned", "aligned"])
def test_kernel_bit_identical_to_reference(kernel_target, dtype, shape):
    _, device = kernel_target
    x, res = make_tensor(shape, dtype, device, seed=1), make_tensor(shape, dtype, device, seed=2)
    bias = make_tensor(shape[-1:], dtype, device, seed=3)
    x[0, 0, 0] = float("nan")  # NaN and signed zeros go through as in the reference
    x[0, 0, 1] = -0.0
    for box in BOXES if shape == GLOBAL else BOXES_ALIGNED:
        for name, _, kw, strides in _family_cases(x.cpu(), res.cpu(), bias.cpu()):
            kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            got = _shard(x, box, _layout(box, strides), kw)
            with regops.use_backend("torch"):
                want = _shard(x.cpu(), box, _layout(box, strides), {k: _cpu(v) for k, v in kw.items()})
            assert got.dtype == want.dtype and got.shape == want.shape, name
            got = got.cpu()
            # bit for bit (signed zeros included); a NaN stays a NaN (its payload may be canonicalised)
            assert torch.equal(got.isnan(), want.isnan()), (name, box)
            finite = ~want.isnan()
            assert torch.equal(got[finite].view(torch.uint8), want[finite].view(torch.uint8)), (name, box)


def _cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


@pytest.mark.ops("global_mask_apply")
def test_kernel_int64_word_indices_and_out_dtype(kernel_target):
    """Global word indices past 2**32 (a shard deep inside a huge tensor) and a wider output dtype."""
    _, device = kernel_target
    x = make_tensor((3, 70), torch.float16, device, seed=4)
    layout = [2**35 + 3, 2**33 + 1, 1]
    got = global_mask_apply(x, None, None, P, 1.5, R.MODE_WHERE, 1, 0, layout, SEED, torch.float32)
    with regops.use_backend("torch"):
        want = global_mask_apply(x.cpu(), None, None, P, 1.5, R.MODE_WHERE, 1, 0, layout, SEED, torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), want)
    words = R.global_words(KEY, OFFSET, (3, 70), layout)
    w = 2**35 + 3 + 2 * (2**33 + 1) + 69
    assert words[2, 69] == R.random_words(KEY, OFFSET + w // 4, (4,))[w % 4]


def test_launcher_grid_for_a_huge_shard_stays_within_cuda_limits():
    from regops._core.launch import recording

    x = torch.empty((2**20, 2**13 + 1), device="meta", dtype=torch.bfloat16)
    with recording() as launches:
        T.global_mask_apply(x, None, None, P, 2.0, R.MODE_WHERE, 1, 0, [0, 2**14, 1], torch.tensor([1, 2]))
    (launch,) = launches
    assert launch.grid[0] * launch.meta["BLOCK"] >= x.numel() and launch.meta["NDIM"] == 2


def test_aligned_path_is_taken_only_where_groups_of_four_share_a_counter():
    def aligned(box, strides):
        layout = _layout(box, strides)
        return T.aligned_words(layout[0], T.collapse(box[1], layout[1:]))

    full = contiguous_strides(GLOBAL_ALIGNED)
    assert [aligned(b, full) for b in BOXES_ALIGNED] == [True, True, True, False]
    assert not any(aligned(b, contiguous_strides(GLOBAL)) for b in BOXES[:-1])
    assert not aligned(((0, 0, 0), (6, 4, 8)), [1, 0, 0])  # drop path: one word per sample


def test_collapse_merges_word_contiguous_dims():
    assert T.collapse((3, 5, 6), [30, 6, 1]) == [(90, 1)]  # a Shard(0) dropout is one dim
    assert T.collapse((3, 2, 6), [30, 6, 1]) == [(12, 1), (3, 30)]
    assert T.collapse((3, 1, 6), [6, 0, 1]) == [(18, 1)]
    assert T.collapse((1, 1), [5, 1]) == [(1, 0)]


def test_gradients_and_gradcheck():
    x = make_tensor((4, 6), torch.float64, seed=5, requires_grad=True)
    res = make_tensor((4, 6), torch.float64, seed=6, requires_grad=True)
    bias = make_tensor((6,), torch.float64, seed=7, requires_grad=True)
    layout = [13, 8, 1]

    def f(x, res, bias):
        return global_mask_apply(x, res, bias, P, R.dropout_scale(P), R.MODE_WHERE, 1, 0, layout, SEED)

    with regops.use_backend("torch"):
        torch.autograd.gradcheck(f, (x, res, bias))
        y = f(x, res, bias)
    keep = R.global_keep_mask(KEY, OFFSET, (4, 6), layout, P)
    g = torch.randn_like(y)
    dx, dres, dbias = torch.autograd.grad(y, (x, res, bias), g)
    want_dx = torch.where(keep, g * R.dropout_scale(P), 0.0)
    assert torch.equal(dx, want_dx) and torch.equal(dres, g)
    torch.testing.assert_close(dbias, want_dx.sum(0), rtol=0, atol=1e-14)


def test_opcheck():
    x = make_tensor((5, 7), torch.float32, requires_grad=True)
    res = make_tensor((5, 7), torch.float32)
    bias = make_tensor((7,), torch.float32)
    args = (x, res, bias, P, R.dropout_scale(P), R.MODE_WHERE, 1, 0, [3, 8, 1], SEED)
    torch.library.opcheck(torch.ops.regops.global_mask_apply, args)
    # the second call: schema, fake impl and autograd registration (AOT tracing is covered above and by compile)
    torch.library.opcheck(
        torch.ops.regops.global_mask_apply,
        (x, None, None, P, 0.4, R.MODE_MULTI, 2, 9, [0, 7, 1], SEED),
        {"out_dtype": torch.float64},
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def f(t):
        return global_mask_apply(t * 2, None, None, P, R.dropout_scale(P), R.MODE_WHERE, 1, 0, [35, 7, 1], SEED) + 1

    x = make_tensor((6, 7), torch.float32, requires_grad=True)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    with regops.use_backend("torch"):
        want = f(x.detach())
    assert torch.equal(y.detach(), want)
    assert torch.equal(x.grad != 0, want != 1)


def test_errors_and_lean_hook():
    x = make_tensor((2, 3))
    with pytest.raises(ValueError, match="regops: unknown mask mode"):
        global_mask_apply(x, None, None, P, 1.0, 7, 1, 0, [0, 3, 1], SEED)
    with pytest.raises(ValueError, match="regops: layout has 1 strides for a 2-D shard"):
        R.word_index((2, 3), [0, 1])
    y = torch.ones((2,) * 7)
    with pytest.raises(ValueError, match="more than 6 non-mergeable dims"):
        T.global_mask_apply(
            y, None, None, P, 1.0, R.MODE_WHERE, 1, 0, [0, *(5**k for k in range(7))], torch.tensor([1, 2])
        )
    assert not is_dtensor(x, None, 3)
    if "torch.distributed.tensor" not in sys.modules:  # the hook never imports it for plain tensors
        assert regops.dropout(x, 0.5) is not None and "torch.distributed.tensor" not in sys.modules


def test_reference_row_fast_path_equals_the_general_word_index():
    for shape, layout in (((3, 70), [2**35 + 3, 2**33 + 1, 1]), ((2, 3, 5), [7, 40, 8, 1]), ((4, 1), [1, 5, 1])):
        fast = R.global_words(KEY, OFFSET, shape, layout)
        w = R.word_index(shape, layout)
        words = R.random_words(KEY, OFFSET, (4 * (int(w.max()) // 4 + 1),)) if int(w.max()) < 4096 else None
        general = torch.stack([R.random_words(KEY, OFFSET + int(v) // 4, (4,))[int(v) % 4] for v in w.reshape(-1)])
        assert torch.equal(fast.reshape(-1), general), (shape, layout)
        if words is not None:
            assert torch.equal(fast.reshape(-1), words[w.reshape(-1)])
