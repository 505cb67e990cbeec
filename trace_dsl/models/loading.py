"""Loading a resolved model and its tokenizer for the runtime, from local files only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trace_dsl.errors import ModelResolutionError
from trace_dsl.models.resolve import ResolvedModel, resolve_model
from trace_dsl.models.smollm2 import ensure_converted

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def local_weights_folder(resolved: ResolvedModel) -> Path:
    """Return the folder to load `resolved` from, converting a packaged model on first use.

    Raises:
        ModelResolutionError: the weights are not on this machine.
    """
    if resolved.kind == "packaged":
        return ensure_converted(resolved)
    if resolved.path is None or not resolved.weights_present:
        # Resolving again with weights required raises the error whose hint explains how to get them.
        resolve_model(resolved.name, require_weights=True)
        raise ModelResolutionError(f"model {resolved.name!r} has no local weights")
    return resolved.path


def _torch_dtype(dtype: "str | torch.dtype", device: str) -> "torch.dtype":
    import torch

    if not isinstance(dtype, str):
        return dtype
    if dtype == "auto":
        # bfloat16 on accelerators that support it; float32 on CPU, where half precision is slow.
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected auto, {', '.join(sorted(_DTYPES))}")
    return getattr(torch, _DTYPES[dtype])


def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model_and_tokenizer(
    model: "ResolvedModel | str",
    *,
    dtype: "str | torch.dtype" = "auto",
    device: str = "auto",
    **model_kwargs: Any,
) -> "tuple[PreTrainedModel, PreTrainedTokenizerBase]":
    """Load a causal language model and its tokenizer from local files, in eval mode.

    Args:
        model: a `ResolvedModel`, or a name that `resolve_model` resolves.
        dtype: 'auto' (bfloat16 on a CUDA device that supports it, else float32), 'float32',
            'float16', 'bfloat16', or a `torch.dtype`.
        device: 'auto' (cuda, then mps, then cpu), or a torch device string.
        model_kwargs: passed on to `AutoModelForCausalLM.from_pretrained`.

    The tokenizer gets a pad token when it has none (its end-of-sequence token), because batched
    scoring pads. When the model's alias expects a chat template and the tokenizer carries none,
    loading fails instead of formatting conversations wrongly.

    Raises:
        ModelResolutionError: the model cannot be resolved, its weights are not on this machine,
            or its tokenizer lacks the expected chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(model) if isinstance(model, str) else model
    folder = local_weights_folder(resolved)
    device = _pick_device(device)
    torch_dtype = _torch_dtype(dtype, device)

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if resolved.chat_template and not tokenizer.chat_template:
        raise ModelResolutionError(
            f"model {resolved.name!r}: tokenizer in {folder} has no chat template, "
            f"expected a {resolved.chat_template} template",
            hint="use the instruction-tuned variant of the model, or a folder whose tokenizer_config.json has chat_template",
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelResolutionError(f"model {resolved.name!r}: tokenizer has neither a pad token nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True, **model_kwargs)
    loaded.to(device)
    loaded.eval()
    if loaded.config.pad_token_id is None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s from %s (%s, %s)", resolved.name, folder, torch_dtype, device)
    return loaded, tokenizer
