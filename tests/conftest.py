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
