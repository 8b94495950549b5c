"""``python -m benchmarks [--family dropout] [--quick] [--device cpu|cuda] [-k REGEX]``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
from pathlib import Path

import torch

from benchmarks import harness


def load_cases() -> None:
    """Import every module of the folder but the harness: the case files (``<family>.py``) register their cases."""
    here = Path(__file__).resolve().parent
    for info in pkgutil.iter_modules([str(here)]):
        if info.name not in ("__main__", "harness"):
            importlib.import_module(f"benchmarks.{info.name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="regops benchmark suite")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and short timing (smoke run)")
    parser.add_argument("-k", dest="match", help="only cases whose 'family name params' matches this regex")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    # torch.compile imports cpp_extension, which warns "No CUDA runtime is found" on a machine without a GPU:
    # noise in a results table, like the profiler's lines (silenced in the harness).
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    load_cases()
    device = torch.device(args.device) if args.device else None
    env, rows = harness.run(args.family, device, args.quick, args.match)
    print(harness.table(env, rows))
    # A partial run (some families, a filter, or --quick) gets its own files beside the full results.
    parts = list(args.family or []) + (["filtered"] if args.match else []) + (["quick"] if args.quick else [])
    stem = "-".join(["results", *parts])
    out = harness.write(env, rows, args.out, stem)
    print(f"\nwrote {out} (+ .csv, .png)")


if __name__ == "__main__":
    main()
