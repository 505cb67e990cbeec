"""The preference-pair record every layer shares.

A pair's id is a hash of its content, so verdicts made by different policy versions, or in
different runs, join on it without a row number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping


def pair_id(history: tuple[Mapping[str, str], ...], prompt: str, chosen: str, rejected: str) -> str:
    """Return the stable content id of a pair: 16 hex digits of a SHA-256.

    The id covers the conversation history, the prompt and both responses, and nothing else, so
    the same pair gets the same id whatever file or format it came from.
    """
    payload = json.dumps(
        {"history": [dict(m) for m in history], "prompt": prompt, "chosen": chosen, "rejected": rejected},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """One (prompt, chosen, rejected) preference labelled under the old policy.

    Attributes:
        id: content hash from `pair_id`.
        prompt: the last user turn, as text.
        chosen: the response preferred under the old policy.
        rejected: the response dispreferred under the old policy.
        history: earlier turns as `{"role": ..., "content": ...}` messages, oldest first; empty
            for single-turn data. The full conversation is `history + (user: prompt)`.
        metadata: per-pair fields (for PKU-SafeRLHF: prompt source, better and safer response ids).
        chosen_metadata: per-response fields of `chosen` (harm categories, severity, safety flag...).
        rejected_metadata: the same for `rejected`.
        source: where the pair came from, as `file:line`, for error messages and `trace explain`.
    """

    id: str
    prompt: str
    chosen: str
    rejected: str
    history: tuple[Mapping[str, str], ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    chosen_metadata: Mapping[str, Any] = field(default_factory=dict)
    rejected_metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def create(
        cls,
        prompt: str,
        chosen: str,
        rejected: str,
        *,
        history: tuple[Mapping[str, str], ...] = (),
        metadata: Mapping[str, Any] | None = None,
        chosen_metadata: Mapping[str, Any] | None = None,
        rejected_metadata: Mapping[str, Any] | None = None,
        source: str = "",
    ) -> "PreferencePair":
        """Build a pair and compute its id from the content."""
        history = tuple(history)
        return cls(
            id=pair_id(history, prompt, chosen, rejected),
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            history=history,
            metadata=dict(metadata or {}),
            chosen_metadata=dict(chosen_metadata or {}),
            rejected_metadata=dict(rejected_metadata or {}),
            source=source,
        )

    def messages(self) -> list[dict[str, str]]:
        """The conversation up to the response: history then the prompt as a user turn."""
        return [dict(m) for m in self.history] + [{"role": "user", "content": self.prompt}]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, which `from_dict` reverses."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "history": [dict(m) for m in self.history],
            "metadata": dict(self.metadata),
            "chosen_metadata": dict(self.chosen_metadata),
            "rejected_metadata": dict(self.rejected_metadata),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "PreferencePair":
        """Rebuild a pair written by `to_dict`, keeping its stored id."""
        return cls(
            id=row["id"],
            prompt=row["prompt"],
            chosen=row["chosen"],
            rejected=row["rejected"],
            history=tuple(row.get("history") or ()),
            metadata=dict(row.get("metadata") or {}),
            chosen_metadata=dict(row.get("chosen_metadata") or {}),
            rejected_metadata=dict(row.get("rejected_metadata") or {}),
            source=row.get("source", ""),
        )
