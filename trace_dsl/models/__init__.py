"""Models: resolving a model argument offline, converting packaged models, and loading them.

    resolved = resolve_model("smollm2")          # never touches the network
    model, tokenizer = load_model_and_tokenizer(resolved, device="cpu")
"""

from trace_dsl.models.loading import load_model_and_tokenizer, local_weights_folder
from trace_dsl.models.resolve import (
    DEFAULT_LORA_TARGET_MODULES,
    ResolvedModel,
    cache_dir,
    list_aliases,
    load_alias_table,
    resolve_model,
)
from trace_dsl.models.smollm2 import ensure_converted

__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "ResolvedModel",
    "cache_dir",
    "ensure_converted",
    "list_aliases",
    "load_alias_table",
    "load_model_and_tokenizer",
    "local_weights_folder",
    "resolve_model",
]
