"""The canonical layout of a policy file, used by `trace fmt` and by the policy content hash.

The layout uses two-space indents and one statement per line. A blank line goes before every
rule and example, between statements of different kinds, and wherever the source had one. Long
tests break before `and` or `or`, and long word lists go one item per line. Example lines come
in the order history, prompt, chosen, rejected, pair, expect. Formatting is idempotent:
`format_file` of its own output returns the same text.

Comments are kept. Each comment belongs to a layout unit (a statement, a rule's `when` or
`unless` test, an example line, an item of a `let` list): a comment on its own line goes before
the unit that follows it, a comment after code goes at the end of the first line of the
innermost unit that contains it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from trace_dsl.lang import nodes as n

WIDTH = 100
INDENT = "  "
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXAMPLE_ORDER = {"history": 0, "prompt": 1, "chosen": 2, "rejected": 3, "pair": 4, "expect": 5}
_PRECEDENCE = {n.Or: 1, n.And: 2, n.Not: 3}


@functools.lru_cache(maxsize=1)
def keywords() -> frozenset[str]:
    """Return the reserved words of the language, which cannot be names or unquoted map keys."""
    from trace_dsl.lang.parser import grammar_parser

    words = set()
    for terminal in grammar_parser().terminals:
        pattern = terminal.pattern
        if pattern.type == "str" and _IDENTIFIER.fullmatch(pattern.value):
            words.add(pattern.value)
    return frozenset(words)


# ---- Single-line text of values and tests -------------------------------------------------------


def quote(text: str) -> str:
    """Quote `text` as a string literal, escaping what a literal cannot contain as is."""
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or char in "\u2028\u2029\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _key(name: str) -> str:
    return name if _IDENTIFIER.fullmatch(name) and name not in keywords() else quote(name)


def value_text(node: Any) -> str:
    """Return the canonical one-line text of a value or literal."""
    if isinstance(node, n.Str):
        return quote(node.value)
    if isinstance(node, n.Num):
        return node.text
    if isinstance(node, n.Bool):
        return "true" if node.value else "false"
    if isinstance(node, n.ListLit):
        return "[" + ", ".join(value_text(item) for item in node.items) + "]"
    if isinstance(node, n.MapLit):
        if not node.entries:
            return "{}"
        return "{ " + ", ".join(f"{_key(e.key)}: {value_text(e.value)}" for e in node.entries) + " }"
    if isinstance(node, n.Ref):
        return node.name
    if isinstance(node, n.Field):
        return f"{node.scope}.{node.name}"
    if isinstance(node, n.Text):
        return node.subject
    if isinstance(node, n.Length):
        return f"{'len' if node.unit == 'characters' else 'words'}({node.subject.subject})"
    if isinstance(node, n.ModelCall):
        args = []
        if node.subject is not None:
            args.append(node.subject.subject)
        if node.target is not None:
            args.append(quote(node.target.value))
        args.extend(f"{option.name}={value_text(option.value)}" for option in node.options)
        return f"{node.kind}({', '.join(args)})"
    if isinstance(node, n.Regex):
        return f"/{node.pattern}/{node.flags}"
    raise TypeError(f"not a value: {type(node).__name__}")


def _flat_operands(node: n.And | n.Or) -> list[Any]:
    operands: list[Any] = []
    for operand in node.operands:
        if type(operand) is type(node):
            operands.extend(_flat_operands(operand))
        else:
            operands.append(operand)
    return operands


def expr_text(node: Any, parent_precedence: int = 0) -> str:
    """Return the canonical one-line text of a test, with the parentheses precedence needs."""
    precedence = _PRECEDENCE.get(type(node), 4)
    if isinstance(node, n.And) and parent_precedence == _PRECEDENCE[n.Or]:
        # `a and b` inside `or` gets parentheses it does not need, so readers need not know precedence.
        parent_precedence = precedence + 1
    if isinstance(node, (n.And, n.Or)):
        word = " and " if isinstance(node, n.And) else " or "
        text = word.join(expr_text(op, precedence) for op in _flat_operands(node))
    elif isinstance(node, n.Not):
        text = "not " + expr_text(node.operand, precedence)
    elif isinstance(node, n.Truth):
        text = value_text(node.value)
    elif isinstance(node, n.Compare):
        text = f"{value_text(node.left)} {node.op} {value_text(node.right)}"
    elif isinstance(node, n.Matches):
        text = f"{value_text(node.subject)} matches {value_text(node.regex)}"
    elif isinstance(node, n.Keywords):
        text = f"{value_text(node.subject)} {node.op} {value_text(node.words)}"
    elif isinstance(node, n.SetTest):
        text = f"{value_text(node.left)} {node.op} {value_text(node.right)}"
    else:
        raise TypeError(f"not a test: {type(node).__name__}")
    if precedence < parent_precedence:
        return f"({text})"
    return text


def _test_lines(node: Any, prefix: str, base: str, precedence: int) -> list[str]:
    """One test after `prefix`; a long word list in it goes one item per line, indented from `base`."""
    single = prefix + expr_text(node, precedence)
    if len(single) <= WIDTH:
        return [single]
    if isinstance(node, n.Keywords) and isinstance(node.words, n.ListLit) and node.words.items:
        head, items = f"{value_text(node.subject)} {node.op} [", node.words.items
    elif isinstance(node, n.SetTest) and isinstance(node.right, n.ListLit) and node.right.items:
        head, items = f"{value_text(node.left)} {node.op} [", node.right.items
    else:
        return [single]
    lines = [prefix + head]
    lines.extend(f"{base}{INDENT}{value_text(item)}," for item in items)
    lines.append(base + "]")
    return lines


def _expr_lines(node: Any, first: str, continuation: str, base: str) -> list[str]:
    """`first` followed by the test, broken before each top-level `or` (else `and`) when long.

    `base` is the indentation of the line `first` starts, for closing brackets of long lists.
    """
    if len(first + expr_text(node)) <= WIDTH:
        return [first + expr_text(node)]
    if not isinstance(node, (n.And, n.Or)):
        return _test_lines(node, first, base, 0)
    word = "and" if isinstance(node, n.And) else "or"
    precedence = _PRECEDENCE[type(node)]
    operands = _flat_operands(node)
    lines = _test_lines(operands[0], first, base, precedence)
    for operand in operands[1:]:
        lines.extend(_test_lines(operand, f"{continuation}{word} ", continuation, precedence))
    return lines


# ---- Statement text -----------------------------------------------------------------------------------


def statement_text(node: Any) -> str:
    """Return the canonical text of one statement without comments."""
    return "\n".join(line for line, _ in _Layout(()).statement(node))


@dataclass
class _Unit:
    node: Any
    depth: int
    leading: list[n.Comment] = field(default_factory=list)
    trailing: list[n.Comment] = field(default_factory=list)


class _Layout:
    """Lays out statements as lines, placing each comment with its unit."""

    def __init__(self, comments: tuple[n.Comment, ...], units: dict[int, _Unit] | None = None) -> None:
        self.units = units or {}
        self.comments = comments

    def _comments(self, node: Any, indent: str) -> tuple[list[str], str]:
        unit = self.units.get(id(node))
        if unit is None:
            return [], ""
        lead = [indent + c.text for c in unit.leading]
        trail = "".join("  " + c.text for c in unit.trailing)
        return lead, trail

    def _unit_lines(self, node: Any, indent: str, lines: list[str]) -> list[tuple[str, Any]]:
        lead, trail = self._comments(node, indent)
        out = [(line, None) for line in lead]
        out.append((lines[0] + trail, node))
        out.extend((line, None) for line in lines[1:])
        return out

    def statement(self, node: Any) -> list[tuple[str, Any]]:
        if isinstance(node, n.Header):
            lines = [f"policy {quote(node.name.value)} version {quote(node.version.value)}"]
            if node.description is not None:
                lines.append(f"description {quote(node.description.value)}")
            return self._unit_lines(node, "", lines)
        if isinstance(node, n.Import):
            return self._unit_lines(node, "", [f"import {quote(node.path.value)}"])
        if isinstance(node, n.Let):
            return self._let(node)
        if isinstance(node, n.PredicateDef):
            return self._unit_lines(node, "", _expr_lines(node.expr, f"predicate {node.name} = ", INDENT, ""))
        if isinstance(node, n.Rule):
            return self._rule(node)
        if isinstance(node, n.Example):
            return self._example(node)
        raise TypeError(f"not a statement: {type(node).__name__}")

    def _let(self, node: n.Let) -> list[tuple[str, Any]]:
        head = f"let {node.name} = "
        value = node.value
        single = head + value_text(value)
        items_commented = isinstance(value, n.ListLit) and any(
            self.units.get(id(item)) and (self.units[id(item)].leading or self.units[id(item)].trailing)
            for item in value.items
        )
        if not isinstance(value, n.ListLit) or not value.items or (len(single) <= WIDTH and not items_commented):
            return self._unit_lines(node, "", [single])
        out = self._unit_lines(node, "", [head + "["])
        for item in value.items:
            out.extend(self._unit_lines(item, INDENT, [INDENT + value_text(item) + ","]))
        out.append(("]", None))
        return out

    def _rule(self, node: n.Rule) -> list[tuple[str, Any]]:
        out = self._unit_lines(node, "", [f"rule {node.id} {quote(node.title.value)}:"])
        when = _expr_lines(node.when, INDENT + "violates when ", INDENT * 2, INDENT)
        out.extend(self._unit_lines(node.when, INDENT, when))
        if node.unless is not None:
            unless = _expr_lines(node.unless, INDENT + "unless ", INDENT * 2, INDENT)
            out.extend(self._unit_lines(node.unless, INDENT, unless))
        return out

    def _example(self, node: n.Example) -> list[tuple[str, Any]]:
        out = self._unit_lines(node, "", [f"example {quote(node.title.value)} {{"])
        items = sorted(node.items, key=lambda item: _EXAMPLE_ORDER[item.kind])
        for item in items:
            out.extend(self._unit_lines(item, INDENT, [INDENT + _example_item_text(item)]))
        out.append(("}", None))
        return out


def _example_item_text(item: n.ExampleItem) -> str:
    value = item.value
    if item.kind == "prompt":
        return f"prompt {quote(value.value)}"
    if item.kind == "history":
        return "history [" + ", ".join(quote(turn.value) for turn in value) + "]"
    if item.kind in ("chosen", "rejected"):
        text = f"{item.kind} {quote(value.text.value)}"
        if value.metadata is not None:
            text += " " + value_text(value.metadata)
        return text
    if item.kind == "pair":
        return "pair " + value_text(value)
    text = f"expect {value.category}"
    if value.rules:
        text += " by " + ", ".join(value.rules)
    return text


# ---- Whole files --------------------------------------------------------------------------------------


def _collect_units(tree: n.PolicyFile) -> list[_Unit]:
    units: list[_Unit] = []
    if tree.header is not None:
        units.append(_Unit(tree.header, 0))
    for statement in tree.statements:
        units.append(_Unit(statement, 0))
        if isinstance(statement, n.Let) and isinstance(statement.value, n.ListLit):
            units.extend(_Unit(item, 1) for item in statement.value.items)
        elif isinstance(statement, n.Rule):
            units.append(_Unit(statement.when, 1))
            if statement.unless is not None:
                units.append(_Unit(statement.unless, 1))
        elif isinstance(statement, n.Example):
            units.extend(_Unit(item, 1) for item in statement.items)
    return units


def _attach_comments(tree: n.PolicyFile, units: list[_Unit]) -> list[n.Comment]:
    """Give each comment to its unit; return the comments after the last unit."""
    leftover: list[n.Comment] = []
    starts = sorted(units, key=lambda u: (u.node.span.line, u.node.span.column, u.depth))
    for comment in tree.comments:
        line, column = comment.span.line, comment.span.column
        if comment.own_line:
            following = [u for u in starts if (u.node.span.line, u.node.span.column) > (line, column)]
            if not following:
                leftover.append(comment)
                continue
            first_line = following[0].node.span.line
            candidates = [u for u in following if u.node.span.line == first_line]
            min(candidates, key=lambda u: (u.depth, u.node.span.column)).leading.append(comment)
            continue
        containing = [u for u in units if u.node.span.line <= line <= u.node.span.end_line]
        if containing:
            max(containing, key=lambda u: (u.depth, u.node.span.line, u.node.span.column)).trailing.append(comment)
            continue
        before = [u for u in starts if u.node.span.line <= line]
        if before:
            before[-1].trailing.append(comment)
        else:
            leftover.append(comment)
    return leftover


def _kind(node: Any) -> str:
    return type(node).__name__


def _blank_between(previous: Any, current: _Unit, source_lines: list[str] | None) -> bool:
    if isinstance(current.node, (n.Rule, n.Example)) or isinstance(previous, (n.Header, n.Rule, n.Example)):
        return True
    if _kind(previous) != _kind(current.node):
        return True
    if source_lines is None:
        return False
    first = current.leading[0].span.line if current.leading else current.node.span.line
    return any(not source_lines[i - 1].strip() for i in range(previous.span.end_line + 1, first))


def format_file(tree: n.PolicyFile, source: str | None = None) -> str:
    """The canonical text of a parsed file, comments included, ending with one newline.

    Args:
        tree: the parsed file.
        source: its text, used only to keep blank lines the author put between statements of
            the same kind and between leading comments.
    """
    units = _collect_units(tree)
    leftover = _attach_comments(tree, units)
    layout = _Layout(tree.comments, {id(u.node): u for u in units})
    source_lines = source.split("\n") if source is not None else None
    out: list[str] = []
    previous = None
    for unit in (u for u in units if u.depth == 0):
        if previous is not None and _blank_between(previous, unit, source_lines):
            out.append("")
        lines = layout.statement(unit.node)
        # Keep one blank line inside a run of leading comments where the author left one.
        count = len(unit.leading)
        for index, (line, _) in enumerate(lines):
            if source_lines is not None and 0 < index <= count:
                above = unit.leading[index - 1].span.line
                below = unit.leading[index].span.line if index < count else unit.node.span.line
                if any(not source_lines[i - 1].strip() for i in range(above + 1, below)):
                    out.append("")
            out.append(line)
        previous = unit.node
    if leftover:
        if out:
            out.append("")
        out.extend(c.text for c in leftover)
    return "\n".join(out).rstrip("\n") + "\n"


def format_source(source: str, path: str = "<string>") -> str:
    """Parse and format a policy text.

    Raises:
        ParseFailure: the text has syntax errors.
    """
    from trace_dsl.lang.parser import parse_source

    return format_file(parse_source(source, path), source)
