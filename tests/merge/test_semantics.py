"""The merges against their definitions and against PEFT's merge_utils: DARE(density=1) is task arithmetic, DARE
is reproducible and keeps the expected fraction, TIES is trim / elect sign / disjoint mean, results do not depend on
the chunking; state dicts are merged tensor by tensor with constant extra memory."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import pytest
import torch

import regops
from regops.testing import make_tensor

merge_utils = pytest.importorskip("peft.utils.merge_utils")
W = [0.5, 1.0, 0.7]


def _data(shape=(50, 37), K=3, dtype=torch.float64):
    base = make_tensor(shape, dtype, seed=100)
    return base, [make_tensor(shape, dtype, seed=k) for k in range(K)]


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def test_task_arithmetic_and_dare_density_one():
    base, ds = _data()
    ta = regops.merge.task_arithmetic(base, ds, W)
    expected = base + sum(w * d for w, d in zip(W, ds, strict=True))
    torch.testing.assert_close(ta, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(ta, base + merge_utils.task_arithmetic(ds, torch.tensor(W, dtype=torch.float64)),
                               rtol=1e-15, atol=1e-15)  # fmt: skip
    assert torch.equal(regops.merge.dare(base, ds, 1.0, W, generator=_gen()), ta)
    assert torch.equal(regops.merge.task_arithmetic(base, torch.stack(ds), W), ta)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_is_trim_elect_disjoint_mean(method):
    base, ds = _data()
    density = 0.3
    merged = regops.merge.ties(base, ds, density, W, majority_sign_method=method)
    # the definition, written out
    trimmed = []
    for d in ds:
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().reshape(-1).topk(k).indices] = True
        trimmed.append(d * keep.reshape(d.shape))
    t = torch.stack(trimmed)
    votes = t.sum(0) if method == "total" else t.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agree = t.sign() == elected
    w = torch.tensor(W, dtype=torch.float64)[:, None, None]
    expected = base + (t * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(merged, expected, rtol=1e-14, atol=1e-14)
    peft = merge_utils.ties(ds, torch.tensor(W, dtype=torch.float64), density, method)
    torch.testing.assert_close(merged, base + peft, rtol=1e-14, atol=1e-14)


def test_magnitude_prune_matches_peft_and_keeps_exactly_k_with_ties():
    base, ds = _data()
    merged = regops.merge.magnitude_prune(base, ds, 0.2, W)
    peft = merge_utils.magnitude_prune(ds, torch.tensor(W, dtype=torch.float64), 0.2)
    torch.testing.assert_close(merged, base + peft, rtol=1e-14, atol=1e-14)
    # many equal magnitudes (a coarse grid): still exactly int(density * n) kept, ties in index order
    d = (make_tensor((4097,), torch.float32) * 4).round() / 4
    zero = torch.zeros_like(d)
    kept = regops.merge.magnitude_prune(zero, [d], 0.37, chunk_size=64)
    assert int((kept != 0).sum()) == min(int(0.37 * d.numel()), int((d != 0).sum()))
    threshold = kept.abs()[kept != 0].min()
    assert bool((d.abs()[kept == 0] <= threshold).all())


def test_dare_reproducible_chunking_independent_and_fraction():
    base, ds = _data()
    a = regops.merge.dare(base, ds, 0.3, W, generator=_gen(), chunk_size=64)
    b = regops.merge.dare(base, ds, 0.3, W, generator=_gen(), chunk_size=4)
    c = regops.merge.dare(base, ds, 0.3, W, generator=_gen())
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, regops.merge.dare(base, ds, 0.3, W, generator=_gen(4)))
    torch.manual_seed(9)
    d1 = regops.merge.dare(base, ds, 0.3, W)
    torch.manual_seed(9)
    assert torch.equal(d1, regops.merge.dare(base, ds, 0.3, W))
    n = 1 << 18
    ones = torch.ones(n, dtype=torch.float64)
    for density in (0.1, 0.5, 0.9):
        out = regops.merge.dare(torch.zeros(n, dtype=torch.float64), [ones], density, generator=_gen(1))
        kept = (out != 0).double().mean().item()
        assert abs(kept - density) < 6 * math.sqrt(density * (1 - density) / n)
        assert torch.all((out == 0) | (out == 1 / density))  # rescaled survivors: unbiased
        # PEFT's random pruning keeps the same fraction with the same scale (statistically)
        peft = merge_utils.dare_linear([ones], torch.ones(1, dtype=torch.float64), density)
        assert abs((peft != 0).double().mean().item() - kept) < 12 * math.sqrt(density * (1 - density) / n)


def test_dare_ties_is_dare_masks_then_peft_disjoint_merge():
    base, ds = _data()
    merged = regops.merge.dare_ties(base, ds, 0.4, W, generator=_gen())
    zeros = torch.zeros_like(base)
    pruned = []
    for k in range(len(ds)):  # delta k's mask is keyed by (seed, name, k): recover it alone
        only = [d if j == k else zeros for j, d in enumerate(ds)]
        pruned.append(regops.merge.dare(zeros, only, 0.4, [float(j == k) for j in range(len(ds))], generator=_gen()))
    t = torch.stack(pruned)
    mask = merge_utils.calculate_majority_sign_mask(t, "total")
    expected = base + merge_utils.disjoint_merge(t * torch.tensor(W, dtype=torch.float64)[:, None, None], mask)
    torch.testing.assert_close(merged, expected, rtol=1e-14, atol=1e-14)


def test_della_keeps_large_magnitudes_more_often_and_is_chunk_independent():
    base, ds = _data((64, 400), K=2)
    a = regops.merge.della(base, ds, 0.5, 0.3, generator=_gen(), chunk_size=404)
    b = regops.merge.della(base, ds, 0.5, 0.3, generator=_gen())
    assert torch.equal(a, b)
    zero = torch.zeros(200, 1000, dtype=torch.float64)
    d = make_tensor((200, 1000), torch.float64, seed=7)
    out = regops.merge.della(zero, [d], 0.5, 0.3, majority_sign_method=None, generator=_gen())
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.5) < 0.01
    order = d.abs().argsort(dim=1)
    low, high = kept.gather(1, order[:, :100]), kept.gather(1, order[:, -100:])
    assert abs(low.double().mean().item() - 0.23) < 0.02 and abs(high.double().mean().item() - 0.77) < 0.02
    ratio = (out[kept] / d[kept]).reciprocal()  # survivors scaled by 1/q, q in [0.2, 0.8]
    assert ratio.min() >= 0.2 - 1e-12 and ratio.max() <= 0.8 + 1e-12


def test_finetuned_weights_equal_deltas():
    base, ds = _data()
    ft = [base + d for d in ds]
    for fn, kw in ((regops.merge.ties, {}), (regops.merge.dare, {"generator": None})):
        a = fn(base, ft, 0.3, W, finetuned=True, **kw) if not kw else fn(base, ft, 0.3, W, finetuned=True,
                                                                            generator=_gen())  # fmt: skip
        b = fn(base, ds, 0.3, W) if not kw else fn(base, ds, 0.3, W, generator=_gen())
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_low_precision_rounds_once():
    base, ds = _data(dtype=torch.bfloat16)
    merged = regops.merge.task_arithmetic(base, ds, W)
    exact = base.double() + sum(w * d.double() for w, d in zip(W, ds, strict=True))
    assert merged.dtype == torch.bfloat16
    assert (merged.double() - exact).abs().max() <= exact.abs().max() * 2**-8


# ------------------------------------------------------------------------------------------------ state dicts
class LazyDict(Mapping):
    """A mapping that builds its tensors on access (as a safetensors file would load them) and counts them."""

    def __init__(self, shapes, seed):
        self.shapes, self.seed, self.loads = shapes, seed, 0

    def __getitem__(self, name):
        self.loads += 1
        return make_tensor(self.shapes[name], torch.float32, seed=self.seed + len(name))

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def test_state_dicts_lazy_out_inplace_and_buffers():
    shapes = {"a.weight": (30, 20), "b.bias": (7,), "c": (3, 4, 5)}
    base = {name: make_tensor(s, torch.float32, seed=i) for i, (name, s) in enumerate(shapes.items())}
    base["steps"] = torch.tensor(7)
    lazy = [LazyDict({**shapes, "steps": ()}, seed) for seed in (10, 20)]
    out = {}
    result = regops.merge.ties(base, lazy, 0.5, out=out)
    assert result is out and sorted(out) == sorted(base) and out["steps"] == 7
    assert all(d.loads == len(shapes) for d in lazy)
    for name in shapes:  # tensor by tensor equals the tensor API
        torch.testing.assert_close(out[name], regops.merge.ties(base[name], [d[name] for d in lazy], 0.5))
    inplace = {k: v.clone() for k, v in base.items()}
    assert regops.merge.dare(inplace, lazy, 0.5, generator=_gen(), inplace=True) is inplace
    fresh = regops.merge.dare(base, lazy, 0.5, generator=_gen())
    for name in shapes:
        assert torch.equal(inplace[name], fresh[name])
        assert not torch.equal(base[name], fresh[name])  # the base of an out-of-place merge is untouched


def test_masks_keyed_by_name_not_position():
    x = make_tensor((100,), torch.float64)
    d = make_tensor((100,), torch.float64, seed=1)
    one = regops.merge.dare({"w": x}, [{"w": d}], 0.5, generator=_gen())["w"]
    two = regops.merge.dare({"v": x, "w": x}, [{"v": d, "w": d}], 0.5, generator=_gen())
    assert torch.equal(two["w"], one) and not torch.equal(two["v"], one)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_merging_four_deltas_needs_constant_extra_memory(method):
    """4 deltas of a 256 MB float32 state dict (4 tensors of 64 MB), merged in place: the peak RSS grows by at most
    1.5x one tensor. (1 GB state dicts: see benchmarks/merge.py; 256 MB keeps this test quick on 2 cores.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure the peak RSS")
    numel = 16 << 20
    names = [f"layer{i}.weight" for i in range(4)]
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.empty(numel).uniform_(-1, 1, generator=gen) for n in names}
    deltas = [{n: torch.empty(numel).uniform_(-1, 1, generator=gen) for n in names} for _ in range(4)]
    tensor_bytes = numel * 4
    merge = regops.merge.dare if method == "dare" else regops.merge.ties
    merge({"w": torch.ones(8)}, [{"w": torch.ones(8)}], 0.5)  # loads the extension and its thread pool first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes()
    if method == "dare":
        regops.merge.dare(base, deltas, 0.3, generator=_gen(), inplace=True)
    else:
        regops.merge.ties(base, deltas, 0.3, inplace=True)
    extra = _peak_rss_bytes() - before
    print(f"{method}: peak RSS +{extra / 2**20:.1f} MiB merging 4 deltas of 4 x {tensor_bytes / 2**20:.0f} MiB tensors")
    assert extra <= 1.5 * tensor_bytes, f"{extra / 2**20:.1f} MiB extra for {tensor_bytes / 2**20:.0f} MiB tensors"
