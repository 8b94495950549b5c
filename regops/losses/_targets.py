"""What the cross-entropy entry points share: their options checked into a :class:`LossOptions`, the targets (labels,
a mixed pair, sparse teacher targets; ignored rows, class and token weights) turned into the ops' sparse form, and
the reductions."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from regops._core import validate
from regops.losses._options import LossOptions
from regops.mix import MixedBatch

REDUCTIONS = ("mean", "sum", "none")


def number(value: Any, name: str, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not torch.compiler.is_compiling():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"regops: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value >= low and (high is None or value <= high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"regops: {name} must be {bound}, got {value}")
    return value


class Targets(NamedTuple):
    index: torch.Tensor  # int64 [N, J], in range
    tweight: torch.Tensor  # [N, J]
    row_weight: torch.Tensor  # [N]
    class_weight: torch.Tensor | None
    denominator: torch.Tensor | float  # scalar: what "mean" divides by


def check_range(index: torch.Tensor, ignored: torch.Tensor, n_classes: int, name: str) -> torch.Tensor:
    """Entries outside ``[0, V)`` that are not ignored: a ValueError on CPU; on other devices (no host sync)
    their rows get a NaN loss and NaN gradients, never a silent out-of-bounds read."""
    bad = ((index < 0) | (index >= n_classes)) & ~ignored
    if index.device.type == "cpu" and index.numel() and not torch.compiler.is_compiling() and bool(bad.any()):
        first = index[bad][0].item()
        raise ValueError(f"regops: {name} holds the class index {first}, outside [0, {n_classes}) and not ignore_index")
    return bad


def prepare(
    lead: torch.Size,
    n_classes: int,
    device: torch.device,
    acc: torch.dtype,
    target: Any,
    mix: MixedBatch | None,
    ignore_index: int,
    weight: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    decoupled: float,
) -> Targets:
    n = lead.numel()
    if mix is not None:
        if not isinstance(mix, MixedBatch):
            raise TypeError(f"regops: mix must be the MixedBatch returned by mix_batch, got {type(mix).__name__}")
        if target is not None:
            raise ValueError("regops: pass either target or mix (whose labels are the targets), not both")
        if mix.target_a.numel() != n:
            raise ValueError(f"regops: the logits have {n} rows but mix has {mix.target_a.numel()} samples")
        validate.same_device("logits", torch.empty(0, device=device), "mix.target_a", mix.target_a)
        index = torch.stack([mix.target_a.reshape(n), mix.target_b.reshape(n)], 1).long()
        lam = (mix.params.lam if acc == torch.float64 else mix.lam).to(acc).reshape(n)
        tweight = torch.stack([lam, 1.0 - lam], 1)
    elif isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError("regops: sparse targets are a pair (indices [..., k], probabilities [..., k])")
        index, probs = (validate.tensor(t, "target") for t in target)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.shape[:-1] != lead:
            raise ValueError(
                f"regops: sparse target indices must be integer [..., k] with leading shape {tuple(lead)}, got "
                f"{index.dtype} {tuple(index.shape)}"
            )
        probs = validate.floating(probs, "target probabilities")
        if probs.shape != index.shape or index.dim() == 0 or index.shape[-1] == 0:
            raise ValueError(
                f"regops: target probabilities {tuple(probs.shape)} must match indices {tuple(index.shape)}"
            )
        validate.same_device("logits", torch.empty(0, device=device), "target", index)
        index = index.reshape(n, -1).long()
        tweight = probs.reshape(n, -1).to(acc)
    else:
        if target is None:
            raise ValueError(
                "regops: target is required (class indices, or (indices, probabilities)) unless mix is given"
            )
        target = validate.tensor(target, "target")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(
                f"regops: target must hold integer class indices, got {target.dtype}; for dense soft targets use "
                "regops.soft_target_cross_entropy, for sparse ones target=(indices, probabilities)"
            )
        if target.shape != lead:
            raise ValueError(
                f"regops: target must have the logits' leading shape (their shape without the class dim) "
                f"{tuple(lead)}, got {tuple(target.shape)}"
            )
        if target.device != device:
            validate.same_device("logits", torch.empty(0, device=device), "target", target)
        index = target.reshape(n, 1).long()
        if device.type == "cpu" and not decoupled and not torch.compiler.is_compiling():
            labels = _labels_on_cpu(index, n_classes, acc, ignore_index, weight, token_weight, lead)
            if labels is not None:
                return labels
        tweight = torch.ones(n, 1, dtype=acc, device=device)
    if decoupled and index.shape[1] != 2:
        raise ValueError("regops: decoupled mixup needs mixed targets (mix=...)")
    return _finish(index, tweight, target, n_classes, acc, ignore_index, weight, token_weight, lead)


def label_targets(
    target: torch.Tensor, n_classes: int, acc: torch.dtype, ignore_index: int, class_weight: torch.Tensor | None
) -> Targets:
    """The targets of integer labels ``[N]`` (the ``label_cross_entropy`` ops), from device-side tensor ops: what
    :func:`prepare` gives for them (out-of-range labels raise on CPU, give NaN rows elsewhere)."""
    index = target.reshape(-1, 1).long()
    tweight = torch.ones(index.shape, dtype=acc, device=index.device)
    return _finish(index, tweight, target, n_classes, acc, ignore_index, class_weight, None, target.shape)


def row_grads(grad: torch.Tensor, reduction: str, denominator: torch.Tensor | float, n: int) -> torch.Tensor:
    """The upstream gradient of each of ``n`` rows from that of :func:`reduce_rows`'s result (autograd's numbers)."""
    if reduction == "none":
        return grad
    if reduction == "mean":
        if isinstance(denominator, float):
            grad = grad / (denominator or 1.0)
        else:
            grad = grad / torch.where(denominator == 0, 1.0, denominator)
    return grad.expand(n).contiguous()


def _labels_on_cpu(
    index: torch.Tensor,
    n_classes: int,
    acc: torch.dtype,
    ignore_index: int,
    weight: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    lead: torch.Size,
) -> Targets | None:
    """What :func:`_finish` gives for plain labels ``[n, 1]`` on the CPU, from a few small ops (a label's target
    weight and its row weight are both "kept"); ``None`` when a label is out of range (:func:`_finish` says which)."""
    if index.numel():
        low, high = torch.aminmax(index)
        low, high = int(low), int(high)
        if 0 <= low and high < n_classes and not low <= ignore_index <= high:
            # every label in range and none ignored: every row kept, "mean" divides by n
            tweight = torch.ones(index.shape, dtype=acc)
            if weight is None and token_weight is None:
                return Targets(index, tweight, tweight.view(-1), None, float(index.shape[0]))
            return _weighted(index, tweight, tweight.view(-1), None, n_classes, acc, weight, token_weight, lead)
    kept = index != ignore_index
    index = index * kept  # ignored rows point at class 0
    if index.numel():
        low, high = torch.aminmax(index)
        if int(low) < 0 or int(high) >= n_classes:
            return None
    tweight = kept.to(acc)
    if weight is None and token_weight is None:  # "mean" divides by the count of kept labels: a host number here
        return Targets(index, tweight, tweight.view(-1), None, float(kept.sum()))
    return _weighted(index, tweight, tweight.view(-1), None, n_classes, acc, weight, token_weight, lead)


def _finish(
    index: torch.Tensor,
    tweight: torch.Tensor,
    target: Any,
    n_classes: int,
    acc: torch.dtype,
    ignore_index: int,
    weight: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    lead: torch.Size,
) -> Targets:
    entry_ignored = index == ignore_index
    bad = check_range(index, entry_ignored, n_classes, "target")
    tweight = torch.where(entry_ignored, 0.0, tweight)
    index = torch.where(entry_ignored | bad, 0, index)
    # a label (or a mixed pair's first label) decides for its row; sparse targets: all their entries
    valid = ~entry_ignored.all(1) if isinstance(target, (tuple, list)) else ~entry_ignored[:, 0]
    return _weighted(index, tweight, valid.to(acc), bad, n_classes, acc, weight, token_weight, lead)


def _weighted(
    index: torch.Tensor,
    tweight: torch.Tensor,
    row_weight: torch.Tensor,
    bad: torch.Tensor | None,
    n_classes: int,
    acc: torch.dtype,
    weight: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    lead: torch.Size,
) -> Targets:
    """The targets with token and class weights applied (rows with a ``bad`` label NaN) and the mean's denominator."""
    device = index.device
    if token_weight is not None:
        token_weight = validate.floating(token_weight, "token_weight")
        if token_weight.shape != lead:
            raise ValueError(f"regops: token_weight must have shape {tuple(lead)}, got {tuple(token_weight.shape)}")
        validate.same_device("logits", torch.empty(0, device=device), "token_weight", token_weight)
        row_weight = row_weight * token_weight.reshape(index.shape[0]).to(acc)
    if bad is not None:
        row_weight = torch.where(bad.any(1), float("nan"), row_weight)
    class_weight = None
    if weight is not None:
        class_weight = validate.floating(weight, "weight")
        if class_weight.shape != (n_classes,):
            raise ValueError(f"regops: weight must be a [V={n_classes}] tensor, got {tuple(class_weight.shape)}")
        validate.same_device("logits", torch.empty(0, device=device), "weight", class_weight)
        class_weight = class_weight.to(acc)
        denominator = (row_weight * (tweight * class_weight[index]).sum(1)).sum()
    else:
        denominator = row_weight.sum()
    return Targets(index, tweight, row_weight, class_weight, denominator)


def no_grad_needed(**tensors: Any) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"regops: no gradient flows to {name}; pass {name}.detach()")
            if isinstance(t, (tuple, list)):
                no_grad_needed(**{f"{name}[{i}]": x for i, x in enumerate(t)})


def reduce_rows(
    rows: torch.Tensor, reduction: str, denominator: torch.Tensor | float, lead: torch.Size
) -> torch.Tensor:
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    # All rows ignored: 0 (and zero gradients), not torch's 0/0 = NaN.
    if isinstance(denominator, float):
        return total / (denominator or 1.0)
    return total / torch.where(denominator == 0, 1.0, denominator)


def loss_options(
    label_smoothing: Any,
    maxsup: Any,
    z_loss: Any,
    confidence_penalty: Any,
    decoupled: Any,
    softcap: Any,
    logit_scale: Any,
    reduction: str,
    mix: MixedBatch | None,
) -> LossOptions:
    """The user's options checked (clear errors) and gathered; ``label_smoothing=None`` takes ``mix``'s."""
    key = (label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction)
    # bools and tensors never share a key; under torch.compile the checks are traced, not looked up
    plain = mix is None and _PLAIN.issuperset(map(type, key)) and not torch.compiler.is_compiling()
    if plain:
        options = _OPTIONS.get(key)
        if options is not None:
            return options
    if label_smoothing is None:
        label_smoothing = mix.label_smoothing if mix is not None else 0.0
    options = LossOptions(
        smoothing=number(label_smoothing, "label_smoothing", 0.0, 1.0),
        maxsup=number(maxsup, "maxsup"),
        z_loss=number(z_loss, "z_loss"),
        confidence=number(confidence_penalty, "confidence_penalty"),
        decoupled=number(decoupled, "decoupled"),
        softcap=0.0 if softcap is None else number(softcap, "softcap"),
        scale=number(logit_scale, "logit_scale", float("-inf")),
    )
    if softcap is not None and options.softcap == 0.0:
        raise ValueError("regops: softcap must be > 0 (None disables it)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"regops: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if plain:
        if len(_OPTIONS) >= 1024:
            _OPTIONS.clear()
        _OPTIONS[key] = options
    return options


# Checked options by the arguments that gave them (plain Python numbers, None and the reduction's name), so that a
# training loop's calls skip the checks; LossOptions is frozen, one instance serves every call.
_PLAIN = frozenset({float, int, str, type(None)})
_OPTIONS: dict[tuple, LossOptions] = {}
