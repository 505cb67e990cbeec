"""Check a policy: resolve names and imports, check types, regular expressions, thresholds,
model-call options, example cases and, when a dataset is given, its metadata fields.

`check_policy` never raises for bad input: it returns a `CheckResult` whose `diagnostics` list
every problem found, and whose `program` (the resolved definitions the compiler consumes) is
set only when there is no error.

Types of values: `bool`, `number`, `string` (a literal), `text` (prompt, response, history),
`list`, `score` (an embedding or classifier similarity or probability), `plugin` (a plugin's
answer: yes/no or a number), `predicate`, and `field` (metadata, whose type is inferred from how
the policy uses it and checked against the dataset with `--data`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

try:  # Python 3.11 renamed the modules behind `re`; 3.10 has them as sre_parse and sre_constants.
    from re import _constants as _sre_constants, _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

from trace_dsl.lang import nodes as n
from trace_dsl.lang.diagnostics import Diagnostic, did_you_mean
from trace_dsl.lang.imports import Module, ModuleSet, load_modules

# Score ranges of the model calls that return a number, for threshold checks.
SCORE_RANGES: dict[str, tuple[float, float, str]] = {
    "embedding": (-1.0, 1.0, "a cosine similarity"),
    "classifier": (0.0, 1.0, "a probability"),
}
REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@dataclass(frozen=True, slots=True)
class Definition:
    """A named `let` value or predicate with the file it comes from."""

    name: str
    node: n.Let | n.PredicateDef
    module: str


@dataclass
class Program:
    """A checked policy: every definition it can use, resolved across its imports.

    Attributes:
        path: the policy file as given.
        header: its header (`None` for a shared library file).
        modules: every file, imports before their importer, each once.
        constants: `let` values by name, as Python values.
        predicates: predicate definitions by name, in declaration order (imports first).
        rules: the violation rules of the policy file, in order.
        examples: its example cases, in order.
        field_types: the type the policy uses each metadata field as, keyed by (scope, name).
    """

    path: str
    header: n.Header | None
    modules: list[Module]
    constants: dict[str, Any]
    let_nodes: dict[str, n.Let]
    predicates: dict[str, n.PredicateDef]
    rules: list[n.Rule]
    examples: list[n.Example]
    field_types: dict[tuple[str, str], str]


@dataclass
class CheckResult:
    """The outcome of `check_policy`.

    Attributes:
        diagnostics: every problem, errors and warnings, in file order.
        sources: the text of each file by its display path, to render diagnostics.
        program: the resolved policy, `None` when there is an error.
    """

    diagnostics: list[Diagnostic]
    sources: dict[str, str]
    program: Program | None

    @property
    def ok(self) -> bool:
        """Whether no diagnostic is an error."""
        return not any(d.severity == "error" for d in self.diagnostics)


def _nested_unbounded_repeat(items: Iterable) -> bool:
    """Return whether a parsed pattern has an unbounded repeat inside another, as in `(a+)+`.

    This is the usual shape of catastrophic backtracking in Python `re`, which has no time limit.
    Overlapping alternatives under one repeat, as in `(a|a)*`, backtrack too and are not found.
    """
    return _walk_repeats(items, inside=False)


def _walk_repeats(items: Iterable, *, inside: bool) -> bool:
    repeats = (_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT)
    for op, arg in items:
        if op in repeats:
            _low, high, body = arg
            unbounded = high == _sre_constants.MAXREPEAT
            if unbounded and inside:
                return True
            if _walk_repeats(body, inside=inside or unbounded):
                return True
        elif op is _sre_constants.SUBPATTERN:
            if _walk_repeats(arg[-1], inside=inside):
                return True
        elif op is _sre_constants.BRANCH:
            if any(_walk_repeats(branch, inside=inside) for branch in arg[1]):
                return True
        elif op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
            if _walk_repeats(arg[1], inside=inside):
                return True
        # Atomic groups and possessive repeats never backtrack into their body, so they are skipped.
    return False


# ---- Dataset schema -------------------------------------------------------------------------------


def value_type_name(value: Any) -> str:
    """Return the policy-language type of a metadata value: bool, number, string, list, mapping or null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def infer_schema(pairs: Iterable[Any], limit: int = 1000) -> dict[str, dict[str, set[str]]]:
    """Collect the metadata fields of the first `limit` pairs and the types each takes.

    Returns:
        `{"response": {name: {types}}, "pair": {name: {types}}}`; response fields come from
        both the chosen and the rejected metadata.
    """
    schema: dict[str, dict[str, set[str]]] = {"response": {}, "pair": {}}
    for index, pair in enumerate(pairs):
        if index >= limit:
            break
        for scope, metadata in (
            ("response", pair.chosen_metadata),
            ("response", pair.rejected_metadata),
            ("pair", pair.metadata),
        ):
            for name, value in metadata.items():
                schema[scope].setdefault(name, set()).add(value_type_name(value))
    return schema


# ---- Literal values ----------------------------------------------------------------------------------


def literal_value(node: Any) -> Any:
    """Return the Python value of a literal or map node (numbers without a fraction become `int`)."""
    if isinstance(node, n.Str):
        return node.value
    if isinstance(node, n.Num):
        if re.fullmatch(r"[+-]?\d+", node.text):
            return int(node.text)
        return node.value
    if isinstance(node, n.Bool):
        return node.value
    if isinstance(node, n.ListLit):
        return [literal_value(item) for item in node.items]
    if isinstance(node, n.MapLit):
        return {entry.key: literal_value(entry.value) for entry in node.entries}
    raise TypeError(f"not a literal: {type(node).__name__}")


def _literal_type(node: Any) -> str:
    if isinstance(node, n.Str):
        return "string"
    if isinstance(node, n.Num):
        return "number"
    if isinstance(node, n.Bool):
        return "bool"
    if isinstance(node, n.ListLit):
        return "list"
    return "mapping"


_ARTICLE = {"embedding": "an embedding", "classifier": "a classifier", "judge": "a judge", "plugin": "a plugin"}

_TYPE_WORDS = {
    "bool": "a yes/no value",
    "number": "a number",
    "string": "a string",
    "text": "text",
    "list": "a list",
    "score": "a model score",
    "plugin": "a plugin answer",
    "predicate": "a predicate",
    "field": "a metadata field",
    "mapping": "a mapping",
    "null": "null",
}


def _words(type_name: str) -> str:
    return _TYPE_WORDS.get(type_name, type_name)


# ---- The checker -------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, modules: ModuleSet, schema: Mapping[str, Mapping[str, set[str]]] | None) -> None:
        self.modules = modules
        self.schema = schema
        self.diagnostics: list[Diagnostic] = list(modules.diagnostics)
        self.definitions: dict[str, Definition] = {}
        self.visible: dict[str, dict[str, Definition]] = {}
        self.field_uses: list[tuple[str, str, str, n.Span, str]] = []
        self.module = ""

    # -- reporting
    def error(self, code: str, message: str, span: n.Span | None, hint: str | None = None, module: str | None = None):
        where = module or self.module
        if span is None:
            self.diagnostics.append(Diagnostic(code, message, where, hint=hint))
            return
        end = span.end_column if span.end_line == span.line else 0
        self.diagnostics.append(Diagnostic(code, message, where, span.line, span.column, end, hint))

    # -- scopes
    def collect_definitions(self) -> None:
        for module in self.modules.order:
            if module.tree is None:
                continue
            own: dict[str, Definition] = {}
            for statement in module.tree.statements:
                if isinstance(statement, (n.Let, n.PredicateDef)):
                    if statement.name in own:
                        first = own[statement.name].node
                        self.error(
                            "TP102",
                            f"`{statement.name}` is already defined at line {first.line}",
                            statement.span,
                            hint="rename one of them",
                            module=module.display,
                        )
                        continue
                    own[statement.name] = Definition(statement.name, statement, module.display)
            visible = dict(own)
            for statement, child in self._imports_of(module):
                for name, definition in self.visible.get(child.display, {}).items():
                    if name in own and own[name].node is not definition.node:
                        self.error(
                            "TP102",
                            f"`{name}` is defined here and also in {definition.module} (line {definition.node.line})",
                            own[name].node.span,
                            hint="rename one of them; imported names share one namespace",
                            module=module.display,
                        )
                    elif name in visible and visible[name].node is not definition.node:
                        self.error(
                            "TP102",
                            f"import brings `{name}` from {definition.module}, already defined in {visible[name].module}",
                            statement.span,
                            hint="rename one of the definitions",
                            module=module.display,
                        )
                    else:
                        visible.setdefault(name, definition)
            self.visible[module.display] = visible
            for definition in own.values():
                self.definitions.setdefault(definition.name, definition)

    def _imports_of(self, module: Module):
        children = {child.resolved: child for child in module.imports}
        base = module.resolved.parent
        for statement in module.tree.statements:
            if isinstance(statement, n.Import):
                target = (base / statement.path.value).resolve()
                if target in children:
                    yield statement, children[target]

    def lookup(self, ref: n.Ref) -> Definition | None:
        visible = self.visible.get(self.module, {})
        definition = visible.get(ref.name)
        if definition is None:
            if ref.name in self.definitions:
                hint = f"`{ref.name}` is defined in {self.definitions[ref.name].module}; import that file"
            else:
                hint = did_you_mean(ref.name, visible)
            self.error("TP101", f"unknown name `{ref.name}`", ref.span,
                       hint=hint or "define it with `let` or `predicate`, or import the file that does")
        return definition

    # -- fields
    def use_field(self, node: n.Field, type_name: str) -> None:
        self.field_uses.append((node.scope, node.name, type_name, node.span, self.module))

    def check_fields(self) -> dict[tuple[str, str], str]:
        first_use: dict[tuple[str, str], tuple[str, n.Span, str]] = {}
        for scope, name, type_name, span, module in self.field_uses:
            key = (scope, name)
            if key not in first_use:
                first_use[key] = (type_name, span, module)
                continue
            first_type, first_span, first_module = first_use[key]
            if first_type != type_name:
                where = f"line {first_span.line}" if first_module == module else f"{first_module}:{first_span.line}"
                self.error(
                    "TP104",
                    f"`{scope}.{name}` is used as {_words(type_name)} here but as {_words(first_type)} at {where}",
                    span,
                    hint="a metadata field has one type; check the field name or the test",
                    module=module,
                )
        if self.schema is not None:
            reported: set[tuple[str, str]] = set()
            for scope, name, type_name, span, module in self.field_uses:
                key = (scope, name)
                if key in reported:
                    continue
                known = self.schema.get(scope, {})
                if name not in known:
                    reported.add(key)
                    listing = ", ".join(sorted(known)) or "none"
                    hint = did_you_mean(name, known) or f"the dataset's {scope} fields: {listing}"
                    self.error("TP120", f"field `{scope}.{name}` is not in the dataset", span, hint=hint, module=module)
                    continue
                observed = known[name] - {"null"}
                if observed and type_name not in observed:
                    reported.add(key)
                    self.error(
                        "TP121",
                        f"field `{scope}.{name}` is used as {_words(type_name)}, but the dataset holds "
                        + " or ".join(_words(t) for t in sorted(observed)),
                        span,
                        hint="change the test to match the data, or fix the field name",
                        module=module,
                    )
        return {key: value[0] for key, value in first_use.items()}

    # -- values
    def value_type(self, value: Any) -> str:
        if isinstance(value, n.Ref):
            definition = self.lookup(value)
            if definition is None:
                return "unknown"
            if isinstance(definition.node, n.PredicateDef):
                return "predicate"
            return _literal_type(definition.node.value)
        if isinstance(value, n.Field):
            return "field"
        if isinstance(value, n.Text):
            return "text"
        if isinstance(value, n.Length):
            return "number"
        if isinstance(value, n.ModelCall):
            self.check_model_call(value)
            if value.kind == "judge":
                return "bool"
            if value.kind == "plugin":
                return "plugin"
            if any(option.name == "threshold" for option in value.options):
                return "bool"
            return "score"
        if isinstance(value, n.ListLit):
            self.check_list(value)
            return "list"
        return _literal_type(value)

    def list_items(self, value: Any) -> tuple[n.ListLit | None, str]:
        """Return the list literal behind a value (a literal or a `let`) and its element type."""
        node = value
        if isinstance(value, n.Ref):
            definition = self.visible.get(self.module, {}).get(value.name)
            node = definition.node.value if definition is not None and isinstance(definition.node, n.Let) else None
        if not isinstance(node, n.ListLit):
            return None, "unknown"
        types = {_literal_type(item) for item in node.items}
        if not types:
            return node, "empty"
        if len(types) > 1:
            return node, "mixed"
        return node, types.pop()

    def check_list(self, node: n.ListLit) -> None:
        types = {_literal_type(item) for item in node.items}
        if "list" in types:
            self.error("TP104", "lists cannot contain lists", node.span)
        elif len(types) > 1:
            self.error("TP104", "a list holds values of one type: all strings or all numbers", node.span,
                       hint="split it into separate lists")

    # -- model calls
    def check_model_call(self, call: n.ModelCall) -> None:
        from trace_dsl.compiler.backends.registry import validate_backend_options

        options: dict[str, Any] = {}
        spans: dict[str, n.Span] = {}
        for option in call.options:
            if option.name in options:
                self.error("TP107", f"option `{option.name}` is given twice", option.span)
                continue
            spans[option.name] = option.span
            if isinstance(option.value, n.Ref):
                definition = self.lookup(option.value)
                if definition is None:
                    continue
                if not isinstance(definition.node, n.Let):
                    self.error("TP104", f"option `{option.name}` needs a value, but `{option.value.name}` is a predicate",
                               option.value.span)
                    continue
                options[option.name] = literal_value(definition.node.value)
            else:
                if isinstance(option.value, n.ListLit):
                    self.check_list(option.value)
                options[option.name] = literal_value(option.value)
        if call.subject is not None:
            subject = call.subject.subject
            if call.kind in ("embedding", "classifier"):
                if subject == "history":
                    self.error("TP107", f"{call.kind} reads the prompt or the response, not the history",
                               call.subject.span)
                elif "input" in options:
                    self.error("TP107", f"give the text to read either as `{subject}` or as the `input` option, not both",
                               spans["input"])
                elif subject == "prompt":
                    options["input"] = "prompt"
            elif subject != "response":
                self.error("TP107", f"{call.kind} always reads the prompt and the response; remove `{subject}`",
                           call.subject.span)
        if call.target is not None:
            if call.kind != "plugin":
                self.error("TP107", f"{call.kind} takes options as `name=value`, not a bare string", call.target.span,
                           hint='for example question="..."' if call.kind == "judge" else None)
            elif "name" in options:
                self.error("TP107", "give the plugin's name once: either first or as `name=`", spans["name"])
            else:
                options["name"] = call.target.value
                spans["name"] = call.target.span
        for problem in validate_backend_options(call.kind, options):
            span = call.span
            for name, option_span in spans.items():
                value = options.get(name)
                if f"'{name}'" in problem or (isinstance(value, str) and f"'{value}'" in problem):
                    span = option_span
                    break
            self.error("TP107", problem, span, hint="policies/README.md lists the options of each model call")

    # -- tests
    def check_expr(self, expr: Any, *, allow_call: bool = False) -> None:
        if isinstance(expr, (n.And, n.Or)):
            for operand in expr.operands:
                self.check_expr(operand)
        elif isinstance(expr, n.Not):
            self.check_expr(expr.operand)
        elif isinstance(expr, n.Truth):
            self.check_truth(expr, allow_call)
        elif isinstance(expr, n.Compare):
            self.check_compare(expr, allow_call)
        elif isinstance(expr, n.Matches):
            self.check_no_call(expr.subject)
            self.check_text_subject(expr.subject, "matches")
            self.check_regex(expr.regex)
        elif isinstance(expr, n.Keywords):
            self.check_no_call(expr.subject)
            self.check_keywords(expr)
        elif isinstance(expr, n.SetTest):
            self.check_no_call(expr.left)
            self.check_no_call(expr.right)
            self.check_set_test(expr)

    def check_no_call(self, value: Any) -> None:
        if isinstance(value, n.ModelCall):
            self.error(
                "TP108",
                f"{_ARTICLE[value.kind]} call must be a predicate of its own",
                value.span,
                hint=f"write `predicate name = {value.kind}(...)` (with a threshold comparison for a score) and use the name here",
            )

    def check_truth(self, expr: n.Truth, allow_call: bool) -> None:
        value = expr.value
        if isinstance(value, n.ModelCall) and not allow_call:
            self.check_no_call(value)
        type_name = self.value_type(value)
        if type_name in ("bool", "predicate", "plugin", "unknown"):
            return
        if type_name == "field":
            self.use_field(value, "bool")
            return
        if type_name == "score":
            low, high, what = SCORE_RANGES[value.kind]
            self.error("TP104", f"{value.kind}(...) gives {what} between {low:g} and {high:g}, not yes/no", value.span,
                       hint=f"compare it with a threshold, e.g. `{value.kind}(...) >= 0.75`")
            return
        if type_name == "text":
            self.error("TP104", f"`{value.subject}` is text, not a test", value.span,
                       hint=f'use a text test such as `{value.subject} contains "..."` or `{value.subject} matches /.../`')
            return
        self.error("TP104", f"{_words(type_name)} is not a test", value.span,
                   hint="a rule or predicate needs a yes/no test, e.g. a comparison")

    def check_compare(self, expr: n.Compare, allow_call: bool) -> None:
        for side in (expr.left, expr.right):
            if isinstance(side, n.ModelCall) and not allow_call:
                self.check_no_call(side)
        left, right = self.value_type(expr.left), self.value_type(expr.right)
        if "unknown" in (left, right):
            return
        ordered = expr.op in ("<", "<=", ">", ">=")
        for side, type_name, other in ((expr.left, left, right), (expr.right, right, left)):
            if type_name == "bool" and isinstance(side, n.ModelCall):
                self.error("TP104", f"{side.kind}(...) answers yes/no and cannot be compared", side.span,
                           hint=f"use it on its own as a test: `predicate name = {side.kind}(...)`")
                return
            if type_name == "field":
                if ordered:
                    self.use_field(side, "number")
                elif other in ("string", "text"):
                    self.use_field(side, "string")
                elif other in ("number", "score"):
                    self.use_field(side, "number")
                elif other == "bool":
                    self.use_field(side, "bool")
        if ordered:
            bad = [(side, t) for side, t in ((expr.left, left), (expr.right, right))
                   if t not in ("number", "score", "plugin", "field")]
            for side, type_name in bad:
                self.error("TP104", f"`{expr.op}` compares numbers, got {_words(type_name)}", side.span,
                           hint="use `len(...)` or `words(...)` to compare a text's length")
        else:
            groups = {"number": "number", "score": "number", "plugin": "any", "field": "any", "string": "string",
                      "text": "string", "bool": "bool", "list": "list", "predicate": "bool"}
            kinds = {groups.get(left, left), groups.get(right, right)} - {"any"}
            if len(kinds) > 1:
                self.error("TP104", f"cannot compare {_words(left)} with {_words(right)}", expr.span)
            elif kinds == {"list"}:
                self.error("TP104", "lists cannot be compared with `==`", expr.span,
                           hint="use `has_all` and `has_any` to test list contents")
        for call, number in ((expr.left, expr.right), (expr.right, expr.left)):
            if isinstance(call, n.ModelCall) and call.kind in SCORE_RANGES and isinstance(number, n.Num):
                if any(option.name == "threshold" for option in call.options):
                    self.error("TP104", f"this {call.kind} call has a `threshold` option and is already yes/no",
                               expr.span, hint="remove the comparison or the threshold option")
                    continue
                low, high, what = SCORE_RANGES[call.kind]
                if not low <= number.value <= high:
                    self.error("TP106", f"threshold {number.text} is out of range: {call.kind} gives {what} "
                               f"between {low:g} and {high:g}", number.span)

    def check_text_subject(self, subject: Any, op: str) -> None:
        type_name = self.value_type(subject)
        if type_name == "field":
            self.use_field(subject, "string")
        elif type_name not in ("text", "string", "unknown"):
            self.error("TP104", f"`{op}` tests text, got {_words(type_name)}", subject.span,
                       hint="test `prompt`, `response`, `history` or a text field such as `response.source`")

    def check_regex(self, regex: n.Regex) -> None:
        flags = 0
        for letter in regex.flags:
            flags |= REGEX_FLAGS[letter]
        try:
            re.compile(regex.pattern, flags)
        except re.error as exc:
            position = exc.pos or 0
            column = regex.span.column + 1 + position
            span = n.Span(regex.span.line, column, regex.span.line, column + 1)
            self.error("TP105", f"invalid regular expression: {exc.msg}", span,
                       hint="the pattern uses Python `re` syntax; escape special characters with `\\`")
            return
        if _nested_unbounded_repeat(_sre_parse.parse(regex.pattern, flags)):
            self.diagnostics.append(Diagnostic(
                "TP140", "regular expression repeats a group that itself repeats without bound; "
                "on a text that almost matches, Python `re` can backtrack exponentially and stall triage",
                self.module, regex.span.line, regex.span.column,
                regex.span.end_column if regex.span.end_line == regex.span.line else 0,
                hint="make only one of the two repeat: `(a+)+` matches the same texts as `a+`",
                severity="warning",
            ))

    def check_keywords(self, expr: n.Keywords) -> None:
        self.check_text_subject(expr.subject, expr.op)
        words = expr.words
        type_name = self.value_type(words)
        if type_name == "unknown":
            return
        if expr.op == "contains":
            if type_name == "list":
                self.error("TP104", "`contains` takes one string", words.span,
                           hint="use `contains_any` or `contains_all` with a list")
            elif type_name != "string":
                self.error("TP104", f"`contains` takes a string, got {_words(type_name)}", words.span)
            elif isinstance(words, n.Str) and not words.value:
                self.error("TP104", "an empty string is contained in every text", words.span)
            return
        if type_name == "string":
            self.error("TP104", f"`{expr.op}` takes a list of strings", words.span,
                       hint="use `contains` for one string, or put it in brackets")
            return
        if type_name != "list":
            self.error("TP104", f"`{expr.op}` takes a list of strings, got {_words(type_name)}", words.span)
            return
        node, item_type = self.list_items(words)
        if node is None:
            return
        if item_type == "empty":
            self.error("TP104", f"`{expr.op}` with an empty list is never useful", words.span)
        elif item_type != "string":
            self.error("TP104", f"`{expr.op}` takes a list of strings", words.span)
        elif any(isinstance(item, n.Str) and not item.value for item in node.items):
            self.error("TP104", "an empty string is contained in every text", words.span)

    def check_set_test(self, expr: n.SetTest) -> None:
        left, right = self.value_type(expr.left), self.value_type(expr.right)
        if "unknown" in (left, right):
            return
        if right != "list":
            self.error("TP104", f"`{expr.op}` needs a list on its right, got {_words(right)}", expr.right.span,
                       hint='write a list such as ["Violence", "Physical Harm"] or the name of a `let` list')
            return
        _, item_type = self.list_items(expr.right)
        if expr.op in ("has_any", "has_all"):
            if left == "field":
                self.use_field(expr.left, "list")
            elif left != "list":
                self.error("TP104", f"`{expr.op}` needs a list on its left, got {_words(left)}", expr.left.span,
                           hint="use `in` to test one value against a list")
            return
        if left == "field":
            self.use_field(expr.left, item_type if item_type in ("string", "number") else "string")
        elif left in ("text", "string"):
            if item_type not in ("string", "unknown"):
                self.error("TP104", f"`in` looks for {_words(left)} in a list of {item_type} values", expr.span)
        elif left == "number":
            if item_type not in ("number", "unknown"):
                self.error("TP104", f"`in` looks for a number in a list of {item_type} values", expr.span)
        else:
            self.error("TP104", f"`in` tests one value, got {_words(left)}", expr.left.span,
                       hint="use `has_any` or `has_all` for a list field")

    # -- statements
    def check_statements(self) -> tuple[list[n.Rule], list[n.Example]]:
        main = self.modules.main
        rules: list[n.Rule] = []
        examples: list[n.Example] = []
        for module in self.modules.order:
            if module.tree is None:
                continue
            self.module = module.display
            is_main = module is main
            for statement in module.tree.statements:
                if isinstance(statement, n.Let):
                    if isinstance(statement.value, n.ListLit):
                        self.check_list(statement.value)
                elif isinstance(statement, n.PredicateDef):
                    self.check_predicate(statement)
                elif isinstance(statement, n.Rule):
                    if not is_main:
                        self.error("TP113", "an imported file holds only `let`, `predicate` and `import` statements",
                                   statement.span, hint="move the rule into the policy file")
                        continue
                    self.check_expr(statement.when)
                    if statement.unless is not None:
                        self.check_expr(statement.unless)
                    rules.append(statement)
                elif isinstance(statement, n.Example):
                    if not is_main:
                        self.error("TP113", "an imported file holds only `let`, `predicate` and `import` statements",
                                   statement.span, hint="move the example into the policy file")
                        continue
                    examples.append(statement)
            if not is_main and module.tree.header is not None:
                self.error("TP113", "an imported file is a shared library and has no `policy` header",
                           module.tree.header.span, hint="remove the header, or import a library instead of a policy")
        self.module = main.display if main else ""
        seen: dict[str, n.Rule] = {}
        for rule in rules:
            if rule.id in seen:
                self.error("TP103", f"rule id `{rule.id}` is already used at line {seen[rule.id].line}", rule.span,
                           hint="rule ids are stable names used in verdicts; give each rule its own")
            else:
                seen[rule.id] = rule
        return rules, examples

    def check_predicate(self, statement: n.PredicateDef) -> None:
        expr = statement.expr
        call_body = (isinstance(expr, n.Truth) and isinstance(expr.value, n.ModelCall)) or (
            isinstance(expr, n.Compare)
            and (isinstance(expr.left, n.ModelCall) or isinstance(expr.right, n.ModelCall))
            and not (isinstance(expr.left, n.ModelCall) and isinstance(expr.right, n.ModelCall))
            and isinstance(expr.right if isinstance(expr.left, n.ModelCall) else expr.left, n.Num)
        )
        self.check_expr(expr, allow_call=call_body)

    def check_predicate_cycles(self) -> None:
        graph = {name: _referenced_names(d.node.expr) for name, d in self.definitions.items()
                 if isinstance(d.node, n.PredicateDef)}
        state: dict[str, int] = {}
        reported: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for child in graph.get(name, ()):
                if child not in graph:
                    continue
                if state.get(child) == 1:
                    cycle = path[path.index(child):] + [child] if child in path else [name, child]
                    definition = self.definitions[child]
                    if child not in reported:
                        reported.add(child)
                        self.error("TP109", "predicate defined in terms of itself: " + " -> ".join(cycle),
                                   definition.node.span, module=definition.module,
                                   hint="a predicate cannot use itself, directly or through others")
                elif state.get(child) is None:
                    visit(child, path + [child])
            state[name] = 2

        for name in graph:
            if state.get(name) is None:
                visit(name, [name])

    def check_examples(self, examples: list[n.Example], rules: list[n.Rule], field_types) -> None:
        rule_ids = [rule.id for rule in rules]
        titles: dict[str, n.Example] = {}
        for example in examples:
            if example.title.value in titles:
                self.error("TP102", f"example \"{example.title.value}\" is already defined at line "
                           f"{titles[example.title.value].line}", example.title.span)
            titles.setdefault(example.title.value, example)
            counts: dict[str, int] = {}
            for item in example.items:
                counts[item.kind] = counts.get(item.kind, 0) + 1
                if counts[item.kind] == 2:
                    self.error("TP131", f"example has more than one `{item.kind}` line", item.span)
            missing = [kind for kind in ("prompt", "chosen", "rejected", "expect") if kind not in counts]
            if missing:
                self.error("TP131", f"example \"{example.title.value}\" lacks " + ", ".join(f"`{m}`" for m in missing),
                           example.span, hint="an example needs prompt, chosen, rejected and expect lines")
            expectation = example.first("expect")
            if isinstance(expectation, n.Expectation):
                if expectation.category == "retain" and expectation.rules:
                    self.error("TP131", "a retained pair's chosen response complies, so no rule fires on it",
                               expectation.span, hint="remove the `by ...` part")
                for rule_id, span in zip(expectation.rules, expectation.rule_spans):
                    if rule_id not in rule_ids:
                        self.error("TP130", f"example expects rule `{rule_id}`, which does not exist", span,
                                   hint=did_you_mean(rule_id, rule_ids) or "rules: " + ", ".join(dict.fromkeys(rule_ids)))
            for item in example.items:
                if item.kind in ("chosen", "rejected") and item.value.metadata is not None:
                    self.check_example_metadata(item.value.metadata, "response", field_types)
                elif item.kind == "pair":
                    self.check_example_metadata(item.value, "pair", field_types)

    def check_example_metadata(self, metadata: n.MapLit, scope: str, field_types) -> None:
        for entry in metadata.entries:
            expected = field_types.get((scope, entry.key))
            actual = "mapping" if isinstance(entry.value, n.MapLit) else _literal_type(entry.value)
            if isinstance(entry.value, n.ListLit):
                self.check_list(entry.value)
            if expected is not None and expected != actual:
                self.error("TP104", f"`{entry.key}` is used by the policy as {_words(expected)}, "
                           f"but the example gives {_words(actual)}", entry.value.span)


def call_options(call: n.ModelCall, constants: Mapping[str, Any]) -> dict[str, Any]:
    """Return the backend options of a checked model call: its `name=value` arguments with `let` names
    replaced by their values, the subject as `input`, and a plugin's name as `name`."""
    options: dict[str, Any] = {}
    for option in call.options:
        if isinstance(option.value, n.Ref):
            options[option.name] = constants[option.value.name]
        else:
            options[option.name] = literal_value(option.value)
    if call.subject is not None and call.kind in ("embedding", "classifier") and call.subject.subject == "prompt":
        options["input"] = "prompt"
    if call.target is not None and call.kind == "plugin":
        options["name"] = call.target.value
    return options


def _referenced_names(expr: Any) -> set[str]:
    """Return every name an expression refers to (predicates and `let` values)."""
    names: set[str] = set()
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, n.Ref):
            names.add(node.name)
        elif isinstance(node, (n.And, n.Or)):
            stack.extend(node.operands)
        elif isinstance(node, n.Not):
            stack.append(node.operand)
        elif isinstance(node, n.Truth):
            stack.append(node.value)
        elif isinstance(node, (n.Compare, n.SetTest)):
            stack.extend((node.left, node.right))
        elif isinstance(node, n.Matches):
            stack.append(node.subject)
        elif isinstance(node, n.Keywords):
            stack.extend((node.subject, node.words))
        elif isinstance(node, n.ModelCall):
            stack.extend(option.value for option in node.options)
    return names


referenced_names = _referenced_names


def check_policy(
    path: str,
    *,
    source: str | None = None,
    schema: Mapping[str, Mapping[str, set[str]]] | None = None,
    require_policy: bool = False,
) -> CheckResult:
    """Check a policy file and its imports.

    Args:
        path: the `.tp` file.
        source: its text when already in memory (imports are still read from disk).
        schema: the dataset's metadata fields from `infer_schema`, to check field names and types.
        require_policy: report a file without a `policy` header (a shared library) as an error.

    Returns:
        Every diagnostic found; `program` is set when none is an error.
    """
    modules = load_modules(path, source=source)
    checker = _Checker(modules, schema)
    main = modules.main
    if main is None or main.tree is None or any(m.tree is None for m in modules.order):
        return CheckResult(checker.diagnostics, modules.sources(), None)
    checker.module = main.display
    if require_policy and main.tree.header is None:
        checker.error("TP114", f"{main.display} has no `policy \"name\" version \"x.y.z\"` header", None,
                      hint="start the file with a header; a file without one is a shared library for `import`")
    checker.collect_definitions()
    checker.check_predicate_cycles()
    rules, examples = checker.check_statements()
    field_types = checker.check_fields()
    checker.module = main.display
    checker.check_examples(examples, rules, field_types)

    diagnostics = _sorted(checker.diagnostics, [m.display for m in modules.order])
    if any(d.severity == "error" for d in diagnostics):
        return CheckResult(diagnostics, modules.sources(), None)

    constants: dict[str, Any] = {}
    let_nodes: dict[str, n.Let] = {}
    predicates: dict[str, n.PredicateDef] = {}
    for module in modules.order:
        for statement in module.tree.statements:
            if isinstance(statement, n.Let):
                constants[statement.name] = literal_value(statement.value)
                let_nodes[statement.name] = statement
            elif isinstance(statement, n.PredicateDef):
                predicates[statement.name] = statement
    program = Program(
        path=main.display,
        header=main.tree.header,
        modules=modules.order,
        constants=constants,
        let_nodes=let_nodes,
        predicates=predicates,
        rules=rules,
        examples=examples,
        field_types=field_types,
    )
    return CheckResult(diagnostics, modules.sources(), program)


def _sorted(diagnostics: list[Diagnostic], order: list[str]) -> list[Diagnostic]:
    rank = {path: index for index, path in enumerate(order)}
    unique: list[Diagnostic] = []
    seen: set[tuple] = set()
    for diagnostic in diagnostics:
        key = (diagnostic.path, diagnostic.line, diagnostic.column, diagnostic.code, diagnostic.message)
        if key not in seen:
            seen.add(key)
            unique.append(diagnostic)
    return sorted(unique, key=lambda d: (rank.get(d.path, len(rank)), d.line, d.column))
