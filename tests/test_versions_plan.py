"""The plan record: writing, reading, hash checks and the training-step estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_dsl.errors import PlanMismatchError, TraceError
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.triage.verdict import Category, Verdict
from trace_dsl.versions.plan import (
    Plan,
    category_counts,
    estimate_steps,
    planned_verdicts,
    read_plan,
    verdicts_hash,
    verify_plan,
    write_plan,
)

MODEL = {"name": "smollm2", "resolved": "/models/smollm2", "revision": None}


def make_verdicts() -> list[Verdict]:
    return [
        Verdict("a", Category.INVERT, False, True, ("r1",), (), "h1"),
        Verdict("b", Category.RETAIN, True, False, (), ("r1",), "h1"),
        Verdict("c", Category.SUPPRESS, False, False, ("r1",), ("r2",), "h1"),
        Verdict("d", Category.ERROR, None, None, (), (), "h1", error="judge timed out"),
    ]


def make_plan(verdicts: list[Verdict] | None = None) -> Plan:
    verdicts = verdicts if verdicts is not None else make_verdicts()
    return Plan(
        policy={"ref": "policy.tp", "hash": "h1"},
        dataset={"path": "data.jsonl", "hash": "d1", "pairs": len(verdicts)},
        model=MODEL,
        config=TrainingConfig().model_dump(),
        counts=category_counts(verdicts),
        expensive=[],
        training=estimate_steps(verdicts, TrainingConfig()).to_dict(),
        verdicts=tuple(verdicts),
    )


def test_plan_round_trip(tmp_path: Path):
    plan = make_plan()
    path = write_plan(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema_version"] == 1
    assert data["counts"] == {"invert": 1, "suppress": 1, "retain": 1, "error": 1}
    assert data["verdicts_hash"] == verdicts_hash(make_verdicts())
    assert read_plan(path) == plan
    assert not (tmp_path / "plan.json.partial").exists()


def test_verdicts_hash_depends_on_order_and_content():
    verdicts = make_verdicts()
    assert verdicts_hash(verdicts) != verdicts_hash(list(reversed(verdicts)))
    edited = [Verdict("a", Category.RETAIN, True, True, (), (), "h1")] + verdicts[1:]
    assert verdicts_hash(verdicts) != verdicts_hash(edited)


def test_edited_plan_file_rejected(tmp_path: Path):
    path = write_plan(make_plan(), tmp_path / "plan.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["verdicts"][0]["category"] = "retain"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PlanMismatchError, match="edited after `trace plan`"):
        read_plan(path)


def test_unknown_schema_version_rejected(tmp_path: Path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema_version": 99}), encoding="utf-8")
    with pytest.raises(PlanMismatchError, match="schema_version 99 is not supported"):
        read_plan(path)


def test_plan_file_missing_or_not_json(tmp_path: Path):
    with pytest.raises(TraceError, match="plan file not found"):
        read_plan(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{\n  oops", encoding="utf-8")
    with pytest.raises(TraceError, match=r"broken.json:2:3: plan file is not valid JSON"):
        read_plan(broken)


def test_verify_plan_accepts_match():
    verify_plan(make_plan(), policy_hash="h1", dataset_hash="d1", model={"resolved": "/models/smollm2", "revision": None})


@pytest.mark.parametrize(
    ("policy_hash", "dataset_hash", "model", "expected"),
    [
        ("h2", "d1", MODEL, "policy hash: planned h1, now h2 (the policy was edited)"),
        ("h1", "d2", MODEL, "dataset hash: planned d1, now d2 (the data changed)"),
        ("h1", "d1", {"resolved": "Qwen/Qwen2.5-7B-Instruct", "revision": "abc"}, "model resolved: planned /models/smollm2"),
    ],
)
def test_verify_plan_mismatch(policy_hash, dataset_hash, model, expected):
    with pytest.raises(PlanMismatchError) as info:
        verify_plan(make_plan(), policy_hash=policy_hash, dataset_hash=dataset_hash, model=model, source="plan.json")
    assert expected in str(info.value)
    assert info.value.code == "TR010"
    assert "trace plan" in str(info.value)


def test_verify_plan_lists_every_mismatch():
    with pytest.raises(PlanMismatchError) as info:
        verify_plan(make_plan(), policy_hash="h2", dataset_hash="d2", model={"resolved": "x", "revision": "main"})
    message = str(info.value)
    assert "policy hash" in message
    assert "dataset hash" in message
    assert "model resolved" in message
    assert "model revision" in message


def test_planned_verdicts_follow_data_order():
    plan = make_plan()
    ordered = planned_verdicts(plan, ["d", "c", "b", "a"])
    assert [v.pair_id for v in ordered] == ["d", "c", "b", "a"]


def test_planned_verdicts_reject_other_pairs():
    with pytest.raises(PlanMismatchError, match="1 pairs without a verdict, 1 planned pairs not in the data"):
        planned_verdicts(make_plan(), ["a", "b", "c", "z"])


def test_estimate_steps_epochs():
    verdicts = [Verdict(f"r{i}", Category.RETAIN, True, None) for i in range(103)]
    verdicts += [Verdict(f"i{i}", Category.INVERT, False, True) for i in range(10)]
    verdicts.append(Verdict("err", Category.ERROR, None, None))
    config = TrainingConfig(per_device_batch_size=2, gradient_accumulation_steps=4, epochs=2.0, heldout_fraction=0.2)
    estimate = estimate_steps(verdicts, config)
    # Held out per category: round(0.2 * 103) = 21 retain and round(0.2 * 10) = 2 invert.
    # 82 + 8 = 90 training pairs: ceil(90 / 2) = 45 batches, 45 // 4 = 11 steps per epoch.
    assert estimate.pairs == 113
    assert estimate.heldout_pairs == 23
    assert estimate.train_pairs == 90
    assert estimate.train_counts == {"invert": 8, "suppress": 0, "retain": 82}
    assert estimate.steps == 22


def test_estimate_steps_per_category_batching():
    verdicts = [Verdict(f"r{i}", Category.RETAIN, True, None) for i in range(50)]
    verdicts += [Verdict(f"i{i}", Category.INVERT, False, True) for i in range(10)]
    config = TrainingConfig(batching="per-category", heldout_fraction=0.0, gradient_accumulation_steps=1)
    # The largest category sets the epoch: 50 retain pairs at one per batch.
    assert estimate_steps(verdicts, config).steps == 50


def test_estimate_matches_trainer_rule():
    from trace_dsl.runtime.trainer import optimiser_steps

    class Sizes:
        """The two things `optimiser_steps` reads of an encoded dataset."""

        def __init__(self, counts: dict[Category, int]) -> None:
            self.counts = counts

        def __len__(self) -> int:
            return sum(self.counts.values())

        def category_indices(self) -> dict[Category, list[int]]:
            return {category: list(range(n)) for category, n in self.counts.items()}

    verdicts = [Verdict(f"r{i}", Category.RETAIN, True, None) for i in range(37)]
    verdicts += [Verdict(f"s{i}", Category.SUPPRESS, False, False) for i in range(11)]
    for batching in ("mixed", "per-category"):
        config = TrainingConfig(batching=batching, per_device_batch_size=3, gradient_accumulation_steps=2, epochs=1.5)
        estimate = estimate_steps(verdicts, config)
        counts = {Category(name): n for name, n in estimate.train_counts.items() if n}
        assert estimate.steps == optimiser_steps(config, Sizes(counts))


def test_estimate_steps_max_steps_wins():
    verdicts = [Verdict(str(i), Category.RETAIN, True, None) for i in range(10)]
    assert estimate_steps(verdicts, TrainingConfig(max_steps=7)).steps == 7
