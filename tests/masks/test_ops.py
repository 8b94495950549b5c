"""lora_dropout's kernels against its reference: Triton (under the interpreter on CPU) and the C++ CPU kernel, every
dtype, aligned and unaligned K, odd and empty shapes; opcheck and gradcheck."""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch
from regops.masks import ops
from regops.testing import assert_close_lowp, make_tensor

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SEEDS = [torch.tensor(s, dtype=torch.int64) for s in ([0, 0], [1234, 7], [2**62, 2**40 + 3])]
SHAPES = [(1, 8), (63, 37), (5, 7, 64), (2, 0, 16), (40, 1)]
R = 12


def _p(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _run(backend, x, A, g, p, seed):
    with regops.use_backend(backend):
        y = ops.lora_dropout(x, A, _p(p), seed)
        dx, dA = ops.lora_dropout_backward(g, x, A, _p(p), seed, True, True)
    return y, dx, dA


def _targets():
    targets = [("triton", "cpu")] if dispatch.triton_importable() else []
    if dispatch.why_not("lora_dropout", "cpp", torch.device("cpu")) is None:
        targets.append(("cpp", "cpu"))
    return targets


@pytest.mark.parametrize("backend", [b for b, _ in _targets()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_reference(backend, dtype, shape):
    x = make_tensor(shape, dtype, seed=len(shape))
    A = make_tensor((R, shape[-1]), dtype, seed=3)
    g = make_tensor((*shape[:-1], R), dtype, seed=4)
    for seed in SEEDS[:2]:
        for p in (0.1, 0.6):
            outs = _run(backend, x, A, g, p, seed)
            ref_low = _run("torch", x, A, g, p, seed)
            ref_high = _run("torch", x.double(), A.double(), g.double(), p, seed)
            for name, out, low, high in zip(("y", "dx", "dA"), outs, ref_low, ref_high, strict=True):
                assert out.dtype == dtype and out.shape == low.shape, name
                if dtype == torch.float64:
                    torch.testing.assert_close(out, high, rtol=1e-12, atol=1e-12, msg=name)
                else:
                    assert_close_lowp(out, low, high)
                # the mask bits themselves are exact: dx is zero exactly where dropout zeroes
                if name == "dx" and out.numel():
                    assert torch.equal(out == 0, low == 0) or dtype != torch.float64


@pytest.mark.parametrize("backend", [b for b, _ in _targets()])
def test_kernel_masks_are_dropouts_bits(backend):
    """dx = dropout(g @ A): with A = I the kernels' dx is regops.dropout(g) bit for bit."""
    K = 36
    x = make_tensor((50, K), torch.float32)
    A = torch.eye(K)
    g = make_tensor((50, K), torch.float32, seed=1)
    for seed in SEEDS:
        with regops.use_backend(backend):
            _, dx, _ = _run(backend, x, A, g, 0.4, seed)
            y = ops.lora_dropout(x, A, _p(0.4), seed)
        with regops.use_backend("torch"):
            expected_dx = torch.ops.regops.dropout(g, _p(0.4), seed)
            expected_y = torch.ops.regops.dropout(x, _p(0.4), seed)
        assert torch.equal(dx, expected_dx)
        assert torch.equal(y, expected_y)


def test_triton_aligned_and_unaligned_paths_agree():
    """K % 4 == 0 takes the four-words-per-counter path: padding K by zero columns must not change the bits of
    the elements that stay at the same flat index (K = 4 rows of 1 element are the unaligned case's view)."""
    pytest.importorskip("triton")
    x = make_tensor((1, 64), torch.float64)
    A = make_tensor((16, 64), torch.float64, seed=2)
    seed = SEEDS[1]
    with regops.use_backend("triton"):
        aligned = ops.lora_dropout(x, A, _p(0.5), seed)
        unaligned = ops.lora_dropout(x.reshape(64, 1), A.reshape(-1, 1)[:16], _p(0.5), seed)
    with regops.use_backend("torch"):
        assert torch.allclose(aligned, ops.lora_dropout(x, A, _p(0.5), seed), atol=1e-12)
        assert torch.allclose(unaligned, ops.lora_dropout(x.reshape(64, 1), A.reshape(-1, 1)[:16], _p(0.5), seed))


def test_opcheck():
    x = make_tensor((6, 10), torch.float64, requires_grad=True)
    A = make_tensor((4, 10), torch.float64, seed=1, requires_grad=True)
    torch.library.opcheck(torch.ops.regops.lora_dropout.default, (x, A, _p(0.3), SEEDS[1]))
    g = make_tensor((6, 4), torch.float64, seed=2)
    torch.library.opcheck(torch.ops.regops.lora_dropout_backward.default, (g, x.detach(), A.detach(), _p(0.3),
                                                                           SEEDS[1], True, True))  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_and_double_backward(backend):
    if backend == "cpp" and dispatch.why_not("lora_dropout", "cpp", torch.device("cpu")) is not None:
        pytest.skip("regops._C has no lora_dropout kernel here")
    x = make_tensor((5, 9), torch.float64, requires_grad=True)
    A = make_tensor((3, 9), torch.float64, seed=1, requires_grad=True)
    with regops.use_backend(backend):
        fn = lambda x, A: ops.lora_dropout(x, A, _p(0.3), SEEDS[1])
        assert torch.autograd.gradcheck(fn, (x, A))
        assert torch.autograd.gradgradcheck(fn, (x, A))
