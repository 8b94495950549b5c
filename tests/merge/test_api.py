"""The merges' argument checks: one clear exception per mistake; inputs are never modified unless in place."""

from __future__ import annotations

import pytest
import torch

import regops


def test_errors():
    base, ds = torch.randn(10), [torch.randn(10), torch.randn(10)]
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        regops.merge.dare(base, ds, 0.0)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        regops.merge.ties(base, ds, 1.5)
    with pytest.raises(ValueError, match="weights must be a sequence of 2"):
        regops.merge.task_arithmetic(base, ds, [1.0])
    with pytest.raises(ValueError, match="has shape"):
        regops.merge.task_arithmetic(base, [torch.randn(9)])
    with pytest.raises(ValueError, match="non-empty sequence"):
        regops.merge.task_arithmetic(base, [])
    with pytest.raises(ValueError, match="majority_sign_method"):
        regops.merge.ties(base, ds, 0.5, majority_sign_method="max")
    with pytest.raises(ValueError, match="epsilon"):
        regops.merge.della(base, ds, 0.5, 0.6)
    with pytest.raises(ValueError, match="multiple of 4"):
        regops.merge.task_arithmetic(base, ds, chunk_size=6)
    with pytest.raises(ValueError, match="either inplace"):
        regops.merge.task_arithmetic({"a": base}, [{"a": d} for d in ds], inplace=True, out={})
    with pytest.raises(KeyError, match="no tensor named 'b'"):
        regops.merge.task_arithmetic({"a": base, "b": base}, [{"a": ds[0]}])
    with pytest.raises(TypeError, match="base must be a tensor or a state dict"):
        regops.merge.task_arithmetic([base], ds)
    with pytest.raises(TypeError, match="floating"):
        regops.merge.task_arithmetic(base, [torch.ones(10, dtype=torch.long)])


def test_inputs_untouched_unless_inplace():
    base, ds = torch.randn(10), [torch.randn(10), torch.randn(10)]
    b0, d0 = base.clone(), [d.clone() for d in ds]
    regops.merge.ties(base, ds, 0.5)
    regops.merge.dare(base, ds, 0.5, finetuned=True)
    assert torch.equal(base, b0) and all(torch.equal(a, b) for a, b in zip(ds, d0, strict=True))
    out = regops.merge.task_arithmetic(base, ds, inplace=True)
    assert out is base and torch.allclose(base, b0 + d0[0] + d0[1])
