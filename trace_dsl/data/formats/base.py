"""Shared parts of the row formats: the row error, the skip record and message validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from trace_dsl.data.records import PreferencePair


class RowError(Exception):
    """A row does not fit its format. The loader adds the file and line and raises or skips it.

    Attributes:
        field: the offending field, dotted for nested values (`chosen[1].role`).
        problem: what is wrong and what was expected.
        reason_code: a short stable label used to count skipped rows by reason.
    """

    def __init__(self, field: str, problem: str, *, reason_code: str = "invalid-row") -> None:
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem
        self.reason_code = reason_code


@dataclass(frozen=True, slots=True)
class SkipRow:
    """A well-formed row that the format's own rules leave out (PKU-SafeRLHF without a safer response)."""

    reason: str
    reason_code: str


RowResult = PreferencePair | SkipRow


@dataclass(frozen=True, slots=True)
class RowFormat:
    """A named row format: how to recognise a row of it and how to turn one into a pair.

    Attributes:
        name: the format name used by `--format` and reported by `trace data inspect`.
        description: one line for help text.
        detect: whether a row looks like this format; only called on the first row.
        convert: builds the pair from a row and its location, or raises `RowError`.
    """

    name: str
    description: str
    detect: Callable[[Mapping[str, Any]], bool]
    convert: Callable[[Mapping[str, Any], str], RowResult]


def type_name(value: Any) -> str:
    """Return the JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def require(row: Mapping[str, Any], field: str) -> Any:
    """Return `row[field]`, or raise `RowError` when it is absent."""
    if field not in row:
        raise RowError(field, "missing", reason_code="missing-field")
    return row[field]


def require_text(row: Mapping[str, Any], field: str) -> str:
    """Return `row[field]` when it is a string, else raise `RowError`."""
    value = require(row, field)
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type_name(value)}", reason_code="wrong-type")
    return value


def is_message_list(value: Any) -> bool:
    """Return whether `value` looks like a list of chat messages (its first item has a role)."""
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def validate_messages(value: Any, field: str) -> tuple[dict[str, str], ...]:
    """Check a list of chat messages and return it as `{"role", "content"}` dicts.

    Raises:
        RowError: `value` is not a non-empty list of objects with a string `role` and a string
            `content` (multimodal content parts are not supported).
    """
    if not isinstance(value, (list, tuple)):
        raise RowError(field, f"expected a list of messages, got {type_name(value)}", reason_code="wrong-type")
    if not value:
        raise RowError(field, "expected at least one message, got an empty list", reason_code="empty-messages")
    messages = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise RowError(where, f"expected a message object, got {type_name(message)}", reason_code="wrong-type")
        role = message.get("role")
        content = message.get("content")
        if not isinstance(role, str) or not role:
            raise RowError(f"{where}.role", f"expected a non-empty string, got {type_name(role)}", reason_code="wrong-type")
        if not isinstance(content, str):
            raise RowError(
                f"{where}.content",
                f"expected a string, got {type_name(content)} (only text messages are supported)",
                reason_code="wrong-type",
            )
        messages.append({"role": role, "content": content})
    return tuple(messages)


def split_prompt_messages(messages: tuple[dict[str, str], ...], field: str) -> tuple[str, tuple[dict[str, str], ...]]:
    """Split a conversation into the last user turn (the prompt) and the turns before it (the history).

    Raises:
        RowError: the conversation does not end with a user message.
    """
    last = messages[-1]
    if last["role"] != "user":
        raise RowError(
            f"{field}[{len(messages) - 1}].role",
            f"the prompt must end with a user message, got {last['role']!r}",
            reason_code="prompt-not-user",
        )
    return last["content"], messages[:-1]


def single_assistant_reply(messages: tuple[dict[str, str], ...], field: str) -> str:
    """Return the text of a response given as a one-message list with role 'assistant'.

    Raises:
        RowError: the list contains more than one message, or its message is not an assistant turn.
    """
    if len(messages) != 1:
        raise RowError(
            field,
            f"expected exactly one assistant message as the response, got {len(messages)} messages",
            reason_code="multi-message-response",
        )
    if messages[0]["role"] != "assistant":
        raise RowError(f"{field}[0].role", f"expected 'assistant', got {messages[0]['role']!r}", reason_code="wrong-role")
    return messages[0]["content"]


def extra_fields(row: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """Return the row's fields outside `known`, kept as per-pair metadata."""
    return {key: value for key, value in row.items() if key not in known}
