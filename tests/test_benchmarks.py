"""The benchmark harness runs a real case end to end and writes its table, JSON, CSV and plot."""

from __future__ import annotations

import json

import torch

from benchmarks import harness
from benchmarks.__main__ import load_cases


def test_harness_runs_dropout_case_and_writes_outputs(tmp_path):
    load_cases()
    env, rows = harness.run(["dropout"], torch.device("cpu"), quick=True, match="dropout forward ")
    variants = {r["variant"] for r in rows}
    assert {"regops", "eager", "compile"} <= variants
    ours = next(r for r in rows if r["variant"] == "regops")
    eager = next(r for r in rows if r["variant"] == "eager")
    assert ours["ms"] > 0 and ours["GB/s"] > 0 and ours["%copy"] > 0
    assert ours["saved_MB"] < 1e-3 < eager["saved_MB"]  # a seed, against torch's stored mask
    assert eager["x_eager"] == 1.0
    text = harness.table(env, rows)
    assert "regops" in text and "copy" in text
    path = harness.write(env, rows, tmp_path, "results-test")
    data = json.loads(path.read_text())
    assert data["environment"]["device_type"] == "cpu" and data["results"]
    assert (tmp_path / "results-test.csv").read_text().startswith("family,case")
    assert (tmp_path / "results-test.png").stat().st_size > 1000
