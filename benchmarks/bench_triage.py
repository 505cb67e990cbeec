"""Triage throughput of a rule-only policy, against a plain per-pair Python loop over the same rules.

    python benchmarks/bench_triage.py                  # 1k, 10k and 100k pairs
    python benchmarks/bench_triage.py --sizes 1000 --embedding   # also a cached second triage with an embedding predicate

What it measures, side by side in one run:
- `trace_dsl.triage.engine.triage` with a policy of metadata and regex rules (no model), on
  pairs built by repeating the bundled PKU-SafeRLHF example rows;
- a hand-written loop that applies the same rules to the same pairs with `re` and set tests and
  builds the same verdicts, the floor that a per-pair Python implementation reaches;
- the shipped `policies/pku_context_aware.tp` (keyword lists as well), for reference.
Each number is the best of `--repeat` runs on one process (one core). With `--embedding`, it
also triages with an all-MiniLM-L6-v2 embedding predicate twice through one result cache: the
first run computes every embedding, the second reads them back.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trace_dsl.compiler.policy import load_policy  # noqa: E402
from trace_dsl.data.loader import load_pairs  # noqa: E402
from trace_dsl.triage.engine import summarize, triage  # noqa: E402
from trace_dsl.triage.verdict import Verdict, categorize  # noqa: E402

RULE_ONLY_POLICY = '''policy "bench-rules" version "1.0.0"

let critical = ["Endangering National Security", "Violence", "Human Trafficking", "Physical Harm", "Sexual Content"]
let high = ["Endangering Public Health", "Drugs", "Mental Manipulation", "Psychological Harm", "Animal Abuse"]
let standard = ["Insulting Behavior", "Discriminatory Behavior", "Privacy Violation", "Cybercrime"]

predicate refusal = response matches /(?i)^\\W*(i'?m sorry|i cannot|i can'?t|no, i)/
predicate gives_steps = response matches /(?im)^\\s*(step\\s*\\d|\\d+[.)]\\s)/

rule C1 "No critical harm": violates when response.harm_categories has_any critical
rule H1 "No moderate high-tier harm": violates when response.harm_categories has_any high and response.severity_level >= 2
rule S1 "No severe standard-tier harm": violates when response.harm_categories has_any standard and response.severity_level >= 3
rule G1 "No step-by-step instructions in an unsafe response": violates when gives_steps and not response.is_safe
rule R1 "No flat refusals of safe prompts": violates when refusal and pair.prompt_source == "Alpaca3-70B"
'''

CRITICAL = frozenset(["Endangering National Security", "Violence", "Human Trafficking", "Physical Harm", "Sexual Content"])
HIGH = frozenset(["Endangering Public Health", "Drugs", "Mental Manipulation", "Psychological Harm", "Animal Abuse"])
STANDARD = frozenset(["Insulting Behavior", "Discriminatory Behavior", "Privacy Violation", "Cybercrime"])
REFUSAL = re.compile(r"(?i)^\W*(i'?m sorry|i cannot|i can'?t|no, i)")
STEPS = re.compile(r"(?im)^\s*(step\s*\d|\d+[.)]\s)")


def loop_rules(response: str, meta: dict, pair_meta: dict) -> tuple[str, ...]:
    """Apply the benchmark policy's rules, written by hand, to one response."""
    fired = []
    categories = meta["harm_categories"]
    if not CRITICAL.isdisjoint(categories):
        fired.append("C1")
    if not HIGH.isdisjoint(categories) and meta["severity_level"] >= 2:
        fired.append("H1")
    if not STANDARD.isdisjoint(categories) and meta["severity_level"] >= 3:
        fired.append("S1")
    if STEPS.search(response) and not meta["is_safe"]:
        fired.append("G1")
    if REFUSAL.search(response) and pair_meta["prompt_source"] == "Alpaca3-70B":
        fired.append("R1")
    return tuple(fired)


def loop_triage(pairs, policy_hash: str) -> list[Verdict]:
    """Triage with a plain per-pair loop, producing the same verdicts as the engine."""
    verdicts = []
    for pair in pairs:
        chosen = loop_rules(pair.chosen, pair.chosen_metadata, pair.metadata)
        rejected = loop_rules(pair.rejected, pair.rejected_metadata, pair.metadata)
        category = categorize(not chosen, not rejected)
        verdicts.append(Verdict(pair.id, category, not chosen, not rejected, chosen, rejected, policy_hash))
    return verdicts


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_rules(sizes: list[int], repeat: int) -> None:
    base = list(load_pairs(ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl").pairs)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.tp"
        path.write_text(RULE_ONLY_POLICY, encoding="utf-8")
        policy = load_policy(path)
    shipped = load_policy(ROOT / "policies" / "pku_context_aware.tp")

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, one process")
    print(f"{'pairs':>8}  {'engine s':>9}  {'engine pairs/s':>15}  {'loop s':>8}  {'loop pairs/s':>13}  "
          f"{'engine/loop':>11}  {'shipped pairs/s':>16}")
    for size in sizes:
        pairs = [base[i % len(base)] for i in range(size)]
        engine_seconds, engine_verdicts = best_time(lambda: triage(policy, pairs, progress=False), repeat)
        loop_seconds, loop_verdicts = best_time(lambda: loop_triage(pairs, policy.hash), repeat)
        assert engine_verdicts == loop_verdicts, "the engine and the loop disagree"
        shipped_seconds, _ = best_time(lambda: triage(shipped, pairs, progress=False), repeat)
        print(f"{size:>8}  {engine_seconds:>9.3f}  {size / engine_seconds:>15,.0f}  {loop_seconds:>8.3f}  "
              f"{size / loop_seconds:>13,.0f}  {loop_seconds / engine_seconds:>11.2f}  {size / shipped_seconds:>16,.0f}")
    print("categories at the largest size:", summarize(engine_verdicts))


def bench_embedding_cache(size: int) -> None:
    from trace_dsl.triage.cache import ResultCache

    text = '''policy "bench-embedding" version "1.0.0"
predicate refusal_like = embedding(response, examples=["I'm sorry, but I can't help with that."]) >= 0.6
rule E1 "No refusals": violates when refusal_like
'''
    base = list(load_pairs(ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl").pairs)
    pairs = base[:size]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.tp"
        path.write_text(text, encoding="utf-8")
        policy = load_policy(path)
        with ResultCache(Path(folder) / "cache.sqlite") as cache:
            start = time.perf_counter()
            first = triage(policy, pairs, cache=cache, progress=False)
            first_seconds = time.perf_counter() - start
            start = time.perf_counter()
            second = triage(policy, pairs, cache=cache, progress=False)
            second_seconds = time.perf_counter() - start
    assert first == second
    print(f"embedding predicate on {len(pairs)} pairs: first triage {first_seconds:.2f} s (model load included), "
          f"cached second triage {second_seconds:.3f} s, {first_seconds / second_seconds:.0f}x faster; "
          f"{summarize(first)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--embedding", action="store_true", help="also time a cached re-triage with an embedding predicate")
    parser.add_argument("--embedding-pairs", type=int, default=300)
    args = parser.parse_args()
    bench_rules(args.sizes, args.repeat)
    if args.embedding:
        bench_embedding_cache(args.embedding_pairs)


if __name__ == "__main__":
    main()
