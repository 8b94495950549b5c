"""regops benchmark suite: ``python -m benchmarks`` (see harness.py)."""
