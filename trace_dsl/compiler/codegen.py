"""Compile the rules without expensive predicates into one Python function.

The function takes `(prompt, response, history, metadata, pair_metadata)` and returns the ids
of the rules that fire, in rule order. It returns the same results as the tree-walking
`Evaluator` (the tests compare both on the bundled data) at a fraction of the cost, so a
rule-only policy triages tens of thousands of pairs per second.

Safety: the generated source is built only from the syntax tree's structure. Every value that
comes from the policy file (strings, field names, word lists, regexes, rule ids) is passed in
the constant tuple `K` and referred to by index, never spliced into the source, so a policy
file cannot inject code.

Any exception inside the function (a missing field, a value of the wrong type) makes the
caller re-run that response through the `Evaluator`, whose `EvaluationError` names the problem.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from trace_dsl.compiler.evaluator import compile_regex
from trace_dsl.lang import nodes as n

RuleFunction = Callable[[str, str, str, Mapping[str, Any], Mapping[str, Any]], list[str]]

_SUBJECTS = {"prompt": "prompt", "response": "response", "history": "history"}


class _FieldTypeError(Exception):
    pass


def _number(source: Mapping[str, Any], name: str) -> Any:
    value = source[name]
    if value.__class__ is bool or not isinstance(value, (int, float)):
        raise _FieldTypeError(name)
    return value


def _boolean(source: Mapping[str, Any], name: str) -> bool:
    value = source[name]
    if value.__class__ is not bool:
        raise _FieldTypeError(name)
    return value


def _string(source: Mapping[str, Any], name: str) -> str:
    value = source[name]
    if not isinstance(value, str):
        raise _FieldTypeError(name)
    return value


def _items(source: Mapping[str, Any], name: str) -> Any:
    value = source[name]
    if not isinstance(value, (list, tuple)):
        raise _FieldTypeError(name)
    return value


def _present(source: Mapping[str, Any], name: str) -> Any:
    value = source[name]
    if value is None:
        raise _FieldTypeError(name)
    return value


def _scalar(source: Mapping[str, Any], name: str) -> Any:
    value = _present(source, name)
    if isinstance(value, (list, tuple, dict, set)):
        raise _FieldTypeError(name)
    return value


_HELPERS = {
    "_number": _number,
    "_boolean": _boolean,
    "_string": _string,
    "_items": _items,
    "_present": _present,
    "_scalar": _scalar,
}


class _Generator:
    def __init__(self, predicates: Mapping[str, n.PredicateDef], constants: Mapping[str, Any]) -> None:
        self.predicates = predicates
        self.constants = constants
        self.table: list[Any] = []
        self.memo: dict[str, str] = {}
        self.memo_exprs: dict[str, str] = {}
        self.lowered: set[str] = set()

    def const(self, value: Any) -> str:
        self.table.append(value)
        return f"K[{len(self.table) - 1}]"

    def source_of(self, scope: str) -> str:
        return "rm" if scope == "response" else "pm"

    def field(self, node: n.Field, helper: str) -> str:
        return f"{helper}({self.source_of(node.scope)}, {self.const(node.name)})"

    def text(self, node: Any) -> str:
        if isinstance(node, n.Text):
            return _SUBJECTS[node.subject]
        if isinstance(node, n.Field):
            return self.field(node, "_string")
        if isinstance(node, n.Str):
            return self.const(node.value)
        if isinstance(node, n.Ref):
            return self.const(self.constants[node.name])
        raise TypeError(f"not text: {type(node).__name__}")

    def lowered_text(self, node: Any) -> str:
        if isinstance(node, n.Text):
            subject = _SUBJECTS[node.subject]
            self.lowered.add(subject)
            # Lower-case each subject at most once per response, and only if a test needs it.
            return f"(L_{subject} if L_{subject} is not None else (L_{subject} := {subject}.lower()))"
        return f"{self.text(node)}.lower()"

    def value(self, node: Any, ordered: bool) -> str:
        if isinstance(node, n.Field):
            return self.field(node, "_number" if ordered else "_present")
        if isinstance(node, n.Length):
            subject = _SUBJECTS[node.subject.subject]
            return f"len({subject})" if node.unit == "characters" else f"len({subject}.split())"
        if isinstance(node, n.Text):
            return _SUBJECTS[node.subject]
        if isinstance(node, n.Ref):
            return self.const(self.constants[node.name])
        if isinstance(node, (n.Str, n.Num, n.Bool)):
            return self.const(node.value)
        if isinstance(node, n.ListLit):
            return self.const([item.value for item in node.items])
        raise TypeError(f"no value for {type(node).__name__}")

    def words(self, node: Any) -> list[str]:
        if isinstance(node, n.Ref):
            raw = self.constants[node.name]
        elif isinstance(node, n.ListLit):
            raw = [item.value for item in node.items]
        else:
            raw = node.value
        if isinstance(raw, str):
            raw = [raw]
        return [word.lower() for word in raw]

    def test(self, node: Any) -> str:
        if isinstance(node, n.And):
            return "(" + " and ".join(self.test(op) for op in node.operands) + ")"
        if isinstance(node, n.Or):
            return "(" + " or ".join(self.test(op) for op in node.operands) + ")"
        if isinstance(node, n.Not):
            return f"(not {self.test(node.operand)})"
        if isinstance(node, n.Truth):
            value = node.value
            if isinstance(value, n.Ref) and value.name in self.predicates:
                return self.predicate(value.name)
            if isinstance(value, n.Ref):
                return "True" if self.constants[value.name] else "False"
            if isinstance(value, n.Field):
                return self.field(value, "_boolean")
            if isinstance(value, n.Bool):
                return "True" if value.value else "False"
            raise TypeError(f"not a test: {type(value).__name__}")
        if isinstance(node, n.Compare):
            ordered = node.op in ("<", "<=", ">", ">=")
            return f"({self.value(node.left, ordered)} {node.op} {self.value(node.right, ordered)})"
        if isinstance(node, n.Matches):
            return f"({self.const(compile_regex(node.regex))}.search({self.text(node.subject)}) is not None)"
        if isinstance(node, n.Keywords):
            text = self.lowered_text(node.subject)
            words = self.words(node.words)
            if node.op == "contains" or len(words) == 1:
                return f"({self.const(words[0])} in {text})"
            joiner = " and " if node.op == "contains_all" else " or "
            return "(" + joiner.join(f"{self.const(word)} in {text}" for word in words) + ")"
        if isinstance(node, n.SetTest):
            right = self.const(frozenset(self.value_items(node.right)))
            if node.op == "in":
                left = self.field(node.left, "_scalar") if isinstance(node.left, n.Field) else self.value(node.left, False)
                return f"({left} in {right})"
            left = self.field(node.left, "_items") if isinstance(node.left, n.Field) else self.value(node.left, False)
            if node.op == "has_any":
                return f"(not {right}.isdisjoint({left}))"
            return f"{right}.issubset({left})"
        raise TypeError(f"not a test: {type(node).__name__}")

    def value_items(self, node: Any) -> list[Any]:
        if isinstance(node, n.Ref):
            return list(self.constants[node.name])
        return [item.value for item in node.items]

    def predicate(self, name: str) -> str:
        # Each predicate is computed at most once per response and only when a rule reaches it.
        local = self.memo.get(name)
        if local is None:
            local = self.memo[name] = f"P{len(self.memo)}"
            self.memo_exprs[local] = self.test(self.predicates[name].expr)
        return f"({local} if {local} is not None else ({local} := {self.memo_exprs[local]}))"


def compile_rules(
    rules: Sequence[n.Rule],
    predicates: Mapping[str, n.PredicateDef],
    constants: Mapping[str, Any],
) -> tuple[RuleFunction, str]:
    """Build the function that returns the ids of the `rules` that fire on one response.

    `rules` must not reach an expensive predicate. Returns the function and its source (kept
    for debugging; `trace explain` does not need it).
    """
    generator = _Generator(predicates, constants)
    body: list[str] = []
    for rule in rules:
        condition = generator.test(rule.when)
        if rule.unless is not None:
            condition = f"{condition} and not {generator.test(rule.unless)}"
        body.append(f"    if {condition}:\n        fired.append({generator.const(rule.id)})")
    header = ["def rules(prompt, response, history, rm, pm):", "    fired = []"]
    header.extend(f"    {local} = None" for local in generator.memo.values())
    header.extend(f"    L_{subject} = None" for subject in sorted(generator.lowered))
    source = "\n".join(header + body + ["    return fired"])
    namespace: dict[str, Any] = {"K": tuple(generator.table), **_HELPERS, "__builtins__": {"len": len}}
    exec(compile(source, "<policy rules>", "exec"), namespace)  # noqa: S102 - source built from the AST only
    return namespace["rules"], source
