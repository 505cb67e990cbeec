"""Compile a checked policy into a `CompiledPolicy`: its identity, its definitions and the
`TriageClassifier` that decides whether a response complies.

`load_policy(path)` is the entry point other layers use. The policy's `hash` is the SHA-256 of
the canonical formatted text of the policy file and of every file it imports, so it changes
exactly when the policy's text changes in substance or comments, and not with its layout.
`elements()` gives each rule, predicate and `let` value a canonical one-line definition and the
names it uses, for tools that compare two versions of a policy.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trace_dsl.compiler.codegen import RuleFunction, compile_rules
from trace_dsl.compiler.evaluator import EvaluationError, Evaluator, ModelTest, ResponseContext
from trace_dsl.errors import PolicyCheckError
from trace_dsl.lang import nodes as n
from trace_dsl.lang.checker import Program, call_options, check_policy, referenced_names
from trace_dsl.lang.diagnostics import render_all
from trace_dsl.lang.formatter import expr_text, format_file, value_text

# Expensive predicates run cheapest kind first: an embedding call is far cheaper than a judge.
KIND_COST = {"embedding": 0, "classifier": 1, "plugin": 2, "judge": 3}


@dataclass(frozen=True, slots=True)
class PolicyElement:
    """One rule, predicate or `let` value, as a tool comparing policy versions reads it.

    Attributes:
        element: "rule", "predicate" or "let".
        id: the rule id or the name.
        title: the rule's title ("" for others).
        text: the canonical definition (for a rule, `violates when ... [unless ...]`).
        uses: the predicate and `let` names the definition refers to directly.
    """

    element: str
    id: str
    title: str
    text: str
    uses: frozenset[str]


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """A violation rule of the compiled policy.

    Attributes:
        id: the stable rule id.
        title: the short title.
        text: canonical definition.
        models: the expensive predicates it can reach (empty for a cheap rule).
    """

    id: str
    title: str
    text: str
    models: frozenset[str]


@dataclass(frozen=True, slots=True)
class ModelPredicate:
    """An expensive predicate: its backend kind and options, and how its result becomes a test.

    Attributes:
        name: the predicate name.
        kind: embedding, classifier, judge or plugin.
        options: backend options for `create_backend`.
        subject: the text it reads: "response", or "prompt" for an embedding or classifier of the prompt.
        test: how the backend result becomes true or false.
        definition: the cache definition: kind and options, without the threshold, so moving a
            threshold re-uses cached scores.
    """

    name: str
    kind: str
    options: Mapping[str, Any]
    subject: str
    test: ModelTest
    definition: str


@dataclass(frozen=True, slots=True)
class ResponseOutcome:
    """The classifier's result for one response.

    Attributes:
        complies: `True`, `False`, or `None` while (or because) an expensive predicate is unknown.
        fired: ids of the rules known to fire, in rule order.
        needed: the expensive predicates still needed to decide (empty once decided).
        error: why the response cannot be decided (a field problem), else `None`.
    """

    complies: bool | None
    fired: tuple[str, ...]
    needed: frozenset[str] = frozenset()
    error: str | None = None


class TriageClassifier:
    """Decide whether one response complies with the policy.

    Rules without expensive predicates run through one generated function; the others through
    the three-valued `Evaluator`, which reports which expensive predicates an undecided response
    still needs.
    """

    def __init__(self, program: Program, models: Mapping[str, ModelPredicate], rules: list[RuleInfo]) -> None:
        self.rule_nodes = list(program.rules)
        self.rules = rules
        self.models = dict(models)
        self.evaluator = Evaluator(program.predicates, program.constants, {m.name: m.test for m in models.values()})
        self.cheap_ids = [r.id for r in rules if not r.models]
        cheap_nodes = [node for node, info in zip(self.rule_nodes, rules) if not info.models]
        self.model_rules = [(node, info) for node, info in zip(self.rule_nodes, rules) if info.models]
        self.cheap_function: RuleFunction
        self.cheap_function, self.cheap_source = compile_rules(cheap_nodes, program.predicates, program.constants)
        self._order = {rule.id: index for index, rule in enumerate(rules)}

    def cheap_rules(self, ctx: ResponseContext) -> tuple[str, ...]:
        """Ids of the cheap rules that fire on a response.

        Raises:
            EvaluationError: a field the rules read is missing or of the wrong type.
        """
        try:
            return tuple(
                self.cheap_function(ctx.prompt, ctx.response, ctx.history, ctx.metadata, ctx.pair_metadata)
            )
        except Exception:  # noqa: BLE001 - any failure is re-run below for an exact message
            fired = []
            for node in self.rule_nodes:
                if node.id in self.cheap_ids and self.rule_fires(node, ctx) is True:
                    fired.append(node.id)
            return tuple(fired)

    def rule_fires(self, node: n.Rule, ctx: ResponseContext) -> bool | None:
        """Return whether a rule fires (its `when` is true and its `unless` is not), in three-valued logic."""
        when = self.evaluator.test(node.when, ctx)
        if when is False:
            return False
        unless = self.evaluator.test(node.unless, ctx) if node.unless is not None else False
        if unless is True:
            return False
        if when is None or unless is None:
            return None
        return True

    def rule_needs(self, node: n.Rule, ctx: ResponseContext) -> set[str]:
        """Return the expensive predicates an undecided rule waits for."""
        names: set[str] = set()
        if self.evaluator.test(node.when, ctx) is None:
            names |= self.evaluator.needed(node.when, ctx)
        if node.unless is not None and self.evaluator.test(node.unless, ctx) is None:
            names |= self.evaluator.needed(node.unless, ctx)
        return names

    def classify(self, ctx: ResponseContext, cheap: tuple[str, ...] | None = None) -> ResponseOutcome:
        """Decide a response with what is known in `ctx.models` so far.

        Args:
            ctx: the response.
            cheap: the cheap rules' result when already computed for this response.
        """
        try:
            fired = list(self.cheap_rules(ctx) if cheap is None else cheap)
            if fired and not self.model_rules:
                return ResponseOutcome(False, tuple(fired))
            undecided: list[n.Rule] = []
            for node, _ in self.model_rules:
                outcome = self.rule_fires(node, ctx)
                if outcome is True:
                    fired.append(node.id)
                elif outcome is None:
                    undecided.append(node)
        except EvaluationError as exc:
            return ResponseOutcome(None, (), error=str(exc))
        fired.sort(key=self._order.__getitem__)
        if fired:
            return ResponseOutcome(False, tuple(fired))
        if not undecided:
            return ResponseOutcome(True, ())
        needed: set[str] = set()
        for node in undecided:
            needed |= self.rule_needs(node, ctx)
        return ResponseOutcome(None, (), frozenset(needed))


@dataclass
class CompiledPolicy:
    """A policy ready to triage pairs.

    Attributes:
        name: the header's policy name.
        version: the header's version string.
        description: the header's description ("" when absent).
        path: the policy file as given.
        hash: SHA-256 (hex) of the canonical text of the policy and its imports.
        rules: the violation rules in order.
        predicates: every predicate's canonical definition by name.
        models: the expensive predicates by name, cheapest kind first.
        classifier: decides whether a response complies.
        program: the checked syntax (examples, constants, imports) for `trace test` and `trace explain`.
    """

    name: str
    version: str
    description: str
    path: str
    hash: str
    rules: tuple[RuleInfo, ...]
    predicates: dict[str, str]
    models: dict[str, ModelPredicate]
    classifier: TriageClassifier
    program: Program
    _elements: dict[str, PolicyElement] = field(default_factory=dict, repr=False)

    @property
    def rule_ids(self) -> tuple[str, ...]:
        """The rule ids in order."""
        return tuple(rule.id for rule in self.rules)

    def elements(self) -> dict[str, PolicyElement]:
        """Return every rule, predicate and `let` value with its canonical definition, keyed by
        `"rule:ID"`, `"predicate:NAME"` and `"let:NAME"`."""
        return dict(self._elements)


def _rule_text(rule: n.Rule) -> str:
    text = f"violates when {expr_text(rule.when)}"
    if rule.unless is not None:
        text += f" unless {expr_text(rule.unless)}"
    return text


def _reachable_models(names: set[str], program: Program, models: Mapping[str, Any]) -> frozenset[str]:
    seen: set[str] = set()
    stack = list(names)
    found: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in program.predicates:
            continue
        seen.add(name)
        if name in models:
            found.add(name)
            continue
        stack.extend(referenced_names(program.predicates[name].expr))
    return frozenset(found)


def _model_predicate(definition: n.PredicateDef, constants: Mapping[str, Any]) -> ModelPredicate | None:
    expr = definition.expr
    op = threshold = None
    number_on_left = False
    if isinstance(expr, n.Truth) and isinstance(expr.value, n.ModelCall):
        call = expr.value
    elif isinstance(expr, n.Compare) and isinstance(expr.left, n.ModelCall):
        call, op, threshold = expr.left, expr.op, expr.right.value
    elif isinstance(expr, n.Compare) and isinstance(expr.right, n.ModelCall):
        call, op, threshold, number_on_left = expr.right, expr.op, expr.left.value, True
    else:
        return None
    options = call_options(call, constants)
    if op is None and "threshold" in options and call.kind in ("embedding", "classifier"):
        op, threshold = ">=", float(options["threshold"])
    backend_options = {key: value for key, value in options.items() if key != "threshold"}
    subject = "prompt" if options.get("input") == "prompt" else "response"
    cache_definition = json.dumps({"kind": call.kind, "options": backend_options}, sort_keys=True, ensure_ascii=False)
    test = ModelTest(definition.name, call.kind, op, threshold, number_on_left)
    return ModelPredicate(definition.name, call.kind, backend_options, subject, test, cache_definition)


def policy_hash(program: Program) -> str:
    """SHA-256 of the canonical text of the policy file and its imports, paths relative to the
    policy's folder (so the hash does not depend on where the policy is run from)."""
    digest = hashlib.sha256()
    main = program.modules[-1]
    root = main.resolved.parent
    for module in [main] + program.modules[:-1]:
        relative = "" if module is main else os.path.relpath(module.resolved, root)
        digest.update(relative.encode("utf-8") + b"\x00")
        digest.update(format_file(module.tree, module.source).encode("utf-8") + b"\x00")
    return digest.hexdigest()


def compile_program(program: Program) -> CompiledPolicy:
    """Compile a checked program (from `check_policy`) into a `CompiledPolicy`."""
    models: dict[str, ModelPredicate] = {}
    for definition in program.predicates.values():
        model = _model_predicate(definition, program.constants)
        if model is not None:
            models[definition.name] = model
    order = list(program.predicates)
    models = dict(sorted(models.items(), key=lambda item: (KIND_COST[item[1].kind], order.index(item[0]))))

    rules = []
    elements: dict[str, PolicyElement] = {}
    for rule in program.rules:
        uses = referenced_names(rule.when) | (referenced_names(rule.unless) if rule.unless is not None else set())
        text = _rule_text(rule)
        rules.append(RuleInfo(rule.id, rule.title.value, text, _reachable_models(uses, program, models)))
        elements[f"rule:{rule.id}"] = PolicyElement("rule", rule.id, rule.title.value, text, frozenset(uses))
    predicates = {}
    for name, definition in program.predicates.items():
        predicates[name] = expr_text(definition.expr)
        elements[f"predicate:{name}"] = PolicyElement(
            "predicate", name, "", predicates[name], frozenset(referenced_names(definition.expr))
        )
    for name, let in program.let_nodes.items():
        elements[f"let:{name}"] = PolicyElement("let", name, "", value_text(let.value), frozenset())

    header = program.header
    classifier = TriageClassifier(program, models, rules)
    return CompiledPolicy(
        name=header.name.value if header else Path(program.path).stem,
        version=header.version.value if header else "",
        description=header.description.value if header and header.description else "",
        path=program.path,
        hash=policy_hash(program),
        rules=tuple(rules),
        predicates=predicates,
        models=models,
        classifier=classifier,
        program=program,
        _elements=elements,
    )


def load_policy(path: str | os.PathLike[str], *, schema: Mapping[str, Mapping[str, set[str]]] | None = None) -> CompiledPolicy:
    """Check and compile a policy file.

    Args:
        path: the `.tp` file.
        schema: a dataset's metadata fields (`trace_dsl.lang.checker.infer_schema`), to check
            field names and types against it.

    Raises:
        PolicyCheckError: the file has errors. Its `diagnostics` lists all of them, and its
            message contains them rendered with their source lines.
    """
    result = check_policy(str(path), schema=schema, require_policy=True)
    if not result.ok or result.program is None:
        errors = [d for d in result.diagnostics if d.severity == "error"]
        count = len(errors)
        raise PolicyCheckError(
            f"{path}: {count} error{'s' if count != 1 else ''} in the policy\n" + render_all(errors, result.sources),
            diagnostics=errors,
            hint=f"run `trace check {path}` for the full report",
        )
    return compile_program(result.program)
