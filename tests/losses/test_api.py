"""regops.cross_entropy and linear_cross_entropy against float64 eager formulas written out in
tests/losses/helpers.py: every regularizer and its gradient, mixed and decoupled targets, sparse teacher targets,
statistics from the same pass, shapes and edges, low precision, memory, the modules, Hugging Face's loss
function, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regops
from regops.losses import _targets as targets
from regops.losses import reference as R
from tests.losses.helpers import F64, data, eager_rows, grad_of


def test_float64_bar_smoothing_zloss_confidence():
    x, y, _ = data()
    ours = regops.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, confidence_penalty=0.05)
    ref = eager_rows(x, y[:, None], torch.ones(6, 1, dtype=F64), a=0.1, l=1e-3, b=0.05).mean()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_of(ours, x), grad_of(ref, x), rtol=0, atol=1e-10)


def test_float64_bar_maxsup_and_its_gradient_formula():
    x, y, _ = data(seed=1)
    ours = regops.cross_entropy(x, y, maxsup=0.2, reduction="sum")
    ref = eager_rows(x, y[:, None], torch.ones(6, 1, dtype=F64), m=0.2).sum()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    g = grad_of(ours, x)
    k = x.shape[1]
    expected = torch.softmax(x, 1) - F.one_hot(y, k).double() + 0.2 * (F.one_hot(x.argmax(1), k).double() - 1.0 / k)
    torch.testing.assert_close(g, expected.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_float64_bar_mixed_and_decoupled(eta):
    x, y, g = data(n=8, seed=2)
    x_img = torch.randn(8, 3, 4, 4, dtype=F64, generator=g)
    _, mix = regops.mix_batch(x_img, y, mixup_alpha=1.0, mode="elem", generator=g)
    mix.target_b[0] = mix.target_a[0]  # a == b on one row
    lam = mix.params.lam
    index, t = torch.stack([mix.target_a, mix.target_b], 1), torch.stack([lam, 1 - lam], 1)
    ours = regops.cross_entropy(x, mix=mix, label_smoothing=0.1, decoupled=eta)
    ref = eager_rows(x, index, t, a=0.1, eta=eta).mean()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_of(ours, x), grad_of(ref, x), rtol=0, atol=1e-10)


def test_every_option_together_with_weights_softcap_scale_and_ignore():
    x, y, g = data(n=9, k=13, seed=3)
    y[4] = -100
    cw = torch.rand(13, dtype=F64, generator=g) + 0.5
    tw = torch.rand(9, dtype=F64, generator=g)
    kw = dict(label_smoothing=0.2, maxsup=0.1, z_loss=1e-2, confidence_penalty=0.3, softcap=5.0, logit_scale=0.7)
    ours = regops.cross_entropy(x, y, weight=cw, token_weight=tw, reduction="none", **kw)
    valid = (y != -100).double()
    ys = y.clamp(min=0)
    ref = eager_rows(x, ys[:, None], torch.ones(9, 1, dtype=F64), row_w=tw * valid, cw=cw, a=0.2, m=0.1, l=1e-2,
                     b=0.3, cap=5.0, s=0.7)  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    gy = torch.randn(9, dtype=F64, generator=g)
    torch.testing.assert_close(grad_of((ours * gy).sum(), x), grad_of((ref * gy).sum(), x), rtol=0, atol=1e-10)
    mean = regops.cross_entropy(x, y, weight=cw, token_weight=tw, **kw)
    torch.testing.assert_close(mean, ref.sum() / (tw * valid * cw[ys]).sum(), rtol=0, atol=1e-10)


def test_sparse_teacher_targets_equal_dense_soft_targets():
    x, _, g = data(n=5, k=17, seed=4)
    top = torch.randn(5, 17, generator=g).softmax(1).topk(4, dim=1)
    probs = top.values.double()
    dense = torch.zeros(5, 17, dtype=F64).scatter_(1, top.indices, probs)
    ours = regops.cross_entropy(x, (top.indices, probs), label_smoothing=0.1, z_loss=1e-3)
    ref = eager_rows(x, top.indices, probs, a=0.1, l=1e-3).mean()
    soft = torch.sum(-dense * torch.log_softmax(x, 1), 1)  # timm SoftTargetCrossEntropy's formula
    torch.testing.assert_close(regops.cross_entropy(x, (top.indices, probs), reduction="none"), soft)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_of(ours, x), grad_of(ref, x), rtol=0, atol=1e-10)


def test_statistics_from_the_same_pass():
    x, y, _ = data(n=7, k=9, seed=5)
    y[3] = -100
    loss, st = regops.cross_entropy(x, y, return_stats=True, reduction="none")
    z = x.detach()
    p = z.softmax(1)
    ok = y != -100
    ys = y.clamp(min=0)
    torch.testing.assert_close(st.loss, loss.detach())
    torch.testing.assert_close(st.lse, torch.logsumexp(z, 1))
    torch.testing.assert_close(st.entropy, -(p * p.log()).sum(1))
    el2n = (p - F.one_hot(ys, 9)).norm(dim=1)
    torch.testing.assert_close(st.el2n, torch.where(ok, el2n, 0.0))
    torch.testing.assert_close(st.max_prob, p.max(1).values)
    assert torch.equal(st.argmax, z.argmax(1))
    others = z.scatter(1, ys[:, None], float("-inf")).max(1).values
    torch.testing.assert_close(st.margin, torch.where(ok, z.gather(1, ys[:, None])[:, 0] - others, 0.0))
    assert not st.lse.requires_grad


def test_leading_shapes_k1_k2_and_all_ignored():
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    y = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(
        regops.cross_entropy(x, y, class_dim=-1), F.cross_entropy(x.reshape(-1, 5), y.reshape(-1))
    )
    assert regops.cross_entropy(x, y, reduction="none", class_dim=-1).shape == (2, 3)
    for k in (1, 2):
        xk = torch.randn(4, k, dtype=F64, requires_grad=True)
        yk = torch.randint(0, k, (4,))
        ours = regops.cross_entropy(xk, yk, label_smoothing=0.1, z_loss=1e-2, maxsup=0.1, confidence_penalty=0.1)
        ref = eager_rows(xk, yk[:, None], torch.ones(4, 1, dtype=F64), a=0.1, l=1e-2, m=0.1, b=0.1).mean()
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(grad_of(ours, xk), grad_of(ref, xk))
    ignored = torch.full((2, 3), -100)
    loss = regops.cross_entropy(x, ignored, label_smoothing=0.1, class_dim=-1)
    assert loss.item() == 0.0
    assert torch.equal(grad_of(loss, x), torch.zeros_like(x))


def test_gradcheck_reference_path():
    x, y, g = data(n=4, k=6, seed=9)
    cw = torch.rand(6, dtype=F64, generator=g) + 0.5

    def f(x):
        return regops.cross_entropy(x, y, weight=cw, label_smoothing=0.1, maxsup=0.1, z_loss=0.01,
                                    confidence_penalty=0.1, softcap=4.0, reduction="none")  # fmt: skip

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logits_use_float32_math(dtype):
    x, y, _ = data(n=16, k=50, seed=10, dtype=dtype)
    ours = regops.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3)
    assert ours.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    ref = eager_rows(x64, y[:, None], torch.ones(16, 1, dtype=F64), a=0.1, l=1e-3).mean()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    g = grad_of(ours, x)
    assert g.dtype == dtype
    g_ref = grad_of(ref, x64)
    # rounded once from float32: within half an ulp of the dtype (plus float32 noise)
    err = (g.double() - g_ref).abs()
    ulp = torch.finfo(dtype).eps * g_ref.abs() + torch.finfo(dtype).tiny
    assert bool((err <= ulp + 1e-7).all())


def test_huge_vocabulary_on_the_reference_path():
    k = (1 << 17) + 3
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, k, generator=g, dtype=F64, requires_grad=True)
    y = torch.tensor([0, k - 1, 12345])
    ours = regops.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, maxsup=0.1)
    ref = eager_rows(x, y[:, None], torch.ones(3, 1, dtype=F64), a=0.1, l=1e-3, m=0.1).mean()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_of(ours, x), grad_of(ref, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_linear_then_formula(monkeypatch, bias):
    monkeypatch.setattr(R, "_LINEAR_CHUNK", 3 * 23)  # 3 rows per block: several blocks
    g = torch.Generator().manual_seed(13)
    h = torch.randn(2, 5, 8, dtype=F64, generator=g, requires_grad=True)
    w = torch.randn(23, 8, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(23, dtype=F64, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, 23, (2, 5), generator=g)
    y[0, 1] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, maxsup=0.05, confidence_penalty=0.1, softcap=6.0)
    ours, st = regops.linear_cross_entropy(h, w, y, b, reduction="none", return_stats=True, **kw)
    logits = F.linear(h, w, b)
    ref, st_ref = regops.cross_entropy(logits, y, reduction="none", return_stats=True, class_dim=-1, **kw)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for a, c in zip(st, st_ref, strict=True):
        torch.testing.assert_close(a, c)
    gy = torch.randn(2, 5, dtype=F64, generator=g)  # a non-uniform upstream gradient: reduction="none" is exact
    params = [h, w] + ([b] if bias else [])
    got = torch.autograd.grad((ours * gy).sum(), params)
    want = torch.autograd.grad((ref * gy).sum(), params)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    for reduction in ("mean", "sum"):  # the one-sweep path (gradients formed in the forward), scaled upstream
        ours = regops.linear_cross_entropy(h, w, y, b, reduction=reduction, **kw)
        ref = regops.cross_entropy(F.linear(h, w, b), y, reduction=reduction, class_dim=-1, **kw)
        torch.testing.assert_close(ours, ref)
        got = torch.autograd.grad(ours * 1.7, params)
        want = torch.autograd.grad(ref * 1.7, params)
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


def test_linear_cross_entropy_never_holds_the_logits(monkeypatch):
    """Peak memory of forward + backward stays a few blocks, a small fraction of one [rows, V] logits tensor."""
    from benchmarks.harness import _cpu_peak

    monkeypatch.setattr(R, "_LINEAR_CHUNK", 1 << 18)  # 1 MiB blocks
    n, hdim, v = 512, 64, 8192  # logits: 16 MiB
    h = torch.randn(n, hdim, requires_grad=True)
    w = torch.randn(v, hdim, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def step():
        regops.linear_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=1e-4).backward()

    peak = _cpu_peak(step)
    grads = h.numel() * 4 + w.numel() * 4 * 2  # d hidden, d weight (+ its float32 accumulator)
    assert peak - grads <= 6 * R._LINEAR_CHUNK * 4, peak
    assert peak - grads < n * v * 4 / 2


def test_bad_input_raises_clear_errors():
    x = torch.randn(3, 5)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        regops.cross_entropy(x, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="outside"):
        regops.cross_entropy(x, torch.tensor([0, -3, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        regops.cross_entropy(x, torch.rand(3, 5))
    with pytest.raises(ValueError, match="leading shape"):
        regops.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_smoothing"):
        regops.cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        regops.cross_entropy(x, y, z_loss=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        regops.cross_entropy(x, y, reduction="batchmean")
    with pytest.raises(ValueError, match="decoupled"):
        regops.cross_entropy(x, y, decoupled=0.5)
    with pytest.raises(ValueError, match="weight"):
        regops.cross_entropy(x, y, weight=torch.ones(4))
    with pytest.raises(ValueError, match="token_weight"):
        regops.cross_entropy(x, y, token_weight=torch.ones(4))
    with pytest.raises(ValueError, match="no gradient"):
        regops.cross_entropy(x, y, token_weight=torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="softcap"):
        regops.cross_entropy(x, y, softcap=0.0)
    with pytest.raises(ValueError, match="V >= 1"):
        regops.cross_entropy(torch.randn(3, 0), y)
    with pytest.raises(TypeError, match="share a dtype"):
        regops.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, dtype=F64), y)
    with pytest.raises(ValueError, match="weight"):
        regops.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), y)
    x_in = x.clone()
    regops.cross_entropy(x, y, label_smoothing=0.1)
    assert torch.equal(x, x_in)  # never modified


def test_out_of_range_labels_give_nan_rows_without_a_host_sync_off_cpu(monkeypatch):
    monkeypatch.setattr(targets, "check_range", lambda index, ignored, n, name: (index < 0) | (index >= n) & ~ignored)
    x = torch.randn(3, 5)
    with regops.use_backend("torch"):  # the targets built by tensor ops, as off the CPU (the C++ kernel checks itself)
        loss = regops.cross_entropy(x, torch.tensor([0, 7, 1]), reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()


def test_modules_take_torch_arguments_and_layouts():
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 5, 3, generator=g, requires_grad=True)  # torch's [N, C, d1]
    y = torch.randint(0, 5, (2, 3), generator=g)
    w = torch.rand(5, generator=g)
    ours = regops.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(x, y)
    torch.testing.assert_close(ours, torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(x, y))
    soft = torch.rand(2, 5, 3, generator=g)
    torch.testing.assert_close(regops.nn.CrossEntropyLoss()(x, soft), F.cross_entropy(x, soft))
    with pytest.raises(ValueError, match="probability targets"):
        regops.nn.CrossEntropyLoss(z_loss=1e-3)(x, soft)
    crit = regops.nn.CrossEntropyLoss(z_loss=1e-3, maxsup=0.1, return_stats=True, reduction="none")
    loss, st = crit(x.detach(), y)
    assert loss.shape == st.el2n.shape == (2, 3)
    assert "z_loss=0.001" in repr(crit)
    h, wt = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    t = torch.randint(0, 5, (4,), generator=g)
    lin = regops.nn.LinearCrossEntropyLoss(label_smoothing=0.1)(h, wt, t)
    torch.testing.assert_close(lin, F.cross_entropy(h @ wt.T, t, label_smoothing=0.1))


def test_bf16_linear_cross_entropy_gradients_are_bounded_against_float64():
    """The numerics contract: dX and dW of the bf16 linear CE within 2x the error of eager bf16 linear + CE."""
    g = torch.Generator().manual_seed(17)
    h64 = torch.randn(64, 32, generator=g, dtype=F64)
    w64 = torch.randn(300, 32, generator=g, dtype=F64) / 4
    y = torch.randint(0, 300, (64,), generator=g)

    def grads(fn, dtype):
        h = h64.to(dtype).requires_grad_()
        w = w64.to(dtype).requires_grad_()
        return [t.double() for t in torch.autograd.grad(fn(h, w), (h, w))]

    def eager(h, w):
        return (
            F.cross_entropy(F.linear(h, w), y, label_smoothing=0.1)
            + 1e-3 * torch.logsumexp(F.linear(h, w), 1).square().mean()
        )

    def ours(h, w):
        return regops.linear_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=1e-3)

    exact = grads(eager, F64)
    ours_bf16, eager_bf16 = grads(ours, torch.bfloat16), grads(eager, torch.bfloat16)
    for got, base, ref in zip(ours_bf16, eager_bf16, exact, strict=True):
        err, err_eager = (got - ref).abs().max().item(), (base - ref).abs().max().item()
        assert err <= 2 * err_eager + 1e-3, (err, err_eager)


def test_cross_entropy_memory_is_a_few_blocks_beyond_the_gradient(monkeypatch):
    """The CPU bar's shape scaled down (blocks of 1 MiB instead of 16): forward + backward with smoothing and
    z-loss allocate the gradient plus at most a few blocks (the eager composition: several [rows, V] copies)."""
    from benchmarks.harness import _cpu_peak

    monkeypatch.setattr(R, "_CHUNK", 1 << 18)
    x = torch.randn(512, 8192, requires_grad=True)  # 16 MiB
    y = torch.randint(0, 8192, (512,))

    def step():
        regops.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-4).backward()
        x.grad = None

    peak = _cpu_peak(step)
    assert peak - x.numel() * 4 <= 3 * R._CHUNK * 4, peak


def test_hugging_face_causal_lm_loss_function():
    from tests.zoo import ZOO

    entry = ZOO["gpt2"]
    model = entry.build(torch.float64)
    ids, _ = entry.batch(3, torch.Generator().manual_seed(19))
    labels = ids.clone()
    labels[0, :2] = -100
    ref = model(ids, labels=labels).loss
    model.loss_function = regops.causal_lm_loss()
    ours = model(ids, labels=labels).loss  # float64 math (transformers upcasts to float32 only)
    torch.testing.assert_close(ours, ref.double(), rtol=1e-6, atol=1e-6)
    model.loss_function = regops.causal_lm_loss(z_loss=1e-3)
    logits = model(ids).logits
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    want = regops.cross_entropy(logits, shifted, z_loss=1e-3, reduction="sum", class_dim=-1) / 7
    got = model(ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        regops.causal_lm_loss(reduction="sum")


def test_sparse_targets_drop_ignored_entries_and_rows():
    x, _, _ = data(n=3, k=6, seed=20)
    idx = torch.tensor([[-100, 3], [-100, -100], [1, 2]])
    probs = torch.tensor([[0.5, 0.5], [0.3, 0.7], [0.6, 0.4]], dtype=F64)
    ours = regops.cross_entropy(x, (idx, probs), reduction="none")
    lp = torch.log_softmax(x, 1)
    want = torch.stack([-0.5 * lp[0, 3], lp.new_zeros(()), -(0.6 * lp[2, 1] + 0.4 * lp[2, 2])])
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(regops.cross_entropy(x, (idx, probs)), want.sum() / 2)  # two rows count
