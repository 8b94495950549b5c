#!/usr/bin/env bash
# Refreshes constraints/lock.txt on purpose: installs the newest releases of every dependency and extra into a
# scratch environment and writes their versions. Run the suite against it (bash scripts/test.sh) before committing.
#   bash scripts/lock.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
REGOPS_LATEST=1 REGOPS_VENV="$SCRATCH/venv" REGOPS_BUILD_EXT=0 bash -c 'source scripts/env.sh'
{
  echo "# The versions the test and benchmark environment was last run with (scripts/env.sh installs with -c this file)."
  echo "# Refresh on purpose with: bash scripts/lock.sh   (then run bash scripts/test.sh and commit both)"
  "$SCRATCH/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v -i "^regops"
} > constraints/lock.txt
echo "wrote constraints/lock.txt ($(grep -c '==' constraints/lock.txt) pins)"
