"""`trace apply`: triage the data with a policy, score the conflicts, train the adapter.

The stages, each writing into the run directory (see `trace_dsl.runtime.rundir`):

1. load the preference pairs and triage them with the compiled policy (`triage.jsonl`);
2. reject pairs whose verdict is `error` (or drop them on request), split off a seeded,
   per-category held-out set for `trace eval` (`split.json`);
3. resolve and load the model and wrap it with a LoRA adapter (peft);
4. compute the alignment impact scores of the conflict pairs, or reuse the saved ones when the
   policy, data, model and impact settings are unchanged (`impact_scores.jsonl`);
5. train with the hybrid objective (`metrics.jsonl`, checkpoints), save the adapter in
   safetensors (and a merged model on request), and write the report.

`--dry-run` stops after stage 4 and prints what training would do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pydantic import ValidationError

from trace_dsl.errors import ConfigurationError, ModelResolutionError, RunDirectoryError, TrainingDataError
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.rundir import RunDirectory, package_versions, read_jsonl, utc_now, write_json, write_jsonl
from trace_dsl.triage.verdict import Category, Verdict

logger = logging.getLogger(__name__)

SPLIT_SCHEMA_VERSION = 1


# --- Configuration ------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """Parse a `--set` value as JSON (numbers, booleans, null, lists), else return the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(
    path: Path | None = None, overrides: Sequence[str] = (), *, base: Mapping[str, Any] | None = None
) -> TrainingConfig:
    """Build the effective `TrainingConfig` from a file and `key=value` overrides.

    Args:
        path: a JSON or YAML file of settings (nested objects for `lora` and `impact`), or None.
        overrides: `key=value` strings; dotted keys reach nested settings (`lora.r=8`) and values
            are read as JSON when they parse (`impact.enabled=false`), else as strings.
        base: settings the file and overrides apply on top of (a resumed run's configuration).

    Raises:
        ConfigurationError: the file cannot be read or parsed, an override has no `=`, or the
            result fails validation (the message names the setting).
    """
    settings: dict[str, Any] = json.loads(json.dumps(dict(base or {})))
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read configuration file {path}: {exc.strerror}") from None
        try:
            if Path(path).suffix.lower() in (".yaml", ".yml"):
                import yaml

                try:
                    loaded = yaml.safe_load(text) or {}
                except yaml.YAMLError as exc:
                    # YAMLError is not a ValueError; its message names the line and column.
                    raise ValueError(str(exc)) from None
            else:
                loaded = json.loads(text)
        except (json.JSONDecodeError, ValueError) as exc:
            raise ConfigurationError(f"{path}: invalid configuration file ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"{path}: expected an object of settings at the top level")
        _merge(settings, loaded)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"invalid --set {override!r}", hint="write it as key=value, for example --set lora.r=8")
        target = settings
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigurationError(f"invalid --set {override!r}: {part} is not a group of settings")
        target[parts[-1]] = _parse_value(value)
    try:
        return TrainingConfig(**settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc']) or 'config'}: {error['msg']}" for error in exc.errors())
        raise ConfigurationError(
            f"invalid training configuration: {problems}",
            hint='--set reads a value as JSON when it parses, so write a list as lora.target_modules=\'["q_proj","v_proj"]\' '
            "and a switch as impact.enabled=false",
        ) from None


def _merge(target: dict[str, Any], source: Mapping[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


# --- Held-out split ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """The seeded held-out split of a run: pair ids used for training and kept for evaluation."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    seed: int
    fraction: float

    def to_dict(self, categories: Mapping[str, Category]) -> dict[str, Any]:
        """Return the `split.json` document, with the count of each category in each part."""

        def counts(ids: Sequence[str]) -> dict[str, int]:
            counter = Counter(categories[pair_id].value for pair_id in ids)
            return {category.value: counter.get(category.value, 0) for category in Category}

        return {
            "schema_version": SPLIT_SCHEMA_VERSION,
            "seed": self.seed,
            "heldout_fraction": self.fraction,
            "counts": {"train": counts(self.train), "heldout": counts(self.heldout)},
            "train": list(self.train),
            "heldout": list(self.heldout),
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "Split":
        """Read a `split.json` document."""
        return cls(tuple(document["train"]), tuple(document["heldout"]), int(document["seed"]), float(document["heldout_fraction"]))


def heldout_split(verdicts: Sequence[Verdict], fraction: float, seed: int) -> Split:
    """Split pairs into training and held-out sets, per category, reproducibly from `seed`.

    Each category keeps round(fraction * size) pairs out, at least one when the category has two
    pairs or more and `fraction` is positive, so every category the data has appears in both
    parts. Within a category the order is a seeded shuffle of the pair ids, independent of the
    file order.
    """
    import random

    groups: dict[Category, list[str]] = {}
    for verdict in verdicts:
        groups.setdefault(verdict.category, []).append(verdict.pair_id)
    train: list[str] = []
    heldout: list[str] = []
    for category in Category:
        ids = sorted(groups.get(category, []))
        random.Random(f"{seed}:{category.value}").shuffle(ids)
        keep_out = round(fraction * len(ids))
        if fraction > 0 and len(ids) >= 2:
            keep_out = max(1, keep_out)
        keep_out = min(keep_out, len(ids) - 1) if len(ids) >= 2 else 0
        heldout.extend(ids[:keep_out])
        train.extend(ids[keep_out:])
    return Split(tuple(train), tuple(heldout), seed, fraction)


# --- Impact-score reuse ---------------------------------------------------------------------------


def impact_key(policy_hash: str, pairs_hash: str, model: Mapping[str, Any], config: TrainingConfig, train_ids: Sequence[str]) -> dict[str, Any]:
    """Return the inputs the impact scores depend on.

    Saved scores are reused only when this key is unchanged.
    """
    return {
        "policy_hash": policy_hash,
        "pairs_hash": pairs_hash,
        "model": {key: model.get(key) for key in ("id", "path", "revision")},
        "impact": config.impact.model_dump(),
        "beta": config.beta,
        "inversion_loss": config.inversion_loss,
        "max_length": config.max_length,
        "lora": config.lora.model_dump(),
        "seed": config.seed,
        "train_hash": hashlib.sha256("\n".join(train_ids).encode("ascii")).hexdigest()[:16],
    }


# --- The request and its result -------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyRequest:
    """Parameters of one `trace apply` run.

    Attributes:
        policy: the `.tp` policy file.
        model: a model name, alias or folder (`trace_dsl.models.resolve_model`).
        data: a preference-data file or dataset id.
        output: the run directory.
        config: the effective training configuration.
        data_format: the data format, None to detect it.
        limit: read at most this many pairs.
        skip_invalid: skip malformed rows (each is logged by the loader) instead of stopping.
        dry_run: stop after triage and impact scores.
        overwrite: replace an existing run directory.
        resume: continue an interrupted run from its last checkpoint.
        merge: also save the adapter merged into the base model.
        drop_errors: leave out pairs whose verdict is `error` instead of stopping.
        command_line: the command as typed, for the manifest.
        progress: draw progress bars on stderr.
        plan: a plan file from `trace plan`, whose verdicts are trained instead of a new triage
            once the policy, data and model are checked against it.
    """

    policy: Path
    model: str
    data: str
    output: Path
    config: TrainingConfig = field(default_factory=TrainingConfig)
    data_format: str | None = None
    limit: int | None = None
    skip_invalid: bool = False
    dry_run: bool = False
    overwrite: bool = False
    resume: bool = False
    merge: bool = False
    drop_errors: bool = False
    command_line: tuple[str, ...] = ()
    progress: bool = True
    plan: Path | None = None


@dataclass(frozen=True)
class ApplyResult:
    """Outcome of one `trace apply` run.

    Attributes:
        run: the run directory.
        counts: pairs per category over all the data.
        split_counts: pairs per category in the `train` and `heldout` parts.
        steps: optimiser steps of training (planned for a dry run).
        estimated_seconds: the estimated training time (dry run only).
        impact_reused: whether saved impact scores were reused.
        status: 'completed' or 'dry-run'.
        seconds: wall time of the whole command.
    """

    run: RunDirectory
    counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    steps: int
    estimated_seconds: float | None
    impact_reused: bool
    status: str
    seconds: float


# --- Stages ----------------------------------------------------------------------------------------


def _load_pairs(request: ApplyRequest) -> list[Any]:
    from trace_dsl.data import load_pairs

    result = load_pairs(request.data, format=request.data_format, limit=request.limit, skip_invalid=request.skip_invalid)
    for skipped in result.skipped:
        logger.warning("skipped %s: %s", skipped.location, skipped.reason)
    pairs = unique_pairs(result.pairs)
    if len(pairs) < len(result.pairs):
        logger.warning("left out %d pairs of %s that repeat an earlier pair", len(result.pairs) - len(pairs), request.data)
    if not pairs:
        raise TrainingDataError(f"{request.data}: no preference pairs were read", hint="check the file and --data-format")
    return pairs


def unique_pairs(pairs: Sequence[Any]) -> list[Any]:
    """Return `pairs` without the repeats of an earlier pair id, in order.

    Verdicts, the held-out split and impact scores are keyed by pair id, so a repeated pair would
    otherwise land in both the training and the held-out part.
    """
    seen: set[str] = set()
    unique = []
    for pair in pairs:
        if pair.id not in seen:
            seen.add(pair.id)
            unique.append(pair)
    return unique


def triage_with_cache(policy: Any, pairs: Sequence[Any], *, progress: bool) -> list[Verdict]:
    """Triage pairs, with expensive predicate results in the global content-keyed cache.

    The cache (`trace_dsl.triage.cache.default_cache_path()`) is shared by every command and run,
    so re-triage after a policy edit recomputes only the predicates that changed. A policy
    without expensive predicates opens no cache.
    """
    from trace_dsl.triage.engine import triage

    if not policy.models:
        return list(triage(policy, pairs, progress=progress))
    from trace_dsl.triage.cache import ResultCache, default_cache_path

    with ResultCache(default_cache_path()) as cache:
        return list(triage(policy, pairs, cache=cache, progress=progress))


def _triage(request: ApplyRequest, pairs: Sequence[Any], dataset_hash: str = "") -> tuple[Any, list[Verdict]]:
    from trace_dsl.compiler.policy import load_policy

    policy = load_policy(request.policy)
    if request.plan is not None:
        from trace_dsl.versions.plan import apply_plan

        # The reviewed verdicts, or PlanMismatchError when the policy, data or model moved.
        pair_ids = [pair.id for pair in pairs]
        verdicts = apply_plan(
            request.plan, policy_hash=policy.hash, dataset_hash=dataset_hash, model_name=request.model, pair_ids=pair_ids
        )
        return policy, verdicts
    return policy, triage_with_cache(policy, pairs, progress=request.progress)


def _check_errors(request: ApplyRequest, verdicts: Sequence[Verdict]) -> list[Verdict]:
    """Stop on `error` verdicts, or leave them out when `drop_errors` is set."""
    errors = [verdict for verdict in verdicts if verdict.category is Category.ERROR]
    if not errors:
        return list(verdicts)
    first = errors[0]
    reason = f"first: pair {first.pair_id}: {first.error or 'no reason recorded'}"
    explain = f"see why with `trace explain {request.policy} --data {request.data} --pair {first.pair_id}`"
    if request.drop_errors and len(errors) < len(verdicts):
        logger.warning("left out %d pairs whose verdict is error (--drop-errors)", len(errors))
        return [verdict for verdict in verdicts if verdict.category is not Category.ERROR]
    if request.drop_errors:
        raise TrainingDataError(
            f"every one of the {len(verdicts)} pairs has verdict 'error', so --drop-errors leaves nothing to train on; {reason}",
            hint=f"{explain}, and fix the policy or its judge",
        )
    raise TrainingDataError(
        f"{len(errors)} of {len(verdicts)} pairs have verdict 'error' (compliance could not be decided); {reason}",
        hint=f"{explain}, fix the policy or its judge, or pass --drop-errors to train without them",
    )


def _resolve_model(name: str) -> Any:
    """Resolve a model alias, folder or Hugging Face id without loading its weights."""
    from trace_dsl.models import resolve_model

    return resolve_model(name)


def _load_model(request: ApplyRequest) -> tuple[Any, Any, Any]:
    """Resolve and load the model and tokenizer; any loading failure is a `ModelResolutionError`."""
    from trace_dsl.models import load_model_and_tokenizer

    resolved = _resolve_model(request.model)
    try:
        model, tokenizer = load_model_and_tokenizer(resolved)
    except ModelResolutionError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers, safetensors and model code raise many types
        raise ModelResolutionError(
            f"model {request.model!r} could not be loaded from {resolved.path}: {type(exc).__name__}: {exc}",
            hint="check that the folder contains a complete transformers causal language model",
        ) from None
    return resolved, model, tokenizer


def _wrap_lora(model: Any, config: TrainingConfig, resolved: Any) -> tuple[Any, list[str]]:
    """Add a fresh LoRA adapter, seeded, on the configured or the model alias's target modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    targets = list(config.lora.target_modules or resolved.lora_target_modules)
    set_seed(config.seed)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora), targets
    except ValueError as exc:
        raise ModelResolutionError(
            f"cannot add a LoRA adapter on modules {targets}: {exc}",
            hint="set lora.target_modules to module names of this model, for example --set 'lora.target_modules=[\"q_proj\",\"v_proj\"]'",
        ) from None


def _impact_scores(
    request: ApplyRequest,
    run: RunDirectory,
    model: Any,
    tokenizer: Any,
    train_pairs: Sequence[Any],
    train_verdicts: Sequence[Verdict],
    key: Mapping[str, Any],
    previous_key: Mapping[str, Any] | None,
) -> tuple[dict[str, float], dict[tuple[str, str], float], bool, dict[str, Any]]:
    """Impact scores and reference log-probabilities of the conflict pairs, reused when the key matches.

    Returns the L1-normalised scores, the reference log-probabilities, whether they were reused,
    and the timings of the computation.
    """
    config = request.config
    conflicts = [v for v in train_verdicts if v.category in (Category.INVERT, Category.SUPPRESS)]
    if previous_key == key and run.impact_scores.exists():
        scores, references = {}, {}
        for row in read_jsonl(run.impact_scores):
            scores[row["pair_id"]] = row["score"]
            references[(row["pair_id"], "chosen")] = row["ref_logprob_chosen"]
            references[(row["pair_id"], "rejected")] = row["ref_logprob_rejected"]
        if set(scores) == {v.pair_id for v in conflicts}:
            logger.info("reusing %d impact scores from %s", len(scores), run.impact_scores)
            return scores, references, True, {}

    from trace_dsl.runtime.impact import compute_impact_scores

    result = compute_impact_scores(model, tokenizer, list(train_pairs), list(train_verdicts), config, progress=request.progress)
    rows = []
    for verdict in conflicts:
        pair_id = verdict.pair_id
        rows.append(
            {
                "pair_id": pair_id,
                "category": verdict.category.value,
                "score": result.scores.get(pair_id, 0.0),
                "raw": _raw_score(result.raw, pair_id),
                "ref_logprob_chosen": result.ref_logprobs.get((pair_id, "chosen")),
                "ref_logprob_rejected": result.ref_logprobs.get((pair_id, "rejected")),
            }
        )
    write_jsonl(run.impact_scores, rows)
    timings = {**result.timings, "method": result.method}
    return dict(result.scores), dict(result.ref_logprobs), False, timings


def _raw_score(raw: Any, pair_id: str) -> float | None:
    if isinstance(raw, Mapping):
        value = raw.get(pair_id)
        return float(value) if value is not None else None
    return None


def _estimate_step_seconds(trainer: Any, batches: int = 3) -> float:
    """Time forward and backward passes of the first training batches; gradients are cleared after.

    The first pass pays one-off costs (allocator growth, kernel selection), so the estimate is
    the mean of the passes after it.
    """
    import torch

    model = trainer.model
    model.train()
    timings = []
    for _, batch in zip(range(batches), trainer.get_train_dataloader()):
        batch = trainer._prepare_inputs(batch)
        started = time.perf_counter()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        timings.append(time.perf_counter() - started)
    seconds = sum(timings[1:]) / len(timings[1:]) if len(timings) > 1 else timings[0]
    model.zero_grad(set_to_none=True)
    trainer._term_sums.zero_()
    trainer._term_count = 0
    torch.manual_seed(trainer.args.seed)
    return seconds


# --- The command -------------------------------------------------------------------------------------


def apply_policy(request: ApplyRequest, *, console: Any = None) -> ApplyResult:
    """Run `trace apply` as `request` specifies and return its outcome.

    Every stage writes into the run directory as soon as it is done. The manifest's `status`
    records how far the run got ('running', 'dry-run', 'completed', 'failed', 'interrupted').

    Raises:
        RunDirectoryError: the run directory exists (without overwrite or resume).
        TrainingDataError: no pairs, pairs in error, or no conflict pair to train on.
        ModelResolutionError: the model cannot be resolved or loaded.
        ConfigurationError: the configuration is invalid.
    """
    started = time.perf_counter()
    if not request.resume:
        request = _with_absolute_paths(request)
    run = RunDirectory(Path(request.output))
    previous = run.read_manifest() if (request.resume or request.overwrite) and run.manifest.exists() else {}
    created = False
    if request.resume:
        run.prepare(resume=True)
        previous = run.read_manifest()
        if previous.get("status") == "completed" and (run.adapter / "adapter_model.safetensors").exists():
            # Resuming from the final checkpoint would train one step past max_steps.
            raise RunDirectoryError(
                f"run {run.root} is already completed; there is nothing to resume",
                hint=f"measure it with `trace eval {run.root}`, or pass --overwrite instead of --resume to train it again",
            )
        _check_resume_inputs(request, previous)
        request = _resumed_request(request, previous)
    else:
        # A model name that resolves to nothing fails here, before the run directory exists, so
        # the corrected command does not need --overwrite.
        _resolve_model(request.model)
        created = not run.root.exists()
        run.prepare(overwrite=request.overwrite)

    config = request.config
    run.update_manifest(
        status="running",
        started_at=utc_now(),
        ended_at=None,
        command_line=list(request.command_line),
        seed=config.seed,
        config=config.model_dump(),
        packages=package_versions(),
        policy={"path": str(request.policy)},
        data={"path": str(request.data), "format": request.data_format, "limit": request.limit, "skip_invalid": request.skip_invalid},
        model={"name": request.model},
        options={"dry_run": request.dry_run, "merge": request.merge, "drop_errors": request.drop_errors, "resume": request.resume, "plan": str(request.plan) if request.plan else None},
    )
    try:
        with _terminate_as_interrupt():
            result = _run_stages(request, run, previous, console)
    except KeyboardInterrupt:
        run.update_manifest(status="interrupted", ended_at=utc_now())
        if console is not None:
            console.print(f"run {run.root} interrupted; repeat the command with --resume to continue it", markup=False)
        raise
    except BaseException as exc:
        if created and [path.name for path in run.root.iterdir()] == [run.manifest.name]:
            # Nothing was computed (a bad policy, data file or plan): leave no directory behind
            # that the corrected command would need --overwrite for.
            shutil.rmtree(run.root)
            raise
        run.update_manifest(status="failed", ended_at=utc_now(), error=f"{type(exc).__name__}: {exc}")
        raise
    seconds = time.perf_counter() - started
    run.update_manifest(status=result.status, ended_at=utc_now(), wall_seconds=round(seconds, 1))
    return ApplyResult(**{**result.__dict__, "seconds": seconds})


def _absolute(value: Any) -> Any:
    """Return a path that exists made absolute, of the same type; anything else unchanged."""
    if value is None or not Path(value).expanduser().exists():
        return value
    resolved = Path(value).expanduser().resolve()
    return resolved if isinstance(value, Path) else str(resolved)


def _with_absolute_paths(request: ApplyRequest) -> ApplyRequest:
    """Return `request` with its local policy, data, model and plan paths made absolute.

    The manifest records these paths, and `trace eval` and `--resume` read them back, possibly
    from another working directory. Dataset ids and model aliases are left as they are.
    """
    return replace(
        request,
        policy=_absolute(request.policy),
        data=_absolute(request.data),
        model=_absolute(request.model),
        plan=_absolute(request.plan),
    )


def _check_resume_inputs(request: ApplyRequest, manifest: Mapping[str, Any]) -> None:
    """Raise when `--resume` names another policy, data or model than the run it continues.

    A resumed run always continues with its recorded inputs, so a different one on the command
    line would otherwise be ignored without a word.
    """
    recorded = {
        "policy": manifest.get("policy", {}).get("path"),
        "data": manifest.get("data", {}).get("path"),
        "model": manifest.get("model", {}).get("name"),
    }
    given = {"policy": request.policy, "data": request.data, "model": request.model}
    changed = [
        f"{name} {str(_absolute(given[name]))!r} (the run has {str(_absolute(recorded[name]))!r})"
        for name in given
        if recorded[name] is not None and str(_absolute(given[name])) != str(_absolute(recorded[name]))
    ]
    if changed:
        raise ConfigurationError(
            f"--resume continues {request.output} with its recorded inputs, but the command names another {'; '.join(changed)}",
            hint="repeat the run's own policy, data and model to resume it, or start a new run with another -o",
        )


def resume_setting_changes(manifest: Mapping[str, Any], path: Path | None, overrides: Sequence[str]) -> list[str]:
    """Return the settings that `path` and `overrides` would change in a run being resumed.

    Each entry reads `key: recorded -> new`. A resumed run keeps its recorded configuration,
    so `trace apply --resume` refuses options that would change it instead of ignoring them.
    """
    recorded = manifest.get("config", {})
    wanted = _flatten(load_config(path, overrides, base=recorded).model_dump())
    current = _flatten(load_config(base=recorded).model_dump())
    return [f"{key}: {current.get(key)!r} -> {value!r}" for key, value in wanted.items() if current.get(key) != value]


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a job scheduler, `timeout`, `docker stop`) like Ctrl-C while the block runs.

    Python's default SIGTERM action ends the process at once, so the manifest would still read
    'running'. Raised as KeyboardInterrupt, it marks the run 'interrupted' first.
    """
    if threading.current_thread() is not threading.main_thread():
        # Signal handlers can only be set from the main thread.
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resumed_request(request: ApplyRequest, manifest: Mapping[str, Any]) -> ApplyRequest:
    """Rebuild the request of the run being resumed.

    Its recorded configuration, policy, data and model take precedence over the new request.
    """
    config = load_config(base=manifest.get("config", {}))
    data = manifest.get("data", {})
    return ApplyRequest(
        policy=Path(manifest.get("policy", {}).get("path", request.policy)),
        model=manifest.get("model", {}).get("name", request.model),
        data=data.get("path", request.data),
        output=request.output,
        config=config,
        data_format=data.get("format"),
        limit=data.get("limit"),
        skip_invalid=data.get("skip_invalid", False),
        dry_run=False,
        overwrite=False,
        resume=True,
        merge=request.merge or manifest.get("options", {}).get("merge", False),
        drop_errors=manifest.get("options", {}).get("drop_errors", request.drop_errors),
        plan=request.plan or (Path(manifest["options"]["plan"]) if manifest.get("options", {}).get("plan") else None),
        command_line=request.command_line,
        progress=request.progress,
    )


def _run_stages(request: ApplyRequest, run: RunDirectory, previous: Mapping[str, Any], console: Any) -> ApplyResult:
    from accelerate import PartialState

    from trace_dsl.data import dataset_hash, pairs_hash
    from trace_dsl.runtime.report import verdict_counts, write_report
    from trace_dsl.runtime.trainer import EncodedItems, build_trainer, build_training_items, fill_reference_logprobs, optimiser_steps, scale_weights

    state = PartialState()
    config = request.config

    # 1. Data and triage.
    pairs = _load_pairs(request)
    data_hash = pairs_hash(pairs)
    file_hash = dataset_hash(request.data, pairs)
    policy, verdicts = _triage(request, pairs, file_hash)
    policy_hash = getattr(policy, "hash", "")
    if state.is_main_process:
        write_jsonl(run.triage, (verdict.to_dict() for verdict in verdicts))
    counts = verdict_counts(verdicts)
    run.update_manifest(
        policy={"path": str(request.policy), "hash": policy_hash},
        data={"path": str(request.data), "format": request.data_format, "limit": request.limit, "skip_invalid": request.skip_invalid, "hash": file_hash, "pairs_hash": data_hash, "pairs": len(pairs)},
        counts=counts,
    )

    # 2. Errors and the held-out split.
    usable = _check_errors(request, verdicts)
    categories = {verdict.pair_id: verdict.category for verdict in usable}
    split = heldout_split(usable, config.heldout_fraction, config.seed)
    split_document = split.to_dict(categories)
    if state.is_main_process:
        write_json(run.split, split_document)
    train_ids = set(split.train)
    train_pairs = [pair for pair in pairs if pair.id in train_ids]
    train_verdicts = [verdict for verdict in usable if verdict.pair_id in train_ids]
    conflicts = [v for v in train_verdicts if v.category in (Category.INVERT, Category.SUPPRESS)]
    if not conflicts:
        raise TrainingDataError(
            f"no INVERT or SUPPRESS pair to train on: the policy finds no conflict in the {len(train_verdicts)} training pairs "
            f"({', '.join(f'{name} {count}' for name, count in counts.items() if count)})",
            hint=f"check the verdicts with `trace triage {request.policy} --data {request.data}`; "
            "if the new policy agrees with the old labels there is nothing to re-align",
        )

    # 3. Model and adapter.
    resolved, model, tokenizer = _load_model(request)
    model, targets = _wrap_lora(model, config, resolved)
    model_record = {
        "name": request.model,
        "id": resolved.hf_id or str(resolved.path),
        "path": str(resolved.path) if resolved.path else None,
        "revision": resolved.revision,
        "kind": resolved.kind,
        "lora_target_modules": targets,
    }
    run.update_manifest(model=model_record)

    # 4. Impact scores.
    key = impact_key(policy_hash, data_hash, model_record, config, sorted(train_ids))
    scores, references, reused, timings = _impact_scores(
        request, run, model, tokenizer, train_pairs, train_verdicts, key, previous.get("impact", {}).get("key")
    )
    run.update_manifest(impact={"key": key, "reused": reused, "timings": timings, "scored": len(scores)})

    corrected = None
    if config.suppress_mode == "corrected":
        from trace_dsl.runtime.generate import corrected_responses

        suppress = [pair for pair in train_pairs if categories[pair.id] is Category.SUPPRESS]
        corrected = corrected_responses(suppress, config, policy=policy, progress=request.progress)
        failed = sum(1 for value in corrected.values() if not value)
        run.update_manifest(corrected={"generator": config.generator, "generated": len(corrected) - failed, "fell_back_to_npo": failed})

    weights = scale_weights(scores, config)
    items = build_training_items(train_pairs, categories, weights, ref_logprobs=references, corrected=corrected)
    items = fill_reference_logprobs(model, tokenizer, items, max_length=config.max_length, batch_size=config.impact.batch_size)
    dataset = EncodedItems(items, tokenizer, max_length=config.max_length)
    steps = optimiser_steps(config, dataset, processes=state.num_processes)
    if config.warmup_steps >= steps:
        # The warmup is linear, so a short run (--max-steps 2 with the default warmup of 100)
        # would train at a tiny fraction of the learning rate and barely change the model.
        logger.warning(
            "warmup_steps %d is not below the %d optimiser steps, so the learning rate peaks at %.2g instead of %g; "
            "lower it for a short run, for example --set warmup_steps=%d",
            config.warmup_steps, steps, config.learning_rate * steps / max(config.warmup_steps, 1), config.learning_rate, steps // 10,
        )
    trainer = build_trainer(
        model, tokenizer, dataset, config, run.checkpoints, metrics_path=run.metrics, progress=request.progress, console=console
    )

    if request.dry_run:
        micro_seconds = _estimate_step_seconds(trainer)
        estimate = micro_seconds * config.gradient_accumulation_steps * steps
        run.update_manifest(training_plan={"steps": steps, "estimated_seconds": round(estimate, 1), "micro_batch_seconds": round(micro_seconds, 3)})
        return ApplyResult(run, counts, split_document["counts"], steps, estimate, reused, "dry-run", 0.0)

    # 5. Training, adapter, report.
    checkpoint = run.last_checkpoint() if request.resume else None
    if checkpoint is not None and state.is_main_process:
        _truncate_metrics(run, int(checkpoint.name.split("-")[1]))
    elif state.is_main_process and run.metrics.exists():
        run.metrics.unlink()
    state.wait_for_everyone()
    train_started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - train_started

    if state.is_main_process:
        model.save_pretrained(run.adapter, safe_serialization=True)
        tokenizer.save_pretrained(run.adapter)
        if request.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(run.merged, safe_serialization=True)
            tokenizer.save_pretrained(run.merged)
        manifest = run.update_manifest(training={"steps": trainer.state.global_step, "seconds": round(train_seconds, 1), "resumed_from": str(checkpoint) if checkpoint else None})
        metrics = list(read_jsonl(run.metrics)) if run.metrics.exists() else []
        # The report is the last file written, so it states the final status and end time.
        write_report(run.root, {**manifest, "status": "completed", "ended_at": utc_now()}, verdicts, split_document["counts"], metrics)
    state.wait_for_everyone()
    return ApplyResult(run, counts, split_document["counts"], trainer.state.global_step, None, reused, "completed", 0.0)


def _truncate_metrics(run: RunDirectory, step: int) -> None:
    """Keep the metric rows up to `step`: rows logged after the checkpoint are logged again on resume."""
    if run.metrics.exists():
        rows = [row for row in read_jsonl(run.metrics) if row.get("step", 0) <= step]
        write_jsonl(run.metrics, rows)


def describe_plan(result: ApplyResult, config: TrainingConfig) -> list[str]:
    """Describe what training would do, one line per item, for `--dry-run`."""
    train = result.split_counts["train"]
    lines = [
        "training would use "
        + ", ".join(f"{train.get(name, 0)} {name}" for name in ("invert", "suppress", "retain"))
        + f" pairs ({sum(result.split_counts['heldout'].values())} held out for `trace eval`)",
        f"{result.steps} optimiser steps of {config.per_device_batch_size} x {config.gradient_accumulation_steps} "
        f"(batching {config.batching}), max_length {config.max_length}, learning rate {config.learning_rate}",
    ]
    if result.estimated_seconds is not None:
        minutes = result.estimated_seconds / 60
        lines.append(f"estimated training time {minutes:.1f} min (from timed micro-batches)")
    lines.append(f"impact scores {'reused' if result.impact_reused else 'computed'}: {result.run.impact_scores}")
    return lines


def format_duration(seconds: float) -> str:
    """`seconds` as '12.3 s' or '4 min 05 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = math.floor(seconds / 60)
    return f"{minutes} min {seconds - 60 * minutes:04.1f} s"
