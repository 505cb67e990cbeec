"""Python plugin predicates: what the policy language should not grow, written as a function.

A plugin is a callable `fn(requests: list[BackendRequest], **args)` returning one item per
request: a `BackendResult`, a bool or a float. Packages register plugins under the entry-point
group `trace_dsl.predicates`:

    [project.entry-points."trace_dsl.predicates"]
    mentions_dosage = "my_package.predicates:mentions_dosage"

and `register_plugin` adds one in-process (tests, notebooks). A policy names a plugin and passes
it `args`; the policy file itself never contains code. Whatever a plugin does wrong (raise, return
too few items, return a string) becomes error results naming the plugin.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

from trace_dsl.compiler.backends.base import BackendRequest, BackendResult, PredicateBackend
from trace_dsl.errors import JudgeError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "trace_dsl.predicates"

PluginFunction = Callable[..., Sequence[Any]]

_registered: dict[str, PluginFunction] = {}


def register_plugin(name: str, fn: PluginFunction) -> None:
    """Make `fn` available to policies as plugin `name`, ahead of any entry point of that name."""
    if not callable(fn):
        raise TypeError(f"plugin {name!r} must be callable, got {type(fn).__name__}")
    _registered[name] = fn


def unregister_plugin(name: str) -> None:
    """Remove a plugin added with `register_plugin`; unknown names are ignored."""
    _registered.pop(name, None)


def available_plugins() -> list[str]:
    """Return the names of every plugin registered in-process or installed by entry point."""
    names = set(_registered)
    names.update(entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return entry
    return None


def _load_plugin(name: str) -> tuple[PluginFunction, str]:
    """Return the plugin function and a string naming its origin and version."""
    if name in _registered:
        fn = _registered[name]
        return fn, f"registered {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    entry = _entry_point(name)
    if entry is None:
        installed = ", ".join(available_plugins()) or "none"
        raise JudgeError(
            f"plugin '{name}' is not installed (entry-point group {ENTRY_POINT_GROUP})",
            hint=f"install the package that provides it; installed plugins: {installed}",
        )
    try:
        fn = entry.load()
    except Exception as exc:  # noqa: BLE001 - a plugin's import may fail in any way; report it
        raise JudgeError(f"plugin '{name}' ({entry.value}) failed to load: {type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise JudgeError(f"plugin '{name}' ({entry.value}) is a {type(fn).__name__}, not a function")
    version = entry.dist.version if entry.dist is not None else "unknown"
    return fn, f"entry point {entry.value} version {version}"


class PluginBackend(PredicateBackend):
    """A Python function that evaluates a predicate.

    Options:
        name: the plugin's entry-point name, or a name given to `register_plugin` (required).
        args: keyword arguments passed to the function (a mapping; default empty).

    Raises:
        JudgeError: no plugin of that name is installed or registered, or it fails to load.
    """

    kind = "plugin"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.name = str(options["name"])
        self.args = dict(options.get("args") or {})
        self._fn, self._origin = _load_plugin(self.name)

    def fingerprint(self) -> str:
        version = getattr(self._fn, "version", None) or getattr(self._fn, "__version__", None)
        args = hashlib.sha256(json.dumps(self.args, sort_keys=True, default=repr).encode()).hexdigest()[:16]
        return f"plugin/v1 name={self.name} origin={self._origin} version={version} args={args}"

    def evaluate(self, requests: Sequence[BackendRequest]) -> list[BackendResult]:
        if not requests:
            return []
        try:
            output = self._fn(list(requests), **self.args)
        except Exception as exc:  # noqa: BLE001 - a plugin bug fails its items, not the triage
            logger.warning("plugin %s raised %s on a batch of %d", self.name, type(exc).__name__, len(requests))
            return self._fail_all(requests, f"plugin '{self.name}' raised {type(exc).__name__}: {exc}")
        try:
            items = list(output)
        except TypeError:
            return self._fail_all(requests, f"plugin '{self.name}' returned {type(output).__name__}, not a list")
        if len(items) != len(requests):
            return self._fail_all(
                requests, f"plugin '{self.name}' returned {len(items)} results for {len(requests)} requests"
            )
        return [self._convert(index, item) for index, item in enumerate(items)]

    def _fail_all(self, requests: Sequence[BackendRequest], reason: str) -> list[BackendResult]:
        return [BackendResult(None, error=reason) for _ in requests]

    def _convert(self, index: int, item: Any) -> BackendResult:
        if isinstance(item, BackendResult):
            if item.error is None and not _is_value(item.value):
                return BackendResult(
                    None, error=f"plugin '{self.name}' item {index}: value {item.value!r} is not a bool or a finite number"
                )
            return item
        if _is_value(item):
            return BackendResult(value=item if isinstance(item, bool) else float(item))
        return BackendResult(
            None,
            error=f"plugin '{self.name}' item {index}: got {type(item).__name__} {item!r:.60}, "
            "expected a BackendResult, a bool or a number",
        )


def _is_value(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(value)
