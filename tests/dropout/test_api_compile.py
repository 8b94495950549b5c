"""torch.compile(fullgraph=True) with p changing between calls: p is a runtime value, graphs are counted.

A Python float p costs at most one recompile (dynamo's automatic-dynamic pass turns it into a graph input); a
0-dim tensor p and a regops.nn module whose p follows a schedule never recompile. p = 0 then p = 1 through the
same graph proves p is read at run time, not baked in.
"""

from __future__ import annotations

import pytest
import torch

import regops
from regops.testing import make_tensor


class GraphCounter:
    """Compiles with AOTAutograd (eager kernels) and counts the graphs dynamo produced since construction."""

    def __init__(self) -> None:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()

    def compile(self, fn):
        return torch.compile(fn, backend="aot_eager", fullgraph=True)

    @property
    def graphs(self) -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]


X = make_tensor((6, 8), seed=1)
B, R, W = make_tensor((8,), seed=2), make_tensor((6, 8), seed=3), make_tensor((8,), seed=4)

FUNCTIONS = {
    "dropout": lambda x, p: regops.dropout(x, p),
    "dropout_bitmask": lambda x, p: regops.dropout(x, p, mask_mode="bitmask"),
    "bias_dropout_add": lambda x, p: regops.bias_dropout_add(x, B * 0, R * 0, p),
    "dropout_add_layer_norm": lambda x, p: regops.dropout_add_layer_norm(x, None, None, None, p, prenorm=True)[1],
    "drop_path": lambda x, p: regops.drop_path(x, p, training=True),
    "drop_path_add": lambda x, p: regops.drop_path_add(x, R, p, training=True) - R,
    "dropout2d": lambda x, p: regops.dropout2d(x.reshape(2, 3, 4, 2), p).reshape(6, 8),
    "shared_dropout": lambda x, p: regops.shared_dropout(x, p, dims=-1),
    "multi_sample_dropout": lambda x, p: regops.multi_sample_dropout(x, p, 3),
}


def _check_runtime_p(out0: torch.Tensor, out1: torch.Tensor, x: torch.Tensor) -> None:
    torch.testing.assert_close(out0, x, atol=1e-6, rtol=1e-6)  # p = 0 keeps everything
    assert torch.equal(out1.abs(), torch.zeros_like(out1))  # p = 1 drops everything


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_functional_p_changes_recompile_at_most_once(name):
    counter = GraphCounter()
    f = counter.compile(FUNCTIONS[name])
    x = X.clone().requires_grad_()
    for p in (0.1, 0.2, 0.3):
        f(x, p).sum().backward()
    out0, out1 = f(x, 0.0), f(x, 1.0)
    assert counter.graphs <= 2, f"{name}: {counter.graphs} graphs for 5 values of p"
    _check_runtime_p(out0.detach(), out1.detach(), X)


def test_tensor_p_never_recompiles_and_numpy_p_compiles():
    np = pytest.importorskip("numpy")
    counter = GraphCounter()
    f = counter.compile(lambda x, p: regops.dropout(x, p))
    outs = [f(X, torch.tensor(p)) for p in (0.1, 0.0, 1.0, 0.4)]
    assert counter.graphs == 1
    _check_runtime_p(outs[1], outs[2], X)
    assert f(X, np.float32(0.0)).equal(X)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):  # checked when the op runs
        f(X, torch.tensor(1.5))


MODULES = {
    "Dropout": lambda: regops.nn.Dropout(0.1),
    "Dropout2d": lambda: torch.nn.Sequential(torch.nn.Unflatten(1, (2, 2, 2)), regops.nn.Dropout2d(0.1)),
    "DropPath": lambda: regops.nn.DropPath(0.1),
    "DropoutAddLayerNorm": lambda: regops.nn.DropoutAddLayerNorm(8, p=0.1),
    "MultiSampleDropout": lambda: regops.nn.MultiSampleDropout(torch.nn.Linear(8, 3), num_samples=2, p=0.1),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_p_schedule_never_recompiles(name):
    model, counter = MODULES[name](), GraphCounter()
    target = model[1] if isinstance(model, torch.nn.Sequential) else model
    attr = "drop_prob" if name == "DropPath" else "p"
    f = counter.compile(model)
    x = X.clone().requires_grad_()
    for step, p in enumerate((0.1, 0.3, 0.0, 1.0, 0.5)):  # an early/late dropout schedule over 5 steps
        setattr(target, attr, p)
        torch.manual_seed(step)
        out = f(x).reshape(6, -1)
        out.float().sum().backward()
        # every step's value is the eager module's at that p with the same seed: p is read at run time
        torch.manual_seed(step)
        with torch.no_grad():
            expected = model(X).reshape(6, -1)
        torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=1e-6, msg=f"{name} p={p}")
    assert counter.graphs == 1, f"{name}: {counter.graphs} graphs over a 5-step p schedule"
