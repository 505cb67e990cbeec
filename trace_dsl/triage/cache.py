"""The content-addressed store of expensive-predicate results, in one SQLite file.

A result is stored under `cache_key(fingerprint, definition, prompt, response)`: the backend's
fingerprint (model, weights, prompt template, decoding), the predicate's definition, and the two
texts. Editing a policy changes the definitions of the predicates it touches, so a re-triage
computes only those. An unchanged predicate on unchanged text is read back.

Only successful results are stored. An error (a timeout, an out-of-format answer) is not, so the
next run asks again. Writes commit in chunks, and the file uses SQLite's write-ahead log, so a
run that crashes or is interrupted keeps every chunk it committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping

from trace_dsl.compiler.backends.base import BackendResult
from trace_dsl.errors import ResultCacheError

CACHE_DIR_ENV = "TRACE_CACHE_DIR"
CACHE_FILE_NAME = "results.sqlite"
SCHEMA_VERSION = 1

# SQLite limits the number of parameters of one statement (32766 since 3.32, 999 before).
_QUERY_CHUNK = 500
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID
"""


def default_cache_path() -> Path:
    """Return `$TRACE_CACHE_DIR/results.sqlite` when the variable is set, else
    `./.trace-cache/results.sqlite` in the working directory."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if folder:
        return Path(folder).expanduser() / CACHE_FILE_NAME
    return Path(".trace-cache") / CACHE_FILE_NAME


def cache_key(fingerprint: str, definition: str, prompt: str, response: str) -> str:
    """Return the hex SHA-256 that names one predicate result.

    Each part is length-prefixed before hashing, so no two different tuples of parts can
    produce the same byte stream.
    """
    digest = hashlib.sha256()
    for part in (fingerprint, definition, prompt, response):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counts for one open cache: stored entries, and this session's hits, misses and writes."""

    path: str
    entries: int
    hits: int
    misses: int
    writes: int
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Return the counts as a JSON-ready dict."""
        return asdict(self)


class ResultCache:
    """Predicate results in a SQLite file, keyed by `cache_key`.

    Use it as a context manager, or call `close`. Several processes may share one file: SQLite's
    write-ahead log lets readers run during a write, and writers wait up to 30 s for each other.

    Raises:
        ResultCacheError: the path is a folder, the file is not a SQLite database, it was
            written by a newer schema, or it cannot be created.
    """

    def __init__(self, path: str | os.PathLike[str], *, commit_every: int = 500) -> None:
        self.path = Path(path).expanduser()
        self.commit_every = max(1, commit_every)
        self._hits = 0
        self._misses = 0
        self._writes = 0
        self._connection: sqlite3.Connection | None = None
        if self.path.is_dir():
            raise ResultCacheError(
                f"result cache path {self.path} is a folder, not a file",
                hint=f"pass a file path such as {self.path / CACHE_FILE_NAME}",
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(str(self.path), timeout=30.0)
            self._prepare()
        except ResultCacheError:
            self._close_quietly()
            raise
        except sqlite3.OperationalError as exc:
            if self._connection is not None:
                # Opened, then refused (locked, read-only): the file itself is not at fault.
                self._close_quietly()
                raise ResultCacheError(
                    f"cannot use {self.path} as a result cache: {exc}",
                    hint="check that the file is writable and no other program holds it, or pass another cache path",
                ) from exc
            raise ResultCacheError(
                f"cannot create the result cache {self.path}: {exc}",
                hint="pass a cache path in a writable folder",
            ) from exc
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise ResultCacheError(
                f"cannot use {self.path} as a result cache: {exc}",
                hint="pass another cache path, or delete the file if it is a damaged result cache",
            ) from exc
        except OSError as exc:
            raise ResultCacheError(
                f"cannot create the result cache {self.path}: {exc.strerror or exc}",
                hint="pass a cache path in a writable folder",
            ) from exc

    def _prepare(self) -> None:
        connection = self._require_open()
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ResultCacheError(
                f"result cache {self.path} has schema version {version}, newer than this toolkit's {SCHEMA_VERSION}",
                hint="upgrade trace-dsl, or pass another cache path",
            )
        # WAL keeps committed chunks on disk through a crash and lets readers run during writes;
        # synchronous=NORMAL is durable in WAL mode except for the last commits on power loss.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        with connection:
            connection.execute(_CREATE_TABLE)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _require_open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ResultCacheError(f"result cache {self.path} is closed")
        return self._connection

    def get_many(self, keys: Iterable[str]) -> dict[str, BackendResult]:
        """Return the stored results of those `keys` that are in the cache."""
        connection = self._require_open()
        wanted = list(dict.fromkeys(keys))
        found: dict[str, BackendResult] = {}
        for start in range(0, len(wanted), _QUERY_CHUNK):
            chunk = wanted[start : start + _QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = connection.execute(f"SELECT key, value FROM results WHERE key IN ({marks})", chunk)
            for key, text in rows:
                result = _decode(text)
                if result is not None:
                    found[key] = result
        self._hits += len(found)
        self._misses += len(wanted) - len(found)
        return found

    def put_many(self, results: Mapping[str, BackendResult]) -> int:
        """Store the successful results among `results`, committing every `commit_every` rows.

        Returns:
            The number of results stored; results with `error` set are skipped.
        """
        connection = self._require_open()
        now = time.time()
        rows = [(key, _encode(result), now) for key, result in results.items() if result.error is None]
        for start in range(0, len(rows), self.commit_every):
            with connection:
                connection.executemany(
                    "INSERT OR REPLACE INTO results (key, value, created_at) VALUES (?, ?, ?)",
                    rows[start : start + self.commit_every],
                )
        self._writes += len(rows)
        return len(rows)

    def stats(self) -> CacheStats:
        """Return the number of stored entries and this session's hits, misses and writes."""
        connection = self._require_open()
        entries = connection.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        size = sum(
            candidate.stat().st_size
            for candidate in (self.path, self.path.with_name(self.path.name + "-wal"))
            if candidate.exists()
        )
        return CacheStats(str(self.path), entries, self._hits, self._misses, self._writes, size)

    def close(self) -> None:
        """Close the file; later calls do nothing."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _close_quietly(self) -> None:
        try:
            self.close()
        except sqlite3.Error:
            self._connection = None

    def __enter__(self) -> "ResultCache":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _encode(result: BackendResult) -> str:
    return json.dumps({"value": result.value, "rationale": result.rationale}, ensure_ascii=False)


def _decode(text: str) -> BackendResult | None:
    """Return the stored result, or `None` for a row that does not decode (treated as a miss)."""
    try:
        payload = json.loads(text)
        value = payload["value"]
        rationale = payload.get("rationale")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(value, (bool, int, float)) or (rationale is not None and not isinstance(rationale, str)):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return BackendResult(value=value, rationale=rationale)
