"""The reference model is the base with the LoRA adapter disabled, not a second copy."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import sample_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_dsl.runtime.logprobs import collate, encode_example, response_token_logits, sequence_logprobs
from trace_dsl.runtime.reference import reference_logprobs, reference_response_logits


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    policy = get_peft_model(base, config).eval()
    # A fresh adapter has B = 0 and changes nothing; give it non-zero B so it does.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    frozen_copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().requires_grad_(False)
    pairs = sample_pairs(3)
    examples = [encode_example(tokenizer, p.messages(), p.chosen, 96) for p in pairs]
    return policy, frozen_copy, collate(examples, tokenizer.pad_token_id)


def test_reference_logprobs_equal_frozen_copy(setup):
    policy, frozen_copy, batch = setup
    with torch.no_grad():
        expected = sequence_logprobs(frozen_copy, batch)
    assert torch.allclose(reference_logprobs(policy, batch), expected, rtol=0, atol=1e-6)


def test_reference_differs_from_adapted_model(setup):
    policy, _, batch = setup
    with torch.no_grad():
        adapted = sequence_logprobs(policy, batch)
    reference = reference_logprobs(policy, batch)
    assert (adapted - reference).abs().min() > 1e-3


def test_adapter_enabled_after_reference(setup):
    policy, _, batch = setup
    with torch.no_grad():
        before = sequence_logprobs(policy, batch)
    reference_logprobs(policy, batch)
    with torch.no_grad():
        after = sequence_logprobs(policy, batch)
    assert torch.equal(before, after)


def test_reference_logits_equal_frozen_copy(setup):
    policy, frozen_copy, batch = setup
    with torch.no_grad():
        expected = response_token_logits(frozen_copy, batch)
    result = reference_response_logits(policy, batch)
    assert torch.equal(result.mask, expected.mask)
    assert torch.allclose(result.logits, expected.logits, rtol=0, atol=1e-6)


def test_reference_rejects_plain_model(setup):
    _, frozen_copy, batch = setup
    with pytest.raises(TypeError, match="no LoRA adapter"):
        reference_logprobs(frozen_copy, batch)
