"""Peak RSS growth of one noised ``dp_clipping`` step, or of one ``regops.hessian.trace`` call, per process: a model
under FSDP2 (``fully_shard`` on every Linear, then the root) in ``world`` gloo processes on CPU against the same
model and call in one process. ``--step plain``: a plain forward and backward, FSDP2's own cost.

``python -m benchmarks.fsdp_memory [--step dp_clipping|hessian_trace|plain] [--hvp finite_difference]
[--layers 8] [--width 1024] [--worlds 1 2] [--out FILE]``

``hessian_trace``: ``trace(model, cross_entropy, x, y, num_probes=2, hvp=...)``; with ``hvp="finite_difference"``
(the default under FSDP2) the sharded central differences, in one process the same products on the whole model;
``hvp="double_backward"``: the exact products, which under FSDP2 gather every parameter.

Each process: a warm-up step (FSDP2's lazy initialisation, first-call allocations), gradients set to ``None``,
then the peak RSS is reset (``/proc/self/clear_refs``) and the measured step runs; growth = ``VmHWM`` after the step
minus ``VmRSS`` before it. glibc is told to serve every allocation above 64 KiB by ``mmap`` (``mallopt``), so
freed tensors leave the process and the warm-up's freed memory cannot hide the step's own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

M_MMAP_THRESHOLD = -3
MIB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _model(layers: int, width: int, world: int) -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    return model


HESSIAN_PROBES = 1


def step_growth(
    rank: int, world: int, layers: int, width: int, batch: int, step_name: str = "dp_clipping", hvp: str = ""
) -> dict[str, float]:
    """Peak RSS growth (bytes) of one noised ``dp_clipping`` step or one ``hessian.trace`` call on this process
    (``world`` > 1: FSDP2)."""
    import regops

    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    model = _model(layers, width, world)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, width, (batch,), generator=gen)

    def step():
        if step_name == "hessian_trace":
            regops.hessian.trace(model, F.cross_entropy, x, y, num_probes=HESSIAN_PROBES, generator=gen, hvp=hvp)
            return
        if step_name == "plain":
            F.cross_entropy(model(x), y).backward()
            return
        with regops.dp_clipping(model, 1.0, loss_reduction="mean", noise_multiplier=1.0, generator=gen):
            F.cross_entropy(model(x), y).backward()

    if step_name == "hessian_trace":  # a training step first: FSDP2's lazy initialisation
        F.cross_entropy(model(x), y).backward()
    step()
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    step()
    growth = _status("VmHWM") - before
    params = sum(_local(p).numel() * p.element_size() for p in model.parameters())  # this rank's shard
    return {"growth": float(growth), "param_bytes": float(params)}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _worker(rank: int, world: int, layers: int, width: int, batch: int, step: str, hvp: str, out_dir: str) -> None:
    result = step_growth(rank, world, layers, width, batch, step, hvp)
    Path(out_dir, f"{world}-{rank}.json").write_text(json.dumps(result))


def measure(
    world: int, layers: int, width: int, batch: int, step: str = "dp_clipping", hvp: str = "finite_difference"
) -> list[dict[str, float]]:
    """One result per rank: ``world`` fresh gloo processes (``world == 1``: the plain model in one process)."""
    from tests.dist_harness import run

    with tempfile.TemporaryDirectory() as tmp:
        run(_worker, world, layers, width, batch, step, hvp, tmp)
        return [json.loads(Path(tmp, f"{world}-{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="examples per process")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--step", choices=["dp_clipping", "hessian_trace", "plain"], default="dp_clipping")
    parser.add_argument("--hvp", choices=["finite_difference", "double_backward"], default="finite_difference")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = {}
    for world in args.worlds:
        ranks = measure(world, args.layers, args.width, args.batch, args.step, args.hvp)
        results[str(world)] = {
            "growth_mib": [r["growth"] / MIB for r in ranks],
            "param_mib_per_rank": [r["param_bytes"] / MIB for r in ranks],
        }
    single = max(results["1"]["growth_mib"]) if "1" in results else None
    for world, r in results.items():
        r["ratio_to_one_process"] = None if single is None else max(r["growth_mib"]) / single
        print(f"world {world}: peak RSS growth per rank {[f'{g:.1f}' for g in r['growth_mib']]} MiB", end="")
        print("" if single is None else f", {r['ratio_to_one_process']:.2f}x one process")
    record = {
        "environment": {
            "torch": torch.__version__,
            "cpu_threads": 1,
            "cores": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "config": {"layers": args.layers, "width": args.width, "batch_per_process": args.batch, "dtype": "float32"},
        "step": {
            "dp_clipping": "dp_clipping(max_norm=1.0, loss_reduction='mean', noise_multiplier=1.0), one backward",
            "plain": "cross_entropy(model(x), y).backward(), no regops",
            "hessian_trace": f"hessian.trace(model, cross_entropy, x, y, num_probes={HESSIAN_PROBES}, "
            f"hvp={args.hvp!r})",
        }[args.step],
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
