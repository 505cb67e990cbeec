"""The classifier predicate: the probability a local sequence-classification model gives a label.

The value of a request is the probability of the predicate's label for its text: a softmax over
the labels, or a per-label sigmoid when the model's config sets
`problem_type = "multi_label_classification"`. The policy compares that value with its
threshold. The label is checked against the model's `id2label` when the backend is created.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.compiler.backends.embedding import request_text
from trace_dsl.compiler.backends.hf import (
    folder_fingerprint,
    load_shared,
    max_input_length,
    resolve_model_path,
    torch_device,
)
from trace_dsl.errors import JudgeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Classifier:
    model: Any
    tokenizer: Any
    labels: tuple[str, ...]
    multi_label: bool
    max_length: int
    device: str
    lock: threading.Lock


def _load_classifier(folder: Path) -> _Classifier:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = torch_device()
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    if tokenizer.pad_token is None:
        # Decoder classifiers (Llama, GPT-2) ship without a pad token. Reusing end-of-sequence
        # is safe because the classifier reads the last non-pad position.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    id2label = model.config.id2label or {}
    labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels))
    multi_label = model.config.problem_type == "multi_label_classification"
    max_length = max_input_length(tokenizer, model.config)
    return _Classifier(model, tokenizer, labels, multi_label, max_length, device, threading.Lock())


class ClassifierBackend(PredicateBackend):
    """Probability of one label from a sequence-classification model.

    Options:
        model: folder, alias known to `trace_dsl.models`, or cached Hugging Face id (required).
        label: one of the model's labels (required); a request's `params["label"]` overrides it.
        input: which text to classify: "response" (default), "prompt" or "prompt_response"
            (prompt and response as a text pair).
        batch_size: texts per forward pass (default 16).

    Raises:
        JudgeError: the model cannot be loaded, or the label is not one of its labels.
    """

    kind = "classifier"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.model_name = str(options["model"])
        self.folder = resolve_model_path(self.model_name)
        self.input = str(options.get("input", "response"))
        self.batch_size = int(options.get("batch_size", 16))
        self._classifier = load_shared("classifier", self.folder, _load_classifier)
        self._folder_digest = folder_fingerprint(self.folder)
        self.label = str(options["label"])
        if self.label not in self.labels:
            raise JudgeError(
                f"label '{self.label}' is not a label of classifier '{self.model_name}'",
                hint=f"use one of: {', '.join(self.labels)}",
            )

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's labels, in the order of its output logits."""
        return self._classifier.labels

    def fingerprint(self) -> str:
        mode = "sigmoid" if self._classifier.multi_label else "softmax"
        return (
            f"classifier/v1 model={self.model_name} weights={self._folder_digest} {mode} "
            f"max_length={self._classifier.max_length} input={self.input}"
        )

    def evaluate(self, requests: Sequence[BackendRequest]) -> list[BackendResult]:
        results: list[BackendResult | None] = [None] * len(requests)
        pending: list[int] = []
        for index, request in enumerate(requests):
            label = request.params.get("label", self.label)
            if label not in self.labels:
                results[index] = BackendResult(
                    None, error=f"label {label!r} is not one of the classifier's labels: {', '.join(self.labels)}"
                )
            else:
                pending.append(index)

        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            try:
                probabilities = self._probabilities([requests[i] for i in batch])
            except RuntimeError as exc:
                # A failed batch fails its own requests only, so the rest of the run goes on.
                logger.warning("classifier %s failed on a batch of %d: %s", self.model_name, len(batch), exc)
                for index in batch:
                    results[index] = BackendResult(None, error=f"classifier failed: {type(exc).__name__}: {exc}")
                continue
            for row, index in enumerate(batch):
                label = requests[index].params.get("label", self.label)
                column = self.labels.index(label)
                value = float(probabilities[row, column])
                results[index] = BackendResult(value=value, rationale=f"p({label}) = {value:.3f}")
        return [result for result in results if result is not None]

    def _probabilities(self, requests: Sequence[BackendRequest]) -> Any:
        import torch

        classifier = self._classifier
        if self.input == "prompt_response":
            encoded = classifier.tokenizer(
                [request.prompt for request in requests],
                [request.response for request in requests],
                padding=True,
                truncation="longest_first",
                max_length=classifier.max_length,
                return_tensors="pt",
            )
        else:
            encoded = classifier.tokenizer(
                [request_text(request, self.input) for request in requests],
                padding=True,
                truncation=True,
                max_length=classifier.max_length,
                return_tensors="pt",
            )
        encoded = encoded.to(classifier.device)
        with classifier.lock, torch.inference_mode():
            logits = classifier.model(**encoded).logits.float()
        if classifier.multi_label:
            return torch.sigmoid(logits).cpu()
        return torch.softmax(logits, dim=-1).cpu()
