"""The README's commands, run as a user would copy them.

Every `trace` line in the README's code blocks runs here. Lines that name placeholder files
(`policy.tp`, `pairs.jsonl`) run in a git repository built by the test, where `policy.tp` is the
shipped PKU-SafeRLHF policy with a history of tagged versions and `pairs.jsonl` a slice of the
real example data. Training commands get a tiny model and one optimiser step; everything else
runs as written. The main job (`scripts/example.sh`) runs in full on the real SmolLM2.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TRACE = [sys.executable, "-m", "trace_dsl.cli.main"]

# Settings that make a training command take seconds on a tiny model.
FAST_TRAINING = ["--max-steps", "1", "--set", "max_length=48", "--set", "impact.gold_batch_size=6"]


def readme_trace_commands() -> list[str]:
    """Return every `trace ...` line inside the README's fenced code blocks, comments removed."""
    commands = []
    in_block = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block and line.startswith("trace "):
            commands.append(line.split("  #")[0].strip())
    return commands


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A git repository holding the README's placeholder files with a history of versions."""
    repo = tmp_path_factory.mktemp("readme-workspace")
    shutil.copytree(ROOT / "policies", repo / "policies")
    shutil.copytree(ROOT / "examples", repo / "examples")
    shutil.copytree(ROOT / "policies" / "shared", repo / "shared")
    rows = (ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    (repo / "pairs.jsonl").write_text("\n".join(rows[:40]) + "\n", encoding="utf-8")

    policy = (ROOT / "policies" / "pku_context_aware.tp").read_text(encoding="utf-8")
    older = policy.replace("response.severity_level >= 3", "response.severity_level >= 2")
    assert older != policy, "the shipped policy no longer has the line this test edits"
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    (repo / "policy.tp").write_text(older, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1.2")
    git(repo, "tag", "v1.2")
    git(repo, "update-ref", "refs/remotes/origin/main", "HEAD")
    (repo / "policy.tp").write_text(policy, encoding="utf-8")
    git(repo, "commit", "-qam", "v1.3")
    git(repo, "tag", "v1.3")
    return repo


def run_trace(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", TRACE_CACHE_DIR=os.environ.get("TRACE_CACHE_DIR", str(cwd / ".cache")))
    return subprocess.run(TRACE + words, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def adapt(command: str, model_dir: str) -> list[str]:
    """Turn a README line into arguments for this test: tiny model and short training."""
    words = shlex.split(command)[1:]
    if words[0] in ("apply", "plan") and "--model" in words:
        words[words.index("--model") + 1] = model_dir
    if words[0] == "apply":
        words += FAST_TRAINING + ["--overwrite"]
    return words


def test_readme_lists_commands():
    commands = readme_trace_commands()
    assert len(commands) >= 10
    for name in ("check", "test", "triage", "diff", "plan", "apply", "eval"):
        assert any(c.split()[1] == name for c in commands), name


def test_readme_commands_run(workspace, tiny_model_dir):
    failures = []
    for command in readme_trace_commands():
        words = adapt(command, str(tiny_model_dir))
        result = run_trace(words, workspace)
        allowed = {0, 2} if "--detailed-exitcode" in words else {0}
        if result.returncode not in allowed:
            failures.append(f"{command}\nexit {result.returncode}\n{result.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)


def test_readme_diff_names_changed_rule(workspace):
    result = run_trace(
        ["diff", "policy.tp@v1.2", "policy.tp@v1.3", "--data", "pairs.jsonl", "--format", "json"], workspace
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1
    changed = {(rule["id"], rule["kind"]) for rule in report["static"]["rules"]}
    assert ("D1", "changed") in changed


@pytest.mark.slow
def test_example_job_on_smollm2(tmp_path, smollm2_path):
    """The README's main job: apply and eval twice on SmolLM2, with real data."""
    if not (ROOT / ".venv" / "bin" / "trace").exists():
        pytest.skip("scripts/example.sh runs .venv/bin/trace; run scripts/setup.sh first")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "example.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    for run in ("pku-v2", "hh-v2"):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["status"] == "completed", run
        assert (tmp_path / run / "adapter" / "adapter_model.safetensors").exists(), run
        assert (tmp_path / run / "eval.json").exists(), run

    evaluation = json.loads((tmp_path / "hh-v2" / "eval.json").read_text())
    assert evaluation["inversion"]["count"] >= 10
    assert evaluation["inversion"]["few_pairs"] is False
