"""Test-wide settings: no test may reach a model hub, and every Hugging Face cache is private
to the test session."""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="trace-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> "os.PathLike[str]":
    """A folder with a tiny random Llama model and its trained tokenizer (see tests/tiny_models.py)."""
    from tiny_models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), seed=0)
