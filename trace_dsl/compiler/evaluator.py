"""Evaluate a policy's tests on one response, in three-valued logic.

A test is true, false, or unknown (`None`) while an expensive predicate it depends on has not
been evaluated (or failed). `and`, `or` and `not` follow Kleene's rules, so `false and x` is
false and `true or x` is true whatever `x` is. The engine uses this to call a model only where
its result can still change a verdict. `needed` names the expensive predicates an unknown test
is waiting for.

This evaluator walks the syntax tree and is the reference semantics; `trace_dsl.compiler.codegen`
compiles the rules without expensive predicates into one Python function per policy that gives
the same answers faster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from trace_dsl.compiler.backends.base import BackendResult
from trace_dsl.lang import nodes as n
from trace_dsl.lang.checker import REGEX_FLAGS, value_type_name

#: `ResponseContext.models` value of an expensive predicate whose backend failed.
FAILED = object()


class EvaluationError(Exception):
    """A test cannot be evaluated on this response because a metadata field is missing or of
    the wrong type. The response's verdict becomes `error` with this message."""


@dataclass(slots=True)
class ResponseContext:
    """One response as the tests see it.

    Attributes:
        role: "chosen" or "rejected", for messages.
        prompt: the prompt text.
        response: the response text.
        history: earlier turns, one message's content per line.
        metadata: the response's metadata (`response.<field>`).
        pair_metadata: the pair's metadata (`pair.<field>`).
        models: results of expensive predicates by name: a `BackendResult` once evaluated.
        memo: values of predicates computed so far (cleared when `models` changes).
    """

    role: str
    prompt: str
    response: str
    history: str
    metadata: Mapping[str, Any]
    pair_metadata: Mapping[str, Any]
    models: dict[str, BackendResult] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    lowered: dict[str, str] = field(default_factory=dict)

    def text(self, subject: str) -> str:
        """Return the text of `prompt`, `response` or `history`."""
        if subject == "response":
            return self.response
        if subject == "prompt":
            return self.prompt
        return self.history

    def lower(self, subject: str) -> str:
        """Return the lower-cased text of a subject, computed once per response."""
        value = self.lowered.get(subject)
        if value is None:
            value = self.lowered[subject] = self.text(subject).lower()
        return value


def history_text(history) -> str:
    """Join the earlier messages' contents, one per line, into the `history` text."""
    return "\n".join(str(message.get("content", "")) for message in history)


def field_value(ctx: ResponseContext, node: n.Field) -> Any:
    """Read a metadata field, raising `EvaluationError` when it is missing or null."""
    source = ctx.metadata if node.scope == "response" else ctx.pair_metadata
    value = source.get(node.name)
    if value is None:
        owner = f"the {ctx.role} response" if node.scope == "response" else "the pair"
        state = "is null" if node.name in source else "is missing"
        raise EvaluationError(f"field `{node.scope}.{node.name}` {state} on {owner}")
    return value


def _expect(ctx: ResponseContext, node: n.Field, value: Any, type_name: str) -> Any:
    actual = value_type_name(value)
    if actual != type_name:
        owner = f"the {ctx.role} response" if node.scope == "response" else "the pair"
        raise EvaluationError(
            f"field `{node.scope}.{node.name}` on {owner} is {actual} ({value!r:.40}), the policy needs {type_name}"
        )
    return value


def compile_regex(regex: n.Regex) -> re.Pattern[str]:
    """Compile a regex literal with its flags."""
    flags = 0
    for letter in regex.flags:
        flags |= REGEX_FLAGS[letter]
    return re.compile(regex.pattern, flags)


class Evaluator:
    """Three-valued evaluation of a checked program's predicates and rules.

    Args:
        predicates: predicate definitions by name.
        constants: `let` values by name.
        model_predicates: for each expensive predicate, how to turn its backend result into a
            truth value (see `ModelTest`).
    """

    def __init__(self, predicates: Mapping[str, n.PredicateDef], constants: Mapping[str, Any],
                 model_predicates: Mapping[str, "ModelTest"]) -> None:
        self.predicates = predicates
        self.constants = constants
        self.model_predicates = model_predicates
        self._regex: dict[int, re.Pattern[str]] = {}
        self._lowered_words: dict[int, tuple[str, ...]] = {}

    # ---- values
    def value(self, node: Any, ctx: ResponseContext) -> Any:
        """Return the value of a non-test node (texts, numbers, lists, fields)."""
        if isinstance(node, n.Text):
            return ctx.text(node.subject)
        if isinstance(node, n.Field):
            return field_value(ctx, node)
        if isinstance(node, n.Length):
            text = ctx.text(node.subject.subject)
            return len(text) if node.unit == "characters" else len(text.split())
        if isinstance(node, n.Ref):
            return self.constants[node.name]
        if isinstance(node, (n.Str, n.Bool)):
            return node.value
        if isinstance(node, n.Num):
            return node.value
        if isinstance(node, n.ListLit):
            return [self.value(item, ctx) for item in node.items]
        raise TypeError(f"no value for {type(node).__name__}")

    # ---- tests
    def test(self, node: Any, ctx: ResponseContext) -> bool | None:
        """Evaluate a test: `True`, `False`, or `None` when an expensive predicate is unknown."""
        if isinstance(node, n.And):
            unknown = False
            for operand in node.operands:
                result = self.test(operand, ctx)
                if result is False:
                    return False
                if result is None:
                    unknown = True
            return None if unknown else True
        if isinstance(node, n.Or):
            unknown = False
            for operand in node.operands:
                result = self.test(operand, ctx)
                if result is True:
                    return True
                if result is None:
                    unknown = True
            return None if unknown else False
        if isinstance(node, n.Not):
            result = self.test(node.operand, ctx)
            return None if result is None else not result
        if isinstance(node, n.Truth):
            return self._truth(node.value, ctx)
        if isinstance(node, n.Compare):
            return self._compare(node, ctx)
        if isinstance(node, n.Matches):
            pattern = self._regex.get(id(node.regex))
            if pattern is None:
                pattern = self._regex[id(node.regex)] = compile_regex(node.regex)
            return pattern.search(self._text_value(node.subject, ctx)) is not None
        if isinstance(node, n.Keywords):
            return self._keywords(node, ctx)
        if isinstance(node, n.SetTest):
            return self._set_test(node, ctx)
        raise TypeError(f"not a test: {type(node).__name__}")

    def predicate(self, name: str, ctx: ResponseContext) -> bool | None:
        """Return the value of a named predicate on a response, memoised in `ctx.memo`."""
        if name in ctx.memo:
            return ctx.memo[name]
        if name in self.model_predicates:
            result = ctx.models.get(name)
            value = None if result is None else self.model_predicates[name].truth(result)
        else:
            value = self.test(self.predicates[name].expr, ctx)
        ctx.memo[name] = value
        return value

    def _truth(self, value: Any, ctx: ResponseContext) -> bool | None:
        if isinstance(value, n.Ref):
            if value.name in self.predicates:
                return self.predicate(value.name, ctx)
            return bool(self.constants[value.name])
        if isinstance(value, n.Field):
            return _expect(ctx, value, field_value(ctx, value), "bool")
        if isinstance(value, n.Bool):
            return value.value
        raise TypeError(f"not a test: {type(value).__name__}")

    def _text_value(self, node: Any, ctx: ResponseContext) -> str:
        if isinstance(node, n.Field):
            return _expect(ctx, node, field_value(ctx, node), "string")
        return self.value(node, ctx)

    def _lowered_text(self, node: Any, ctx: ResponseContext) -> str:
        if isinstance(node, n.Text):
            return ctx.lower(node.subject)
        return self._text_value(node, ctx).lower()

    def _words(self, node: Any) -> tuple[str, ...]:
        words = self._lowered_words.get(id(node))
        if words is None:
            raw = self.constants[node.name] if isinstance(node, n.Ref) else (
                [item.value for item in node.items] if isinstance(node, n.ListLit) else [node.value]
            )
            if isinstance(raw, str):
                raw = [raw]
            words = self._lowered_words[id(node)] = tuple(word.lower() for word in raw)
        return words

    def _keywords(self, node: n.Keywords, ctx: ResponseContext) -> bool:
        text = self._lowered_text(node.subject, ctx)
        words = self._words(node.words)
        if node.op == "contains_all":
            return all(word in text for word in words)
        return any(word in text for word in words)

    def _compare(self, node: n.Compare, ctx: ResponseContext) -> bool | None:
        ordered = node.op in ("<", "<=", ">", ">=")
        left = self._operand(node.left, ctx, ordered)
        right = self._operand(node.right, ctx, ordered)
        if left is None or right is None:
            return None
        if node.op == "==":
            return left == right
        if node.op == "!=":
            return left != right
        if node.op == "<":
            return left < right
        if node.op == "<=":
            return left <= right
        if node.op == ">":
            return left > right
        return left >= right

    def _operand(self, node: Any, ctx: ResponseContext, ordered: bool) -> Any:
        if isinstance(node, n.ModelCall):
            raise TypeError("model calls are evaluated through their predicate")
        if isinstance(node, n.Field):
            value = field_value(ctx, node)
            return _expect(ctx, node, value, "number") if ordered else value
        return self.value(node, ctx)

    def _set_test(self, node: n.SetTest, ctx: ResponseContext) -> bool:
        right = self.value(node.right, ctx)
        if node.op == "in":
            left = self.value(node.left, ctx)
            if isinstance(left, (list, tuple, dict, set)):
                raise EvaluationError(f"`in` needs one value on its left, got a {value_type_name(left)}")
            return left in right
        left = self.value(node.left, ctx)
        if isinstance(node.left, n.Field):
            _expect(ctx, node.left, left, "list")
        if node.op == "has_any":
            return any(item in left for item in right)
        return all(item in left for item in right)

    # ---- what an unknown test waits for
    def needed(self, node: Any, ctx: ResponseContext) -> set[str]:
        """Return the expensive predicates, not yet evaluated, that an unknown test depends on.

        Operands already known are skipped, so a predicate that cannot change the outcome is
        never listed. Call after `test` on the same context.
        """
        if isinstance(node, (n.And, n.Or)):
            names: set[str] = set()
            for operand in node.operands:
                if self.test(operand, ctx) is None:
                    names |= self.needed(operand, ctx)
            return names
        if isinstance(node, n.Not):
            return self.needed(node.operand, ctx)
        if isinstance(node, n.Truth) and isinstance(node.value, n.Ref) and node.value.name in self.predicates:
            name = node.value.name
            if self.predicate(name, ctx) is not None:
                return set()
            if name in self.model_predicates:
                return set() if name in ctx.models else {name}
            return self.needed(self.predicates[name].expr, ctx)
        return set()


@dataclass(frozen=True, slots=True)
class ModelTest:
    """How an expensive predicate's backend result becomes a truth value.

    Attributes:
        name: the predicate's name.
        kind: embedding, classifier, judge or plugin.
        op: the comparison with the threshold (`>=`, `<`, ...), or `None` for a yes/no result.
        threshold: the number compared against; also set by a `threshold` option (with `>=`).
        number_on_left: whether the score is on the left of the comparison.
    """

    name: str
    kind: str
    op: str | None = None
    threshold: float | None = None
    number_on_left: bool = False

    def truth(self, result: BackendResult) -> bool | None:
        """Return the test's value, or `None` when the backend failed or its result is out of format."""
        if result.error is not None or result.value is None:
            return None
        value = result.value
        if self.op is None:
            return value if isinstance(value, bool) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        left, right = (self.threshold, value) if self.number_on_left else (value, self.threshold)
        return {
            "==": left == right, "!=": left != right, "<": left < right,
            "<=": left <= right, ">": left > right, ">=": left >= right,
        }[self.op]

    def failure(self, result: BackendResult) -> str | None:
        """Why `truth` gives `None` for a result, or `None` when it gives a value."""
        if result.error is not None:
            return result.error
        value = result.value
        if value is None:
            return "the backend returned no value"
        if self.op is None and not isinstance(value, bool):
            return f"expected a yes/no answer, got {value!r}"
        if self.op is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"expected a score to compare with {self.threshold:g}, got {value!r}"
        return None
