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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted SmolLM2-135M-Instruct folder, converted from its GGUF file on first use.

    The folder lives in the toolkit's cache (`$TRACE_CACHE_DIR`, else `~/.cache/trace-dsl`), so
    only the first session on a machine pays the conversion (about 20 s); later ones reuse it.
    """
    from trace_dsl.models import ensure_converted, resolve_model

    return ensure_converted(resolve_model("smollm2"))
