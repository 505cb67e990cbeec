"""Backends for the expensive predicates: embedding similarity, text classifiers, LLM judges
and Python plugins. Each one evaluates a batch of (prompt, response) requests."""

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend

__all__ = ["BackendRequest", "BackendResult", "PredicateBackend"]
