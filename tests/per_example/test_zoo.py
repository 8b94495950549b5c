"""Per-example gradient norms and DP clipping on the zoo of real architectures (tests/zoo.py), against the
brute-force per-example loop: float64 exact, one and two micro-batches, fp32 and bf16 autocast; the architectures
whose examples move through reshapes, windows, recurrences and parameters used outside their modules, on the fast
path (no torch.func)."""

from __future__ import annotations

import warnings

import pytest
import torch

import regops
from tests.zoo import T5_SEQ, ZOO, per_example_loop_grads

KNOWN = ["gpt2", "bert", "llama", "vit", "resnet18", "encoder", "encoder_seq_first", "tied_lm", "reused_mlp"]
NAMES = [n for n in KNOWN if n in ZOO]


def _build(name: str, dtype: torch.dtype):
    entry = ZOO[name]
    model = entry.build(dtype)
    if entry.has_batchnorm:
        model, changes = regops.fix_model(model)
        assert changes and all("GroupNorm" in c.after for c in changes)
    return entry, model


def _norms_and_clipped(grads, bound=None):
    """Total norms of per-example gradients and their clipped sum (bound: 0.8 x the median norm by default)."""
    norms = torch.stack([torch.stack([g.double().square().sum() for g in d.values()]).sum().sqrt() for d in grads])
    bound = 0.8 * norms.median().item() if bound is None else bound
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    clipped = {k: sum(f * d[k].double() for f, d in zip(factors, grads, strict=True)) for k in grads[0]}
    return norms, bound, clipped


def _oracle(entry, model64, inputs, target):
    """Per-example gradients by the loop: their norms, and the clipped sum for a bound at 0.8 x the median."""
    grads = per_example_loop_grads(entry, model64, inputs, target)
    norms, bound, clipped = _norms_and_clipped(grads)
    per_param = {k: torch.stack([d[k].norm() for d in grads]) for k in grads[0]}
    return norms, per_param, bound, clipped


def _split(x):
    n = x.shape[0] // 2
    return x[:n], x[n:]


def _run_two(entry, model, inputs, target, reduction, autocast=None, backward_inside=False):
    """Two micro-batches (forward + backward each) in one dp_clipping block."""
    for xi, yi in zip(_split(inputs), _split(target), strict=True):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            out = entry.forward(model, xi)
            if backward_inside:
                entry.loss(out, yi, reduction).backward()
        if not backward_inside:
            entry.loss(out, yi, reduction).backward()


def _rel(got: dict, exp: dict) -> float:
    num = sum((got[k].double() - exp[k]).square().sum() for k in exp)
    den = sum(exp[k].square().sum() for k in exp)
    return float((num / den).sqrt())


# ResNet-18 (11M parameters, the slowest by far on the CI's two cores) is checked in float64 only: its layers
# (Conv, GroupNorm, Linear) are rules the low-precision runs of test_grad_norms.py cover.
LOW_PRECISION = [n for n in NAMES if n != "resnet18"]


@pytest.mark.parametrize("name", NAMES)
def test_zoo_matches_the_per_example_loop(name):
    """One oracle (the float64 loop), four runs: the norms block with one micro-batch (float64, exact) and
    dp_clipping with two micro-batches in float64 (exact), fp32 and bf16 autocast."""
    entry, model = _build(name, torch.float64)
    b = 2 if name == "resnet18" else 4  # ResNet-18: keep the loop short
    inputs, target = entry.batch(b, dtype=torch.float64)
    norms_exp, per_param_exp, bound, clipped = _oracle(entry, model, inputs, target)

    # one micro-batch: the plain norms block (no unsupported="vmap"), then Book-Keeping clipping
    model.zero_grad(set_to_none=True)
    with regops.per_sample_grad_norms(model, "sum", retain_signals=True) as norms:
        entry.loss(entry.forward(model, inputs), target).backward()
    for k, v in per_param_exp.items():  # some are 0 up to rounding (a key bias under softmax): absolute floor
        torch.testing.assert_close(norms.per_param[k], v, rtol=1e-6, atol=1e-12, msg=k)
    torch.testing.assert_close(norms.total, norms_exp, rtol=1e-6, atol=0)
    if name in LOW_PRECISION:  # (ResNet-18: its clipping is checked with two micro-batches below)
        regops.clip_per_sample_(norms, max_norm=bound)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, clipped[k], rtol=1e-6, atol=1e-12, msg=k)

    # two micro-batches in one dp_clipping block, mean loss: the clipped sum over all b examples, / b
    model.zero_grad(set_to_none=True)
    with regops.dp_clipping(model, max_norm=bound, loss_reduction="mean") as clip:
        _run_two(entry, model, inputs, target, "mean")
    assert clip.micro_batch_sizes == [b // 2, b // 2]
    torch.testing.assert_close(clip.total, norms_exp, rtol=1e-6, atol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clipped[k] / b, rtol=1e-6, atol=1e-12, msg=k)
    if name not in LOW_PRECISION:
        return

    # fp32, and bf16 autocast with the backward outside it (PyTorch's recommended pattern; the tied LM runs its
    # backward inside the autocast region too): same weights rounded to fp32, against the float64 loop. The error
    # allowed is derived, not guessed: at most twice that of torch's own per-example loop in the same precision (the
    # same autocast) plus one rounding of that precision.
    model = model.float()
    inputs = inputs.float() if inputs.is_floating_point() else inputs
    for mode in ("fp32", "bf16"):
        low = torch.bfloat16 if mode == "bf16" else torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            norms_ref, _, clipped_ref = _norms_and_clipped(per_example_loop_grads(entry, model, inputs, target), bound)
        err_ref = ((norms_ref - norms_exp).abs() / norms_exp).max().item()
        floor = torch.finfo(low).eps / 2
        model.zero_grad(set_to_none=True)
        inside = mode == "bf16" and name == "tied_lm"
        with regops.dp_clipping(model, max_norm=bound, loss_reduction="sum") as clip:
            _run_two(entry, model, inputs, target, "sum", autocast=mode == "bf16", backward_inside=inside)
        got = {k: p.grad for k, p in model.named_parameters()}
        assert clip.total.dtype == torch.float32 and clip.total.shape == (b,)
        err = ((clip.total.double() - norms_exp).abs() / norms_exp).max().item()
        assert err <= 2 * err_ref + floor, (mode, err, err_ref)
        assert _rel(got, clipped) <= 2 * _rel(clipped_ref, clipped) + floor, (mode, _rel(got, clipped))


# Examples flattened to [B * T, d] rows (OPT), a relative-position bias looked up from bucket ids whose leading dim
# has the batch size (T5 with T == B), rotary embeddings (GPT-NeoX), sliding windows and q/k/v biases (Mistral,
# Qwen2), distillation tokens (DeiT), window partitions and a masked relative-position bias (Swin), a layer scale
# through a reshape (ConvNeXt), squeeze-excite with GroupNorm after fix_model (MobileNetV3), recurrent layers in both
# layouts, bidirectional and packed, and cross-attention: all on the fast path, exact.
MORE = [
    "opt", "t5", "gpt_neox", "mistral", "qwen2", "deit", "swin", "convnext", "mobilenetv3", "lstm", "lstm_seq_first",
    "gru", "gru_seq_first", "lstm_bidirectional_packed", "gru_packed_seq_first", "rnn_bidirectional",
    "cross_attention",
]  # fmt: skip


def _no_torch_func(caught) -> None:
    slow = [str(w.message) for w in caught if str(w.message).startswith("regops: per-example gradients of")]
    assert slow == [], slow


@pytest.mark.parametrize("name", [n for n in MORE if n in ZOO])
def test_more_architectures_match_the_per_example_loop_on_the_fast_path(name):
    """float64 per-example norms of one micro-batch and dp_clipping (noise 0) over two micro-batches equal the
    per-example loop (rel 1e-6), with no use left to the torch.func path."""
    entry, model = _build(name, torch.float64)
    b = T5_SEQ if name == "t5" else 4  # T5: the batch size equals the sequence length
    inputs, target = entry.batch(b, dtype=torch.float64)
    norms_exp, per_param_exp, bound, clipped = _oracle(entry, model, inputs, target)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with regops.per_sample_grad_norms(model, "sum") as norms:
            entry.loss(entry.forward(model, inputs), target).backward()
        for k, v in per_param_exp.items():  # some are 0 up to rounding (a key bias under softmax): absolute floor
            torch.testing.assert_close(norms.per_param[k], v, rtol=1e-6, atol=1e-12, msg=k)
        torch.testing.assert_close(norms.total, norms_exp, rtol=1e-6, atol=0)
        model.zero_grad(set_to_none=True)
        with regops.dp_clipping(model, max_norm=bound, loss_reduction="mean") as clip:
            _run_two(entry, model, inputs, target, "mean")
    _no_torch_func(caught)
    assert clip.micro_batch_sizes == [b // 2, b // 2]
    torch.testing.assert_close(clip.total, norms_exp, rtol=1e-6, atol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clipped[k] / b, rtol=1e-6, atol=1e-12, msg=k)


# The zoo entries beyond KNOWN and MORE and what regops must do with each: None for exact norms, else a fragment of
# the refusal (a parameter passed to another library's custom op that torch.func cannot run either). A new entry has
# to be added here: the test says which.
OTHERS: dict[str, str | None] = {"regops_fused": "dropout_add_layer_norm"}


def _exact_norms(entry, model, inputs, target):
    with regops.per_sample_grad_norms(model, "sum") as norms:
        entry.loss(entry.forward(model, inputs), target).backward()
    torch.testing.assert_close(norms.total, _oracle(entry, model, inputs, target)[0], rtol=1e-6, atol=0)


def test_other_zoo_entries_are_exact_or_refused_by_name():
    """Entries added to the zoo later (in eval mode: no dropout masks to replay): exact norms, or an error that
    names the op regops can attribute neither on its fast path nor through torch.func."""
    assert set(ZOO) - set(KNOWN) - set(MORE) == set(OTHERS), "say in OTHERS what regops does with each new entry"
    for name, refused in OTHERS.items():
        entry = ZOO[name]
        model = entry.build(torch.float64).eval()
        inputs, target = entry.batch(3, dtype=torch.float64)
        if refused is None:
            _exact_norms(entry, model, inputs, target)
            continue
        with pytest.raises(ValueError, match="cannot attribute") as err, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _exact_norms(entry, model, inputs, target)
        assert refused in str(err.value) and "torch.func" in str(err.value), (name, str(err.value))


def test_fused_dropout_entry_written_with_torch_ops_is_exact():
    """The same model written with torch's ops (``fused = False``; eval mode, so no masks) gets exact norms: the
    refusal above is about the custom op, not the model."""
    entry = ZOO["regops_fused"]
    model = entry.build(torch.float64).eval()
    model.fused = False
    inputs, target = entry.batch(3, dtype=torch.float64)
    _exact_norms(entry, model, inputs, target)
