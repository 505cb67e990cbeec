"""Row formats of preference data and the detection of a file's format from its first row."""

from __future__ import annotations

from typing import Any, Mapping

from trace_dsl.data.formats.base import RowError, RowFormat, SkipRow
from trace_dsl.data.formats.hh_rlhf import HH_RLHF
from trace_dsl.data.formats.pku import PKU_HARM_CATEGORIES, PKU_SAFERLHF
from trace_dsl.data.formats.trl import CONVERSATIONAL, IMPLICIT_PROMPT, STANDARD, TRACE_PAIRS
from trace_dsl.errors import DatasetFormatError

# Detection order matters: the toolkit's own rows and PKU-SafeRLHF rows also carry fields of the
# generic formats, and HH-RLHF rows would otherwise pass as implicit-prompt strings.
FORMATS: dict[str, RowFormat] = {
    row_format.name: row_format
    for row_format in (TRACE_PAIRS, PKU_SAFERLHF, CONVERSATIONAL, STANDARD, HH_RLHF, IMPLICIT_PROMPT)
}


def get_format(name: str) -> RowFormat:
    """Return the row format called `name`.

    Raises:
        DatasetFormatError: no format has that name (the message lists the known ones).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise DatasetFormatError(
            f"unknown data format {name!r}", hint=f"known formats: {', '.join(FORMATS)}"
        ) from None


def detect_format(row: Mapping[str, Any], location: str) -> RowFormat:
    """Return the first format in `FORMATS` whose shape `row` has.

    Raises:
        DatasetFormatError: no format fits (the message lists the row's fields and the formats).
    """
    for row_format in FORMATS.values():
        if row_format.detect(row):
            return row_format
    fields = ", ".join(sorted(row)) or "none"
    raise DatasetFormatError(
        f"{location}: cannot detect the data format from this row (fields: {fields})",
        hint="pass --format with one of: "
        + "; ".join(f"{row_format.name} ({row_format.description})" for row_format in FORMATS.values()),
    )


__all__ = [
    "FORMATS",
    "PKU_HARM_CATEGORIES",
    "RowError",
    "RowFormat",
    "SkipRow",
    "detect_format",
    "get_format",
]
