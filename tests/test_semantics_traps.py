"""The calls a new user makes with the README open give the exact answer or a clear error, never a plausible
wrong number: the errors that must name the argument and the fix. (Each family's traps live in its
tests/<family>/test_semantics*.py: the Hessian's, the losses' class dim and float64 weights, data valuation's
loss reduction and dataset order.)"""

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
