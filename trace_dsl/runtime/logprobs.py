"""Sequence log-probabilities of responses, and the logits the KL retain term needs.

This module owns how a (conversation, response) example becomes tokens and how a model scores
the response:

- `encode_example` renders the conversation with the tokenizer's chat template when it has one,
  and as plain ``prompt + "\\n\\n" + response + eos`` otherwise. It tokenizes the prompt and
  the response separately so their boundary never merges into one token, truncates to
  `max_length`, and masks the prompt out of the labels.
- `collate` pads examples into a batch (right padding, one example per row); `pack`
  concatenates them into one row without padding, relying on transformers' detection of packed
  sequences from restarting `position_ids` (block-diagonal attention when no attention mask is
  given).
- `sequence_logprobs` sums the log-probabilities of the response tokens, and
  `response_token_logits` returns the full-vocabulary logits at the response positions.

Both scoring functions run the decoder, then apply the output layer only at response
positions, so no logits are computed for prompt or padding tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label value of tokens that are not scored (prompt and padding), as in transformers."""

PLAIN_SEPARATOR = "\n\n"
"""Text between the prompt and the response when the tokenizer has no chat template."""

# Tokens of scored positions passed through the output layer at once under `torch.no_grad()`:
# bounds the [tokens, vocabulary] logits tensor to about 200 MB with a 49k vocabulary in float32.
_NO_GRAD_CHUNK_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class EncodedExample:
    """One tokenized (prompt, response) example.

    Attributes:
        input_ids: prompt tokens followed by response tokens.
        prompt_length: how many leading tokens belong to the prompt (at least 1).
        truncated: whether tokens were cut to fit `max_length`.
    """

    input_ids: tuple[int, ...]
    prompt_length: int
    truncated: bool = False

    @property
    def response_length(self) -> int:
        """Number of response tokens, the tokens that are scored."""
        return len(self.input_ids) - self.prompt_length

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenBatch:
    """Examples laid out for one forward pass, padded (one example per row) or packed.

    Attributes:
        input_ids: token ids, shape [rows, length].
        position_ids: positions restarting at 0 for each example, shape [rows, length].
        labels: the input ids at response tokens and `IGNORE_INDEX` elsewhere, shape [rows, length].
        sequence_index: which example each token belongs to, -1 at padding, shape [rows, length].
        attention_mask: 1 on real tokens and 0 on padding for a padded batch, None for a packed one.
        num_sequences: number of examples in the batch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    sequence_index: torch.Tensor
    attention_mask: torch.Tensor | None
    num_sequences: int

    def to(self, device: torch.device | str) -> "TokenBatch":
        """Return the same batch with every tensor on `device`."""
        return TokenBatch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            labels=self.labels.to(device),
            sequence_index=self.sequence_index.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            num_sequences=self.num_sequences,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch, padding included."""
        return self.input_ids.numel()


@dataclass(frozen=True)
class ResponseLogits:
    """Full-vocabulary logits at the response positions of each example, left-aligned.

    Attributes:
        logits: shape [examples, max response length, vocabulary]; zero where `mask` is False.
        targets: the response token each position predicts, shape [examples, max response length].
        mask: True at real response tokens, shape [examples, max response length].
    """

    logits: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


# Encoding


def _render_prompt_and_response(
    tokenizer, messages: Sequence[Mapping[str, str]], response: str
) -> tuple[str, str, bool]:
    """Split the rendered conversation into prompt text and response text.

    Returns the prompt text, the response text (with whatever end-of-turn text the template
    adds), and whether special tokens must be added when tokenizing the prompt. A chat template
    writes its own special tokens, plain text does not.
    """
    messages = [dict(m) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full_text.startswith(prompt_text):
            return prompt_text, full_text[len(prompt_text):], False
        # Some templates render the last assistant turn differently from the generation prompt
        # (for example they strip reasoning). Score the response after the generation prompt.
        return prompt_text, response + (tokenizer.eos_token or ""), False

    prompt_text = PLAIN_SEPARATOR.join(m["content"] for m in messages) + PLAIN_SEPARATOR
    return prompt_text, response + (tokenizer.eos_token or ""), True


def _truncate(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a prompt and response to `max_length` tokens together.

    The response keeps its tokens while the prompt can shrink from the left. The prompt is kept
    down to `min(len(prompt), max_length // 2)` tokens of its end, since a response scored
    without its question means little, and only then is the response cut from the right.
    """
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    prompt_floor = min(len(prompt_ids), max_length // 2)
    prompt_keep = max(prompt_floor, max_length - len(response_ids))
    prompt_keep = min(prompt_keep, len(prompt_ids))
    response_keep = max_length - prompt_keep
    return prompt_ids[len(prompt_ids) - prompt_keep:], response_ids[:response_keep]


def encode_example(
    tokenizer, messages: Sequence[Mapping[str, str]], response: str, max_length: int
) -> EncodedExample:
    """Tokenize a conversation and a response for scoring.

    Args:
        tokenizer: a transformers tokenizer. Its chat template is used when it has one.
        messages: the conversation before the response, as `{"role", "content"}` dicts
            (`PreferencePair.messages()`).
        response: the assistant's response text.
        max_length: maximum tokens of prompt plus response; see `_truncate` for what is cut.

    Returns:
        The example, with the prompt's token count so the labels can mask it.

    Raises:
        ValueError: `max_length` is below 2, or the prompt renders to no tokens.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    prompt_text, response_text, add_special = _render_prompt_and_response(tokenizer, messages, response)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError("the prompt renders to no tokens; a response needs at least one token to condition on")

    kept_prompt, kept_response = _truncate(list(prompt_ids), list(response_ids), max_length)
    truncated = len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(response_ids)
    return EncodedExample(
        input_ids=tuple(kept_prompt + kept_response), prompt_length=len(kept_prompt), truncated=truncated
    )


# Batching


def collate(examples: Sequence[EncodedExample], pad_token_id: int | None) -> TokenBatch:
    """Pad examples on the right into a batch with one example per row.

    `pad_token_id` None pads with 0; padded positions are masked out of attention and labels,
    so the id does not change any result.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    pad = 0 if pad_token_id is None else pad_token_id
    rows, length = len(examples), max(len(e) for e in examples)

    input_ids = torch.full((rows, length), pad, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    sequence_index = torch.full((rows, length), -1, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        n = len(ids)
        input_ids[row, :n] = ids
        labels[row, example.prompt_length:n] = ids[example.prompt_length:]
        attention_mask[row, :n] = 1
        sequence_index[row, :n] = row
        position_ids[row, :n] = torch.arange(n)
    return TokenBatch(input_ids, position_ids, labels, sequence_index, attention_mask, rows)


def pack(examples: Sequence[EncodedExample]) -> TokenBatch:
    """Concatenate examples into a single row without padding.

    Each example's positions restart at 0 and no attention mask is passed, which makes
    transformers (5.x, `masking_utils.find_packed_sequence_indices`) build a block-diagonal
    causal mask, so no example attends to another. Every example starts with a prompt token
    whose label is ignored, so no token is scored as a continuation of the previous example.
    """
    if not examples:
        raise ValueError("cannot pack an empty list of examples")
    input_ids, labels, sequence_index, position_ids = [], [], [], []
    for index, example in enumerate(examples):
        ids = list(example.input_ids)
        input_ids.extend(ids)
        labels.extend([IGNORE_INDEX] * example.prompt_length + ids[example.prompt_length:])
        sequence_index.extend([index] * len(ids))
        position_ids.extend(range(len(ids)))

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long)

    return TokenBatch(row(input_ids), row(position_ids), row(labels), row(sequence_index), None, len(examples))


# Scoring


def _output_layer_applies_directly(model) -> bool:
    """Return whether the model's logits are its output layer applied to the decoder's last hidden state.

    Models that soft-cap or rescale logits (Gemma 2, Cohere) are scored through the full
    forward pass instead.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    try:
        model.get_decoder()
    except (AttributeError, ValueError):
        return False
    return model.get_output_embeddings() is not None


def _scored_positions(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions whose next token is a response token.

    Returns a boolean mask over [rows, length - 1], the target token at each selected position,
    and the example each selected position belongs to.
    """
    shifted_labels = batch.labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    return mask, shifted_labels[mask], batch.sequence_index[:, 1:][mask]


def _scored_states(model, batch: TokenBatch):
    """Run the model and keep only the positions whose next token is a response token.

    Returns the states at those positions as [tokens, features], the target token and the
    example index of each, and the output layer still to apply (None when the states are
    already logits). Positions come in row-major order, so each example's tokens are
    contiguous and in order.
    """
    mask, targets, owners = _scored_positions(batch)
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    if _output_layer_applies_directly(model):
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return hidden[:, :-1][mask], targets, owners, model.get_output_embeddings()
    logits = model(**inputs, use_cache=False).logits
    return logits[:, :-1][mask], targets, owners, None


def sequence_logprobs(model, batch: TokenBatch) -> torch.Tensor:
    """Sum of the log-probabilities of each example's response tokens, shape [examples].

    Gradients flow to the model's parameters when autograd is on. Under `torch.no_grad()` the
    output layer runs in chunks of scored positions, so the logits are never all held at once.
    The log-softmax is taken inside `cross_entropy`, in float32, and only the target's value is
    kept.
    """
    states, targets, owners, output_layer = _scored_states(model, batch)

    def token_logprobs(chunk: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = output_layer(chunk) if output_layer is not None else chunk
        return -F.cross_entropy(logits.float(), chunk_targets, reduction="none")

    if torch.is_grad_enabled() or targets.numel() <= _NO_GRAD_CHUNK_TOKENS:
        per_token = token_logprobs(states, targets)
    else:
        chunks = [
            token_logprobs(states[start:start + _NO_GRAD_CHUNK_TOKENS], targets[start:start + _NO_GRAD_CHUNK_TOKENS])
            for start in range(0, targets.numel(), _NO_GRAD_CHUNK_TOKENS)
        ]
        per_token = torch.cat(chunks)

    totals = torch.zeros(batch.num_sequences, dtype=per_token.dtype, device=per_token.device)
    return totals.index_add(0, owners, per_token)


def response_token_logits(model, batch: TokenBatch) -> ResponseLogits:
    """Full-vocabulary logits at each example's response positions, for the token-level KL term.

    Position k of example i contains the logits that predict its k-th response token. The tensor
    is [examples, max response length, vocabulary], left-aligned, zero-filled past each
    example's response; `mask` marks the real positions.
    """
    states, targets, owners, output_layer = _scored_states(model, batch)
    logits = output_layer(states) if output_layer is not None else states
    counts = torch.bincount(owners, minlength=batch.num_sequences)
    width = int(counts.max()) if counts.numel() else 0
    # Offset of each scored position within its own example: positions arrive grouped by
    # example and in order, so it is the running index minus the example's first index.
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(owners.numel(), device=owners.device) - starts[owners]

    padded = logits.new_zeros(batch.num_sequences, width, logits.shape[-1])
    padded = padded.index_put((owners, offsets), logits)
    padded_targets = torch.full((batch.num_sequences, width), IGNORE_INDEX, dtype=torch.long, device=owners.device)
    padded_targets[owners, offsets] = targets
    mask = torch.zeros((batch.num_sequences, width), dtype=torch.bool, device=owners.device)
    mask[owners, offsets] = True
    return ResponseLogits(logits=padded, targets=padded_targets, mask=mask)


def encode_and_collate(
    tokenizer, items: Sequence[tuple[Sequence[Mapping[str, str]], str]], max_length: int
) -> TokenBatch:
    """Encode (messages, response) items and pad them into one batch, in the given order."""
    examples = [encode_example(tokenizer, messages, response, max_length) for messages, response in items]
    return collate(examples, tokenizer.pad_token_id)
