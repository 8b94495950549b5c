"""The calls a new user makes with the README open give the exact answer or a clear error, never a plausible
wrong number: the class dim of cross-entropy, float64 weights in the mixed BCE, and the errors that must name the
argument and the fix. (The Hessian traps live in tests/test_semantics_traps_hessian.py, data valuation's in
tests/valuation/test_semantics.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops

F64 = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- class dim
@pytest.mark.ops("cross_entropy", "cross_entropy_backward")
def test_cross_entropy_reads_classes_in_dim_1_as_torch_does(kernel_target):
    """[N, C, L] logits with C == L: regops used to read them classes-last (a different loss than torch's)."""
    _, device = kernel_target
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, dtype=torch.float32, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 4, (2, 4), generator=g).to(device)
    for loss_fn in (regops.cross_entropy, regops.nn.CrossEntropyLoss()):
        ours = loss_fn(x, y)
        ref = F.cross_entropy(x, y)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
    # classes last needs saying so; without it a [B, T, V] call raises and says how to write it
    lm = torch.randn(2, 3, 5, generator=g).to(device)
    t = torch.randint(0, 5, (2, 3), generator=g).to(device)
    with pytest.raises(ValueError, match="class_dim=-1"):
        regops.cross_entropy(lm, t)
    with pytest.raises(ValueError, match="class_dim=-1"):
        regops.nn.CrossEntropyLoss()(lm, t)
    want = F.cross_entropy(lm.transpose(1, 2), t, label_smoothing=0.1)
    torch.testing.assert_close(regops.cross_entropy(lm, t, class_dim=-1, label_smoothing=0.1), want)
    torch.testing.assert_close(regops.nn.CrossEntropyLoss(label_smoothing=0.1, class_dim=-1)(lm, t), want)


def test_cross_entropy_segmentation_and_unbatched_shapes_match_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=F64, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 5), generator=g)
    y[0, 0, 0] = -100
    w = torch.rand(3, dtype=F64, generator=g) + 0.5
    for reduction in ("mean", "sum", "none"):
        ours = regops.cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction=reduction)
        ref = F.cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(ours, ref)
        gy = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(ours, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])
    _, stats = regops.cross_entropy(x, y, return_stats=True)
    assert stats.loss.shape == y.shape
    z = torch.randn(5, dtype=F64, generator=g)
    torch.testing.assert_close(regops.cross_entropy(z, torch.tensor(2)), F.cross_entropy(z, torch.tensor(2)))
    # an explicit class_dim anywhere
    torch.testing.assert_close(regops.cross_entropy(x.movedim(1, 3), y, class_dim=3), F.cross_entropy(x, y))


def test_symmetric_kl_of_3d_logits_needs_a_class_dim():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, 4, dtype=F64, generator=g), torch.randn(2, 4, 4, dtype=F64, generator=g)
    with pytest.raises(ValueError, match="needs class_dim"):
        regops.symmetric_kl(a, b)
    pa, pb = a.log_softmax(1), b.log_softmax(1)
    want = (0.5 * ((pa.exp() - pb.exp()) * (pa - pb)).sum(1)).mean()
    torch.testing.assert_close(regops.symmetric_kl(a, b, class_dim=1), want)
    torch.testing.assert_close(regops.symmetric_kl(a.transpose(1, 2), b.transpose(1, 2), class_dim=-1), want)


# ---------------------------------------------------------------------------------------------- float64 losses
@pytest.mark.ops("mix_binary_cross_entropy", "mix_binary_cross_entropy_backward")
def test_mix_binary_cross_entropy_keeps_float64_weights(kernel_target):
    """A Python-number pos_weight was made a float32 tensor first: 1.6e-9 off in float64."""
    _, device = kernel_target
    g = torch.Generator().manual_seed(0)
    b, c = 6, 5
    y = torch.randint(0, c, (b,), generator=g).to(device)
    images = torch.randn(b, 3, dtype=F64, generator=g).to(device)
    _, mix = regops.mix_batch(images, y, mixup_alpha=0.8, num_classes=c)
    z = torch.randn(b, c, dtype=F64, generator=g)
    lam = mix.params.lam.double().cpu()[:, None]
    ta, tb = F.one_hot(mix.target_a.cpu(), c).double(), F.one_hot(mix.target_b.cpu(), c).double()
    t = lam * ta + (1 - lam) * tb
    w = torch.rand(c, dtype=F64, generator=g) + 0.1
    for kw in (dict(pos_weight=1 / 3), dict(weight=w, pos_weight=1 / 7), dict(pos_weight=w)):
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        got = regops.mix_binary_cross_entropy(z.to(device), mix, label_smoothing=0.0, **on_device)
        pw = kw["pos_weight"]
        pw = torch.tensor(pw, dtype=F64) if isinstance(pw, float) else pw
        want = F.binary_cross_entropy_with_logits(z, t, kw.get("weight"), pos_weight=pw)
        assert got.dtype == F64
        torch.testing.assert_close(got.cpu(), want, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------- clear errors
def test_errors_name_the_argument_and_the_fix():
    model = _mlp()
    with pytest.raises(ValueError, match="the batch is empty"):
        with regops.per_sample_grad_norms(model, loss_reduction="mean"):
            F.cross_entropy(model(torch.randn(0, 5, dtype=F64)), torch.zeros(0, dtype=torch.long)).backward()
    x, y = _data(4, 6)
    with pytest.raises(TypeError, match="targets are missing"):
        regops.hessian.trace(model, nn.CrossEntropyLoss(), x, num_probes=2)
    for affine in (True, False):
        bn = nn.Sequential(nn.Linear(5, 8), nn.Sequential(nn.BatchNorm1d(8, affine=affine)), nn.Linear(8, 3))
        bn = bn.double()
        with pytest.raises(ValueError, match=r"BatchNorm1d '1\.0'.*model\.eval\(\).*fix_model"):
            with regops.per_sample_grad_norms(bn, loss_reduction="mean"):
                F.cross_entropy(bn(x), y).backward()
        with pytest.raises(ValueError, match=r"BatchNorm1d '1\.0'"):
            regops.per_sample_grad_dots(bn, F.cross_entropy, (x, y), (x, y), loss_reduction="mean")
    w, frozen = torch.randn(3, requires_grad=True), torch.randn(3)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(3,\)\) does not require grad"):
        regops.hessian.trace_penalty(((w * frozen) ** 4).sum(), [w, frozen])
    with pytest.raises(ValueError, match=r"params\['f'\]"):
        regops.hessian.trace_penalty(((w * frozen) ** 4).sum(), {"w": w, "f": frozen})
    with pytest.raises(TypeError, match="weight is torch.float64 but the logits are torch.float32"):
        regops.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), weight=torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="class_weight is torch.float32"):
        h, head = torch.randn(4, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
        regops.linear_cross_entropy(h, head, torch.tensor([0, 1, 2, 0]), class_weight=torch.ones(3))
    # float32 class weights with bfloat16 logits: autocast's pairing, accepted
    regops.cross_entropy(torch.randn(4, 3).bfloat16(), torch.tensor([0, 1, 2, 0]), weight=torch.ones(3))


_X = torch.randn(2, 3, 4, 4)
_TRAINING_CALLS = {
    "dropout": lambda t: regops.dropout(_X, 0.5, training=t),
    "dropout1d": lambda t: regops.dropout1d(_X[0], 0.5, training=t),
    "dropout2d": lambda t: regops.dropout2d(_X, 0.5, training=t),
    "dropout3d": lambda t: regops.dropout3d(_X[None], 0.5, training=t),
    "shared_dropout": lambda t: regops.shared_dropout(_X, 0.5, training=t),
    "drop_path": lambda t: regops.drop_path(_X, 0.5, training=t),
    "drop_path_add": lambda t: regops.drop_path_add(_X, _X, 0.5, training=t),
    "nested_dropout": lambda t: regops.nested_dropout(_X, 0.5, training=t),
    "multi_sample_dropout": lambda t: regops.multi_sample_dropout(_X, 0.5, 2, training=t),
    "bias_dropout_add": lambda t: regops.bias_dropout_add(_X, torch.zeros(4), _X, 0.5, training=t),
    "dropout_add_layer_norm": lambda t: regops.dropout_add_layer_norm(
        _X, _X, torch.ones(4), torch.zeros(4), 0.5, training=t
    ),
}


@pytest.mark.parametrize("name", sorted(_TRAINING_CALLS))
def test_training_must_be_a_bool_as_torch_requires(name):
    with pytest.raises(TypeError, match=r"dropout\(\): argument 'train'"):
        F.dropout(_X, 0.5, training="yes")  # what torch does
    for bad in ("yes", 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="training must be a bool"):
            _TRAINING_CALLS[name](bad)
    _TRAINING_CALLS[name](False)
