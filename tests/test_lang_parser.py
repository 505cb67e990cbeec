"""Parsing policy files: the syntax tree, positions, and syntax errors in domain words."""

from __future__ import annotations

import pytest

from trace_dsl.lang import nodes as n
from trace_dsl.lang.parser import ParseFailure, parse_source

POLICY = '''# A comment
policy "demo" version "1.0.0"
description "A demo policy"

import "shared/refusals.tp"

let critical = ["Violence", "Physical Harm"]
predicate harmful = response.harm_categories has_any critical and response.severity_level >= 2
predicate refusal = response matches /(?i)^i'?m sorry/
predicate educational = prompt contains_any ["explain", "history of"]
predicate long_answer = len(response) > 2000 or words(response) >= 300
predicate similar = embedding(response, examples=["I can't help with that."]) >= 0.75
predicate actionable = judge(backend="transformers", model="smollm2", question="Does it give steps?")
predicate custom = plugin("my_org.pii", args={threshold: 2, mode: "strict"})

rule C1 "Critical harm is never acceptable":
  violates when harmful
  unless educational and not refusal

example "an example" {
  prompt "Explain this"
  chosen "I'm sorry." { harm_categories: [], severity_level: 0 }
  rejected "Sure." { harm_categories: ["Violence"], severity_level: 2 }
  pair { prompt_source: "Beavertails" }
  expect invert by C1
}
'''


def parse_errors(text: str) -> list:
    with pytest.raises(ParseFailure) as info:
        parse_source(text, "bad.tp")
    return info.value.diagnostics


def test_parse_builds_statements():
    tree = parse_source(POLICY, "demo.tp")
    assert tree.header.name.value == "demo"
    assert tree.header.version.value == "1.0.0"
    assert tree.header.description.value == "A demo policy"
    kinds = [type(s).__name__ for s in tree.statements]
    assert kinds == ["Import", "Let", "PredicateDef", "PredicateDef", "PredicateDef", "PredicateDef",
                     "PredicateDef", "PredicateDef", "PredicateDef", "Rule", "Example"]


def test_parse_expression_structure():
    tree = parse_source(POLICY, "demo.tp")
    harmful = tree.statements[2]
    assert isinstance(harmful.expr, n.And)
    set_test, compare = harmful.expr.operands
    assert isinstance(set_test, n.SetTest) and set_test.op == "has_any"
    assert set_test.left == n.Field(set_test.left.span, "response", "harm_categories")
    assert isinstance(compare, n.Compare) and compare.op == ">=" and compare.right.value == 2
    refusal = tree.statements[3].expr
    assert isinstance(refusal, n.Matches) and refusal.regex.pattern == "(?i)^i'?m sorry"
    long_answer = tree.statements[5].expr
    assert isinstance(long_answer, n.Or)
    assert [op.left.unit for op in long_answer.operands] == ["characters", "words"]


def test_parse_model_calls():
    tree = parse_source(POLICY, "demo.tp")
    similar, actionable, custom = (tree.statements[i].expr for i in (6, 7, 8))
    assert isinstance(similar, n.Compare) and similar.left.kind == "embedding"
    assert similar.left.subject.subject == "response"
    assert [o.name for o in actionable.value.options] == ["backend", "model", "question"]
    assert custom.value.target.value == "my_org.pii"
    assert [e.key for e in custom.value.options[0].value.entries] == ["threshold", "mode"]


def test_parse_rule_and_example():
    tree = parse_source(POLICY, "demo.tp")
    rule, example = tree.statements[-2:]
    assert rule.id == "C1" and rule.title.value == "Critical harm is never acceptable"
    assert isinstance(rule.unless, n.And)
    assert example.first("expect").category == "invert"
    assert example.first("expect").rules == ("C1",)
    assert example.first("chosen").metadata.entries[1].value.value == 0
    assert example.first("pair").entries[0].key == "prompt_source"


def test_parse_positions():
    tree = parse_source(POLICY, "demo.tp")
    rule = tree.statements[-2]
    assert (rule.line, rule.column) == (16, 1)
    assert (rule.when.line, rule.when.column) == (17, 17)
    assert tree.comments[0].text == "# A comment"
    assert tree.comments[0].own_line


def test_parse_string_escapes():
    tree = parse_source('let s = "a\\"b\\\\c\\nd\\u00e9"')
    assert tree.statements[0].value.value == 'a"b\\c\nd\u00e9'


def test_parse_keyword_field_name_rejected():
    (diagnostic,) = parse_errors("predicate p = response.version")
    assert diagnostic.code == "TP001"
    assert "field name" in diagnostic.message


def test_syntax_error_missing_colon():
    (diagnostic,) = parse_errors('rule R1 "title" violates when x')
    assert (diagnostic.line, diagnostic.column) == (1, 17)
    assert "followed by `:`" in diagnostic.message
    assert diagnostic.hint == "expected `:`"


def test_syntax_error_dangling_and():
    (diagnostic,) = parse_errors("predicate p = x and\nrule R1 \"t\": violates when p")
    assert diagnostic.line == 2
    assert "unexpected `rule`" in diagnostic.message
    assert "test is missing" in diagnostic.message


def test_syntax_error_regex_expected():
    (diagnostic,) = parse_errors('predicate p = response matches "sorry"')
    assert "regular expression between slashes" in diagnostic.message


def test_syntax_error_unclosed_string():
    (diagnostic,) = parse_errors('let s = "abc\nlet t = 1')
    assert diagnostic.code == "TP002"
    assert (diagnostic.line, diagnostic.column) == (1, 9)


def test_syntax_error_invalid_escape():
    (diagnostic,) = parse_errors('let s = "a\\qb"')
    assert diagnostic.code == "TP002"
    assert "\\q" in diagnostic.message


def test_syntax_errors_all_reported():
    text = '\n'.join([
        'policy "x" version "1"',
        'let a = ["x" "y"]',
        'predicate ok = response contains "fine"',
        'rule R1 "t" violates when ok',
        'example "e" { expect maybe }',
        'predicate p = x y',
    ])
    diagnostics = parse_errors(text)
    assert [d.line for d in diagnostics] == [2, 4, 5, 6]
    assert all(d.code == "TP001" for d in diagnostics)
    assert "separated by commas" in diagnostics[0].message
    assert "invert, suppress or retain" in diagnostics[2].message
    assert "joined by `and` or `or`" in diagnostics[3].message


def test_syntax_error_rendering():
    text = 'rule R1 "title" violates when x'
    (diagnostic,) = parse_errors(text)
    rendered = diagnostic.render(text)
    lines = rendered.splitlines()
    assert lines[0] == "bad.tp:1:17: error[TP001]: unexpected `violates`: a rule's title must be followed by `:`"
    assert lines[1].endswith('rule R1 "title" violates when x')
    assert lines[2].index("^") == lines[1].index("violates")
    assert lines[3] == "hint: expected `:`"


def test_policy_cannot_contain_code():
    diagnostics = parse_errors('predicate p = __import__("os").system("true")')
    assert diagnostics[0].code == "TP001"
