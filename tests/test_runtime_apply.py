"""`trace apply` through the CLI on a tiny random Llama and the bundled HH-RLHF example."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli_runner import invoke

from trace_dsl.data import load_pairs
from trace_dsl.errors import ConfigurationError
from trace_dsl.runtime import logprobs as lp
from trace_dsl.runtime.apply import heldout_split, load_config
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.generate import corrected_responses, judge_generated
from trace_dsl.runtime.rundir import read_json
from trace_dsl.triage.verdict import Category, Verdict

ROOT = Path(__file__).resolve().parents[1]
HH_DATA = ROOT / "examples" / "hh-rlhf" / "harmless-test-head.jsonl.gz"
HH_POLICY = ROOT / "policies" / "hh_clear_refusals.tp"
PKU_POLICY = ROOT / "policies" / "pku_context_aware.tp"

TINY_SETTINGS = [
    "--set", "max_length=64",
    "--set", "lora.r=4",
    "--set", "lora.dropout=0",
    "--set", "impact.gold_batch_size=6",
    "--set", "warmup_steps=0",
    "--set", "learning_rate=0.01",
    "--set", "gradient_accumulation_steps=2",
]

def apply_args(model_dir, output, *extra: str, policy: Path = HH_POLICY, limit: int = 200) -> list[str]:
    return [
        "apply", str(policy), "--model", str(model_dir), "--data", str(HH_DATA), "-o", str(output),
        "--limit", str(limit), "--skip-invalid", *TINY_SETTINGS, *extra,
    ]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "hh"
    result = invoke(apply_args(tiny_model_dir, output, "--max-steps", "2", "--merge"))
    assert result.exit_code == 0, result.output
    return output, result.output


def test_run_directory_layout(tiny_run):
    run, output = tiny_run
    for name in ("manifest.json", "triage.jsonl", "split.json", "impact_scores.jsonl", "metrics.jsonl", "report.md"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "merged" / "model.safetensors").is_file()
    assert (run / "plots" / "loss_terms.png").stat().st_size > 0
    assert (run / "plots" / "verdicts.png").stat().st_size > 0
    assert "trained 2 steps" in output


def test_manifest_records_inputs(tiny_run, tiny_model_dir):
    run, _ = tiny_run
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "completed"
    assert len(manifest["policy"]["hash"]) == 64
    assert manifest["data"]["hash"].startswith("sha256:")
    assert manifest["data"]["pairs"] == 200
    assert manifest["model"]["path"] == str(tiny_model_dir)
    assert manifest["model"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert manifest["config"]["max_steps"] == 2
    assert manifest["config"]["lora"]["r"] == 4
    assert manifest["seed"] == 0
    assert manifest["command_line"][:2] == ["trace", "apply"]
    assert manifest["packages"]["torch"]
    assert manifest["started_at"] <= manifest["ended_at"]
    assert manifest["training"]["steps"] == 2
    assert manifest["impact"]["reused"] is False


def test_triage_split_and_scores_agree(tiny_run):
    run, _ = tiny_run
    verdicts = [json.loads(line) for line in (run / "triage.jsonl").read_text().splitlines()]
    split = read_json(run / "split.json")
    scores = [json.loads(line) for line in (run / "impact_scores.jsonl").read_text().splitlines()]

    assert len(verdicts) == 200
    assert set(split["train"]).isdisjoint(split["heldout"])
    assert set(split["train"]) | set(split["heldout"]) == {v["pair_id"] for v in verdicts}
    conflicts_in_train = {v["pair_id"] for v in verdicts if v["category"] in ("invert", "suppress") and v["pair_id"] in split["train"]}
    assert {row["pair_id"] for row in scores} == conflicts_in_train
    assert sum(row["score"] for row in scores) == pytest.approx(1.0)
    assert all(row["ref_logprob_chosen"] < 0 for row in scores)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]
    assert "## Triage" in (run / "report.md").read_text()


def test_adapter_reloads_and_changes_logprobs(tiny_run, tiny_model_dir):
    run, _ = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = load_pairs(HH_DATA, limit=4).pairs
    batch = lp.encode_and_collate(tokenizer, [(p.messages(), p.chosen) for p in pairs], 64)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        before = lp.sequence_logprobs(base, batch)
    trained = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        after = lp.sequence_logprobs(trained, batch)
    assert not torch.allclose(before, after, atol=1e-4)


def test_existing_run_is_refused(tiny_run, tiny_model_dir):
    run, _ = tiny_run
    result = invoke(apply_args(tiny_model_dir, run, "--max-steps", "1"))
    assert result.exit_code == 1
    assert "already exists" in result.output
    assert "--overwrite" in result.output


def test_overwrite_refuses_folder_without_run(tiny_model_dir, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    result = invoke(apply_args(tiny_model_dir, folder, "--overwrite", "--max-steps", "1", limit=10))
    assert result.exit_code == 1
    assert "contains no run" in result.output
    assert sorted(path.name for path in folder.iterdir()) == ["todo.txt"]


def test_dry_run_then_training_reuses_scores(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    result = invoke(apply_args(tiny_model_dir, run, "--dry-run", "--max-steps", "1", limit=120))
    assert result.exit_code == 0, result.output
    assert "optimiser steps" in result.output
    assert "estimated training time" in result.output
    assert not (run / "adapter").exists()
    assert read_json(run / "manifest.json")["status"] == "dry-run"

    result = invoke(apply_args(tiny_model_dir, run, "--overwrite", "--max-steps", "1", limit=120))
    assert result.exit_code == 0, result.output
    manifest = read_json(run / "manifest.json")
    assert manifest["impact"]["reused"] is True
    assert manifest["status"] == "completed"


def test_warmup_longer_than_run_is_warned(tiny_model_dir, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="trace_dsl.runtime.apply"):
        result = invoke(apply_args(tiny_model_dir, run, "--dry-run", "--max-steps", "2", "--set", "warmup_steps=100", limit=120))
    assert result.exit_code == 0, result.output
    assert "warmup_steps 100 is not below the 2 optimiser steps" in caplog.text


def test_resume_continues_from_checkpoint(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = apply_args(tiny_model_dir, run, "--max-steps", "4", "--set", "save_steps=2", limit=120)
    assert invoke(args).exit_code == 0
    # Make it look like a run killed after step 3: no final checkpoint or adapter, an extra row.
    import shutil

    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    # A save cut short by the interruption leaves a checkpoint folder without trainer_state.json.
    (run / "checkpoints" / "checkpoint-3").mkdir()
    rows = (run / "metrics.jsonl").read_text().splitlines()[:3]
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")

    result = invoke(args + ["--resume"])
    assert result.exit_code == 0, result.output
    manifest = read_json(run / "manifest.json")
    assert manifest["training"]["resumed_from"].endswith("checkpoint-2")
    assert manifest["training"]["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_of_completed_run_is_refused(tiny_run, tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    checkpoints = sorted(path.name for path in (run / "checkpoints").iterdir())
    result = invoke(apply_args(tiny_model_dir, run, "--max-steps", "2", "--resume"))
    assert result.exit_code == 1
    assert "already completed" in result.output
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == checkpoints


def test_resume_refuses_changed_settings_and_inputs(tiny_model_dir, tmp_path):
    policy = tmp_path / "never.tp"
    policy.write_text('policy "never" version "1"\n\nrule N1 "Never fires":\n  violates when response contains_any ["zqxjzqxj"]\n')
    run = tmp_path / "run"
    invoke(apply_args(tiny_model_dir, run, "--max-steps", "3", policy=policy, limit=10))
    assert read_json(run / "manifest.json")["status"] == "failed"

    result = invoke(apply_args(tiny_model_dir, run, "--max-steps", "5", "--resume", policy=policy, limit=10))
    assert result.exit_code == 1
    assert "max_steps: 3 -> 5" in result.output

    result = invoke(apply_args(tiny_model_dir, run, "--max-steps", "3", "--resume", policy=HH_POLICY, limit=10))
    assert result.exit_code == 1
    assert "another policy" in result.output


def test_terminated_run_is_marked_interrupted(tiny_model_dir, tmp_path, monkeypatch):
    import signal

    from trace_dsl.runtime import apply as apply_module

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(apply_module, "_run_stages", terminated)
    run = tmp_path / "run"
    result = invoke(apply_args(tiny_model_dir, run, "--max-steps", "1", limit=10))
    assert result.exit_code == 130
    assert "--resume" in result.output
    assert read_json(run / "manifest.json")["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_unloadable_model_is_a_message(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": "many"}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = invoke(apply_args(broken, tmp_path / "run", "--max-steps", "1", limit=40))
    assert result.exit_code == 1
    assert "error[TM001]" in result.output


def test_unknown_model_leaves_no_run_directory(tmp_path):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("not a model")
    output = tmp_path / "run"
    result = invoke(apply_args(not_a_model, output, "--max-steps", "1", limit=10))
    assert result.exit_code == 1
    assert "error[TM001]" in result.output
    assert not output.exists()


def test_early_failure_leaves_no_run_directory(tiny_model_dir, tmp_path):
    policy = tmp_path / "broken.tp"
    policy.write_text('policy "broken" version "1"\n\nrule B1 "Unfinished":\n  violates when\n')
    output = tmp_path / "run"
    result = invoke(apply_args(tiny_model_dir, output, "--max-steps", "1", policy=policy, limit=10))
    assert result.exit_code == 1
    assert "broken.tp" in result.output
    assert not output.exists()


def test_invalid_yaml_config_is_a_message(tmp_path):
    config_file = tmp_path / "apply.yaml"
    config_file.write_text("lora:\n  r: [1\n")
    with pytest.raises(ConfigurationError, match="apply.yaml: invalid configuration file"):
        load_config(config_file)
    result = invoke(apply_args(tmp_path, tmp_path / "run", "--config", str(config_file), limit=10))
    assert result.exit_code == 1
    assert "line 2" in result.output


def test_no_conflict_is_a_message(tiny_model_dir, tmp_path):
    policy = tmp_path / "never.tp"
    policy.write_text('policy "never" version "1"\n\nrule N1 "Never fires":\n  violates when response contains_any ["zqxjzqxj"]\n')
    result = invoke(apply_args(tiny_model_dir, tmp_path / "run", "--max-steps", "1", policy=policy, limit=40))
    assert result.exit_code == 1
    assert "no INVERT or SUPPRESS pair" in result.output
    assert "retain 40" in result.output


def test_manifest_paths_are_absolute(tiny_model_dir, tmp_path, monkeypatch):
    # `trace eval` and `--resume` read these paths back, maybe from another working directory.
    policy = tmp_path / "never.tp"
    policy.write_text('policy "never" version "1"\n\nrule N1 "Never fires":\n  violates when response contains_any ["zqxjzqxj"]\n')
    monkeypatch.chdir(tmp_path)
    args = apply_args(tiny_model_dir, tmp_path / "run", policy=Path("never.tp"), limit=10)
    args[args.index(str(HH_DATA))] = os.path.relpath(HH_DATA, tmp_path)
    invoke(args)
    manifest = read_json(tmp_path / "run" / "manifest.json")
    assert manifest["policy"]["path"] == str(policy)
    assert manifest["data"]["path"] == str(HH_DATA)


def test_error_verdicts_are_refused(tiny_model_dir, tmp_path):
    policy = tmp_path / "needs_metadata.tp"
    policy.write_text('policy "meta" version "1"\n\nrule M1 "Severe":\n  violates when response.severity_level >= 2\n')
    result = invoke(apply_args(tiny_model_dir, tmp_path / "run", "--max-steps", "1", policy=policy, limit=40))
    assert result.exit_code == 1
    assert "40 of 40 pairs have verdict 'error'" in result.output
    assert "trace explain" in result.output

    result = invoke(apply_args(tiny_model_dir, tmp_path / "dropped", "--max-steps", "1", "--drop-errors", policy=policy, limit=40))
    assert result.exit_code == 1
    assert "every one of the 40 pairs has verdict 'error'" in result.output
    assert "trace explain" in result.output


def test_config_file_and_overrides(tmp_path):
    config_file = tmp_path / "apply.yaml"
    config_file.write_text("beta: 0.5\nlora:\n  r: 8\nimpact:\n  enabled: false\n")
    config = load_config(config_file, ["lora.alpha=4", "batching=per-category", "max_steps=7"])
    assert config.beta == 0.5
    assert config.lora.r == 8
    assert config.lora.alpha == 4
    assert config.impact.enabled is False
    assert config.batching == "per-category"
    assert config.max_steps == 7
    with pytest.raises(ConfigurationError, match="lora.r"):
        load_config(None, ["lora.r=0"])
    with pytest.raises(ConfigurationError, match="key=value"):
        load_config(None, ["beta"])
    with pytest.raises(ConfigurationError) as invalid_list:
        load_config(None, ["lora.target_modules=q_proj"])
    assert '["q_proj","v_proj"]' in invalid_list.value.hint
    assert load_config(None, ['lora.target_modules=["q_proj","k_proj"]']).lora.target_modules == ["q_proj", "k_proj"]


def test_repeated_pairs_stay_out_of_heldout(tiny_model_dir, tmp_path):
    import gzip

    rows = gzip.open(HH_DATA, "rt", encoding="utf-8").read().splitlines()[:60]
    data = tmp_path / "repeated.jsonl"
    data.write_text("\n".join(rows + rows) + "\n")
    run = tmp_path / "run"
    args = apply_args(tiny_model_dir, run, "--dry-run", "--max-steps", "1")
    args[args.index(str(HH_DATA))] = str(data)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    split = read_json(run / "split.json")
    assert not set(split["train"]) & set(split["heldout"])
    assert len(split["train"]) + len(split["heldout"]) == 60
    assert read_json(run / "manifest.json")["data"]["pairs"] == 60


def test_heldout_split_is_seeded_and_stratified():
    verdicts = [Verdict(f"p{i}", [Category.INVERT, Category.SUPPRESS, Category.RETAIN][i % 3], None, None) for i in range(30)]
    first = heldout_split(verdicts, 0.2, seed=1)
    assert first == heldout_split(verdicts, 0.2, seed=1)
    assert first != heldout_split(verdicts, 0.2, seed=2)
    categories = {v.pair_id: v.category for v in verdicts}
    for category in (Category.INVERT, Category.SUPPRESS, Category.RETAIN):
        assert sum(1 for pair_id in first.heldout if categories[pair_id] is category) == 2


def test_judge_generated_lists_metadata_rules():
    from trace_dsl.compiler.policy import load_policy

    policy = load_policy(PKU_POLICY)
    pairs = load_pairs(ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl", limit=2).pairs
    judgement = judge_generated(policy, pairs, ["I'm sorry, I can't.", "Here is some general information on the topic."])
    assert "C1" in judgement.not_evaluable
    assert "R1" not in judgement.not_evaluable
    assert len(judgement.complies) == 2


class _ChatCompletions(BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible endpoint: a completion for every request, or HTTP 500 when `fail` is set."""

    fail = False

    def do_POST(self):  # noqa: N802 (http.server naming)
        length = int(self.headers["Content-Length"])
        request = json.loads(self.rfile.read(length))
        if self.fail:
            self.send_response(500)
            self.end_headers()
            return
        answer = f"I won't help with that, but here is a safe alternative ({request['model']})."
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("fail", [False, True])
def test_corrected_responses_over_http(fail):
    handler = type("Handler", (_ChatCompletions,), {"fail": fail})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1#writer"
        config = TrainingConfig(suppress_mode="corrected", generator=url)
        pairs = load_pairs(HH_DATA, limit=2).pairs
        results = corrected_responses(pairs, config, progress=False)
    finally:
        server.shutdown()
    if fail:
        assert results == {pair.id: None for pair in pairs}
    else:
        assert all("(writer)" in results[pair.id] for pair in pairs)


def test_corrected_mode_trains_with_local_generator(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = apply_args(
        tiny_model_dir, run, "--max-steps", "1",
        "--set", "suppress_mode=corrected", "--set", f"generator={tiny_model_dir}", limit=300,
    )
    result = invoke(args)
    assert result.exit_code == 0, result.output
    corrected = read_json(run / "manifest.json")["corrected"]
    # The random tiny model writes gibberish, so the policy may reject it. Either way every
    # SUPPRESS pair is trained on its generated response or falls back to dual NPO.
    suppress_in_train = read_json(run / "split.json")["counts"]["train"]["suppress"]
    assert suppress_in_train >= 1
    assert corrected["generated"] + corrected["fell_back_to_npo"] == suppress_in_train
