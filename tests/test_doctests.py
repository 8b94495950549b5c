"""Every example in a public docstring runs as written, on CPU, and shows what it says (``doctest``).

The examples see ``torch`` and ``regops`` (imported, as a user's session would have them) and nothing else: each
builds its own small inputs. A public function or class without an example, or whose example does not run yet,
is listed below; the lists may only shrink."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest
import torch

import regops
from tests.test_docstrings import NAMESPACES

# Public names whose docstrings have no example yet (may only shrink).
WITHOUT_EXAMPLE = {
    "BackendUnavailableError", "DPClipping", "DPOptimizer", "DiagonalEstimate", "Dropout1d", "Dropout2d",
    "Dropout3d", "GSAM", "GradientCoherence", "LookSAM", "LossStats", "MixCrossEntropy", "MixParams", "MixedBatch",
    "PatchHandle", "PeftLoRALinear", "PerSampleGradNorms", "PrivateModule", "ReLUL1Stats", "SoftTargetCrossEntropy",
    "TracInTopK", "TraceEstimate", "mixed_targets",
}  # fmt: skip
# Public names whose examples do not run as written yet (may only shrink).
EXAMPLES_NOT_RUNNING = {
    "AdamW", "BatchMemoryManager", "CrossEntropyLoss", "CutMix", "DPDataLoader", "DropPath", "DropoutAddLayerNorm",
    "HessianLinearOperator", "LinearCrossEntropyLoss", "LoRALinear", "MixUp", "Mixup", "MultiSampleDropout",
    "PoissonBatchSampler", "PrivacyAccountant", "PrivacyEngine", "ReLUL1", "SAM", "SGD", "bias_dropout_add",
    "causal_lm_loss", "clip_per_sample_", "cross_entropy", "data_scores", "diagonal", "dp_clipping", "drop_path",
    "drop_path_add", "dropout", "dropout_add_layer_norm", "empirical_fisher_diagonal", "fix_model", "ggn_diagonal",
    "ggn_trace", "gradient_coherence", "linear_cross_entropy", "linear_head_diagonal", "linear_head_trace",
    "lora_dropout", "manifold_mix", "mix_batch", "mix_binary_cross_entropy", "mix_cross_entropy",
    "multi_sample_dropout", "nested_dropout", "orthogonality_penalty", "patch", "per_sample_grad_dots",
    "per_sample_grad_norms", "preserve_bn_stats", "probes", "relu_l1", "soft_target_cross_entropy", "spectral_norms",
    "symmetric_kl", "trace", "trace_penalty", "tracin", "twice_differentiable",
}  # fmt: skip


def _public() -> list[tuple[str, object]]:
    found: dict[int, tuple[str, object]] = {}
    for ns in NAMESPACES:
        module = importlib.import_module(ns)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found.setdefault(id(obj), (f"{ns}.{name}", obj))
    return sorted(found.values())


PUBLIC = _public()
FINDER = doctest.DocTestFinder(recurse=True, exclude_empty=True)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests(name: str, obj: object) -> list[doctest.DocTest]:
    tests = FINDER.find(obj, name, module=False, globs={})
    return [t for t in tests if t.examples and not any(p.startswith("_") for p in t.name[len(name) :].split("."))]


def _run(name: str, obj: object) -> tuple[int, str]:
    failed, report = 0, []
    for test in _tests(name, obj):
        torch.manual_seed(0)
        test.globs = {"torch": torch, "regops": regops}
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        failed += runner.run(test, out=report.append).failed
    return failed, "".join(report)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_every_public_example_runs(name, obj):
    short = name.rsplit(".", 1)[1]
    has_example = bool(_tests(name, obj))
    if short in WITHOUT_EXAMPLE:
        assert not has_example, f"{name} has an example now: drop it from WITHOUT_EXAMPLE"
        return
    assert has_example, f"{name}: no example in its docstring"
    failed, report = _run(name, obj)
    if short in EXAMPLES_NOT_RUNNING:
        assert failed, f"{name}'s example runs now: drop it from EXAMPLES_NOT_RUNNING"
    else:
        assert not failed, f"{name}: its example does not run as written:\n{report[-3000:]}"
