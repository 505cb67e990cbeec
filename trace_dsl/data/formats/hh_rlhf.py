"""HH-RLHF dialogues: `chosen` and `rejected` hold whole conversations as text.

Each turn starts with `\\n\\nHuman: ` or `\\n\\nAssistant: `. Both strings share the conversation
up to the last `\\n\\nAssistant:` and differ in that final assistant turn. The pair's prompt is
the last human turn of the shared part, its history the turns before that (as `user` and
`assistant` messages), and its responses the two final assistant turns. Turn texts are stripped
of surrounding whitespace.

Rows whose shared parts differ (a handful in the published harmless-base test split) raise
`RowError` with reason `prompt-mismatch`, so the loader reports them or skips them under
`skip_invalid`. Consecutive turns of one role are kept as they are, not merged.

The format carries no labels beyond the preference itself. Any other field of a row is kept as
per-pair metadata under its own name.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from trace_dsl.data.formats.base import RowError, RowFormat, RowResult, extra_fields, require_text
from trace_dsl.data.records import PreferencePair

_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def _normalise_start(text: str) -> str:
    # Some copies drop the two newlines before the first turn.
    if text.startswith("Human:"):
        return "\n\n" + text
    return text


def _split_final_turn(text: str, field: str) -> tuple[str, str]:
    """Split a dialogue at its last assistant marker into the shared part and the final reply."""
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        raise RowError(field, "expected a dialogue ending with an '\\n\\nAssistant:' turn", reason_code="not-a-dialogue")
    return text[:cut], text[cut + len(_ASSISTANT) :].strip()


def _turns(prefix: str, field: str) -> list[dict[str, str]]:
    markers = list(_TURN.finditer(prefix))
    if not markers or markers[0].start() != 0:
        raise RowError(field, "expected the dialogue to start with '\\n\\nHuman:'", reason_code="not-a-dialogue")
    turns = []
    for marker, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following else len(prefix)
        turns.append({"role": _ROLES[marker.group(1)], "content": prefix[marker.end() : end].strip()})
    return turns


def convert_hh_row(row: Mapping[str, Any], location: str) -> RowResult:
    """Build a pair from one HH-RLHF row, splitting off the shared conversation as prompt and history."""
    chosen_text = _normalise_start(require_text(row, "chosen"))
    rejected_text = _normalise_start(require_text(row, "rejected"))
    chosen_prefix, chosen = _split_final_turn(chosen_text, "chosen")
    rejected_prefix, rejected = _split_final_turn(rejected_text, "rejected")

    if chosen_prefix != rejected_prefix:
        at = len(os.path.commonprefix([chosen_prefix, rejected_prefix]))
        raise RowError(
            "rejected",
            f"the conversation before the final assistant turn differs from chosen's (from character {at}), "
            "so there is no shared prompt",
            reason_code="prompt-mismatch",
        )
    turns = _turns(chosen_prefix, "chosen")
    if turns[-1]["role"] != "user":
        raise RowError("chosen", "expected a human turn before the final assistant turn", reason_code="prompt-not-user")

    return PreferencePair.create(
        turns[-1]["content"],
        chosen,
        rejected,
        history=tuple(turns[:-1]),
        metadata=extra_fields(row, {"chosen", "rejected"}),
        source=location,
    )


def _detect(row: Mapping[str, Any]) -> bool:
    chosen = row.get("chosen")
    return (
        "prompt" not in row
        and isinstance(chosen, str)
        and isinstance(row.get("rejected"), str)
        and _normalise_start(chosen).startswith("\n\nHuman:")
    )


HH_RLHF = RowFormat(
    name="hh-rlhf",
    description="HH-RLHF rows: chosen and rejected as whole '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues",
    detect=_detect,
    convert=convert_hh_row,
)
