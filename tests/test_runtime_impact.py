"""Alignment impact scores on a tiny Llama model with a fresh LoRA adapter.

The batched directional method is checked against the per-response backward loop, and the
loop's scores against gradient dot products of the actual loss functions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import sample_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_dsl.errors import TrainingDataError
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.impact import (
    ImpactResult,
    build_gold_batch,
    compute_impact_scores,
    gold_gradient,
    normalise_scores,
)
from trace_dsl.runtime.logprobs import collate, encode_example, sequence_logprobs
from trace_dsl.runtime.losses import dual_npo_loss, inversion_loss
from trace_dsl.runtime.reference import reference_logprobs
from trace_dsl.triage.verdict import Category, Verdict

PAIRS = sample_pairs(14)
# A fixed triage: 5 RETAIN, 5 INVERT, 4 SUPPRESS.
CATEGORIES = [Category.RETAIN] * 5 + [Category.INVERT] * 5 + [Category.SUPPRESS] * 4
COMPLIANCE = {Category.RETAIN: (True, False), Category.INVERT: (False, True), Category.SUPPRESS: (False, False)}


def _verdicts(pairs, categories):
    return [Verdict(p.id, c, *COMPLIANCE[c]) for p, c in zip(pairs, categories)]


VERDICTS = _verdicts(PAIRS, CATEGORIES)


def _config(**impact) -> TrainingConfig:
    options = {"gold_batch_size": 9, "batch_size": 4, **impact}
    return TrainingConfig(max_length=48, impact=options)


def _peft_model(folder, dtype):
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, config)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    torch.manual_seed(0)
    return _peft_model(tiny_model_dir, torch.float64)


@pytest.fixture(scope="module")
def loop_and_directional(model64, tokenizer):
    loop = compute_impact_scores(model64, tokenizer, PAIRS, VERDICTS, _config(method="loop"), progress=False)
    directional = compute_impact_scores(model64, tokenizer, PAIRS, VERDICTS, _config(), progress=False)
    return loop, directional


# Gold batch


def test_gold_batch_composition():
    gold = build_gold_batch(PAIRS, VERDICTS, size=9, seed=3)
    by_id = {p.id: p for p in PAIRS}
    counts = {c: sum(item.category == c for item in gold) for c in Category}
    assert counts[Category.RETAIN] == 3
    assert counts[Category.INVERT] == 3
    assert counts[Category.SUPPRESS] == 3
    for item in gold:
        pair = by_id[item.pair_id]
        if item.category == Category.RETAIN:
            assert (item.chosen, item.rejected) == (pair.chosen, pair.rejected)
        if item.category == Category.INVERT:
            assert (item.chosen, item.rejected) == (pair.rejected, pair.chosen)
        if item.category == Category.SUPPRESS:
            source = by_id[item.chosen_from]
            assert item.rejected == pair.chosen
            assert CATEGORIES[PAIRS.index(source)] in (Category.RETAIN, Category.INVERT)
            compliant = source.chosen if CATEGORIES[PAIRS.index(source)] == Category.RETAIN else source.rejected
            assert item.chosen == compliant
            assert item.messages == tuple(pair.messages())


def test_gold_batch_seeded():
    first = build_gold_batch(PAIRS, VERDICTS, size=9, seed=3)
    again = build_gold_batch(PAIRS, VERDICTS, size=9, seed=3)
    other_seeds = [build_gold_batch(PAIRS, VERDICTS, size=9, seed=s) for s in range(4, 9)]
    assert first == again
    assert any(other != first for other in other_seeds)


def test_gold_batch_fills_with_suppress():
    # A third of 12 is 4, so 4 RETAIN, 4 INVERT, and the remaining 4 from the 4 SUPPRESS pairs.
    gold = build_gold_batch(PAIRS, VERDICTS, size=12, seed=0)
    assert [item.category for item in gold].count(Category.SUPPRESS) == 4
    assert len(gold) == 12


def test_gold_batch_short_categories():
    # Only 4 SUPPRESS pairs exist, so a batch of 30 stops at 5 + 5 + 4.
    gold = build_gold_batch(PAIRS, VERDICTS, size=30, seed=0)
    assert len(gold) == 14
    assert len({item.pair_id for item in gold}) == 14


def test_gold_batch_no_compliant_response():
    categories = [Category.SUPPRESS] * len(PAIRS)
    gold = build_gold_batch(PAIRS, _verdicts(PAIRS, categories), size=9, seed=0)
    assert gold == []


# Directional against the loop


def test_directional_matches_loop_float64(loop_and_directional):
    loop, directional = loop_and_directional
    assert set(directional.raw) == set(loop.raw)
    assert len(loop.raw) == 9
    for pair_id, expected in loop.raw.items():
        assert directional.raw[pair_id] == pytest.approx(expected, rel=1e-4, abs=1e-10)
    for pair_id, expected in loop.scores.items():
        assert directional.scores[pair_id] == pytest.approx(expected, rel=1e-4, abs=1e-10)
    for key, expected in loop.ref_logprobs.items():
        assert directional.ref_logprobs[key] == pytest.approx(expected, rel=1e-9)


def test_scores_clipped_and_normalised(loop_and_directional):
    _, directional = loop_and_directional
    positive = [v for v in directional.raw.values() if v > 0]
    assert positive, "the fixture should produce some positive raw scores"
    assert any(v < 0 for v in directional.raw.values()), "the fixture should produce some negative raw scores"
    assert sum(directional.scores.values()) == pytest.approx(1.0)
    for pair_id, raw in directional.raw.items():
        expected = max(raw, 0.0) / sum(positive)
        assert directional.scores[pair_id] == pytest.approx(expected)


def test_weights_mean_scaling(loop_and_directional):
    _, directional = loop_and_directional
    # The default weight scaling is 'mean': weights are scores times the conflict-set size.
    assert sum(directional.weights.values()) == pytest.approx(9.0)
    for pair_id, score in directional.scores.items():
        assert directional.weights[pair_id] == pytest.approx(9 * score)


def test_ref_logprobs_equal_reference_model(loop_and_directional, model64, tokenizer):
    _, directional = loop_and_directional
    pair = PAIRS[5]
    examples = [encode_example(tokenizer, pair.messages(), text, 48) for text in (pair.chosen, pair.rejected)]
    expected = reference_logprobs(model64, collate(examples, tokenizer.pad_token_id))
    assert directional.ref_logprobs[(pair.id, "chosen")] == pytest.approx(expected[0].item(), rel=1e-9)
    assert directional.ref_logprobs[(pair.id, "rejected")] == pytest.approx(expected[1].item(), rel=1e-9)
    assert len(directional.ref_logprobs) == 18


def test_raw_scores_are_loss_gradient_dot_products(loop_and_directional, model64, tokenizer):
    """The beta/2 factors: raw w_i equals <g_J, grad L_i> with L_i built from the loss functions."""
    loop, _ = loop_and_directional
    config = _config()
    gold = build_gold_batch(PAIRS, VERDICTS, config.impact.gold_batch_size, config.seed)
    model64.eval()
    g_j = gold_gradient(model64, tokenizer, gold, config)
    parameters = {n: p for n, p in model64.named_parameters() if p.requires_grad}

    for pair, category in [(PAIRS[6], Category.INVERT), (PAIRS[11], Category.SUPPRESS)]:
        examples = [encode_example(tokenizer, pair.messages(), text, 48) for text in (pair.chosen, pair.rejected)]
        logp_chosen, logp_rejected = sequence_logprobs(model64, collate(examples, tokenizer.pad_token_id))
        ref_chosen, ref_rejected = logp_chosen.detach(), logp_rejected.detach()
        if category == Category.INVERT:
            loss = inversion_loss(logp_rejected, logp_chosen, ref_rejected, ref_chosen, config.beta)
        else:
            loss = dual_npo_loss(logp_chosen, ref_chosen, logp_rejected, ref_rejected, config.beta)
        grads = torch.autograd.grad(loss.sum(), list(parameters.values()))
        dot = sum((g.double() * g_j[n].double()).sum() for n, g in zip(parameters, grads)).item()
        assert loop.raw[pair.id] == pytest.approx(dot, rel=1e-6)


def test_packed_layout_matches_padded(model64, tokenizer, loop_and_directional):
    _, padded = loop_and_directional
    packed = compute_impact_scores(model64, tokenizer, PAIRS, VERDICTS, _config(), progress=False, layout="packed")
    for pair_id, expected in padded.raw.items():
        assert packed.raw[pair_id] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    for key, expected in padded.ref_logprobs.items():
        assert packed.ref_logprobs[key] == pytest.approx(expected, rel=1e-9)


def test_directional_matches_loop_float32(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = _peft_model(tiny_model_dir, torch.float32)
    loop = compute_impact_scores(model, tokenizer, PAIRS, VERDICTS, _config(method="loop"), progress=False)
    directional = compute_impact_scores(model, tokenizer, PAIRS, VERDICTS, _config(), progress=False)
    largest = max(abs(v) for v in loop.raw.values())
    for pair_id, expected in loop.raw.items():
        assert directional.raw[pair_id] == pytest.approx(expected, rel=1e-3, abs=1e-3 * largest)
    for pair_id, expected in loop.scores.items():
        assert directional.scores[pair_id] == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_adapter_restored_after_scoring(model64, loop_and_directional):
    for name, parameter in model64.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(parameter) == 0
            assert parameter.requires_grad
        assert parameter.grad is None


def test_training_mode_restored(model64, tokenizer):
    model64.train()
    compute_impact_scores(model64, tokenizer, PAIRS, VERDICTS, _config(), progress=False)
    assert model64.training
    model64.eval()


# Edge cases


def test_no_suppress_pairs(model64, tokenizer):
    categories = [Category.RETAIN] * 7 + [Category.INVERT] * 7
    result = compute_impact_scores(model64, tokenizer, PAIRS, _verdicts(PAIRS, categories), _config(), progress=False)
    assert set(result.scores) == {p.id for p in PAIRS[7:]}
    assert result.scores and sum(result.scores.values()) == pytest.approx(1.0)


def test_no_retain_pairs(model64, tokenizer):
    categories = [Category.INVERT] * 7 + [Category.SUPPRESS] * 7
    verdicts = _verdicts(PAIRS, categories)
    loop = compute_impact_scores(model64, tokenizer, PAIRS, verdicts, _config(method="loop"), progress=False)
    directional = compute_impact_scores(model64, tokenizer, PAIRS, verdicts, _config(), progress=False)
    assert len(directional.scores) == 14
    # 3 INVERT pairs flipped, then SUPPRESS prompts with INVERT rejected responses as winners.
    assert len(directional.gold_pair_ids) == 9
    assert set(directional.gold_pair_ids[3:]) <= {p.id for p in PAIRS[7:]}
    for pair_id, expected in loop.raw.items():
        assert directional.raw[pair_id] == pytest.approx(expected, rel=1e-4, abs=1e-10)


def test_normalise_all_negative_gives_zeros():
    assert normalise_scores({"a": -1.0, "b": -0.5}) == {"a": 0.0, "b": 0.0}


def test_normalise_clips_then_divides():
    scores = normalise_scores({"a": 3.0, "b": -2.0, "c": 1.0})
    assert scores == pytest.approx({"a": 0.75, "b": 0.0, "c": 0.25})


def test_no_conflicts_raises(model64, tokenizer):
    verdicts = _verdicts(PAIRS, [Category.RETAIN] * len(PAIRS))
    with pytest.raises(TrainingDataError, match="no INVERT or SUPPRESS pair"):
        compute_impact_scores(model64, tokenizer, PAIRS, verdicts, _config(), progress=False)


def test_error_verdict_raises(model64, tokenizer):
    verdicts = list(VERDICTS)
    verdicts[3] = Verdict(PAIRS[3].id, Category.ERROR, None, None, error="judge timed out")
    with pytest.raises(TrainingDataError, match="1 pair\\(s\\) have verdict 'error'") as caught:
        compute_impact_scores(model64, tokenizer, PAIRS, verdicts, _config(), progress=False)
    assert "trace explain" in caught.value.hint


def test_missing_verdict_raises(model64, tokenizer):
    with pytest.raises(TrainingDataError, match="have no verdict"):
        compute_impact_scores(model64, tokenizer, PAIRS, VERDICTS[:-1], _config(), progress=False)


def test_empty_gold_batch_raises(model64, tokenizer):
    verdicts = _verdicts(PAIRS, [Category.SUPPRESS] * len(PAIRS))
    with pytest.raises(TrainingDataError, match="gold batch is empty"):
        compute_impact_scores(model64, tokenizer, PAIRS, verdicts, _config(), progress=False)


def test_trained_adapter_rejected(model64, tokenizer):
    trained = copy.deepcopy(model64)
    with torch.no_grad():
        next(p for n, p in trained.named_parameters() if "lora_B" in n).fill_(0.01)
    with pytest.raises(ValueError, match="not at its starting weights"):
        compute_impact_scores(trained, tokenizer, PAIRS, VERDICTS, _config(), progress=False)


def test_disabled_gives_uniform_weights(model64, tokenizer, loop_and_directional):
    _, directional = loop_and_directional
    result = compute_impact_scores(model64, tokenizer, PAIRS, VERDICTS, _config(enabled=False), progress=False)
    assert result.method == "uniform"
    assert result.scores == pytest.approx({pair_id: 1 / 9 for pair_id in directional.scores})
    assert result.weights == pytest.approx({pair_id: 1.0 for pair_id in directional.scores})
    for key, expected in directional.ref_logprobs.items():
        assert result.ref_logprobs[key] == pytest.approx(expected, rel=1e-9)


def test_result_round_trips_through_dict(loop_and_directional):
    _, directional = loop_and_directional
    assert ImpactResult.from_dict(directional.to_dict()) == directional
