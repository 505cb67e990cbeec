#!/usr/bin/env bash
# The main job on the bundled real data with SmolLM2-135M-Instruct, on a CPU:
# triage, impact scores and hybrid LoRA training, then evaluation, for two policy changes.
# Usage: bash scripts/example.sh [RUNS_DIR]   (default: runs/; existing runs are replaced)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs}"
TRACE=.venv/bin/trace
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# PKU-SafeRLHF under the tiered, context-aware harm policy.
$TRACE apply policies/pku_context_aware.tp --model smollm2 --data examples/pku-saferlhf/pairs.jsonl \
    --limit 100 --config examples/pku-saferlhf/apply.json -o "$RUNS/pku-v2" --overwrite
$TRACE eval "$RUNS/pku-v2" --max-pairs 30 --generate-n 8 --max-new-tokens 32

# HH-RLHF harmless under the "decline plainly" policy: the PKU slice has too few INVERT pairs
# (5 in 300) for a held-out inversion figure, this one holds out 10.
$TRACE apply policies/hh_clear_refusals.tp --model smollm2 --data examples/hh-rlhf/harmless-test-head.jsonl.gz \
    --skip-invalid --config examples/hh-rlhf/apply.json -o "$RUNS/hh-v2" --overwrite
$TRACE eval "$RUNS/hh-v2" --max-pairs 30 --generate-n 8 --max-new-tokens 32
