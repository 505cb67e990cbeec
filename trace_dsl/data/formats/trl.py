"""The preference formats of TRL's dataset guide, and the toolkit's own pair rows.

- standard: `prompt`, `chosen`, `rejected` as strings.
- conversational: `prompt` as a list of messages ending with a user turn; `chosen` and
  `rejected` as one-message lists holding the assistant reply.
- implicit-prompt: `chosen` and `rejected` only, either both strings or both message lists. The
  prompt is their common beginning. For strings it is the longest common prefix, cut back to the
  last whitespace so that no word is split. For messages it is the longest run of equal leading
  messages.
- trace-pairs: rows written by `PreferencePair.to_dict` (from `trace` commands); the stored `id`
  must match the content.

In the first three, fields beyond the format's own are kept as per-pair metadata under their own
names (`score_chosen`, `source`, ...).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from trace_dsl.data.formats.base import (
    RowError,
    RowFormat,
    RowResult,
    extra_fields,
    is_message_list,
    require,
    require_text,
    single_assistant_reply,
    split_prompt_messages,
    type_name,
    validate_messages,
)
from trace_dsl.data.records import PreferencePair

_PAIR_FIELDS = {"prompt", "chosen", "rejected"}


def convert_standard_row(row: Mapping[str, Any], location: str) -> RowResult:
    """Build a pair from string `prompt`, `chosen` and `rejected` fields."""
    return PreferencePair.create(
        require_text(row, "prompt"),
        require_text(row, "chosen"),
        require_text(row, "rejected"),
        metadata=extra_fields(row, _PAIR_FIELDS),
        source=location,
    )


def convert_conversational_row(row: Mapping[str, Any], location: str) -> RowResult:
    """Build a pair from message-list `prompt`, `chosen` and `rejected` fields."""
    prompt_messages = validate_messages(require(row, "prompt"), "prompt")
    prompt, history = split_prompt_messages(prompt_messages, "prompt")
    chosen = single_assistant_reply(validate_messages(require(row, "chosen"), "chosen"), "chosen")
    rejected = single_assistant_reply(validate_messages(require(row, "rejected"), "rejected"), "rejected")
    return PreferencePair.create(
        prompt, chosen, rejected, history=history, metadata=extra_fields(row, _PAIR_FIELDS), source=location
    )


def _split_common_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    shared = os.path.commonprefix([chosen, rejected])
    # Cut back to a whitespace boundary so the prompt does not end inside a word that the two
    # responses happen to begin alike.
    if len(shared) < min(len(chosen), len(rejected)) and shared and not shared[-1].isspace():
        boundary = max(shared.rfind(" "), shared.rfind("\n"), shared.rfind("\t"))
        shared = shared[: boundary + 1] if boundary >= 0 else ""
    if not shared.strip():
        raise RowError(
            "chosen",
            "chosen and rejected share no beginning, so no prompt can be extracted",
            reason_code="no-shared-prompt",
        )
    return shared.strip(), chosen[len(shared) :].strip(), rejected[len(shared) :].strip()


def convert_implicit_row(row: Mapping[str, Any], location: str) -> RowResult:
    """Build a pair from `chosen` and `rejected` that both contain the prompt."""
    chosen_value = require(row, "chosen")
    rejected_value = require(row, "rejected")
    metadata = extra_fields(row, _PAIR_FIELDS)

    if isinstance(chosen_value, str):
        if not isinstance(rejected_value, str):
            raise RowError(
                "rejected", f"expected a string like chosen, got {type_name(rejected_value)}", reason_code="wrong-type"
            )
        prompt, chosen, rejected = _split_common_text(chosen_value, rejected_value)
        return PreferencePair.create(prompt, chosen, rejected, metadata=metadata, source=location)

    chosen_messages = validate_messages(chosen_value, "chosen")
    rejected_messages = validate_messages(rejected_value, "rejected")
    shared = 0
    while (
        shared < min(len(chosen_messages), len(rejected_messages))
        and chosen_messages[shared] == rejected_messages[shared]
    ):
        shared += 1
    if shared == 0:
        raise RowError(
            "rejected[0]", "differs from chosen[0], so no shared prompt can be extracted", reason_code="no-shared-prompt"
        )
    prompt, history = split_prompt_messages(chosen_messages[:shared], "chosen")
    chosen = single_assistant_reply(chosen_messages[shared:], "chosen (after the shared prompt)")
    rejected = single_assistant_reply(rejected_messages[shared:], "rejected (after the shared prompt)")
    return PreferencePair.create(prompt, chosen, rejected, history=history, metadata=metadata, source=location)


def convert_trace_row(row: Mapping[str, Any], location: str) -> RowResult:
    """Rebuild a pair written by `PreferencePair.to_dict`, checking that its id matches its content."""
    history_value = row.get("history") or []
    history = validate_messages(history_value, "history") if history_value else ()
    for field in ("metadata", "chosen_metadata", "rejected_metadata"):
        if not isinstance(row.get(field) or {}, dict):
            raise RowError(field, f"expected an object, got {type_name(row[field])}", reason_code="wrong-type")
    pair = PreferencePair.create(
        require_text(row, "prompt"),
        require_text(row, "chosen"),
        require_text(row, "rejected"),
        history=history,
        metadata=row.get("metadata"),
        chosen_metadata=row.get("chosen_metadata"),
        rejected_metadata=row.get("rejected_metadata"),
        # Keep the location the pair was first read from, so errors still point at the original row.
        source=row.get("source") or location,
    )
    stored_id = require_text(row, "id")
    if stored_id != pair.id:
        raise RowError(
            "id",
            f"stored id {stored_id} does not match the content hash {pair.id}; the row was edited after it was written",
            reason_code="id-mismatch",
        )
    return pair


def _both(row: Mapping[str, Any], check) -> bool:
    return check(row.get("chosen")) and check(row.get("rejected"))


STANDARD = RowFormat(
    name="standard",
    description="TRL standard: prompt, chosen and rejected as strings",
    detect=lambda row: isinstance(row.get("prompt"), str) and _both(row, lambda value: isinstance(value, str)),
    convert=convert_standard_row,
)

CONVERSATIONAL = RowFormat(
    name="conversational",
    description="TRL conversational: prompt, chosen and rejected as lists of {role, content} messages",
    detect=lambda row: is_message_list(row.get("prompt")) and _both(row, is_message_list),
    convert=convert_conversational_row,
)

IMPLICIT_PROMPT = RowFormat(
    name="implicit-prompt",
    description="TRL implicit prompt: chosen and rejected only, each holding the prompt (strings or messages)",
    detect=lambda row: "prompt" not in row
    and (_both(row, lambda value: isinstance(value, str)) or _both(row, is_message_list)),
    convert=convert_implicit_row,
)

TRACE_PAIRS = RowFormat(
    name="trace-pairs",
    description="pairs written by trace itself (PreferencePair.to_dict): id, prompt, chosen, rejected, metadata",
    detect=lambda row: {"id", "prompt", "chosen", "rejected", "chosen_metadata", "rejected_metadata"} <= set(row),
    convert=convert_trace_row,
)
