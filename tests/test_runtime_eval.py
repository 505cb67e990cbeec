"""`trace eval` on a run trained on a tiny random Llama with the HH-RLHF example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_runner import invoke

from trace_dsl.data import load_pairs
from trace_dsl.runtime.evaluate import FEW_PAIRS, _preference_share, format_table, perplexity
from trace_dsl.runtime.rundir import read_json

ROOT = Path(__file__).resolve().parents[1]
HH_DATA = ROOT / "examples" / "hh-rlhf" / "harmless-test-head.jsonl.gz"
HH_POLICY = ROOT / "policies" / "hh_clear_refusals.tp"


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval-runs") / "hh"
    args = [
        "apply", str(HH_POLICY), "--model", str(tiny_model_dir), "--data", str(HH_DATA), "-o", str(run),
        "--limit", "300", "--skip-invalid", "--max-steps", "2",
        "--set", "max_length=64", "--set", "lora.r=4", "--set", "impact.gold_batch_size=6",
        "--set", "warmup_steps=0", "--set", "learning_rate=0.01", "--set", "gradient_accumulation_steps=2",
    ]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def evaluated(trained_run):
    result = invoke(["eval", str(trained_run), "--generate-n", "3", "--max-new-tokens", "8", "--max-pairs", "12"])
    assert result.exit_code == 0, result.output
    return trained_run, result.output


def test_eval_table_lists_every_metric(evaluated):
    _, output = evaluated
    for label in ("inversion accuracy", "suppression", "retention: KL", "retention: preference", "perplexity", "policy agreement"):
        assert label in output, label
    assert f"(n<{FEW_PAIRS})" in output


def test_eval_json_in_run_directory(evaluated):
    run, _ = evaluated
    report = read_json(run / "eval.json")
    split = read_json(run / "split.json")

    assert report["schema_version"] == 1
    assert report["heldout"]["source"] == "split"
    available = split["counts"]["heldout"]
    assert report["heldout"]["available"] == available
    assert report["heldout"]["counts"] == {name: min(count, 12) for name, count in available.items()}
    inversion = report["inversion"]
    assert inversion["count"] == min(available["invert"], 12)
    assert inversion["few_pairs"] is (inversion["count"] < FEW_PAIRS)
    # At the reference model every implicit reward ties, and a tie counts half.
    assert inversion["base"] == 0.5
    assert 0.0 <= inversion["trained"] <= 1.0
    assert report["retention"]["kl"] > 0
    assert report["retention"]["few_pairs"] is False
    assert report["utility"]["tokens"] > 1000
    assert report["utility"]["trained_perplexity"] != report["utility"]["base_perplexity"]
    agreement = report["policy_agreement"]
    assert agreement["count"] == 3
    assert agreement["few_pairs"] is True
    assert agreement["rules_not_evaluable"] == []
    assert len(agreement["samples"]) == 3


def test_eval_json_format_on_stdout(evaluated):
    run, _ = evaluated
    result = invoke(["eval", str(run), "--format", "json", "--generate-n", "0", "--max-pairs", "12"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1
    assert "policy_agreement" not in report


def test_eval_on_given_file_skips_trained_pairs(evaluated, tmp_path):
    run, _ = evaluated
    split = read_json(run / "split.json")
    pairs = load_pairs(HH_DATA, limit=300, skip_invalid=True).pairs
    rows = [p for p in pairs if p.id in set(split["train"])][:3] + [p for p in pairs if p.id in set(split["heldout"])][:5]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in rows))

    result = invoke(["eval", str(run), "--data", str(data), "--format", "json", "--generate-n", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["heldout"]["source"] == str(data)
    assert sum(report["heldout"]["counts"].values()) == 5


def test_bad_utility_text_is_a_message(evaluated, tmp_path):
    run, _ = evaluated
    before = (run / "eval.json").read_bytes()
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xf8\x00\xff" * 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for text, message in ((binary, "is not UTF-8 text"), (empty, "is empty")):
        result = invoke(["eval", str(run), "--generate-n", "0", "--utility-text", str(text)])
        assert result.exit_code == 1
        assert message in result.output
    assert (run / "eval.json").read_bytes() == before


def test_edited_manifest_is_a_message(evaluated, tmp_path):
    import shutil

    run, _ = evaluated
    for edit, message in (
        (lambda manifest: manifest["config"].update(new_setting=1), "new_setting: Extra inputs are not permitted"),
        (lambda manifest: manifest.pop("policy"), "field policy.path is missing"),
    ):
        copy = tmp_path / f"run-{len(message)}"
        shutil.copytree(run, copy)
        manifest = read_json(copy / "manifest.json")
        edit(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        result = invoke(["eval", str(copy), "--generate-n", "0"])
        assert result.exit_code == 1
        assert message in result.output


def test_damaged_adapter_is_a_message(evaluated, tmp_path):
    import shutil

    run, _ = evaluated
    for name, damage in (("adapter_model.safetensors", b"\x10\x00"), ("adapter_config.json", b"{")):
        copy = tmp_path / name
        shutil.copytree(run, copy)
        (copy / "adapter" / name).write_bytes(damage)
        result = invoke(["eval", str(copy), "--generate-n", "0"])
        assert result.exit_code == 1
        assert "cannot load the adapter" in result.output


def test_eval_without_adapter_is_a_message(tiny_model_dir, tmp_path):
    run = tmp_path / "dry"
    args = [
        "apply", str(HH_POLICY), "--model", str(tiny_model_dir), "--data", str(HH_DATA), "-o", str(run),
        "--limit", "120", "--dry-run", "--set", "max_length=64", "--set", "impact.gold_batch_size=6",
    ]
    assert invoke(args).exit_code == 0
    result = invoke(["eval", str(run)])
    assert result.exit_code == 1
    assert "no trained adapter" in " ".join(result.output.split())


def test_preference_share_counts_ties_half():
    assert _preference_share([1.0, -1.0, 0.0, 0.0]) == 0.5
    assert _preference_share([1.0, 1.0]) == 1.0
    assert _preference_share([1e-9, -1e-9]) == 0.5


def test_perplexity_of_repeated_text_is_lower(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    value, tokens = perplexity(model, tokenizer, "How do I bake bread? " * 20, window=32)
    assert tokens > 32
    assert 1.0 < value < len(tokenizer) * 10


def test_table_shows_no_base_without_pairs():
    empty = {"count": 0, "few_pairs": True}
    report = {
        "inversion": empty,
        "suppression": {**empty, "mean_logprob_change": None},
        "retention": {**empty, "kl": None},
        "utility": {"tokens": 10, "base_perplexity": 20.0, "trained_perplexity": 21.0},
    }
    rows = {line.split("  ")[0]: line.split() for line in format_table(report)}
    assert rows["suppression: mean log-prob change"][-2:] == ["-", "-"]
    assert rows["retention: KL(ref || trained)"][-2:] == ["-", "-"]
