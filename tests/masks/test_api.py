"""lora_dropout's argument checks: one clear exception per mistake."""

from __future__ import annotations

import pytest
import torch

import regops


def test_errors():
    x, A = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="A must have shape"):
        regops.lora_dropout(x, torch.randn(3, 7), 0.1)
    with pytest.raises(ValueError, match="A must have shape"):
        regops.lora_dropout(x, torch.randn(8), 0.1)
    with pytest.raises(TypeError, match="same dtype"):
        regops.lora_dropout(x, A.double(), 0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        regops.lora_dropout(x, A, 1.5)
    with pytest.raises(ValueError, match="at least one dimension"):
        regops.lora_dropout(torch.tensor(1.0), A, 0.1)
    with pytest.raises(TypeError, match="floating"):
        regops.lora_dropout(x.long(), A, 0.1)
    with pytest.raises(TypeError, match="generator"):
        regops.lora_dropout(x, A, 0.1, generator=3)


def test_inputs_are_not_modified():
    x, A = torch.randn(4, 8), torch.randn(3, 8)
    x0, A0 = x.clone(), A.clone()
    regops.lora_dropout(x, A, 0.5)
    assert torch.equal(x, x0) and torch.equal(A, A0)


def test_p_one_gives_zeros():
    x, A = torch.randn(4, 8), torch.randn(3, 8)
    assert torch.equal(regops.lora_dropout(x, A, 1.0), torch.zeros(4, 3))
