"""Every error the toolkit raises on purpose.

Each class subclasses the builtin exception that fits and carries a stable code, so scripts can
match on the code and the CLI can print a one-line message instead of a traceback.
"""

from __future__ import annotations


class TraceError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    code = "TP000"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message


class PolicySyntaxError(TraceError, SyntaxError):
    """A `.tp` file does not parse."""

    code = "TP001"


class PolicyCheckError(TraceError, ValueError):
    """A `.tp` file parses but fails name resolution, imports or type checks.

    `diagnostics` holds every problem found, not only the first.
    """

    code = "TP100"

    def __init__(self, message: str, *, diagnostics: list | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.diagnostics = list(diagnostics or [])


class DatasetFormatError(TraceError, ValueError):
    """A preference-data file or row is malformed or of an unknown format."""

    code = "TD001"


class DatasetNotFoundError(TraceError, FileNotFoundError):
    """A preference-data file does not exist, or a Hugging Face dataset is neither cached nor reachable."""

    code = "TD002"


class PairNotFoundError(TraceError, LookupError):
    """No pair in the data has the requested id or row index."""

    code = "TD010"


class ModelResolutionError(TraceError, LookupError):
    """A model name resolves to nothing, or its weights are not on this machine."""

    code = "TM001"


class JudgeError(TraceError, RuntimeError):
    """An expensive predicate (judge, classifier, embedding) failed or answered out of format."""

    code = "TJ001"


class ResultCacheError(TraceError, OSError):
    """The result cache file cannot be opened, is not a cache, or cannot be written."""

    code = "TC001"


class PlanMismatchError(TraceError, ValueError):
    """A saved plan no longer matches the policy, data or model it was made for."""

    code = "TR010"


class RunDirectoryError(TraceError, FileExistsError):
    """A run directory exists and overwriting it was not asked for, or it is incomplete."""

    code = "TR001"


class TrainingDataError(TraceError, ValueError):
    """The triaged data cannot be trained on (no conflicts, pairs in error, ...)."""

    code = "TR020"


class ConfigurationError(TraceError, ValueError):
    """A training configuration file or `--set` override is invalid."""

    code = "TR030"


class GitRevisionError(TraceError, LookupError):
    """A `file@revision` reference cannot be read from git."""

    code = "TG001"


class OutputPathError(TraceError, OSError):
    """An output file (triage file, plan, report) cannot be written where the user asked."""

    code = "TO001"
