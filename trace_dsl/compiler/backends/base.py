"""The interface between the compiled policy and an expensive predicate backend.

The evaluation engine gathers, for one predicate, every (prompt, response) whose verdict still
depends on it, and calls `evaluate` once with the whole batch. A backend must not raise for one
bad item. It returns a `BackendResult` with `error` set, and the engine turns that into an
`error` verdict for the pair. `fingerprint` names the model and settings, so cached results are
reused only by an identical backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """One item to evaluate.

    Attributes:
        prompt: the prompt text (the last user turn).
        response: the response text being judged.
        params: the predicate's own arguments (example texts, label, question, rubric...).
    """

    prompt: str
    response: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendResult:
    """The answer for one request.

    Attributes:
        value: a score (float) or a yes/no answer (bool); `None` when `error` is set.
        rationale: the judge's words or other explanation, kept for `trace explain`.
        error: why no value could be had (timeout, out-of-format answer, ...), else `None`.
    """

    value: float | bool | None
    rationale: str | None = None
    error: str | None = None


class PredicateBackend(ABC):
    """A model or service that answers one kind of expensive predicate."""

    kind: ClassVar[str] = ""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the backend could answer differently (model id,
        revision, prompt template, decoding settings)."""

    @abstractmethod
    def evaluate(self, requests: Sequence[BackendRequest]) -> list[BackendResult]:
        """Answer every request, in order, one result each."""

    def close(self) -> None:
        """Release models or connections; the default does nothing."""
