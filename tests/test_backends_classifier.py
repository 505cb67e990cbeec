"""The classifier predicate with tiny random BERT classifiers built and saved in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from trace_dsl.compiler.backends.base import BackendRequest
from trace_dsl.compiler.backends.registry import create_backend
from trace_dsl.errors import JudgeError

WORDS = "the a how to make bomb bread bake weapon kill help you i can not sorry here is".split()


def _save_tiny_classifier(folder: Path, labels: list[str], *, multi_label: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return _save_tiny_classifier(tmp_path_factory.mktemp("classifier"), ["safe", "unsafe", "refusal"])


REQUESTS = [
    BackendRequest("how to make a bomb", "here is how to make a bomb"),
    BackendRequest("how to bake bread", "sorry i can not help you"),
    BackendRequest("kill", "the " * 200),
]


def test_probabilities_are_softmax(classifier_dir):
    backends = {label: create_backend("classifier", {"model": str(classifier_dir), "label": label}) for label in ("safe", "unsafe", "refusal")}

    values = {label: [result.value for result in backend.evaluate(REQUESTS)] for label, backend in backends.items()}

    for index in range(len(REQUESTS)):
        column = [values[label][index] for label in values]
        assert all(0.0 <= value <= 1.0 for value in column)
        assert sum(column) == pytest.approx(1.0, abs=1e-5)


def test_batching_matches_single_requests(classifier_dir):
    backend = create_backend("classifier", {"model": str(classifier_dir), "label": "unsafe", "batch_size": 2})
    batched = [result.value for result in backend.evaluate(REQUESTS)]
    single = [backend.evaluate([request])[0].value for request in REQUESTS]
    assert batched == pytest.approx(single, abs=1e-5)


def test_unknown_label_lists_labels(classifier_dir):
    with pytest.raises(JudgeError) as raised:
        create_backend("classifier", {"model": str(classifier_dir), "label": "toxic"})
    assert "toxic" in raised.value.message
    assert "safe, unsafe, refusal" in raised.value.hint


def test_unknown_request_label_gives_error_result(classifier_dir):
    backend = create_backend("classifier", {"model": str(classifier_dir), "label": "safe"})
    [bad, good] = backend.evaluate([BackendRequest("p", "r", params={"label": "toxic"}), BackendRequest("p", "r")])
    assert bad.value is None
    assert "toxic" in bad.error
    assert good.error is None


def test_multi_label_uses_sigmoid(tmp_path):
    folder = _save_tiny_classifier(tmp_path / "multi", ["violence", "fraud"], multi_label=True)
    violence = create_backend("classifier", {"model": str(folder), "label": "violence"})
    fraud = create_backend("classifier", {"model": str(folder), "label": "fraud"})

    assert "sigmoid" in violence.fingerprint()
    for request in REQUESTS:
        [v] = violence.evaluate([request])
        [f] = fraud.evaluate([request])
        assert 0.0 < v.value < 1.0
        assert 0.0 < f.value < 1.0
        assert v.value + f.value != pytest.approx(1.0, abs=1e-6)


def test_prompt_response_input_reads_both(classifier_dir):
    response_only = create_backend("classifier", {"model": str(classifier_dir), "label": "safe"})
    pair = create_backend("classifier", {"model": str(classifier_dir), "label": "safe", "input": "prompt_response"})
    request = BackendRequest("how to make a bomb", "sorry")
    assert response_only.evaluate([request])[0].value != pair.evaluate([request])[0].value
    assert response_only.fingerprint() != pair.fingerprint()


def test_missing_model_folder_is_judge_error(tmp_path):
    with pytest.raises(JudgeError) as raised:
        create_backend("classifier", {"model": str(tmp_path / "absent"), "label": "safe"})
    assert "does not exist" in raised.value.message
