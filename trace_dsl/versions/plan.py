"""The plan record: what a policy version will train on, fixed before training starts.

`trace plan` writes a plan after triage and review. `trace apply --plan` trains exactly the
verdicts it contains, and only while the policy content hash, the dataset hash and the resolved
model still match the recorded ones. Everything a reviewer needs is in the one JSON file:
counts per category, flips against a previous version, expensive-predicate calls needed versus
cached, an estimate of training steps, and the verdicts with their hash.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from trace_dsl.errors import PlanMismatchError, TraceError
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.triage.verdict import Category, Verdict

PLAN_SCHEMA_VERSION = 1


def verdicts_hash(verdicts: Sequence[Verdict]) -> str:
    """Return the SHA-256 of the verdicts, in order, as canonical JSON lines."""
    digest = hashlib.sha256()
    for verdict in verdicts:
        line = json.dumps(verdict.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def category_counts(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Return the number of verdicts per category, every category present (zero included)."""
    counts = {c.value: 0 for c in (Category.INVERT, Category.SUPPRESS, Category.RETAIN, Category.ERROR)}
    for verdict in verdicts:
        counts[verdict.category.value] += 1
    return counts


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """How much training a plan implies, for one process.

    Attributes:
        pairs: trainable pairs (every category but error).
        train_pairs: pairs left for training after the held-out split.
        heldout_pairs: pairs kept out for `trace eval`.
        train_counts: training pairs per category.
        steps: optimiser steps (`max_steps` when set, else epochs over the training pairs).
    """

    pairs: int
    train_pairs: int
    heldout_pairs: int
    train_counts: Mapping[str, int]
    steps: int

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return {
            "pairs": self.pairs,
            "train_pairs": self.train_pairs,
            "heldout_pairs": self.heldout_pairs,
            "train_counts": dict(self.train_counts),
            "steps": self.steps,
        }


def estimate_steps(verdicts: Sequence[Verdict], config: TrainingConfig, *, processes: int = 1) -> StepEstimate:
    """Estimate the optimiser steps `trace apply` will run on these verdicts.

    Pairs in error are left out, as `trace apply --drop-errors` does. The rest is split with the
    same seeded per-category held-out split as `trace apply`. The step count follows the
    trainer's rule: batches per epoch over the training pairs (per category with per-category
    batching), divided among `processes`, then by gradient accumulation, times epochs.
    """
    from trace_dsl.runtime.apply import heldout_split

    usable = [v for v in verdicts if v.category is not Category.ERROR]
    split = heldout_split(usable, config.heldout_fraction, config.seed)
    by_id = {v.pair_id: v.category for v in usable}
    train_counts = {c.value: 0 for c in (Category.INVERT, Category.SUPPRESS, Category.RETAIN)}
    for pair_id in split.train:
        train_counts[by_id[pair_id].value] += 1

    if config.max_steps is not None:
        steps = config.max_steps
    elif not split.train:
        steps = 0
    else:
        if config.batching == "per-category":
            batches = max(math.ceil(n / config.per_device_batch_size) for n in train_counts.values() if n)
        else:
            batches = math.ceil(len(split.train) / config.per_device_batch_size)
        batches = math.ceil(batches / processes)
        steps = math.ceil(max(1, batches // config.gradient_accumulation_steps) * config.epochs)
    return StepEstimate(
        pairs=len(usable),
        train_pairs=len(split.train),
        heldout_pairs=len(split.heldout),
        train_counts=train_counts,
        steps=steps,
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """A reviewed triage, bound to the exact policy, data and model it was made for.

    Attributes:
        policy: `{"ref": what the user gave, "hash": the compiled policy's content hash}`.
        dataset: `{"path": ..., "hash": ..., "pairs": number of pairs}`.
        model: `{"name": as given, "resolved": model id or folder, "revision": or None}`, or
            `None` when the plan was made without a model.
        config: the effective `TrainingConfig` as a dict.
        counts: verdicts per category.
        expensive: per expensive predicate, the calls the triage needed and how many the cache held.
        training: the `StepEstimate` as a dict.
        verdicts: every verdict, in dataset order.
        flips: the flip matrix against a previous policy version, with its ref and hash, or `None`.
        created_at: UTC time of writing, ISO 8601.
    """

    policy: Mapping[str, Any]
    dataset: Mapping[str, Any]
    model: Mapping[str, Any] | None
    config: Mapping[str, Any]
    counts: Mapping[str, int]
    expensive: Sequence[Mapping[str, Any]]
    training: Mapping[str, int]
    verdicts: tuple[Verdict, ...]
    flips: Mapping[str, Any] | None = None
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def verdicts_hash(self) -> str:
        """The SHA-256 of the verdicts (see `verdicts_hash`)."""
        return verdicts_hash(self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as a JSON-ready dict with `schema_version` (`Plan.from_dict` reverses it)."""
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "created_at": self.created_at,
            "policy": dict(self.policy),
            "dataset": dict(self.dataset),
            "model": dict(self.model) if self.model is not None else None,
            "config": dict(self.config),
            "counts": dict(self.counts),
            "flips": dict(self.flips) if self.flips is not None else None,
            "expensive": [dict(e) for e in self.expensive],
            "training": dict(self.training),
            "verdicts_hash": self.verdicts_hash,
            "verdicts": [v.to_dict() for v in self.verdicts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "plan") -> "Plan":
        """Rebuild a plan and check its schema version and verdicts hash.

        Raises:
            PlanMismatchError: the schema version is unknown, a field is missing, or the
                verdicts no longer match their recorded hash (the file was edited).
        """
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise PlanMismatchError(
                f"{source}: plan schema_version {version!r} is not supported (expected {PLAN_SCHEMA_VERSION})",
                hint="write the plan again with this version's `trace plan`",
            )
        try:
            plan = cls(
                policy=data["policy"],
                dataset=data["dataset"],
                model=data.get("model"),
                config=data["config"],
                counts=data["counts"],
                expensive=data.get("expensive") or [],
                training=data["training"],
                verdicts=tuple(Verdict.from_dict(row) for row in data["verdicts"]),
                flips=data.get("flips"),
                created_at=data.get("created_at", ""),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise PlanMismatchError(
                f"{source}: invalid plan file: {exc!r}", hint="write the plan again with `trace plan`"
            ) from None
        if plan.verdicts_hash != data.get("verdicts_hash"):
            raise PlanMismatchError(
                f"{source}: the verdicts do not match the plan's verdicts_hash (the file was edited after `trace plan`)",
                hint="write the plan again with `trace plan` instead of editing it",
            )
        return plan


def write_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan as indented JSON, through a temporary file so a crash leaves no half plan."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(plan.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(target)
    return target


def read_plan(path: str | Path) -> Plan:
    """Read and check a plan file written by `write_plan`.

    Raises:
        TraceError: the file is missing or not JSON.
        PlanMismatchError: see `Plan.from_dict`.
    """
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"plan file not found: {source}", hint="write one with `trace plan POLICY --data DATA -o plan.json`") from None
    except json.JSONDecodeError as exc:
        raise TraceError(f"{source}:{exc.lineno}:{exc.colno}: plan file is not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise TraceError(f"{source}: plan file must hold a JSON object")
    return Plan.from_dict(data, source=str(source))


def verify_plan(
    plan: Plan,
    *,
    policy_hash: str,
    dataset_hash: str,
    model: Mapping[str, Any] | None = None,
    source: str = "plan",
) -> None:
    """Check that the policy, data and model at hand are the ones the plan was made for.

    Args:
        plan: the plan read from disk.
        policy_hash: content hash of the policy about to be applied.
        dataset_hash: hash of the dataset about to be trained on.
        model: `{"resolved": ..., "revision": ...}` of the model about to be trained; compared
            with the plan's model when both are given. A plan made without a model accepts any.
        source: the plan's file name, for the message.

    Raises:
        PlanMismatchError: listing every field that differs, with the planned and current value.
    """
    problems: list[str] = []
    if plan.policy.get("hash") != policy_hash:
        problems.append(f"policy hash: planned {plan.policy.get('hash')}, now {policy_hash} (the policy was edited)")
    if plan.dataset.get("hash") != dataset_hash:
        problems.append(f"dataset hash: planned {plan.dataset.get('hash')}, now {dataset_hash} (the data changed)")
    if plan.model is not None and model is not None:
        for key in ("resolved", "revision"):
            planned, current = plan.model.get(key), model.get(key)
            if planned != current:
                problems.append(f"model {key}: planned {planned}, now {current}")
    if problems:
        raise PlanMismatchError(
            f"{source} does not match what is being applied: " + "; ".join(problems),
            hint="review the change and write a new plan with `trace plan`, or apply the planned policy, data and model",
        )


def planned_verdicts(plan: Plan, pair_ids: Sequence[str]) -> list[Verdict]:
    """Return the plan's verdicts in the order of `pair_ids` (the dataset being trained on).

    Raises:
        PlanMismatchError: a pair has no planned verdict, or the plan contains verdicts for pairs
            that are not in the data.
    """
    by_id = {v.pair_id: v for v in plan.verdicts}
    missing = [pid for pid in pair_ids if pid not in by_id]
    extra = by_id.keys() - set(pair_ids)
    if missing or extra:
        raise PlanMismatchError(
            f"the plan's verdicts cover different pairs than the data ({len(missing)} pairs without a verdict, "
            f"{len(extra)} planned pairs not in the data)",
            hint="write a new plan with `trace plan` for this data",
        )
    return [by_id[pid] for pid in pair_ids]


def model_identity(name: str) -> dict[str, Any]:
    """Resolve a model name offline and return what a plan records of it.

    `resolved` is the Hugging Face id, or the local folder when there is none, as `trace apply`
    records it in the run manifest.

    Raises:
        ModelResolutionError: the name resolves to nothing.
    """
    from trace_dsl.models import resolve_model

    resolved = resolve_model(name)
    return {
        "name": name,
        "resolved": resolved.hf_id or (str(resolved.path) if resolved.path else None),
        "revision": resolved.revision,
        "kind": resolved.kind,
    }


def apply_plan(
    path: str | Path, *, policy_hash: str, dataset_hash: str, model_name: str, pair_ids: Sequence[str]
) -> list[Verdict]:
    """Read a plan for `trace apply --plan`, check it, and return its verdicts in data order.

    Args:
        path: the plan file written by `trace plan`.
        policy_hash: content hash of the policy being applied.
        dataset_hash: `trace_dsl.data.dataset_hash` of the data being trained on.
        model_name: the model argument of `trace apply`, resolved offline for the comparison.
        pair_ids: the ids of the loaded pairs, in order.

    Raises:
        PlanMismatchError: the plan file was edited, or the policy, data, model or set of pairs
            differs from the plan's.
    """
    plan = read_plan(path)
    verify_plan(
        plan, policy_hash=policy_hash, dataset_hash=dataset_hash, model=model_identity(model_name), source=str(path)
    )
    return planned_verdicts(plan, pair_ids)
