"""The formatter: canonical layout, idempotence, comments kept, meaning unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from trace_dsl.lang.formatter import format_source, statement_text
from trace_dsl.lang.parser import parse_source

POLICIES = sorted(Path(__file__).resolve().parent.parent.joinpath("policies").rglob("*.tp"))

MESSY = '''# Top comment

# second block
policy   "demo"    version "1.0.0" description "Demo"   # on the header
import "shared/refusals.tp"
let critical = ["Violence",   # S6
   # before the second item
   "Physical Harm",]
let   limit=3
predicate harmful = (response.harm_categories has_any critical and response.severity_level >= 2) or (not response.is_safe and (refusal or limit > 2)) or pair.prompt_source == "a-rather-long-source-name-here"
rule C1 "Critical":   # after the title
  # before when
  violates when harmful unless refusal  # after unless
example "old" { expect invert by C1
  prompt "hi"
  chosen "I'm sorry" { harm_categories: [], "rule": true }
  rejected "ok" }
# final comment
'''

EXPECTED = '''# Top comment

# second block
policy "demo" version "1.0.0"  # on the header
description "Demo"

import "shared/refusals.tp"

let critical = [
  "Violence",  # S6
  # before the second item
  "Physical Harm",
]
let limit = 3

predicate harmful = (response.harm_categories has_any critical and response.severity_level >= 2)
  or (not response.is_safe and (refusal or limit > 2))
  or pair.prompt_source == "a-rather-long-source-name-here"

rule C1 "Critical":  # after the title
  # before when
  violates when harmful
  unless refusal  # after unless

example "old" {
  prompt "hi"
  chosen "I'm sorry" { harm_categories: [], "rule": true }
  rejected "ok"
  expect invert by C1
}

# final comment
'''

HAND_CASES = [
    MESSY,
    'predicate p = not (a or b) and not not c\n',
    'predicate p = (a and b) and (c and d) or e\n',
    'let s = "quote \\" backslash \\\\ newline \\n tab \\t"\n',
    'predicate p = response matches /a\\/b/i and prompt contains "x"\n',
    'rule R1 "t": violates when response contains_any ["' + '", "'.join(f"word number {i}" for i in range(20)) + '"]\n',
    'example "e" {\n  expect retain\n  history ["a", "b"]\n  pair { "odd key": 1, nested: { a: [1, 2] } }\n'
    '  rejected "r"\n  chosen "c"\n  prompt "p"\n}\n',
    '# only a comment\n',
    '',
]


def test_format_canonical_layout():
    assert format_source(MESSY) == EXPECTED


@pytest.mark.parametrize("source", HAND_CASES)
def test_format_idempotent_hand_cases(source):
    once = format_source(source)
    assert format_source(once) == once


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_format_idempotent_shipped(path):
    once = format_source(path.read_text(encoding="utf-8"))
    assert format_source(once) == once


@pytest.mark.parametrize("source", HAND_CASES)
def test_format_keeps_comments(source):
    before = [c.text for c in parse_source(source).comments]
    after = [c.text for c in parse_source(format_source(source)).comments]
    assert sorted(before) == sorted(after)


@pytest.mark.parametrize("source", HAND_CASES)
def test_format_keeps_meaning(source):
    before = [statement_text(s) for s in parse_source(source).statements]
    after = [statement_text(s) for s in parse_source(format_source(source)).statements]
    assert before == after


def test_format_breaks_long_word_lists():
    source = HAND_CASES[5]
    lines = format_source(source).splitlines()
    assert lines[1] == "  violates when response contains_any ["
    assert lines[2] == '    "word number 0",'
    assert lines[-1] == "  ]"
    assert all(len(line) <= 100 for line in lines)


def test_format_orders_example_lines():
    lines = format_source(HAND_CASES[6]).splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["history", "prompt", "chosen", "rejected", "pair", "expect"]
    assert lines[5] == '  pair { "odd key": 1, nested: { a: [1, 2] } }'
