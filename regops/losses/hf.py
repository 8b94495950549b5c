"""Hugging Face causal LMs: regops' cross-entropy as the model's loss, with no global patching.

Transformers models compute their loss through ``model.loss_function`` (default: ``ForCausalLMLoss``: shift the
labels, ``F.cross_entropy`` on upcast float32 logits, ``"sum" / num_items_in_batch`` under gradient accumulation).
:func:`causal_lm_loss` returns a function with that signature which calls :func:`regops.cross_entropy` instead:
no float32 copy of the logits, the regularizers and statistics available, same reduction rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from regops.losses.regularized import cross_entropy

__all__ = ["causal_lm_loss"]


def causal_lm_loss(**options: Any) -> Callable[..., torch.Tensor]:
    """A drop-in for transformers' ``ForCausalLMLoss`` backed by :func:`regops.cross_entropy` with ``options``.

    Example::

        >>> model.loss_function = regops.causal_lm_loss(label_smoothing=0.1, z_loss=1e-4)
        >>> model(input_ids, labels=input_ids).loss.backward()
    """
    for key in ("reduction", "ignore_index", "return_stats", "mix", "target"):
        if key in options:
            raise ValueError(f"regops: causal_lm_loss sets {key} itself (as transformers' loss does)")

    def loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if shift_labels is None:  # tokens < n predict n
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        rows = logits.reshape(-1, vocab_size)
        target = shift_labels.reshape(-1).to(rows.device)
        if num_items_in_batch is None:
            return cross_entropy(rows, target, ignore_index=ignore_index, **options)
        total = cross_entropy(rows, target, ignore_index=ignore_index, reduction="sum", **options)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    return loss
