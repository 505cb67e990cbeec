"""Triage: run a compiled policy over preference pairs and record a verdict per pair."""

from trace_dsl.triage.verdict import Category, Verdict, categorize

__all__ = ["Category", "Verdict", "categorize"]
