"""The mixing op's kernels (Triton under the interpreter on CPU, the C++ CPU kernel, CUDA and Triton on a GPU) against
the reference, bit for bit: every dtype and layout, random weights, partners and boxes, the transposed mix
(backward), an unused partner never read; opcheck, torch.compile, launch grids, the C++ kernel's input checks."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import launch
from regops.mix import ops
from regops.mix import reference as R
from regops.mix import triton as mix_triton

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _example_params(batch: int, height: int, width: int, seed: int = 0) -> regops.MixParams:
    torch.manual_seed(seed)
    return regops.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", partner="random").sample_params(
        torch.zeros(batch, 1, height, width)
    )


def _mix_args(shape, dtype, gen, channels_last=False):
    """A batch and random per-sample parameters: some partners unused (w_other = 0), some w_self = 1, random boxes
    (empty ones included), a random permutation of partners."""
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


def _on(device, args):
    return [a.to(device) for a in args]


# ----------------------------------------------------------------------------------------------- kernels vs reference
@pytest.mark.ops("mix_apply", "mix_apply_backward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "3d", "2d"])
def test_mix_kernel_matches_reference(kernel_target, dtype, layout):
    _, device = kernel_target
    shapes = {"nchw": (5, 3, 7, 9), "channels_last": (5, 3, 7, 9), "3d": (5, 7, 9), "2d": (5, 33)}
    shape = shapes[layout]
    height, width = (1, 33) if layout == "2d" else shape[-2:]
    gen = torch.Generator().manual_seed(1)
    x = (
        (torch.rand(shape, generator=gen) * 255).to(dtype)
        if dtype == torch.uint8
        else torch.randn(shape, generator=gen)
    )
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p = _example_params(5, height, width)
    if layout == "2d":
        p = regops.MixParams(p.lam, p.partner, torch.zeros_like(p.box), torch.zeros_like(p.use_cutmix))
    args = [t.to(device) for t in (*p.image_weights, p.partner, p.box)]
    out = ops.mix_apply(x, *args)
    with regops.use_backend("torch"):
        expected = ops.mix_apply(x.cpu(), *[a.cpu() for a in args])
    assert out.stride() == expected.stride()
    assert torch.equal(out.cpu(), expected)
    if dtype.is_floating_point:
        grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        gk = ops.mix_apply_backward(grad, *args)
        with regops.use_backend("torch"):
            gr = ops.mix_apply_backward(grad.cpu(), *[a.cpu() for a in args])
        assert torch.equal(gk.cpu(), gr)


@pytest.mark.ops("mix_apply", "mix_apply_backward")
@pytest.mark.parametrize("dtype", (*DTYPES, torch.uint8))
def test_random_weights_partners_and_boxes_bits_match_reference(kernel_target, dtype):
    """Forward and transposed mix on every layout, with unused partners, w_self = 1 and empty and full boxes."""
    backend, device = kernel_target
    gen = torch.Generator().manual_seed(5)
    cases = [((5, 7), False), ((3, 2, 5, 6), False), ((2, 5, 4), False), ((1, 1, 1, 1), False)]
    cases += [((6, 3, 40, 41), False), ((4, 3, 9, 11), True), ((3, 5, 6, 7), True)]
    if not (backend == "triton" and device.type == "cpu"):  # 300 programs: slow under the interpreter
        cases.append(((300, 3, 5, 7), False))  # many samples per parallel chunk
    for shape, channels_last in cases:
        args = _mix_args(shape, dtype, gen, channels_last)
        got, want = ops.mix_apply(*_on(device, args)), R.mix_apply(*args)
        assert got.dtype == dtype and got.stride() == want.stride(), shape
        assert torch.equal(got.cpu(), want), (shape, channels_last)
        if dtype.is_floating_point:
            got, want = ops.mix_apply_backward(*_on(device, args)), R.mix_apply_backward(*args)
            assert got.dtype == dtype and got.stride() == want.stride(), shape
            assert torch.equal(got.cpu(), want), ("backward", shape, channels_last)


@pytest.mark.ops("mix_apply", "mix_apply_backward")
def test_an_unused_partner_is_never_read(kernel_target):
    _, device = kernel_target
    x = torch.randn(4, 3, 5, 5)
    x[1] = float("nan")
    ws, wo = torch.full((4,), 0.5), torch.zeros(4)
    partner, box = torch.tensor([1, 0, 3, 2]), torch.zeros(4, 4, dtype=torch.long)
    args = _on(device, (x, ws, wo, partner, box))
    assert not ops.mix_apply(*args)[0].isnan().any()
    assert not ops.mix_apply_backward(*args)[0].isnan().any()  # sample 0's gradient gathers from sample 1


def test_large_sample_path_equals_chunked_path(monkeypatch):
    """The reference mixes large samples one at a time and small ones in chunks: both give the same bits."""
    gen = torch.Generator().manual_seed(8)
    p = _example_params(6, 7, 9, seed=4)
    args = (*p.image_weights, p.partner, p.box)
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.uint8):
        x = torch.randn(6, 3, 7, 9, generator=gen)
        x = (x.abs() * 60).to(dtype) if dtype == torch.uint8 else x.to(dtype)
        chunked = R.mix_apply(x, *args)
        monkeypatch.setattr(R, "_CHUNK", 1)
        one_by_one = R.mix_apply(x, *args)
        monkeypatch.undo()
        assert torch.equal(chunked, one_by_one)


@pytest.mark.ops("mix_apply", "mix_apply_backward")
def test_manifold_mix_kernel_gradients(kernel_target):
    _, device = kernel_target
    p = _example_params(4, 3, 5, seed=5)
    p = regops.MixParams(*(t.to(device) for t in (p.lam, p.partner, p.box, p.use_cutmix)))
    h = torch.randn(4, 2, 3, 5, device=device, requires_grad=True)
    (gk,) = torch.autograd.grad((regops.manifold_mix(h, p) ** 2).sum(), h)
    with regops.use_backend("torch"):
        (gr,) = torch.autograd.grad((regops.manifold_mix(h, p) ** 2).sum(), h)
    torch.testing.assert_close(gk, gr)


@pytest.mark.ops("mix_apply", "mix_apply_backward")
def test_op_gradient_opcheck_and_compile(kernel_target):
    _, device = kernel_target
    x, ws, wo, partner, box = _on(device, _mix_args((5, 3, 6, 7), torch.float32, torch.Generator().manual_seed(2)))
    xg = x.clone().requires_grad_()
    y = ops.mix_apply(xg, ws, wo, partner, box)
    y.backward(torch.ones_like(y))
    with regops.use_backend("torch"):
        xr = x.cpu().requires_grad_()
        y_ref = ops.mix_apply(xr, ws.cpu(), wo.cpu(), partner.cpu(), box.cpu())
        y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y.cpu(), y_ref) and torch.equal(xg.grad.cpu(), xr.grad)
    torch.library.opcheck(torch.ops.regops.mix_apply, (x, ws, wo, partner, box))
    torch.library.opcheck(torch.ops.regops.mix_apply_backward, (x, ws, wo, partner, box))
    fn = torch.compile(lambda t: ops.mix_apply(t, ws, wo, partner, box), fullgraph=True, backend="eager")
    assert torch.equal(fn(x).cpu(), y_ref.detach())


def test_double_backward_is_the_mix_again():
    p = _example_params(4, 3, 5, seed=6)
    h = torch.randn(4, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: regops.manifold_mix(t, p), (h,))


@pytest.mark.parametrize("index", range(2))
def test_opcheck_reference_path(index):
    p = _example_params(4, 3, 5, seed=1)
    x = torch.randn(4, 2, 3, 5, requires_grad=True)
    samples = [
        (x, *p.image_weights, p.partner, p.box),
        (x.detach().contiguous(memory_format=torch.channels_last), *p.image_weights, p.partner, p.box),
    ]
    with regops.use_backend("torch"):
        torch.library.opcheck(torch.ops.regops.mix_apply.default, samples[index])


# ----------------------------------------------------------------------------------------------- C++ input checks
@pytest.mark.ops("mix_apply", "mix_apply_backward", backends=("cpp",))
def test_cpp_kernels_check_their_input(kernel_target):
    x = torch.randn(4, 3, 5, 5)
    ws, wo = torch.full((4,), 0.5), torch.zeros(4)
    partner, box = torch.tensor([1, 0, 3, 2]), torch.zeros(4, 4, dtype=torch.long)
    for op in (torch.ops.regops.mix_apply, torch.ops.regops.mix_apply_backward):
        with pytest.raises(RuntimeError, match=r"partner\[0\] = 4 is not in \[0, 4\)"):
            op(x, ws, wo, torch.tensor([4, 0, 3, 2]), box)
        bad_box = box.clone()
        bad_box[2] = torch.tensor([0, 6, 1, 2])
        with pytest.raises(RuntimeError, match="outside the"):
            op(x, ws, wo, partner, bad_box)
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            op(x.to(torch.int32), ws, wo, partner, box)
    with pytest.raises(RuntimeError, match="permutation"):
        torch.ops.regops.mix_apply_backward(x, ws, wo, torch.tensor([1, 1, 3, 2]), box)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        torch.ops.regops.mix_apply_backward(x.to(torch.uint8), ws, wo, partner, box)


# ----------------------------------------------------------------------------------------------- launch grids
def test_mix_grids_stay_within_cuda_limits_for_2_pow_20_images():
    n = 1 << 20
    meta = dict(device="meta")
    images = torch.empty(n, 3, 8, 8, **meta)
    w = torch.empty(n, **meta)
    partner = torch.empty(n, dtype=torch.long, **meta)
    box = torch.empty(n, 4, dtype=torch.long, **meta)
    with launch.recording() as launches:
        mix_triton.mix_apply(images, w, w, partner, box)
        mix_triton.mix_apply_backward(images, w, w, partner, box)
    assert [lc.kernel for lc in launches] == ["mix_kernel", "mix_kernel"]
    for lc in launches:
        launch.check_grid(lc.grid, lc.kernel)
        assert lc.meta["enable_fp_fusion"] is False  # the mix kernel rounds like the reference on a GPU
    assert [lc.meta["TRANSPOSE"] for lc in launches] == [False, True]
