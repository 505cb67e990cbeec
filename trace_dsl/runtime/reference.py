"""The reference model: the base model with the LoRA adapter switched off.

TRACE's losses compare the policy with the reference model, the starting checkpoint. Since
training only changes a LoRA adapter, the reference is the same model with the adapter
disabled (peft's `disable_adapter()`), so no second copy of the weights is held in memory.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from trace_dsl.runtime.logprobs import ResponseLogits, TokenBatch, response_token_logits, sequence_logprobs


def _require_peft_model(model) -> None:
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            f"{type(model).__name__} has no LoRA adapter to disable; wrap it with peft.get_peft_model "
            "so the reference model is the base with the adapter off"
        )


@contextlib.contextmanager
def reference_model(model) -> Iterator[object]:
    """Run the block with the adapter disabled, so `model` computes the reference model.

    Raises:
        TypeError: `model` is not a peft model.
    """
    _require_peft_model(model)
    with model.disable_adapter():
        yield model


def reference_logprobs(model, batch: TokenBatch) -> torch.Tensor:
    """Reference log-probabilities of each example's response, shape [examples], without gradients."""
    with torch.no_grad(), reference_model(model):
        return sequence_logprobs(model, batch)


def reference_response_logits(model, batch: TokenBatch) -> ResponseLogits:
    """Reference logits at the response positions (for `losses.token_kl`), without gradients."""
    with torch.no_grad(), reference_model(model):
        return response_token_logits(model, batch)
