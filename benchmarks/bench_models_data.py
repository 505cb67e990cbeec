"""SmolLM2 load paths side by side, and preference-data loading throughput.

    python benchmarks/bench_models_data.py [--repeats 3]

Measures, on this machine:

- convert: `ensure_converted` into an empty cache folder, once: loading the packaged GGUF file
  (dequantised to float32), copying its weights into a plain model, checking their logits
  agree and saving the folder;
- gguf load: `from_pretrained(folder, gguf_file=...)` for model and tokenizer, the path that
  every run would pay without the conversion cache (best of --repeats);
- cached load: `load_model_and_tokenizer("smollm2")` from the converted folder (best of --repeats);
- data: `load_pairs` over the two shipped examples, pairs per second (best of --repeats).

Reported: seconds for each, and the ratio gguf load / cached load measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def best_of(repeats: int, action) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions of each load; the best is reported.")
    args = parser.parse_args()

    cache = tempfile.mkdtemp(prefix="trace-bench-cache-")
    os.environ["TRACE_CACHE_DIR"] = cache
    try:
        run(args.repeats)
    finally:
        # The converted folder is 0.54 GB; it was only needed for the timing.
        shutil.rmtree(cache, ignore_errors=True)


def run(repeats: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trace_dsl.data import load_pairs
    from trace_dsl.models import ensure_converted, load_model_and_tokenizer, resolve_model
    from trace_dsl.models.smollm2 import packaged_gguf_path

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    # --- SmolLM2 ---------------------------------------------------------------------------------
    resolved = resolve_model("smollm2")
    started = time.perf_counter()
    ensure_converted(resolved)
    convert_seconds = time.perf_counter() - started

    gguf = packaged_gguf_path(resolved.packaged, resolved.gguf_file)

    def load_gguf() -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    gguf_seconds = best_of(repeats, load_gguf)
    cached_seconds = best_of(repeats, lambda: load_model_and_tokenizer(resolved, device="cpu"))

    print(f"convert (once)   {convert_seconds:7.2f} s")
    print(f"gguf load        {gguf_seconds:7.2f} s  (best of {repeats})")
    print(f"cached load      {cached_seconds:7.2f} s  (best of {repeats})")
    print(f"ratio gguf/cached {gguf_seconds / cached_seconds:6.1f}x")

    # --- Data ------------------------------------------------------------------------------------
    examples = [
        (ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl", {}),
        (ROOT / "examples" / "hh-rlhf" / "harmless-test-head.jsonl.gz", {"skip_invalid": True}),
    ]
    for path, options in examples:
        result = load_pairs(path, **options)
        seconds = best_of(repeats, lambda: load_pairs(path, **options))
        print(f"load_pairs {path.name:<32} {len(result.pairs):5d} pairs  {seconds * 1000:7.1f} ms  "
              f"{len(result.pairs) / seconds:9.0f} pairs/s")


if __name__ == "__main__":
    main()
