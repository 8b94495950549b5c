#!/usr/bin/env bash
# The benchmark suite on the device present (GPU if any, else the CPU paths): prints a table and writes
# JSON, CSV and a PNG plot under benchmarks/results/<device>/.   bash scripts/bench.sh [--family F] [--quick]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m regops.info
python -m benchmarks "$@"
