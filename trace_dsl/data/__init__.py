"""Preference data: the `PreferencePair` record and loaders for the common formats."""

from trace_dsl.data.records import PreferencePair, pair_id

__all__ = ["PreferencePair", "pair_id"]
