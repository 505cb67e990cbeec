"""The policy language: parse `.tp` files to a syntax tree, check them, format them.

`parse_source` builds the tree (`trace_dsl.lang.nodes`), `check_policy` resolves imports and
names and checks types (every problem a `Diagnostic`), `format_source` gives the canonical layout.
"""

from trace_dsl.lang.checker import CheckResult, Program, check_policy, infer_schema
from trace_dsl.lang.diagnostics import CODES, Diagnostic, render_all
from trace_dsl.lang.formatter import format_file, format_source
from trace_dsl.lang.parser import ParseFailure, parse_source

__all__ = [
    "CODES",
    "CheckResult",
    "Diagnostic",
    "ParseFailure",
    "Program",
    "check_policy",
    "format_file",
    "format_source",
    "infer_schema",
    "parse_source",
    "render_all",
]
