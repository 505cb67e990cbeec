"""Preference data: the `PreferencePair` record and loaders for the common formats."""

from trace_dsl.data.formats import FORMATS, PKU_HARM_CATEGORIES, detect_format
from trace_dsl.data.loader import (
    LoadResult,
    PairReader,
    SkippedRow,
    dataset_hash,
    file_sha256,
    load_pairs,
    pairs_hash,
)
from trace_dsl.data.records import PreferencePair, pair_id

__all__ = [
    "FORMATS",
    "LoadResult",
    "PKU_HARM_CATEGORIES",
    "PairReader",
    "PreferencePair",
    "SkippedRow",
    "dataset_hash",
    "detect_format",
    "file_sha256",
    "load_pairs",
    "pair_id",
    "pairs_hash",
]
