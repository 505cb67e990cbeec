"""The syntax tree of a policy file: one small frozen record per construct.

Every node carries a `Span` (1-based line and column of its first and last character), so the
checker, the formatter and `trace explain` can point at the source. The parser's transformer
(`trace_dsl.lang.parser`) is the only place that builds these records from Lark trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True, slots=True)
class Span:
    """A source range: 1-based lines and columns, the end column one past the last character."""

    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(frozen=True, slots=True)
class Node:
    """Base of every syntax-tree record."""

    span: Span

    @property
    def line(self) -> int:
        """The 1-based line the node starts on."""
        return self.span.line

    @property
    def column(self) -> int:
        """The 1-based column the node starts at."""
        return self.span.column


# ---- Literals -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Str(Node):
    """A quoted string; `value` is the decoded text."""

    value: str


@dataclass(frozen=True, slots=True)
class Num(Node):
    """A number literal; `text` keeps the spelling for the formatter."""

    value: float
    text: str


@dataclass(frozen=True, slots=True)
class Bool(Node):
    """`true` or `false`."""

    value: bool


@dataclass(frozen=True, slots=True)
class ListLit(Node):
    """A bracketed list of literals."""

    items: tuple["Literal", ...]


@dataclass(frozen=True, slots=True)
class MapEntry(Node):
    """One `key: value` entry of a map."""

    key: str
    value: "Literal | MapLit"


@dataclass(frozen=True, slots=True)
class MapLit(Node):
    """A braced map of entries, used for plugin arguments and example metadata."""

    entries: tuple[MapEntry, ...]


@dataclass(frozen=True, slots=True)
class Regex(Node):
    """A `/pattern/flags` literal; the pattern is Python `re` syntax."""

    pattern: str
    flags: str


Literal = Union[Str, Num, Bool, ListLit]

# ---- Values and tests -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref(Node):
    """A reference to a `let` value or a predicate by name."""

    name: str


@dataclass(frozen=True, slots=True)
class Field(Node):
    """A metadata field: `response.<name>` (of the response being judged) or `pair.<name>`."""

    scope: str
    name: str


@dataclass(frozen=True, slots=True)
class Text(Node):
    """A text subject: `prompt`, `response` or `history` (earlier turns, one per line)."""

    subject: str


@dataclass(frozen=True, slots=True)
class Length(Node):
    """`len(text)` in characters or `words(text)` in whitespace-separated words."""

    unit: str
    subject: Text


@dataclass(frozen=True, slots=True)
class OptionArg(Node):
    """A `name=value` argument of a model call."""

    name: str
    value: "Literal | MapLit | Ref"


@dataclass(frozen=True, slots=True)
class ModelCall(Node):
    """An expensive predicate: `embedding(...)`, `classifier(...)`, `judge(...)` or `plugin(...)`.

    Attributes:
        kind: the backend kind.
        subject: the text judged; `None` means the response.
        target: the positional string (the plugin's entry-point name), else `None`.
        options: the `name=value` arguments in source order.
    """

    kind: str
    subject: Text | None
    target: Str | None
    options: tuple[OptionArg, ...]


Value = Union[Ref, Field, Text, Length, ModelCall, Str, Num, Bool, ListLit]


@dataclass(frozen=True, slots=True)
class Compare(Node):
    """`left op right` with op one of == != < <= > >=."""

    left: Value
    op: str
    right: Value


@dataclass(frozen=True, slots=True)
class Matches(Node):
    """`subject matches /regex/`."""

    subject: Value
    regex: Regex


@dataclass(frozen=True, slots=True)
class Keywords(Node):
    """`subject contains|contains_any|contains_all words`, case-insensitive substring tests."""

    subject: Value
    op: str
    words: Value


@dataclass(frozen=True, slots=True)
class SetTest(Node):
    """`left has_any|has_all|in right`: list-field overlap, inclusion or membership."""

    left: Value
    op: str
    right: Value


@dataclass(frozen=True, slots=True)
class Truth(Node):
    """A value used as a test on its own: a predicate name, a boolean field or a yes/no model call."""

    value: Value


@dataclass(frozen=True, slots=True)
class Not(Node):
    """`not operand`."""

    operand: "Expr"


@dataclass(frozen=True, slots=True)
class And(Node):
    """`a and b and ...`, flattened."""

    operands: tuple["Expr", ...]


@dataclass(frozen=True, slots=True)
class Or(Node):
    """`a or b or ...`, flattened."""

    operands: tuple["Expr", ...]


Expr = Union[Compare, Matches, Keywords, SetTest, Truth, Not, And, Or]

# ---- Statements -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header(Node):
    """`policy "name" version "x.y.z" [description "..."]`."""

    name: Str
    version: Str
    description: Str | None


@dataclass(frozen=True, slots=True)
class Import(Node):
    """`import "relative/path.tp"`: brings another file's `let` values and predicates into scope."""

    path: Str


@dataclass(frozen=True, slots=True)
class Let(Node):
    """`let name = literal`: a named constant."""

    name: str
    value: Literal


@dataclass(frozen=True, slots=True)
class PredicateDef(Node):
    """`predicate name = expr`: a named, reusable test of one response."""

    name: str
    expr: Expr


@dataclass(frozen=True, slots=True)
class Rule(Node):
    """`rule ID "title": violates when expr [unless expr]`.

    A rule fires on a response when `when` is true and `unless` is not. A response complies
    with the policy when no rule fires.
    """

    id: str
    title: Str
    when: Expr
    unless: Expr | None


@dataclass(frozen=True, slots=True)
class ExampleResponse(Node):
    """`chosen "text" {metadata}` or `rejected "text" {metadata}` inside an example."""

    role: str
    text: Str
    metadata: MapLit | None


@dataclass(frozen=True, slots=True)
class Expectation(Node):
    """`expect category [by RULE, ...]`: the category and the rules expected to fire on chosen."""

    category: str
    rules: tuple[str, ...]
    rule_spans: tuple[Span, ...]


@dataclass(frozen=True, slots=True)
class ExampleItem(Node):
    """One line of an example block.

    `kind` is prompt, history, chosen, rejected, pair or expect. `value` is the matching node:
    a `Str`, a tuple of `Str`, an `ExampleResponse`, a `MapLit` or an `Expectation`.
    """

    kind: str
    value: object


@dataclass(frozen=True, slots=True)
class Example(Node):
    """`example "title" { ... }`: a pair with its expected triage category."""

    title: Str
    items: tuple[ExampleItem, ...]

    def first(self, kind: str) -> object | None:
        """Return the value of the first item of `kind`, or `None`."""
        for item in self.items:
            if item.kind == kind:
                return item.value
        return None


Statement = Union[Import, Let, PredicateDef, Rule, Example]


@dataclass(frozen=True, slots=True)
class Comment(Node):
    """A `# ...` comment; `own_line` is true when no code precedes it on its line."""

    text: str
    own_line: bool


@dataclass(frozen=True, slots=True)
class PolicyFile(Node):
    """One parsed `.tp` file: its header (absent in a shared library file), statements and comments."""

    path: str
    header: Header | None
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...]
