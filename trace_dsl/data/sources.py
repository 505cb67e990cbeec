"""Reading raw rows from preference-data sources: files and Hugging Face datasets.

Every row comes out as a `RawRow` that carries its location (`file:line` for JSON lines,
`file:row N` for JSON arrays, Parquet files and datasets), so an error can name it. JSON lines and
Parquet files are streamed: memory does not grow with the file. A JSON array is parsed whole,
because the standard library has no streaming JSON parser.

Supported sources:
- `.jsonl`, `.json` (an array of objects, an object holding one such array, or JSON lines under
  a `.json` name), `.parquet`, and each of those compressed as `.gz`;
- a folder written by `datasets.Dataset.save_to_disk`;
- a Hugging Face dataset id `org/name` (optionally `org/name:split`), loaded through
  `datasets.load_dataset`, which uses the local cache when the Hub cannot be reached.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from trace_dsl.errors import DatasetFormatError, DatasetNotFoundError

# `org/name`, optionally followed by `:split`.
_HF_DATASET_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<split>[\w.-]+))?$")
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True, slots=True)
class RawRow:
    """One row as read from a source, before any format is applied.

    Attributes:
        number: 1-based line number (JSON lines) or row number (other sources).
        data: the row's fields.
        location: `source:line` or `source:row N`, for messages and `PreferencePair.source`.
    """

    number: int
    data: Mapping[str, Any]
    location: str


def _suffixes(path: Path) -> tuple[str, bool]:
    """Return the data suffix of a file name (`.jsonl`, `.json`, `.parquet`) and whether it is gzipped."""
    name = path.name.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[: -len(".gz")]
    for suffix in (".jsonl", ".ndjson", ".json", ".parquet"):
        if name.endswith(suffix):
            return (".jsonl" if suffix == ".ndjson" else suffix), compressed
    raise DatasetFormatError(
        f"{path}: unsupported file type",
        hint="use .jsonl, .json or .parquet (each optionally .gz), or a Hugging Face dataset id org/name",
    )


def _has_data_suffix(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".jsonl", ".ndjson", ".json", ".parquet"))


def _open_text(path: Path, compressed: bool) -> IO[str]:
    # utf-8-sig drops the byte-order mark that Windows tools write at the start of UTF-8 files.
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open("r", encoding="utf-8-sig")


def _check_object(value: Any, location: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise DatasetFormatError(
            f"{location}: expected a JSON object with the pair's fields, got {type(value).__name__}",
        )
    return value


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not allow. A NaN field compares false
    # with every number, so a test such as `severity_level >= 2` would silently pass.
    raise ValueError(f"{name} is not valid JSON; write null for a missing value")


def _check_surrogates(value: Any, location: str) -> None:
    """Raise when a string in `value` holds a lone surrogate (a `\\uD800`-`\\uDFFF` escape without its pair).

    Python's json decodes such an escape without complaint, but the result cannot be encoded as
    UTF-8, so hashing the pair id and writing outputs fail. It is usually a character cut in two.
    """
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(exc.object[exc.start])
        raise DatasetFormatError(
            f"{location}: `\\u{code:04x}` is half of a surrogate pair, so the text is not valid Unicode",
            hint="repair or remove this row; it usually holds a character that was cut in two",
        ) from None


def _read_json_lines(path: Path, handle: IO[str], *, first_line: int = 1) -> Iterator[RawRow]:
    for number, line in enumerate(handle, start=first_line):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            value = json.loads(line, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(
                f"{location}: invalid JSON at column {exc.colno}: {exc.msg}",
                hint="each line of a .jsonl file holds one complete JSON object",
            ) from None
        except ValueError as exc:
            raise DatasetFormatError(f"{location}: {exc}") from None
        if "\\u" in line:
            # Only an escape can produce a lone surrogate, so other lines skip the check.
            _check_surrogates(value, location)
        yield RawRow(number, _check_object(value, location), location)


def _read_json(path: Path, compressed: bool) -> Iterator[RawRow]:
    with _open_text(path, compressed) as handle:
        text = handle.read()
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Several JSON values one after another: JSON lines under a .json name.
            yield from _read_json_lines(path, io.StringIO(text))
            return
        raise DatasetFormatError(
            f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}",
        ) from None
    except ValueError as exc:
        raise DatasetFormatError(f"{path}: {exc}") from None
    if "\\u" in text:
        _check_surrogates(document, str(path))
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) == 1 and all(isinstance(item, dict) for item in lists[0]):
            document = lists[0]
        else:
            # One object on its own: a file holding a single pair.
            document = [document]
    if not isinstance(document, list):
        raise DatasetFormatError(f"{path}: expected a JSON array of objects, got {type(document).__name__}")
    for index, value in enumerate(document, start=1):
        location = f"{path}:row {index}"
        yield RawRow(index, _check_object(value, location), location)


def _undecodable_line(path: Path, compressed: bool) -> tuple[int, int] | None:
    """Return the 1-based line and byte column of the first bytes that are not UTF-8, if any."""
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, exc.start + 1
    return None


def _nan_to_none(value: Any) -> Any:
    """Return `value` with every float NaN, at any depth, replaced by `None`.

    Arrow columns (Parquet, datasets) hold NaN where pandas had a missing number. As a number it
    compares false with everything, so `severity_level >= 2` would pass; as null the field is
    missing and the pair gets an `error` verdict.
    """
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value


def _read_parquet(path: Path, compressed: bool) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if compressed:
            # Parquet needs random access, so a gzipped file is decompressed into memory first.
            with gzip.open(path, "rb") as handle:
                parquet = pq.ParquetFile(io.BytesIO(handle.read()))
        else:
            parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetFormatError(f"{path}: not a readable Parquet file: {exc}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for value in batch.to_pylist():
            number += 1
            yield RawRow(number, _nan_to_none(value), f"{path}:row {number}")


def _read_dataset(dataset: Any, label: str) -> Iterator[RawRow]:
    for number, value in enumerate(dataset, start=1):
        yield RawRow(number, _nan_to_none(value), f"{label}:row {number}")


def _load_saved_dataset(path: Path) -> Iterator[RawRow]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetFormatError(
                f"{path}: saved dataset has splits {', '.join(loaded)} and no 'train' split",
                hint="save one split with Dataset.save_to_disk, or pass its folder",
            )
        loaded = loaded["train"]
    yield from _read_dataset(loaded, str(path))


def _load_hub_dataset(repo: str, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types for "not available"
        raise DatasetNotFoundError(
            f"{repo}: no such file, and the Hugging Face dataset {repo!r} (split {split!r}) could not be "
            f"loaded: {type(exc).__name__}: {exc}",
            hint=(
                f"on a machine with network run `huggingface-cli download --repo-type dataset {repo}` and copy "
                "the cache (HF_HOME) here, or export the data to a .jsonl or .parquet file and pass its path"
            ),
        ) from None
    yield from _read_dataset(loaded, f"{repo}:{split}")


def is_hub_dataset_id(source: str) -> bool:
    """Return whether `source` reads as a Hugging Face dataset id (`org/name` or `org/name:split`)."""
    return bool(_HF_DATASET_ID.match(source))


def read_rows(source: str | Path) -> Iterator[RawRow]:
    """Yield the rows of a file, a saved dataset folder or a Hugging Face dataset id, in order.

    Raises:
        DatasetNotFoundError: the file does not exist and `source` is not a dataset id, or the
            dataset is neither cached nor reachable.
        DatasetFormatError: the file type is unsupported, or the file is not valid JSON or Parquet
            (naming the line where parsing failed).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _load_saved_dataset(path)
            return
        raise DatasetFormatError(
            f"{path}: is a folder, not a data file or a dataset saved with save_to_disk",
            hint="pass a .jsonl, .json or .parquet file",
        )
    if not path.exists():
        match = _HF_DATASET_ID.match(str(source))
        # `data/pairs.jsonl` also fits the `org/name` pattern, but a file suffix says it is a path.
        if match is None or _has_data_suffix(path):
            raise DatasetNotFoundError(f"{source}: no such file", hint="check the path")
        yield from _load_hub_dataset(match["repo"], match["split"] or "train")
        return

    suffix, compressed = _suffixes(path)
    try:
        if suffix == ".parquet":
            yield from _read_parquet(path, compressed)
        elif suffix == ".json":
            yield from _read_json(path, compressed)
        else:
            with _open_text(path, compressed) as handle:
                yield from _read_json_lines(path, handle)
    except UnicodeDecodeError as exc:
        # exc.start counts from the decoder's buffer, not the file, so find the line again.
        where = _undecodable_line(path, compressed)
        location = f"{path}:{where[0]}" if where else str(path)
        detail = f" at column {where[1]}" if where else ""
        raise DatasetFormatError(f"{location}: not UTF-8 text: {exc.reason}{detail}",
                                 hint="save the file as UTF-8") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise DatasetFormatError(f"{path}: damaged or truncated gzip file: {exc}") from None
