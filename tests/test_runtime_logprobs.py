"""Encoding, truncation, batching and response log-probabilities on a tiny Llama model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tokenizer, sample_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_dsl.runtime.logprobs import (
    IGNORE_INDEX,
    collate,
    encode_example,
    pack,
    response_token_logits,
    sequence_logprobs,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    pairs = sample_pairs(3)
    items = [(p.messages(), p.chosen) for p in pairs] + [(p.messages(), p.rejected) for p in pairs]
    return [encode_example(tokenizer, messages, response, max_length=96) for messages, response in items]


def _naive_logprob(model, example) -> float:
    """Log-probability of the response from a full forward pass over one unpadded example."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    per_token = logp[torch.arange(len(targets)), targets]
    return per_token[example.prompt_length - 1:].sum().item()


def test_encode_uses_chat_template(tokenizer):
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    example = encode_example(tokenizer, messages, "Mix flour and water.", max_length=256)
    prompt_text = tokenizer.decode(example.input_ids[: example.prompt_length])
    response_text = tokenizer.decode(example.input_ids[example.prompt_length:])
    assert prompt_text == "<|begin|>user\nHow do I bake bread?<|end|>\n<|begin|>assistant\n"
    assert response_text == "Mix flour and water.<|end|>\n"
    assert not example.truncated


def test_encode_plain_without_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    example = encode_example(tokenizer, [{"role": "user", "content": "How do I bake bread?"}], "Mix flour.", 256)
    assert tokenizer.decode(example.input_ids[: example.prompt_length]) == "How do I bake bread?\n\n"
    assert tokenizer.decode(example.input_ids[example.prompt_length:]) == "Mix flour.<|end|>"


def test_truncation_cuts_prompt_from_left(tokenizer):
    long_prompt = " ".join(["please explain the history of bread"] * 30)
    messages = [{"role": "user", "content": long_prompt}]
    full = encode_example(tokenizer, messages, "Bread is old.", max_length=4096)
    cut = encode_example(tokenizer, messages, "Bread is old.", max_length=64)
    assert len(cut) == 64
    assert cut.truncated
    assert cut.response_length == full.response_length
    assert cut.input_ids == full.input_ids[-64:]


def test_truncation_keeps_half_for_prompt(tokenizer):
    messages = [{"role": "user", "content": "Tell me a story."}]
    long_response = " ".join(["the baker kneaded the dough"] * 40)
    full = encode_example(tokenizer, messages, long_response, max_length=4096)
    cut = encode_example(tokenizer, messages, long_response, max_length=64)
    assert full.prompt_length < 32
    assert cut.prompt_length == full.prompt_length
    assert len(cut) == 64
    assert cut.input_ids == full.input_ids[:64]


def test_truncation_both_long(tokenizer):
    messages = [{"role": "user", "content": " ".join(["why is the sky blue"] * 40)}]
    response = " ".join(["because of scattering"] * 40)
    full = encode_example(tokenizer, messages, response, max_length=4096)
    cut = encode_example(tokenizer, messages, response, max_length=64)
    assert cut.prompt_length == 32
    assert cut.response_length == 32
    prompt_end = full.input_ids[: full.prompt_length][-32:]
    assert cut.input_ids[:32] == prompt_end
    assert cut.input_ids[32:] == full.input_ids[full.prompt_length: full.prompt_length + 32]


def test_collate_masks_prompt_and_padding(examples, tokenizer):
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.input_ids.shape == (len(examples), max(len(e) for e in examples))
    for row, example in enumerate(examples):
        assert (batch.labels[row, : example.prompt_length] == IGNORE_INDEX).all()
        assert (batch.labels[row, example.prompt_length: len(example)] != IGNORE_INDEX).all()
        assert (batch.labels[row, len(example):] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].sum().item() == len(example)


def test_sequence_logprobs_match_naive(model, examples, tokenizer):
    expected = torch.tensor([_naive_logprob(model, e) for e in examples])
    with torch.no_grad():
        padded = sequence_logprobs(model, collate(examples, tokenizer.pad_token_id))
        packed = sequence_logprobs(model, pack(examples))
    assert torch.allclose(padded, expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(packed, expected, rtol=1e-5, atol=1e-4)


def test_sequence_logprobs_has_gradient(model, examples, tokenizer):
    batch = collate(examples[:2], tokenizer.pad_token_id)
    total = sequence_logprobs(model, batch).sum()
    total.backward()
    gradient = model.model.layers[0].self_attn.q_proj.weight.grad
    assert gradient is not None
    assert gradient.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_response_token_logits_positions(model, examples, tokenizer):
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        result = response_token_logits(model, batch)
    assert result.mask.sum(1).tolist() == [e.response_length for e in examples]
    for index, example in enumerate(examples):
        with torch.no_grad():
            full = model(torch.tensor([example.input_ids])).logits[0]
        start = example.prompt_length - 1
        expected = full[start: len(example) - 1]
        n = example.response_length
        assert torch.allclose(result.logits[index, :n], expected, atol=1e-4)
        assert result.targets[index, :n].tolist() == list(example.input_ids[example.prompt_length:])
        assert not result.mask[index, n:].any()
