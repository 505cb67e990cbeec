"""Diagnostics: one problem in a policy file, with its code, position, message and hint.

`trace check` prints each as

    policies/p.tp:12:7: error[TP104]: `has_any` needs a list on its left, got a number
       12 |   violates when response.severity_level has_any critical
          |                 ^^^^^^^^^^^^^^^^^^^^^^^
    hint: ...

The codes are stable so scripts and editors can match on them; `CODES` lists every one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CODES: dict[str, str] = {
    "TP001": "syntax error",
    "TP002": "invalid string literal",
    "TP003": "file cannot be read",
    "TP101": "unknown name",
    "TP102": "duplicate definition",
    "TP103": "duplicate rule id",
    "TP104": "wrong type",
    "TP105": "invalid regular expression",
    "TP106": "threshold out of range",
    "TP107": "invalid model-call options",
    "TP108": "model call in the wrong place",
    "TP109": "predicate defined in terms of itself",
    "TP110": "imported file not found",
    "TP111": "import leaves the policy's folder tree",
    "TP112": "import cycle",
    "TP113": "statement not allowed in this file",
    "TP114": "policy header missing or misplaced",
    "TP120": "field not in the dataset",
    "TP121": "field type differs from the dataset",
    "TP130": "example expects a rule that does not exist",
    "TP131": "example incomplete or malformed",
}


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a policy file.

    Attributes:
        code: a key of `CODES`.
        message: what is wrong, naming the value.
        path: the file, as given by the user or relative to the policy's folder.
        line: 1-based line (0 when the problem has no position, such as an unreadable file).
        column: 1-based column.
        end_column: one past the last column to underline on `line` (0 underlines one character).
        hint: what to do about it, or `None`.
        severity: "error" or "warning"; only errors make `trace check` fail.
    """

    code: str
    message: str
    path: str
    line: int = 0
    column: int = 0
    end_column: int = 0
    hint: str | None = None
    severity: str = "error"

    def location(self) -> str:
        """`path:line:col`, or just `path` without a position."""
        if self.line <= 0:
            return self.path
        return f"{self.path}:{self.line}:{self.column}"

    def headline(self) -> str:
        """Return the first line of the rendered diagnostic."""
        return f"{self.location()}: {self.severity}[{self.code}]: {self.message}"

    def render(self, source: str | None = None) -> str:
        """Render the diagnostic: headline, the source line with a caret under the problem, hint."""
        lines = [self.headline()]
        if source is not None and self.line > 0:
            source_lines = source.splitlines()
            if self.line <= len(source_lines):
                text = source_lines[self.line - 1].expandtabs(1)
                gutter = f"{self.line:>5} | "
                lines.append(gutter + text)
                start = max(self.column, 1)
                end = self.end_column if self.end_column > start else start + 1
                end = min(end, max(len(text) + 1, start + 1))
                lines.append(" " * (len(gutter) - 2) + "| " + " " * (start - 1) + "^" * (end - start))
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "path": self.path,
            "line": self.line,
            "column": self.column,
            "end_column": self.end_column,
            "hint": self.hint,
        }


def render_all(diagnostics: list[Diagnostic], sources: dict[str, str] | None = None) -> str:
    """Render several diagnostics, reading each one's source line from `sources` or the file."""
    sources = dict(sources or {})
    blocks = []
    for diagnostic in diagnostics:
        if diagnostic.path not in sources:
            try:
                sources[diagnostic.path] = Path(diagnostic.path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                sources[diagnostic.path] = ""
        blocks.append(diagnostic.render(sources[diagnostic.path] or None))
    return "\n".join(blocks)


def close_matches(name: str, candidates, limit: int = 3) -> list[str]:
    """Return the candidates spelled most like `name`, best first."""
    import difflib

    return difflib.get_close_matches(name, sorted(set(candidates)), n=limit, cutoff=0.6)


def did_you_mean(name: str, candidates) -> str | None:
    """Return a hint naming the close matches of `name`, or `None` when nothing is close."""
    matches = close_matches(name, candidates)
    if not matches:
        return None
    return "did you mean " + " or ".join(f"`{m}`" for m in matches) + "?"
