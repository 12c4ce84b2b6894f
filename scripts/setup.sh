#!/usr/bin/env bash
# Create .venv with fcit and its pinned dependencies. torch is pinned through constraints.txt: any other resolution
# pulls a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
