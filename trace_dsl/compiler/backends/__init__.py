"""Backends for the expensive predicates: embedding similarity, text classifiers, LLM judges
and Python plugins. Each one evaluates a batch of (prompt, response) requests."""

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.compiler.backends.plugin import register_plugin, unregister_plugin
from trace_dsl.compiler.backends.registry import BACKEND_KINDS, create_backend, validate_backend_options

__all__ = [
    "BACKEND_KINDS",
    "BackendRequest",
    "BackendResult",
    "PredicateBackend",
    "create_backend",
    "register_plugin",
    "unregister_plugin",
    "validate_backend_options",
]
