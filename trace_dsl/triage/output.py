"""Triage files: verdicts written as JSON lines or Parquet, and read back.

Each row is `Verdict.to_dict()`: pair_id, category, chosen_complies, rejected_complies,
chosen_rules, rejected_rules, policy_hash, error. A file is written to a temporary name and
renamed when complete, so an interrupted write never leaves a truncated triage file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from trace_dsl.errors import DatasetFormatError
from trace_dsl.triage.verdict import Verdict

FORMATS = ("jsonl", "parquet")


def output_format(path: str | os.PathLike[str], format: str | None = None) -> str:
    """Return the triage file format: `format` when given, else the one the file extension names.

    Raises:
        ValueError: the format is unknown, or the extension names none.
    """
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown triage format '{format}'; use one of: {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"cannot tell the triage format from '{path}'; name it .jsonl or .parquet, or pass --format")


def write_verdicts(verdicts: Sequence[Verdict], path: str | os.PathLike[str], format: str | None = None) -> Path:
    """Write verdicts to `path` (jsonl or parquet), replacing it only once complete."""
    target = Path(path)
    kind = output_format(target, format)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial")
    rows = [verdict.to_dict() for verdict in verdicts]
    if kind == "jsonl":
        with temporary.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("pair_id", pa.string()),
                ("category", pa.string()),
                ("chosen_complies", pa.bool_()),
                ("rejected_complies", pa.bool_()),
                ("chosen_rules", pa.list_(pa.string())),
                ("rejected_rules", pa.list_(pa.string())),
                ("policy_hash", pa.string()),
                ("error", pa.string()),
            ]
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), temporary)
    os.replace(temporary, target)
    return target


def read_verdicts(path: str | os.PathLike[str], format: str | None = None) -> list[Verdict]:
    """Read a triage file written by `write_verdicts`.

    Raises:
        DatasetFormatError: a row is not a verdict (the message names the line).
    """
    source = Path(path)
    kind = output_format(source, format)
    if kind == "parquet":
        import pyarrow.parquet as pq

        rows: Iterable[dict] = pq.read_table(source).to_pylist()
        return [Verdict.from_dict(row) for row in rows]
    verdicts = []
    with source.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                verdicts.append(Verdict.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetFormatError(f"{source}:{number}: not a verdict row ({exc})") from None
    return verdicts
