#!/usr/bin/env bash
# The documentation site: Sphinx over docs/ (MyST Markdown pages, the API reference generated from the docstrings,
# the benchmark tables read from benchmarks/results), warnings are errors. In the project's environment, as
# scripts/test.sh (scripts/env.sh installs the docs extra at the lock's versions).
#   bash scripts/docs.sh            -> docs/_build/html/index.html
#   DOCS_OUT=/some/dir bash scripts/docs.sh
# The suite builds the same site (tests/test_docs_site.py), so CI checks it through scripts/test.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${DOCS_OUT:-$ROOT/docs/_build}"
python -m sphinx -b html -W --keep-going -q docs "$OUT/html"
echo "regops: the site is in $OUT/html/index.html" >&2
