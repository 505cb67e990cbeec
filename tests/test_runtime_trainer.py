"""The hybrid trainer on a tiny random Llama: which parameters move, what is logged, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import sample_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_dsl.runtime import logprobs as lp
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.losses import dual_npo_loss, inversion_loss, token_kl
from trace_dsl.runtime.trainer import (
    EncodedItems,
    HybridCollator,
    PerCategorySampler,
    SeededShuffleSampler,
    build_trainer,
    build_training_items,
    fill_reference_logprobs,
    hybrid_loss,
    optimiser_steps,
    scale_weights,
)
from trace_dsl.triage.verdict import Category

MAX_LENGTH = 48
CATEGORIES = [Category.INVERT, Category.SUPPRESS, Category.RETAIN] * 2


def _config(**overrides) -> TrainingConfig:
    settings = dict(
        max_length=MAX_LENGTH,
        learning_rate=5e-3,
        warmup_steps=0,
        per_device_batch_size=2,
        gradient_accumulation_steps=1,
        save_steps=100,
        lr_scheduler="constant",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


def _peft_model(model_dir, config: TrainingConfig):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(base, lora)
    # LoRA starts with B = 0; a random B makes the policy differ from the reference, so
    # every term has a non-trivial value and gradient.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def _dataset(model, tokenizer, config: TrainingConfig, n_pairs: int = 6) -> EncodedItems:
    pairs = sample_pairs(n_pairs)
    categories = {pair.id: CATEGORIES[i % len(CATEGORIES)] for i, pair in enumerate(pairs)}
    conflict_ids = [pair.id for pair in pairs if categories[pair.id] is not Category.RETAIN]
    scores = {pair_id: (i + 1) / sum(range(1, len(conflict_ids) + 1)) for i, pair_id in enumerate(conflict_ids)}
    items = build_training_items(pairs, categories, scale_weights(scores, config))
    items = fill_reference_logprobs(model, tokenizer, items, max_length=config.max_length)
    return EncodedItems(items, tokenizer, max_length=config.max_length)


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_training_changes_lora_only(tiny_model_dir, tokenizer, tmp_path):
    config = _config(max_steps=3)
    model = _peft_model(tiny_model_dir, config)
    dataset = _dataset(model, tokenizer, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    trainer = build_trainer(model, tokenizer, dataset, config, tmp_path / "checkpoints", progress=False)
    trainer.train()

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        if parameter.requires_grad:
            assert changed, f"trainable parameter {name} did not change"
        else:
            assert not changed, f"frozen parameter {name} changed"


def _direct_terms(model, tokenizer, dataset: EncodedItems, config: TrainingConfig) -> dict[str, float]:
    """The loss terms of a batch of every item, computed item by item without the collator."""
    inversion = npo = kl = 0.0
    with torch.no_grad():
        for item in dataset.items:
            batch = lp.encode_and_collate(tokenizer, [(item.messages, text) for text in item.sequences()], config.max_length)
            if item.objective == "kl":
                policy = lp.response_token_logits(model, batch)
                with model.disable_adapter():
                    reference = lp.response_token_logits(model, batch)
                kl += config.alpha_kl * token_kl(reference.logits, policy.logits, policy.mask).item()
                continue
            first, second = lp.sequence_logprobs(model, batch).tolist()
            ref = (torch.tensor([item.ref_first]), torch.tensor([item.ref_second]))
            if item.objective == "inversion":
                loss = inversion_loss(torch.tensor([first]), torch.tensor([second]), *ref, config.beta, config.inversion_loss)
                inversion += item.weight * loss.item()
            else:
                loss = dual_npo_loss(torch.tensor([first]), ref[0], torch.tensor([second]), ref[1], config.beta)
                npo += item.weight * loss.item()
    count = len(dataset.items)
    terms = {"loss/inversion": inversion / count, "loss/npo": npo / count, "loss/kl": kl / count}
    terms["loss/total"] = sum(terms.values())
    return terms


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_logged_terms_match_direct_computation(tiny_model_dir, tokenizer, tmp_path, kind):
    config = _config(max_steps=1, per_device_batch_size=6, inversion_loss=kind)
    model = _peft_model(tiny_model_dir, config)
    dataset = _dataset(model, tokenizer, config)
    model.eval()
    expected = _direct_terms(model, tokenizer, dataset, config)
    collated = HybridCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        batched = hybrid_loss(model, collated, config)

    metrics = tmp_path / "metrics.jsonl"
    trainer = build_trainer(model, tokenizer, dataset, config, tmp_path / "checkpoints", metrics_path=metrics, progress=False)
    trainer.train()

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]
    assert batched.total.item() == pytest.approx(expected["loss/total"], rel=1e-4)
    for name, value in expected.items():
        assert rows[0][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert all(value > 0 for value in expected.values())


def test_resume_continues_from_saved_step(tiny_model_dir, tokenizer, tmp_path):
    config = _config(max_steps=4, save_steps=2, per_device_batch_size=1)

    model = _peft_model(tiny_model_dir, config)
    dataset = _dataset(model, tokenizer, config)
    full = build_trainer(model, tokenizer, dataset, config, tmp_path / "full", metrics_path=tmp_path / "full.jsonl", progress=False)
    full.train()
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    model = _peft_model(tiny_model_dir, config)
    resumed = build_trainer(model, tokenizer, dataset, config, tmp_path / "resumed", metrics_path=tmp_path / "resumed.jsonl", progress=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert steps == [3, 4]
    assert resumed.state.global_step == 4
    full_rows = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    resumed_rows = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert resumed_rows[0]["loss/total"] == pytest.approx(full_rows[2]["loss/total"], rel=1e-4)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.detach(), trained[name], rtol=1e-4, atol=1e-6)


def test_per_category_batches_hold_each_category(tiny_model_dir, tokenizer):
    config = _config(batching="per-category", per_device_batch_size=1)
    model = _peft_model(tiny_model_dir, config)
    dataset = _dataset(model, tokenizer, config, n_pairs=7)
    sampler = PerCategorySampler(dataset.category_indices(), per_category=1, seed=3)
    order = list(sampler)

    assert len(order) == len(sampler) == sampler.batch_size * 3
    for start in range(0, len(order), sampler.batch_size):
        batch_categories = {dataset.items[i].category for i in order[start : start + sampler.batch_size]}
        assert batch_categories == {Category.INVERT, Category.SUPPRESS, Category.RETAIN}
    assert order == list(PerCategorySampler(dataset.category_indices(), per_category=1, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_per_category_training_divides_by_category_batch(tiny_model_dir, tokenizer, tmp_path):
    config = _config(batching="per-category", per_device_batch_size=1, max_steps=2)
    model = _peft_model(tiny_model_dir, config)
    dataset = _dataset(model, tokenizer, config)
    trainer = build_trainer(model, tokenizer, dataset, config, tmp_path / "checkpoints", metrics_path=tmp_path / "m.jsonl", progress=False)
    assert trainer.args.per_device_train_batch_size == 3
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    # Every step sees one item of each category, so every term is present at every step.
    for row in rows:
        assert row["loss/inversion"] > 0
        assert row["loss/npo"] > 0
        assert row["loss/kl"] > 0
    assert optimiser_steps(config, dataset) == 2


def test_mixed_sampler_is_seeded_permutation():
    sampler = SeededShuffleSampler(10, seed=5)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    assert order == list(SeededShuffleSampler(10, seed=5))
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_training_items_flip_invert_pairs():
    pairs = sample_pairs(3)
    categories = dict(zip([p.id for p in pairs], [Category.INVERT, Category.SUPPRESS, Category.RETAIN]))
    corrected = {pairs[1].id: "I can't help with that, but here is a safe alternative."}
    items = build_training_items(pairs, categories, {pairs[0].id: 0.5}, corrected=corrected)

    assert (items[0].objective, items[0].first, items[0].second, items[0].weight) == ("inversion", pairs[0].rejected, pairs[0].chosen, 0.5)
    assert (items[1].objective, items[1].first, items[1].second) == ("inversion", corrected[pairs[1].id], pairs[1].chosen)
    assert (items[2].objective, items[2].first, items[2].second, items[2].weight) == ("kl", pairs[2].chosen, None, 1.0)
    fallback = build_training_items(pairs, categories, {}, corrected={pairs[1].id: None})
    assert (fallback[1].objective, fallback[1].first, fallback[1].second) == ("npo", pairs[1].chosen, pairs[1].rejected)


def test_weight_scaling_and_uniform_ablation():
    scores = {"a": 0.75, "b": 0.25, "c": 0.0}
    assert scale_weights(scores, TrainingConfig()) == pytest.approx({"a": 2.25, "b": 0.75, "c": 0.0})
    summed = TrainingConfig(impact={"weight_scaling": "sum"})
    assert scale_weights(scores, summed) == pytest.approx(scores)
    uniform = TrainingConfig(impact={"enabled": False})
    assert scale_weights(scores, uniform) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert math.isclose(sum(scale_weights(scores, TrainingConfig(impact={"enabled": False, "weight_scaling": "sum"})).values()), 1.0)


_DISTRIBUTED_SCRIPT = '''
import json, sys
from pathlib import Path

sys.path.insert(0, {tests!r})
import torch
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from tiny_models import sample_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.trainer import EncodedItems, build_trainer, build_training_items, fill_reference_logprobs
from trace_dsl.triage.verdict import Category

out = Path({out!r})
config = TrainingConfig(max_length=48, warmup_steps=0, gradient_accumulation_steps=1, max_steps=2, save_steps=100,
                        lr_scheduler="constant", learning_rate=5e-3, lora={{"r": 4, "dropout": 0.0}})
tokenizer = AutoTokenizer.from_pretrained({model!r})
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained({model!r}), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
pairs = sample_pairs(8)
cycle = [Category.INVERT, Category.SUPPRESS, Category.RETAIN]
items = build_training_items(pairs, {{p.id: cycle[i % 3] for i, p in enumerate(pairs)}}, {{}})
items = fill_reference_logprobs(model, tokenizer, items, max_length=config.max_length)
dataset = EncodedItems(items, tokenizer, max_length=config.max_length)
trainer = build_trainer(model, tokenizer, dataset, config, out / "checkpoints", metrics_path=out / "metrics.jsonl", progress=False)
trainer.train()
state = PartialState()
changed = any(not torch.all(p == 0) for n, p in model.named_parameters() if "lora_B" in n)
(out / f"rank{{state.process_index}}.json").write_text(json.dumps({{"processes": state.num_processes, "changed": changed, "step": trainer.state.global_step}}))
'''


@pytest.mark.slow
def test_trains_under_accelerate_launch(tiny_model_dir, tmp_path):
    """Two CPU processes under `accelerate launch`: both train, only the main one logs."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(_DISTRIBUTED_SCRIPT.format(tests=tests, out=str(tmp_path), model=str(tiny_model_dir)))
    # On a machine without GPUs, `--multi_gpu` starts torchrun processes that accelerate runs as
    # multi-CPU data parallel (gloo backend); `--cpu` alone would start a single process.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [rank["processes"] for rank in ranks] == [2, 2]
    assert all(rank["changed"] for rank in ranks)
    assert all(rank["step"] == 2 for rank in ranks)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
