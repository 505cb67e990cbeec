"""Loading preference pairs from any supported source, with every skipped row accounted for.

    result = load_pairs("examples/pku-saferlhf/pairs.jsonl")
    result.format          # 'pku-saferlhf', detected from the first row
    result.pairs           # PreferencePair records, in file order
    result.skipped         # rows left out, each with its location and reason

A malformed row raises `DatasetFormatError` naming the file, line and field. With
`skip_invalid=True` it is recorded in `skipped` instead. Rows that a format's own rules leave out
(PKU-SafeRLHF rows without a valid `safer_response_id`) are always recorded there, never raised.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from trace_dsl.data.formats import RowError, RowFormat, SkipRow, detect_format, get_format
from trace_dsl.data.records import PreferencePair
from trace_dsl.data.sources import read_rows
from trace_dsl.errors import DatasetFormatError


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """A row that produced no pair.

    Attributes:
        location: `file:line` or `file:row N`.
        reason: what was wrong, for people.
        reason_code: a short stable label to count by (`no-safer-response`, `prompt-mismatch`,
            `missing-field`, `wrong-type`, ...).
        field: the offending field, when one is to blame.
    """

    location: str
    reason: str
    reason_code: str
    field: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """Return the row as a JSON-ready dict."""
        return {"location": self.location, "reason": self.reason, "reason_code": self.reason_code, "field": self.field}


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The pairs read from one source and the account of the rows read.

    Attributes:
        source: the path or dataset id as given.
        format: the row format used, detected or forced.
        pairs: the pairs in source order.
        rows_read: non-blank rows read (stops early when a `limit` was reached).
        skipped: rows that produced no pair, in source order.
    """

    source: str
    format: str
    pairs: tuple[PreferencePair, ...]
    rows_read: int
    skipped: tuple[SkippedRow, ...]

    def skipped_by_reason(self) -> dict[str, int]:
        """Count skipped rows per `reason_code`, most frequent first."""
        return dict(Counter(row.reason_code for row in self.skipped).most_common())

    def summary(self) -> str:
        """Return one line for logs: rows read, pairs and skipped rows by reason."""
        line = f"{self.source}: {self.format}, {self.rows_read} rows, {len(self.pairs)} pairs"
        if self.skipped:
            reasons = ", ".join(f"{count} {code}" for code, count in self.skipped_by_reason().items())
            line += f", {len(self.skipped)} skipped ({reasons})"
        return line


class PairReader:
    """Stream pairs from a source one at a time, keeping count of what was read and skipped.

    Iterate it once; afterwards `format`, `rows_read` and `skipped` describe the whole pass.
    `load_pairs` collects the stream into a `LoadResult`.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        format: str | None = None,
        skip_invalid: bool = False,
        limit: int | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.source = str(source)
        self.row_format: RowFormat | None = get_format(format) if format else None
        self.skip_invalid = skip_invalid
        self.limit = limit
        self.rows_read = 0
        self.pairs_read = 0
        self.skipped: list[SkippedRow] = []

    @property
    def format(self) -> str | None:
        """The format in use; None until the first row is read when it is detected."""
        return self.row_format.name if self.row_format else None

    def __iter__(self) -> Iterator[PreferencePair]:
        for row in read_rows(self.source):
            if self.limit is not None and self.pairs_read >= self.limit:
                return
            self.rows_read += 1
            if self.row_format is None:
                self.row_format = detect_format(row.data, row.location)
            try:
                result = self.row_format.convert(row.data, row.location)
            except RowError as exc:
                if not self.skip_invalid:
                    raise DatasetFormatError(
                        f"{row.location}: field {exc.field!r}: {exc.problem}",
                        hint=(
                            f"the rows are read as format {self.row_format.name!r}; fix this row, pass "
                            "--skip-invalid to skip malformed rows, or --data-format to read another format"
                        ),
                    ) from None
                self.skipped.append(SkippedRow(row.location, exc.problem, exc.reason_code, exc.field))
                continue
            if isinstance(result, SkipRow):
                self.skipped.append(SkippedRow(row.location, result.reason, result.reason_code))
                continue
            self.pairs_read += 1
            yield result
        if self.rows_read == 0:
            raise DatasetFormatError(f"{self.source}: contains no rows", hint="check that the right file was passed")


def load_pairs(
    source: str | Path,
    *,
    format: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> LoadResult:
    """Load preference pairs from a file, a saved dataset folder or a Hugging Face dataset id.

    Args:
        source: a `.jsonl`, `.json` or `.parquet` file (each optionally `.gz`), a folder written by
            `Dataset.save_to_disk`, or a dataset id `org/name[:split]` (cached, or reachable).
        format: the row format (`trace_dsl.data.formats.FORMATS` names them); detected from the
            first row when None.
        skip_invalid: record malformed rows in `skipped` and go on, instead of raising.
        limit: stop after this many pairs.

    Raises:
        DatasetNotFoundError: the file does not exist, or the dataset cannot be loaded.
        DatasetFormatError: the file cannot be parsed, its format cannot be detected, it contains no
            rows, or (without `skip_invalid`) a row is malformed; the message names file, line
            and field.
    """
    reader = PairReader(source, format=format, skip_invalid=skip_invalid, limit=limit)
    pairs = tuple(reader)
    return LoadResult(
        source=str(source),
        format=reader.format or "unknown",
        pairs=pairs,
        rows_read=reader.rows_read,
        skipped=tuple(reader.skipped),
    )


def file_sha256(path: str | Path) -> str:
    """Return `sha256:<hex>` of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def pairs_hash(pairs: Iterable[PreferencePair]) -> str:
    """Return `sha256:<hex>` over the pair ids in order, which cover every pair's content."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.id.encode("ascii"))
        digest.update(b"\n")
    return f"sha256:{digest.hexdigest()}"


def dataset_hash(source: str | Path, pairs: Iterable[PreferencePair] | None = None) -> str:
    """Return a content hash of a dataset, for run manifests.

    A file is hashed by its bytes, so any edit changes the hash. A dataset id or saved folder has
    no single file, so its hash covers the ids of `pairs` (loaded from it when not given).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return file_sha256(path)
    if pairs is None:
        pairs = load_pairs(source).pairs
    return pairs_hash(pairs)
