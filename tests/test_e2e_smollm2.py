"""End to end on the real SmolLM2-135M-Instruct: `trace apply` then `trace eval` through the CLI.

A small slice of the bundled PKU-SafeRLHF example with its context-aware policy, short
sequences and two optimiser steps keep the whole module near a minute of CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from trace_dsl.cli.main import app
from trace_dsl.data import load_pairs
from trace_dsl.runtime import logprobs as lp
from trace_dsl.runtime.rundir import read_json

ROOT = Path(__file__).resolve().parents[1]
PKU_DATA = ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl"
PKU_POLICY = ROOT / "policies" / "pku_context_aware.tp"
MAX_LENGTH = 96

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def smollm2_run(smollm2_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("smollm2") / "pku"
    args = [
        "apply", str(PKU_POLICY), "--model", "smollm2", "--data", str(PKU_DATA), "-o", str(run),
        "--limit", "30", "--max-steps", "2", "--set", "batching=per-category",
        "--set", f"max_length={MAX_LENGTH}", "--set", "impact.gold_batch_size=6",
        "--set", "gradient_accumulation_steps=2", "--set", "warmup_steps=0", "--set", "learning_rate=0.001",
    ]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 0, result.output
    return run


def test_apply_writes_complete_run(smollm2_run, smollm2_path):
    for name in ("manifest.json", "triage.jsonl", "split.json", "impact_scores.jsonl", "metrics.jsonl", "report.md"):
        assert (smollm2_run / name).is_file(), name
    assert (smollm2_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (smollm2_run / "plots" / "loss_terms.png").is_file()
    manifest = read_json(smollm2_run / "manifest.json")
    assert manifest["status"] == "completed"
    assert manifest["model"]["name"] == "smollm2"
    assert manifest["model"]["path"] == str(smollm2_path)
    assert manifest["counts"]["suppress"] > 0
    metrics = [json.loads(line) for line in (smollm2_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]
    # Per-category batching puts a SUPPRESS pair in every step, and its NPO loss is log 2 > 0
    # at the first step.
    assert all(row["loss/npo"] > 0 for row in metrics)


def test_adapter_reloads_and_changes_logprobs(smollm2_run, smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    pairs = load_pairs(PKU_DATA, limit=3).pairs
    batch = lp.encode_and_collate(tokenizer, [(p.messages(), p.chosen) for p in pairs], MAX_LENGTH)
    with torch.no_grad():
        before = lp.sequence_logprobs(base, batch)
    trained = PeftModel.from_pretrained(base, smollm2_run / "adapter").eval()
    with torch.no_grad():
        after = lp.sequence_logprobs(trained, batch)
        with trained.disable_adapter():
            reference = lp.sequence_logprobs(trained, batch)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(reference, before, rtol=1e-5, atol=1e-4)


def test_eval_reports_on_heldout_pairs(smollm2_run):
    result = runner.invoke(app, ["eval", str(smollm2_run), "--generate-n", "2", "--max-new-tokens", "8"])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 0, result.output
    assert "policy agreement" in result.output
    report = read_json(smollm2_run / "eval.json")
    assert report["schema_version"] == 1
    assert report["suppression"]["count"] >= 1
    assert report["suppression"]["mean_logprob_change"] < 0
    assert report["utility"]["base_perplexity"] < 100
    assert "C1" in report["policy_agreement"]["rules_not_evaluable"]
