"""One training step of the hybrid TRACE trainer against TRL's DPOTrainer, side by side.

    python benchmarks/bench_train_step.py [--pairs 4] [--max-length 128] [--steps 3]

Measures, with SmolLM2-135M-Instruct, LoRA r 32 / alpha 16 / dropout 0.1 on q_proj and v_proj,
the same preference pairs (the first --pairs rows of examples/pku-saferlhf/pairs.jsonl), batch
size --pairs, one gradient-accumulation step and the same --max-length:

- trl:        `trl.DPOTrainer`, sigmoid loss, beta 0.3; its reference is the base with the
              adapter disabled, run at every step (TRL's default, precompute_ref_log_probs=False);
- trl-precomputed: the same with precompute_ref_log_probs=True (reference log-probs computed
              once before training, as `trace apply` does);
- trace:      `HybridTrainer` on the same pairs triaged as invert, suppress, retain, invert, ...
              so the step computes all three terms, the KL one included; reference log-probs of
              conflict pairs computed once before training, as `trace apply` does;
- trace-copy: the same, but the reference is a second, frozen copy of the model in memory
              (the reference code's setup), to show what the adapter-disabled reference saves.

All setups run in float32 without gradient checkpointing (TRL's defaults, bf16 and checkpointing,
are switched off). Each setup runs in its own process, so peak memory is not shared. Reported per setup: median
seconds per optimiser step over --steps steps after one warm-up step, the resident set size
(RSS) before training, and the peak RSS during the steps (sampled every 2 ms with psutil; torch's
CPU allocator is not visible to tracemalloc). Ratios are trace / trl.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl"
SETUPS = ("trl", "trl-precomputed", "trace", "trace-copy")


# --- Measurement helpers ---------------------------------------------------------------------


class PeakRss:
    """Sample this process's RSS in a background thread and keep the maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def step_timer():
    """A Trainer callback that records the wall time of each optimiser step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def rss_mb() -> float:
    """Measure the current RSS in MiB, after handing freed heap pages back to the system.

    Setup work (loading, reference passes) leaves freed memory in glibc's heap; trimming it in
    every setup makes the 'before' figures comparable.
    """
    import ctypes
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


# --- Setups ----------------------------------------------------------------------------------


def load_pairs(count: int):
    from trace_dsl.data import load_pairs as load

    return list(load(DATA, limit=count).pairs)


def smollm2_folder() -> Path:
    from trace_dsl.models import ensure_converted, resolve_model

    return ensure_converted(resolve_model("smollm2"))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=32, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def run_trl(args, workdir: Path, *, precompute: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    pairs = load_pairs(args.pairs)
    rows = [{"prompt": p.messages(), "chosen": [{"role": "assistant", "content": p.chosen}], "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    dataset = Dataset.from_list(rows * (args.steps + 1))
    config = DPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        beta=0.3,
        loss_type=["sigmoid"],
        learning_rate=1e-4,
        max_steps=args.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        precompute_ref_log_probs=precompute,
        # TRL 1.16 defaults to bf16 and gradient checkpointing; both setups run float32 without
        # checkpointing, as the hybrid trainer does, so the same work is measured.
        bf16=False,
        gradient_checkpointing=False,
    )
    timer = step_timer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(), callbacks=[timer])
    before = rss_mb()
    with PeakRss() as peak:
        trainer.train()
    return {"step_seconds": statistics.median(timer.seconds[1:]), "rss_before_mb": before, "peak_rss_mb": peak.peak / 2**20}


def run_trace(args, workdir: Path, *, reference_copy: bool) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trace_dsl.runtime.trainer as trainer_module
    from trace_dsl.runtime import logprobs as lp
    from trace_dsl.runtime.config import TrainingConfig
    from trace_dsl.runtime.trainer import EncodedItems, build_trainer, build_training_items, fill_reference_logprobs, scale_weights
    from trace_dsl.triage.verdict import Category

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder)
    frozen_copy = None
    if reference_copy:
        frozen_copy = copy.deepcopy(base).eval()
        for parameter in frozen_copy.parameters():
            parameter.requires_grad_(False)
    model = get_peft_model(base, lora_config())

    if frozen_copy is not None:
        import torch

        def copy_reference_logits(_model, batch):
            with torch.no_grad():
                return lp.response_token_logits(frozen_copy, batch)

        def copy_reference_logprobs(_model, batch):
            with torch.no_grad():
                return lp.sequence_logprobs(frozen_copy, batch)

        trainer_module.reference_response_logits = copy_reference_logits
        trainer_module.reference_logprobs = copy_reference_logprobs

    pairs = load_pairs(args.pairs)
    cycle = [Category.INVERT, Category.SUPPRESS, Category.RETAIN]
    categories = {pair.id: cycle[i % 3] for i, pair in enumerate(pairs)}
    config = TrainingConfig(
        per_device_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        max_steps=args.steps + 1,
        warmup_steps=0,
        save_steps=10_000,
    )
    conflicts = [pid for pid, c in categories.items() if c is not Category.RETAIN]
    weights = scale_weights({pid: 1.0 / len(conflicts) for pid in conflicts}, config)
    items = build_training_items(pairs * (args.steps + 1), {**categories}, weights)
    items = fill_reference_logprobs(model, tokenizer, items[: len(pairs)], max_length=config.max_length) * (args.steps + 1)
    dataset = EncodedItems(items, tokenizer, max_length=config.max_length)
    trainer = build_trainer(model, tokenizer, dataset, config, workdir / "trace", progress=False)
    timer = step_timer()
    trainer.add_callback(timer)
    before = rss_mb()
    with PeakRss() as peak:
        trainer.train()
    return {"step_seconds": statistics.median(timer.seconds[1:]), "rss_before_mb": before, "peak_rss_mb": peak.peak / 2**20}


# --- Driver ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per batch")
    parser.add_argument("--max-length", type=int, default=128, help="maximum tokens of prompt plus response")
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps after one warm-up step")
    parser.add_argument("--setup", choices=SETUPS, help="run one setup in this process and print its JSON (internal)")
    args = parser.parse_args()

    if args.setup:
        import tempfile

        import torch

        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as workdir:
            if args.setup.startswith("trl"):
                result = run_trl(args, Path(workdir), precompute=args.setup == "trl-precomputed")
            else:
                result = run_trace(args, Path(workdir), reference_copy=args.setup == "trace-copy")
        print("RESULT " + json.dumps(result))
        return

    results = {}
    for setup in SETUPS:
        command = [sys.executable, __file__, "--setup", setup, "--pairs", str(args.pairs), "--max-length", str(args.max_length), "--steps", str(args.steps)]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            print(output.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"setup {setup} failed with exit code {output.returncode}")
        results[setup] = json.loads(lines[-1][len("RESULT "):])

    print(f"SmolLM2-135M-Instruct, LoRA r32 q_proj/v_proj, batch {args.pairs} pairs, max_length {args.max_length}, {args.steps} timed steps")
    print(f"{'setup':<16} {'s/step':>8} {'RSS before MB':>14} {'peak RSS MB':>12} {'peak-before MB':>15}")
    for setup, row in results.items():
        print(f"{setup:<16} {row['step_seconds']:>8.3f} {row['rss_before_mb']:>14.0f} {row['peak_rss_mb']:>12.0f} {row['peak_rss_mb'] - row['rss_before_mb']:>15.0f}")
    trl, trace, trace_copy = results["trl"], results["trace"], results["trace-copy"]
    precomputed = results["trl-precomputed"]
    print(f"step time trace / trl: {trace['step_seconds'] / trl['step_seconds']:.2f}x (target <= 1.25x)")
    print(f"step time trace / trl-precomputed: {trace['step_seconds'] / precomputed['step_seconds']:.2f}x")
    print(f"peak RSS trace / trl: {trace['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x (target <= 1.00x)")
    print(f"peak RSS trace / trl-precomputed: {trace['peak_rss_mb'] / precomputed['peak_rss_mb']:.2f}x")
    print(f"peak RSS trace / trace-copy: {trace['peak_rss_mb'] / trace_copy['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
