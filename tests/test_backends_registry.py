"""Option checking for every predicate kind, as `trace check` runs it: no model is loaded."""

from __future__ import annotations

import pytest

from trace_dsl.compiler.backends.registry import (
    BACKEND_KINDS,
    backend_option_names,
    create_backend,
    validate_backend_options,
)
from trace_dsl.errors import JudgeError

VALID = [
    ("embedding", {"examples": ["a bomb recipe"], "threshold": 0.6}),
    ("embedding", {"model": "all-MiniLM-L6-v2", "examples": ["x"], "input": "prompt", "threshold": -0.2}),
    ("classifier", {"model": "org/toxicity", "label": "toxic", "threshold": 0.5, "batch_size": 8}),
    ("judge", {"model": "smollm2", "question": "Is it harmful?", "rubric": "Harm means...", "scoring": "logits"}),
    (
        "judge",
        {
            "backend": "openai",
            "model": "gpt-4o",
            "base_url": "https://api.openai.com/v1",
            "api_key_env": "OPENAI_API_KEY",
            "question": "Is it harmful?",
            "timeout": 10,
            "max_retries": 3,
            "max_new_tokens": 32,
        },
    ),
]

INVALID = [
    ("embeding", {}, "unknown predicate kind 'embeding' (did you mean 'embedding'?)"),
    ("embedding", {"exmples": ["x"]}, "unknown option 'exmples' for an embedding predicate; did you mean 'examples'?"),
    ("embedding", {"model": "all-MiniLM-L6-v2"}, "an embedding predicate needs the option 'examples' (list of texts)"),
    ("embedding", {"examples": []}, "option 'examples' must list at least one example text"),
    ("embedding", {"examples": "a bomb"}, "option 'examples' must be a list of texts, got str"),
    ("embedding", {"examples": ["x"], "threshold": 1.5}, "option 'threshold' must be between -1 and 1, got 1.5"),
    ("embedding", {"examples": ["x"], "input": "answer"}, "unknown input 'answer'"),
    ("classifier", {"model": "m"}, "a classifier predicate needs the option 'label' (text)"),
    ("classifier", {"model": "m", "label": "x", "threshold": -0.1}, "option 'threshold' must be between 0 and 1, got -0.1"),
    ("classifier", {"model": "m", "label": "x", "threshold": True}, "option 'threshold' must be a number, got bool"),
    ("classifier", {"model": "m", "label": "x", "threshold": float("nan")}, "option 'threshold' must be a number, got float"),
    ("classifier", {"model": "/no/such/folder", "label": "x"}, "the model folder /no/such/folder does not exist"),
    ("judge", {"backend": "opneai", "model": "m", "question": "q?"}, "unknown judge backend 'opneai' (did you mean 'openai'?)"),
    ("judge", {"model": "m"}, "a judge predicate needs the option 'question' (text)"),
    ("judge", {"model": "m", "question": "q?", "base_url": "http://x/v1"}, "option 'base_url' applies only to judge backend 'openai'"),
    ("judge", {"backend": "openai", "model": "m", "question": "q?", "scoring": "logits"}, "applies only to judge backend 'transformers'"),
    ("judge", {"backend": "openai", "model": "m", "question": "q?", "timeout": 0}, "option 'timeout' must be at least"),
    ("judge", {"backend": "openai", "model": "m", "question": "q?", "max_retries": 2.5}, "option 'max_retries' must be an integer"),
    ("judge", {"backend": "openai", "model": "m", "question": "q?", "base_url": "localhost:8000"}, "must be an http:// or https:// URL"),
    ("judge", {"backend": "openai", "model": "m", "question": "q?", "api_key_env": "sk-proj-abc123"}, "not the key itself"),
    ("judge", {"backend": "openai", "model": "m", "question": "q?", "api_key": "sk-1"}, "must never hold a secret"),
    ("plugin", {"name": "absent_plugin_xyz"}, "plugin 'absent_plugin_xyz' is not installed"),
    ("plugin", {"name": "p", "args": ["a"]}, "option 'args' must be a mapping, got list"),
]


@pytest.mark.parametrize(("kind", "options"), VALID)
def test_valid_options_pass(kind, options):
    assert validate_backend_options(kind, options) == []


@pytest.mark.parametrize(("kind", "options", "expected"), INVALID)
def test_invalid_options_are_explained(kind, options, expected):
    problems = validate_backend_options(kind, options)
    assert any(expected in problem for problem in problems), problems


def test_every_problem_is_reported():
    problems = validate_backend_options("classifier", {"threshold": 2, "lable": "x"})
    assert len(problems) == 4  # unknown 'lable', missing model, missing label, threshold range
    assert any("did you mean 'label'" in problem for problem in problems)


def test_api_key_message_never_repeats_the_key():
    problems = validate_backend_options(
        "judge", {"backend": "openai", "model": "m", "question": "q?", "api_key_env": "sk-proj-abc123"}
    )
    assert all("sk-proj-abc123" not in problem for problem in problems)


def test_every_kind_has_options():
    for kind in BACKEND_KINDS:
        assert backend_option_names(kind)
    assert backend_option_names("nope") == ()


def test_create_backend_lists_problems():
    with pytest.raises(JudgeError) as raised:
        create_backend("judge", {"backend": "vllm", "model": "m", "question": "q?"})
    assert "unknown judge backend 'vllm'" in raised.value.message
