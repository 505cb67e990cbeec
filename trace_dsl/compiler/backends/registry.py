"""The one entry to the expensive-predicate backends: option checking and construction.

`validate_backend_options` is what `trace check` calls: it loads no model and returns every
problem with a predicate's options as a sentence, which the checker places at the option's
source position. `create_backend` builds the backend that evaluates the predicate, loading its
model on first use.

Options by kind (the keys a policy writes):

- embedding: model, examples, input, threshold, batch_size
- classifier: model, label, input, threshold, batch_size
- judge: backend, model, question, rubric, policy, max_new_tokens; for backend "transformers"
  also scoring, batch_size; for backend "openai" also base_url, api_key_env, timeout,
  max_retries, backoff, concurrency
- plugin: name, args

`threshold` is checked here but applied by the policy engine: a backend returns the score.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from trace_dsl.compiler.backends.base import PredicateBackend
from trace_dsl.compiler.backends.embedding import TEXT_INPUTS
from trace_dsl.compiler.backends.judge import JUDGE_BACKENDS, JUDGE_SCORING
from trace_dsl.compiler.backends.plugin import available_plugins
from trace_dsl.errors import JudgeError

BACKEND_KINDS = ("embedding", "classifier", "judge", "plugin")

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One option of a backend kind: its expected type, whether it is required, an extra
    check returning a problem or `None`, and the judge backend it is limited to."""

    type_name: str
    required: bool = False
    check: Check | None = None
    judge_backend: str | None = None


def _is_type(value: Any, type_name: str) -> bool:
    if type_name == "text":
        return isinstance(value, str)
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if type_name == "list of texts":
        return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
    if type_name == "mapping":
        return isinstance(value, Mapping)
    raise ValueError(f"unknown option type {type_name!r}")


def _in_range(low: float | None, high: float | None) -> Check:
    def check(value: Any) -> str | None:
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                return f"must be at least {low:g}, got {value:g}"
            if low is None:
                return f"must be at most {high:g}, got {value:g}"
            return f"must be between {low:g} and {high:g}, got {value:g}"
        return None

    return check


def _one_of(choices: tuple[str, ...], what: str = "value") -> Check:
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        close = difflib.get_close_matches(value, choices, n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown {what} '{value}'{suggestion}; use one of: {', '.join(choices)}"

    return check


def _non_empty_text(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _non_empty_examples(value: Any) -> str | None:
    if not value:
        return "must list at least one example text"
    if any(not item.strip() for item in value):
        return "must not contain an empty example text"
    return None


def _model_name(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    # Only absolute paths are checked: a relative path may be meant relative to where the
    # triage runs, which is not known when the policy is checked.
    path = Path(value).expanduser()
    if (value.startswith(("/", "~"))) and not path.exists():
        return f"the model folder {value} does not exist"
    return None


def _base_url(value: str) -> str | None:
    if not re.match(r"^https?://[^\s/]+", value):
        return f"must be an http:// or https:// URL such as http://127.0.0.1:8000/v1, got '{value}'"
    return None


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _api_key_env(value: str) -> str | None:
    looks_like_key = (
        value.startswith(("sk-", "sk_", "Bearer "))
        or not _ENV_NAME.match(value)
        or (len(value) >= 24 and any(c.islower() for c in value) and any(c.isdigit() for c in value))
    )
    if looks_like_key:
        return (
            "must be the NAME of an environment variable that holds the API key, not the key itself; "
            "remove the key from the policy (and revoke it if it was shared), then write for example "
            "api_key_env = \"OPENAI_API_KEY\""
        )
    return None


def _plugin_name(value: str) -> str | None:
    installed = available_plugins()
    if value in installed:
        return None
    close = difflib.get_close_matches(value, installed, n=1)
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    listing = ", ".join(installed) if installed else "none are installed"
    return (
        f"plugin '{value}' is not installed in entry-point group trace_dsl.predicates{suggestion}; "
        f"installed plugins: {listing}"
    )


def _text_keys(value: Mapping[str, Any]) -> str | None:
    bad = [key for key in value if not isinstance(key, str)]
    return f"argument names must be texts, got {bad!r}" if bad else None


_TEXT_INPUT = OptionSpec("text", check=_one_of(TEXT_INPUTS, "input"))
_BATCH_SIZE = OptionSpec("integer", check=_in_range(1, None))

OPTION_SPECS: dict[str, dict[str, OptionSpec]] = {
    "embedding": {
        "model": OptionSpec("text", check=_model_name),
        "examples": OptionSpec("list of texts", required=True, check=_non_empty_examples),
        "input": _TEXT_INPUT,
        "threshold": OptionSpec("number", check=_in_range(-1, 1)),
        "batch_size": _BATCH_SIZE,
    },
    "classifier": {
        "model": OptionSpec("text", required=True, check=_model_name),
        "label": OptionSpec("text", required=True, check=_non_empty_text),
        "input": _TEXT_INPUT,
        "threshold": OptionSpec("number", check=_in_range(0, 1)),
        "batch_size": _BATCH_SIZE,
    },
    "judge": {
        "backend": OptionSpec("text", check=_one_of(JUDGE_BACKENDS, "judge backend")),
        "model": OptionSpec("text", required=True, check=_model_name),
        "question": OptionSpec("text", required=True, check=_non_empty_text),
        "rubric": OptionSpec("text"),
        "policy": OptionSpec("text"),
        "max_new_tokens": OptionSpec("integer", check=_in_range(1, 4096)),
        "scoring": OptionSpec("text", check=_one_of(JUDGE_SCORING, "scoring"), judge_backend="transformers"),
        "batch_size": OptionSpec("integer", check=_in_range(1, None), judge_backend="transformers"),
        "base_url": OptionSpec("text", check=_base_url, judge_backend="openai"),
        "api_key_env": OptionSpec("text", check=_api_key_env, judge_backend="openai"),
        "timeout": OptionSpec("number", check=_in_range(0.001, None), judge_backend="openai"),
        "max_retries": OptionSpec("integer", check=_in_range(0, 20), judge_backend="openai"),
        "backoff": OptionSpec("number", check=_in_range(0, 600), judge_backend="openai"),
        "concurrency": OptionSpec("integer", check=_in_range(1, 256), judge_backend="openai"),
    },
    "plugin": {
        "name": OptionSpec("text", required=True, check=_plugin_name),
        "args": OptionSpec("mapping", check=_text_keys),
    },
}

_ARTICLE = {"embedding": "an embedding", "classifier": "a classifier", "judge": "a judge", "plugin": "a plugin"}


def backend_option_names(kind: str) -> tuple[str, ...]:
    """Return the option names a predicate of `kind` accepts (empty for an unknown kind)."""
    return tuple(OPTION_SPECS.get(kind, {}))


def validate_backend_options(kind: str, options: Mapping[str, Any]) -> list[str]:
    """Check a predicate's backend options without loading any model.

    Returns:
        One sentence per problem, or an empty list when the options are valid. Problems are
        an unknown kind or option, a missing required option, a wrong type, a value out of
        range, an unknown judge backend, a plugin that is not installed, and an API key
        written in the policy.
    """
    if kind not in OPTION_SPECS:
        return [_one_of(BACKEND_KINDS, "predicate kind")(kind) or ""]
    specs = OPTION_SPECS[kind]
    judge_backend = options.get("backend", "transformers") if kind == "judge" else None
    problems: list[str] = []

    for name in options:
        if name in specs:
            continue
        if name == "api_key":
            problems.append(
                "option 'api_key' is not allowed: a policy must never hold a secret; put the key in an "
                "environment variable and name it with api_key_env"
            )
            continue
        close = difflib.get_close_matches(str(name), list(specs), n=2)
        suggestion = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        problems.append(
            f"unknown option '{name}' for {_ARTICLE[kind]} predicate{suggestion} "
            f"(valid options: {', '.join(specs)})"
        )

    for name, spec in specs.items():
        if name not in options:
            if spec.required:
                problems.append(f"{_ARTICLE[kind]} predicate needs the option '{name}' ({spec.type_name})")
            continue
        value = options[name]
        if not _is_type(value, spec.type_name):
            article = "an" if spec.type_name[0] in "aeiou" else "a"
            problems.append(f"option '{name}' must be {article} {spec.type_name}, got {type(value).__name__} {value!r:.60}")
            continue
        if spec.judge_backend is not None and judge_backend in JUDGE_BACKENDS and judge_backend != spec.judge_backend:
            problems.append(
                f"option '{name}' applies only to judge backend '{spec.judge_backend}', "
                f"not '{judge_backend}'; remove it or set backend = \"{spec.judge_backend}\""
            )
            continue
        if spec.check is not None:
            problem = spec.check(value)
            if problem:
                problems.append(f"option '{name}' {problem}" if problem.startswith(("must", "argument")) else problem)
    return problems


def create_backend(kind: str, options: Mapping[str, Any]) -> PredicateBackend:
    """Build the backend for a predicate of `kind` with `options`, loading its model.

    Models are loaded once per process and shared between backends naming the same folder.

    Raises:
        JudgeError: the options are invalid (every problem is listed), the model cannot be
            found or loaded, a classifier label is unknown, an openai judge has no base URL
            or its API-key variable is unset, or a plugin is missing.
    """
    problems = validate_backend_options(kind, options)
    if problems:
        raise JudgeError(
            f"invalid options for {_ARTICLE.get(kind, 'a')} predicate: " + "; ".join(problems),
            hint="run `trace check` on the policy to see each problem at its line",
        )
    if kind == "embedding":
        from trace_dsl.compiler.backends.embedding import EmbeddingBackend

        return EmbeddingBackend(options)
    if kind == "classifier":
        from trace_dsl.compiler.backends.classifier import ClassifierBackend

        return ClassifierBackend(options)
    if kind == "judge":
        from trace_dsl.compiler.backends.judge import OpenAIJudge, TransformersJudge

        if options.get("backend", "transformers") == "openai":
            return OpenAIJudge(options)
        return TransformersJudge(options)
    from trace_dsl.compiler.backends.plugin import PluginBackend

    return PluginBackend(options)
