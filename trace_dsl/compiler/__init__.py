"""Compile a checked policy into a triage classifier.

`load_policy(path)` checks a `.tp` file and its imports and returns a `CompiledPolicy`: its
content hash, rules, predicate definitions, expensive predicates and the `TriageClassifier`
that decides whether one response complies.
"""

from trace_dsl.compiler.policy import (
    CompiledPolicy,
    ModelPredicate,
    PolicyElement,
    ResponseOutcome,
    RuleInfo,
    TriageClassifier,
    compile_program,
    load_policy,
)

__all__ = [
    "CompiledPolicy",
    "ModelPredicate",
    "PolicyElement",
    "ResponseOutcome",
    "RuleInfo",
    "TriageClassifier",
    "compile_program",
    "load_policy",
]
