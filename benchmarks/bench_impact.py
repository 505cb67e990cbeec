"""Impact scores: the batched directional method against the per-response backward loop.

    python benchmarks/bench_impact.py                      # 64 conflict pairs, max length 256
    python benchmarks/bench_impact.py --pairs 8 --max-length 128   # a quick check

On SmolLM2-135M-Instruct (through `trace_dsl.models`) with a fresh LoRA adapter (r 32, alpha 16,
dropout 0.1, q_proj and v_proj) and real PKU-SafeRLHF pairs, it measures side by side, in one
process:

- forward: one plain forward pass over the conflict responses without gradients (length-sorted,
  packed, the same batch size): a lower bound for any method that must look at every response;
- gold gradient: g_J over the gold batch, which both methods share;
- loop: one backward pass per response and a dot product with g_J (the reference code's way);
- directional: per-example scalars and one backward pass per batch, packed and padded;

and reports the wall time of each, and the maximum relative difference of the raw scores and
the normalised scores between the directional methods and the loop. The pairs are built from the
PKU-SafeRLHF sample with the more helpful response (`better_response_id`) as chosen, the old
policy, and the dataset's safety flags as the new policy's compliance, which yields INVERT pairs
(the helpful response is unsafe, the other safe) and SUPPRESS pairs (both unsafe). The first
`--pairs` conflicts are scored, INVERT first; every RETAIN pair is available to the gold batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trace_dsl.data.records import PreferencePair  # noqa: E402
from trace_dsl.models import load_model_and_tokenizer, resolve_model  # noqa: E402
from trace_dsl.runtime.config import TrainingConfig  # noqa: E402
from trace_dsl.runtime.impact import (  # noqa: E402
    build_gold_batch,
    conflict_examples,
    directional_derivatives_batched,
    directional_derivatives_loop,
    gold_gradient,
    normalise_scores,
    raw_impact_scores,
)
from trace_dsl.runtime.logprobs import pack, sequence_logprobs  # noqa: E402
from trace_dsl.triage.verdict import Category, Verdict  # noqa: E402

SAMPLE = REPO / "examples" / "pku-saferlhf" / "pairs.jsonl"


def load_triaged_pairs(path: Path) -> tuple[list[PreferencePair], list[Verdict]]:
    """Pairs with the better response as chosen, and verdicts from the safety flags."""
    pairs, verdicts = [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            row = json.loads(line)
            better = row.get("better_response_id")
            if better not in (0, 1):
                continue
            pair = PreferencePair.create(
                row["prompt"], row[f"response_{better}"], row[f"response_{1 - better}"], source=f"{path.name}:{line_number}"
            )
            chosen_safe, rejected_safe = bool(row[f"is_response_{better}_safe"]), bool(row[f"is_response_{1 - better}_safe"])
            if chosen_safe:
                category = Category.RETAIN
            else:
                category = Category.INVERT if rejected_safe else Category.SUPPRESS
            pairs.append(pair)
            verdicts.append(Verdict(pair.id, category, chosen_safe, rejected_safe))
    return pairs, verdicts


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def forward_only(model, tokenizer, examples, batch_size: int) -> None:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]), reverse=True)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            sequence_logprobs(model, pack([examples[i] for i in order[start:start + batch_size]]))


def max_relative_difference(expected: dict[str, float], actual: dict[str, float]) -> tuple[float, float]:
    """Maximum of |a - e| / |e| over non-zero e, and maximum of |a - e| / max |e|."""
    largest = max(abs(v) for v in expected.values()) or 1.0
    relative = [abs(actual[k] - v) / abs(v) for k, v in expected.items() if v != 0]
    scaled = [abs(actual[k] - v) / largest for k, v in expected.items()]
    return max(relative, default=0.0), max(scaled, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="conflict pairs to score")
    parser.add_argument("--max-length", type=int, default=256, help="maximum tokens of prompt plus response")
    parser.add_argument("--batch-size", type=int, default=4, help="responses per forward pass")
    parser.add_argument("--gold-batch-size", type=int, default=64, help="pairs in the gold batch")
    parser.add_argument("--model", default="smollm2", help="model name or alias")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    sample = SAMPLE
    all_pairs, all_verdicts = load_triaged_pairs(sample)
    category_of = {v.pair_id: v.category for v in all_verdicts}
    invert = [p for p in all_pairs if category_of[p.id] == Category.INVERT]
    suppress = [p for p in all_pairs if category_of[p.id] == Category.SUPPRESS]
    retain = [p for p in all_pairs if category_of[p.id] == Category.RETAIN]
    conflicts = (invert + suppress)[: args.pairs]
    scored_invert = [p for p in conflicts if category_of[p.id] == Category.INVERT]
    scored_suppress = [p for p in conflicts if category_of[p.id] == Category.SUPPRESS]
    pairs = retain + conflicts

    config = TrainingConfig(
        max_length=args.max_length,
        impact={"gold_batch_size": args.gold_batch_size, "batch_size": args.batch_size},
    )
    base, tokenizer = load_model_and_tokenizer(resolve_model(args.model), dtype="float32", device="cpu")
    lora = LoraConfig(r=32, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora).eval()

    examples, keys = conflict_examples(tokenizer, conflicts, config.max_length)
    tokens = sum(len(e) for e in examples)
    response_tokens = sum(e.response_length for e in examples)
    gold = build_gold_batch(pairs, all_verdicts, config.impact.gold_batch_size, config.seed)
    print(
        f"{len(conflicts)} conflict pairs ({len(scored_invert)} invert, {len(scored_suppress)} suppress), "
        f"{len(examples)} responses, {tokens} tokens ({response_tokens} response tokens), gold batch {len(gold)}",
        file=sys.stderr,
    )

    direction, gold_seconds = timed(gold_gradient, model, tokenizer, gold, config, layout="padded")
    print(f"gold gradient: {gold_seconds:.1f} s", file=sys.stderr)

    # The machine may be shared, so the methods take turns on the same slices of responses
    # (longest first) and their times are summed: a busy spell slows all of them alike.
    batch_size = config.impact.batch_size
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]), reverse=True)
    rounds = [order[start:start + 2 * batch_size] for start in range(0, len(order), 2 * batch_size)]
    methods = {
        "forward": lambda chunk: forward_only(model, tokenizer, chunk, batch_size),
        "directional-packed": lambda chunk: directional_derivatives_batched(
            model, tokenizer, chunk, direction, batch_size=batch_size, layout="packed"
        ),
        "directional-padded": lambda chunk: directional_derivatives_batched(
            model, tokenizer, chunk, direction, batch_size=batch_size, layout="padded"
        ),
        "loop": lambda chunk: directional_derivatives_loop(model, tokenizer, chunk, direction),
    }
    # One untimed call each on the two shortest responses pays one-time costs (kernel selection,
    # lazy initialisation) outside the timings.
    for run in methods.values():
        run([examples[i] for i in order[-2:]])
    wall = {name: 0.0 for name in methods}
    cpu = {name: 0.0 for name in methods}
    outputs = {name: (torch.zeros(len(examples), dtype=torch.float64), torch.zeros(len(examples), dtype=torch.float64)) for name in methods}
    names = list(methods)
    for round_index, indices in enumerate(rounds):
        chunk = [examples[i] for i in indices]
        # Rotate the order so no method always runs first (cold caches) or last.
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            output = methods[name](chunk)
            wall[name] += time.perf_counter() - wall_started
            cpu[name] += time.process_time() - cpu_started
            if output is not None:
                outputs[name][0][indices] = output[0]
                outputs[name][1][indices] = output[1]
        print(f"round {round_index + 1}/{len(rounds)}: " + ", ".join(f"{n} {wall[n]:.0f} s" for n in names), file=sys.stderr)

    results = {}
    for name in names[1:]:
        derivatives, logprobs = outputs[name]
        derivative_map = {key: float(value) for key, value in zip(keys, derivatives)}
        raw = raw_impact_scores(scored_invert, scored_suppress, derivative_map, config)
        results[name] = {"seconds": wall[name], "raw": raw, "scores": normalise_scores(raw), "logprobs": logprobs}
    forward_seconds = wall["forward"]

    loop = results["loop"]
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": args.model,
        "conflict_pairs": len(conflicts),
        "responses": len(examples),
        "tokens": tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "gold_batch": len(gold),
        "forward_s": round(forward_seconds, 2),
        "cpu_s": {name: round(value, 2) for name, value in cpu.items()},
        "gold_gradient_s": round(gold_seconds, 2),
        "positive_scores": sum(v > 0 for v in loop["raw"].values()),
    }
    for name in ("directional-packed", "directional-padded", "loop"):
        result = results[name]
        report[f"{name}_s"] = round(result["seconds"], 2)
        report[f"{name}_over_forward"] = round(result["seconds"] / forward_seconds, 2)
        if name != "loop":
            raw_relative, raw_scaled = max_relative_difference(loop["raw"], result["raw"])
            score_relative, _ = max_relative_difference(
                {k: v for k, v in loop["scores"].items() if v > 0}, result["scores"]
            )
            report[f"{name}_speedup_over_loop"] = round(loop["seconds"] / result["seconds"], 2)
            report[f"{name}_raw_max_rel_diff"] = raw_relative
            report[f"{name}_raw_max_diff_over_largest"] = raw_scaled
            report[f"{name}_score_max_rel_diff"] = score_relative
            report[f"{name}_logprob_max_abs_diff"] = float((result["logprobs"] - loop["logprobs"]).abs().max())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
