"""regops.dropout: bit-identical backends, torch semantics, statistics, autograd, compile, memory, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import regops
from regops._core import dispatch
from regops._core.philox import keep_mask, random_words
from regops.dropout.reference import dropout_scale
from regops.testing import ODD_SIZES, make_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEEDS = [torch.tensor(s, dtype=torch.int64) for s in ([0, 0], [1234, 7], [-(2**63), 2**32 - 1], [2**62, 2**40 + 3])]
SHAPES = [(n,) for n in ODD_SIZES] + [(3, 5, 7), (2, 0, 3), ()]


def _p(v: float) -> torch.Tensor:
    """The ops take p as a 0-dim float64 tensor (a runtime value under torch.compile)."""
    return torch.tensor(v, dtype=torch.float64)


def _op(x, p, seed):
    return torch.ops.regops.dropout(x, _p(p), seed)


def _reference(x, p, seed):
    with regops.use_backend("torch"):
        return _op(x, p, seed)


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.ops("dropout")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_bit_identical_to_reference(kernel_target, dtype, shape):
    _, device = kernel_target
    x = make_tensor(shape, dtype, device, seed=len(shape))
    for seed in SEEDS:
        for p in (0.1, 0.5, 0.97):
            out = _op(x, p, seed)
            ref = _reference(x.cpu(), p, seed)
            assert out.dtype == dtype and out.shape == x.shape
            assert torch.equal(out.cpu(), ref), f"seed={seed.tolist()} p={p}"


@pytest.mark.ops("dropout")
def test_kernel_noncontiguous_reads_logical_order(kernel_target):
    _, device = kernel_target
    x = make_tensor((37, 65), torch.float32, device, noncontiguous=True)
    assert not x.is_contiguous()
    seed = SEEDS[1]
    assert torch.equal(_op(x, 0.3, seed).cpu(), _reference(x.contiguous().cpu(), 0.3, seed))
    xt = make_tensor((40, 33), torch.bfloat16, device).t()
    assert torch.equal(_op(xt, 0.3, seed).cpu(), _reference(xt.contiguous().cpu(), 0.3, seed))


@pytest.mark.ops("dropout")
def test_kernel_p_one_gives_zeros_and_p_tiny_keeps_all(kernel_target):
    _, device = kernel_target
    x = make_tensor((1000,), torch.float32, device)
    assert torch.equal(_op(x, 1.0, SEEDS[1]), torch.zeros_like(x))
    assert torch.equal(_op(x, 1e-12, SEEDS[1]), x)


@pytest.mark.ops("dropout")
def test_kernel_keep_threshold_is_exact_at_the_boundary(kernel_target):
    """p chosen so the threshold lands exactly on an element's word: that element is dropped (keep iff
    (word >> 1) > threshold), and kept when the threshold is one lower. A >= in a kernel changes only these."""
    _, device = kernel_target
    seed = SEEDS[1]
    key, offset = (int(v) for v in seed)
    x = torch.ones(64, device=device)
    words = random_words(key, offset, (64,)) >> 1
    for i in (0, 5, 63):
        w = int(words[i])
        for p, kept in (((w + 1) / 2**31, False), (w / 2**31, True)):
            y = _op(x, p, seed).cpu()
            assert torch.equal(y, _reference(x.cpu(), p, seed)), (i, p)
            assert bool(y[i] != 0) == kept, (i, p)


@pytest.mark.parametrize("block", [256, 1024, 4096])
def test_triton_result_independent_of_tiling(block, monkeypatch):
    pytest.importorskip("triton")
    from regops.dropout import triton as T

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_tensor((5000,), torch.float16, device)
    seed = torch.tensor([99, 12345], device=device)
    expected = T.dropout(x, _p(0.4), seed)
    monkeypatch.setattr(T, "_block", lambda t: block)
    assert torch.equal(T.dropout(x, _p(0.4), seed), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_extension_unaligned_and_large(dtype):
    reason = dispatch.why_not("dropout", "cuda", torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    base = make_tensor((1 << 20) + 3, dtype, "cuda")
    x = base[1:]  # storage offset of one element: not 16-byte aligned, scalar path
    seed = SEEDS[2]
    with regops.use_backend("cuda"):
        out = _op(x, 0.25, seed)
    with regops.use_backend("triton"):
        out_triton = _op(x, 0.25, seed)
    assert torch.equal(out, out_triton)
    assert torch.equal(out.cpu(), _reference(x.cpu(), 0.25, seed))


# ------------------------------------------------------------------------------------------------ semantics
def test_keep_rate_and_unbiasedness():
    n = 1 << 20
    x = torch.ones(n)
    for p in (0.1, 0.5, 0.9):
        y = regops.dropout(x, p, generator=torch.Generator().manual_seed(3))
        kept = (y != 0).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(kept - (1 - p)) < 6 * sigma, (p, kept)
        assert abs(y.double().mean().item() - 1.0) < 6 * sigma / (1 - p)
        assert torch.all((y == 0) | (y == dropout_scale(p)))


def test_masks_are_uncorrelated_across_elements_and_calls():
    n = 1 << 18
    torch.manual_seed(0)
    a = regops.dropout(torch.ones(n), 0.5) != 0
    b = regops.dropout(torch.ones(n), 0.5) != 0  # the generator advanced: a new mask
    for u, v in ((a, b), (a[:-1], a[1:]), (a[:-4], a[4:])):
        corr = torch.corrcoef(torch.stack([u.double(), v.double()]))[0, 1].item()
        assert abs(corr) < 6 / math.sqrt(u.numel()), corr


def test_manual_seed_and_generator_reproduce():
    x = make_tensor((4097,), torch.float32)
    torch.manual_seed(5)
    a = regops.dropout(x, 0.3)
    torch.manual_seed(5)
    b = regops.dropout(x, 0.3)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    c, d = regops.dropout(x, 0.3, generator=g1), regops.dropout(x, 0.3, generator=g2)
    assert torch.equal(c, d)
    assert not torch.equal(regops.dropout(x, 0.3, generator=g1), c)  # the generator advanced


def test_eval_and_p_zero_return_the_input_like_torch():
    x = torch.randn(10)
    assert regops.dropout(x, 0.5, training=False) is x is F.dropout(x, 0.5, training=False)
    assert regops.dropout(x, 0.0) is x


def test_does_not_modify_input_unless_inplace():
    x = torch.randn(1000)
    before = x.clone()
    regops.dropout(x, 0.5)
    assert torch.equal(x, before)
    out = regops.dropout(x, 0.5, inplace=True)
    assert out is x
    assert torch.all((x == 0) | torch.isclose(x, before * 2))


def test_p_one_gives_zeros_with_zero_gradient():
    x = torch.randn(100, requires_grad=True)
    y = regops.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(0,), (2, 0), ()], ids=str)
def test_empty_and_scalar(shape):
    x = torch.randn(shape, requires_grad=True)
    y = regops.dropout(x, 0.5)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------ autograd
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_grad_times_same_mask(dtype):
    x = make_tensor((63, 17), dtype, requires_grad=True)
    g = make_tensor((63, 17), dtype, seed=9)
    p = 0.3
    seed = torch.tensor([42, 1000])
    y = _op(x, p, seed)
    (dx,) = torch.autograd.grad(y, x, g)
    mask = keep_mask(42, 1000, x.shape, p)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.where(mask, g.to(compute) * dropout_scale(p), 0.0).to(dtype)
    assert torch.equal(dx, expected)
    assert torch.equal(y != 0, mask & (x != 0))


def test_gradcheck_float64():
    x = make_tensor((7, 9), torch.float64, requires_grad=True)
    seed = torch.tensor([3, 4])
    assert torch.autograd.gradcheck(lambda t: _op(t, 0.4, seed), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _op(t, 0.4, seed), (x,))


def test_saves_only_the_seed_for_backward():
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    x = torch.randn(1 << 20, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = regops.dropout(x, 0.1)
    assert sum(sizes) <= 64, sizes
    y.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    x = make_tensor((5, 33), dtype, requires_grad=dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.regops.dropout, (x, _p(0.3), torch.tensor([1, 2])))
    torch.library.opcheck(torch.ops.regops.dropout, (make_tensor((0,), dtype), _p(0.3), torch.tensor([1, 2])))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def f(t):
        return regops.dropout(t * 2, 0.25) + 1

    compiled = torch.compile(f, fullgraph=True)
    x = make_tensor((64, 33), torch.float32, requires_grad=True)
    torch.manual_seed(23)
    y = compiled(x)
    y.sum().backward()
    kept = y != 1
    assert abs(kept.double().mean().item() - 0.75) < 5 * (0.1875 / kept.numel()) ** 0.5  # 5 sigma
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 2 * dropout_scale(0.25)))
    torch.testing.assert_close(y[kept], (x * 2 * dropout_scale(0.25) + 1)[kept])


# ------------------------------------------------------------------------------------------------ modules
def test_module_is_a_drop_in_for_torch_dropout():
    ours, theirs = regops.nn.Dropout(0.2, inplace=True), torch.nn.Dropout(0.2, inplace=True)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict()
    assert isinstance(ours, torch.nn.Dropout)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(8, 8)
    assert ours.eval()(x) is x
    y = regops.nn.Dropout(0.5).train()(torch.ones(1000))
    assert set(y.unique().tolist()) <= {0.0, 2.0}


class _Net(torch.nn.Sequential):
    def forward(self, x):
        x = self[1](self[0](x))
        x = self[2][0](x)
        x = self[3]["a"](self[3]["b"](x))
        return self[4](x)


def _model():
    shared = torch.nn.Dropout(0.3)
    return _Net(
        torch.nn.Linear(4, 8),
        shared,
        torch.nn.Sequential(torch.nn.Dropout(0.1, inplace=True), torch.nn.Dropout2d(0.2)),
        torch.nn.ModuleDict({"a": torch.nn.AlphaDropout(0.1), "b": shared}),
        torch.nn.Linear(8, 2),
    )


def test_patch_swaps_dropout_and_reverts():
    model = _model().eval()
    originals = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    handle = regops.patch(model)
    assert len(handle) == 4  # the shared module appears under two parents
    assert type(model[1]) is regops.nn.Dropout and model[1] is model[3]["b"]
    assert model[1].p == 0.3 and model[2][0].inplace and model[2][0].p == 0.1
    assert type(model[2][1]) is regops.nn.Dropout2d and model[2][1].p == 0.2
    assert type(model[3]["a"]) is torch.nn.AlphaDropout
    assert not model[1].training
    model.train()
    model(torch.randn(3, 4)).sum().backward()
    handle.revert()
    assert [m for m in model.modules() if type(m) is torch.nn.Dropout] == originals
    assert type(model[2][1]) is torch.nn.Dropout2d
    assert model[1].training
    assert not any(type(m) is regops.nn.Dropout for m in model.modules())


def test_patch_as_context_manager_and_idempotent():
    model = _model()
    with regops.patch(model) as handle:
        assert len(handle) == 4
        assert len(regops.patch(model)) == 0  # already ours
    assert type(model[1]) is torch.nn.Dropout


def test_patch_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        regops.patch("model")
    with pytest.raises(ValueError, match="from_module"):
        regops.patch(torch.nn.Dropout())


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_probability(p):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        regops.dropout(torch.randn(3), p)


@pytest.mark.parametrize("p", ["0.5", None, torch.tensor([0.1, 0.2])])
def test_bad_probability_type(p):
    with pytest.raises(TypeError, match="p must be a number"):
        regops.dropout(torch.randn(3), p)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_tensor(dtype):
    with pytest.raises(TypeError, match="floating dtype"):
        regops.dropout(torch.zeros(3, dtype=dtype), 0.5)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        regops.dropout([1.0, 2.0], 0.5)


def test_generator_on_wrong_device():
    with pytest.raises(ValueError, match="generator is on cpu"):
        regops.dropout(torch.randn(3, device="meta"), 0.5, generator=torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        regops.dropout(torch.randn(3), 0.5, generator=5)


@pytest.mark.cuda
def test_cpu_generator_with_cuda_tensor():
    with pytest.raises(ValueError, match="generator is on cpu"):
        regops.dropout(torch.randn(3, device="cuda"), 0.5, generator=torch.Generator())
    g = torch.Generator(device="cuda").manual_seed(1)
    a = regops.dropout(torch.ones(100, device="cuda"), 0.5, generator=g)
    g.manual_seed(1)
    assert torch.equal(a, regops.dropout(torch.ones(100, device="cuda"), 0.5, generator=g))


@pytest.mark.cuda
def test_cuda_manual_seed_reproduces_and_matches_reference():
    x = make_tensor((10_000,), torch.bfloat16, "cuda")
    torch.manual_seed(0)
    a = regops.dropout(x, 0.2)
    torch.manual_seed(0)
    with regops.use_backend("torch"):
        b = regops.dropout(x, 0.2)
    assert torch.equal(a, b)
