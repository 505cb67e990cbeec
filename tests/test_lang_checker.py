"""The checker: every kind of bad input gets its code, position and hint; good input gets a program."""

from __future__ import annotations

from pathlib import Path

import pytest

from trace_dsl.compiler.policy import load_policy
from trace_dsl.data.records import PreferencePair
from trace_dsl.errors import PolicyCheckError
from trace_dsl.lang.checker import check_policy, infer_schema

HEADER = 'policy "t" version "1"\n'


def check(tmp_path: Path, text: str, files: dict[str, str] | None = None, **kwargs):
    for name, content in (files or {}).items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
    path = tmp_path / "policy.tp"
    path.write_text(text, encoding="utf-8")
    return check_policy(str(path), **kwargs)


def codes(result) -> list[str]:
    return [d.code for d in result.diagnostics]


def only(result, code: str):
    found = [d for d in result.diagnostics if d.code == code]
    assert len(found) == 1, [d.headline() for d in result.diagnostics]
    return found[0]


def test_valid_policy_gives_program(tmp_path):
    result = check(tmp_path, HEADER + 'predicate p = response contains "x"\nrule R1 "t": violates when p\n')
    assert result.ok
    assert result.program.rules[0].id == "R1"
    assert list(result.program.predicates) == ["p"]


def test_unknown_name_with_close_match(tmp_path):
    result = check(tmp_path, HEADER + 'let critical = ["Violence"]\n'
                   'predicate p = response.harm_categories has_any critcal\nrule R1 "t": violates when p\n')
    diagnostic = only(result, "TP101")
    assert diagnostic.message == "unknown name `critcal`"
    assert (diagnostic.line, diagnostic.column) == (3, 48)
    assert diagnostic.hint == "did you mean `critical`?"
    assert result.program is None


def test_unknown_name_defined_elsewhere(tmp_path):
    files = {"shared/lib.tp": "predicate uses_helper = helper\n"}
    text = HEADER + 'import "shared/lib.tp"\npredicate helper = response contains "x"\nrule R1 "t": violates when helper\n'
    diagnostic = only(check(tmp_path, text, files), "TP101")
    assert diagnostic.path.endswith("shared/lib.tp")
    assert "import that file" in diagnostic.hint


def test_duplicate_definition(tmp_path):
    result = check(tmp_path, HEADER + 'let a = 1\nlet a = 2\nrule R1 "t": violates when a > 0\n')
    assert only(result, "TP102").line == 3


def test_duplicate_rule_id(tmp_path):
    result = check(tmp_path, HEADER + 'rule R1 "a": violates when true\nrule R1 "b": violates when false\n')
    diagnostic = only(result, "TP103")
    assert diagnostic.line == 3
    assert "already used at line 2" in diagnostic.message


@pytest.mark.parametrize(
    "expr, fragment",
    [
        ("response.severity_level has_any [\"a\"] and response.severity_level >= 2", "used as a number here but as a list"),
        ('response contains ["a", "b"]', "`contains` takes one string"),
        ('response contains_any "a"', "takes a list of strings"),
        ("response contains_any [1, 2]", "takes a list of strings"),
        ("len(response)", "a number is not a test"),
        ("response", "`response` is text, not a test"),
        ('prompt > 3', "`>` compares numbers, got text"),
        ('response.is_safe == "yes" and response.is_safe', "used as a yes/no value here but as a string"),
        ('pair.prompt_source in "Beavertails"', "needs a list on its right"),
        ('[1, "a"] has_any [1]', "one type"),
        ('response contains ""', "empty string"),
        ("len(response) == [1]", "cannot compare"),
    ],
)
def test_wrong_types(tmp_path, expr, fragment):
    result = check(tmp_path, HEADER + f"rule R1 \"t\": violates when {expr}\n")
    messages = [d.message for d in result.diagnostics if d.code == "TP104"]
    assert any(fragment in message for message in messages), messages


def test_invalid_regex_points_into_pattern(tmp_path):
    result = check(tmp_path, HEADER + "rule R1 \"t\": violates when response matches /ab(c/\n")
    diagnostic = only(result, "TP105")
    assert "missing )" in diagnostic.message
    # The pattern starts one column after the slash; `re` reports the offset of the open group.
    assert diagnostic.column == len('rule R1 "t": violates when response matches /ab') + 1


@pytest.mark.parametrize(
    "call, fragment",
    [
        ('embedding(response, examples=["x"]) >= 1.5', "embedding gives a cosine similarity between -1 and 1"),
        ('classifier(response, model="m", label="toxic") > 1.2', "classifier gives a probability between 0 and 1"),
        ('classifier(response, model="m", label="toxic") >= -0.1', "out of range"),
    ],
)
def test_threshold_out_of_range(tmp_path, call, fragment):
    result = check(tmp_path, HEADER + f"predicate p = {call}\nrule R1 \"t\": violates when p\n")
    assert fragment in only(result, "TP106").message


def test_unknown_judge_backend(tmp_path):
    text = HEADER + 'predicate j = judge(backend="vllm", model="smollm2", question="Is it harmful?")\n' \
                    'rule R1 "t": violates when j\n'
    diagnostic = only(check(tmp_path, text), "TP107")
    assert "unknown judge backend 'vllm'" in diagnostic.message
    assert diagnostic.column == len("predicate j = judge(") + 1


def test_unknown_and_missing_options(tmp_path):
    text = HEADER + 'predicate j = judge(model="smollm2", questoin="Is it harmful?")\nrule R1 "t": violates when j\n'
    messages = [d.message for d in check(tmp_path, text).diagnostics if d.code == "TP107"]
    assert any("unknown option 'questoin'" in m and "'question'" in m for m in messages), messages
    assert any("needs the option 'question'" in m for m in messages), messages


def test_api_key_in_policy_rejected(tmp_path):
    text = HEADER + ('predicate j = judge(backend="openai", model="m", question="q", api_key="sk-123")\n'
                     'rule R1 "t": violates when j\n')
    assert any("api_key" in d.message for d in check(tmp_path, text).diagnostics if d.code == "TP107")


def test_model_call_must_be_own_predicate(tmp_path):
    text = HEADER + 'predicate p = response contains "x" and embedding(response, examples=["y"]) > 0.5\n' \
                    'rule R1 "t": violates when p\n'
    assert "must be a predicate of its own" in only(check(tmp_path, text), "TP108").message


def test_judge_cannot_be_compared(tmp_path):
    text = HEADER + 'predicate j = judge(model="smollm2", question="q") > 0.5\nrule R1 "t": violates when j\n'
    assert any("cannot be compared" in d.message for d in check(tmp_path, text).diagnostics)


def test_score_needs_threshold(tmp_path):
    text = HEADER + 'predicate s = embedding(response, examples=["y"])\nrule R1 "t": violates when s\n'
    assert "compare it with a threshold" in only(check(tmp_path, text), "TP104").hint


def test_predicate_cycle(tmp_path):
    text = HEADER + "predicate a = b\npredicate b = a\nrule R1 \"t\": violates when a\n"
    assert "a -> b -> a" in only(check(tmp_path, text), "TP109").message


def test_import_not_found(tmp_path):
    result = check(tmp_path, HEADER + 'import "shared/missing.tp"\n')
    diagnostic = only(result, "TP110")
    assert (diagnostic.line, diagnostic.column) == (2, 8)


def test_import_leaving_tree(tmp_path):
    (tmp_path / "outside.tp").write_text('let x = 1\n')
    inner = tmp_path / "policies"
    inner.mkdir()
    (inner / "policy.tp").write_text(HEADER + 'import "../outside.tp"\nimport "/etc/passwd"\n')
    result = check_policy(str(inner / "policy.tp"))
    assert codes(result) == ["TP111", "TP111"]
    assert "leaves the policy's folder" in result.diagnostics[0].message
    assert "must be relative" in result.diagnostics[1].message


def test_import_symlink_out_of_tree(tmp_path):
    (tmp_path / "secret.tp").write_text("let x = 1\n")
    inner = tmp_path / "policies"
    inner.mkdir()
    (inner / "link.tp").symlink_to(tmp_path / "secret.tp")
    (inner / "policy.tp").write_text(HEADER + 'import "link.tp"\n')
    assert codes(check_policy(str(inner / "policy.tp"))) == ["TP111"]


def test_import_cycle(tmp_path):
    files = {"a.tp": 'import "b.tp"\nlet x = 1\n', "b.tp": 'import "a.tp"\nlet y = 2\n'}
    result = check(tmp_path, HEADER + 'import "a.tp"\n', files)
    diagnostic = only(result, "TP112")
    assert diagnostic.path.endswith("b.tp")
    chain = diagnostic.message.removeprefix("import cycle: ").split(" -> ")
    assert [Path(step).name for step in chain] == ["a.tp", "b.tp", "a.tp"]


def test_import_brings_names(tmp_path):
    files = {"shared/refusals.tp": 'let openers = ["sorry"]\npredicate refusal = response contains_any openers\n'}
    result = check(tmp_path, HEADER + 'import "shared/refusals.tp"\nrule R1 "t": violates when refusal\n', files)
    assert result.ok, [d.headline() for d in result.diagnostics]
    assert set(result.program.predicates) == {"refusal"}
    assert result.program.constants == {"openers": ["sorry"]}


def test_imported_error_names_its_file(tmp_path):
    files = {"shared/lib.tp": 'predicate broken = response matches /(/\n'}
    result = check(tmp_path, HEADER + 'import "shared/lib.tp"\n', files)
    diagnostic = only(result, "TP105")
    assert diagnostic.path.endswith("shared/lib.tp")


def test_imported_file_without_rules(tmp_path):
    files = {"lib.tp": 'rule R9 "t": violates when true\n'}
    assert codes(check(tmp_path, HEADER + 'import "lib.tp"\n', files)) == ["TP113"]


def test_library_is_not_a_policy(tmp_path):
    path = tmp_path / "lib.tp"
    path.write_text('predicate p = response contains "x"\n')
    assert check_policy(str(path)).ok
    with pytest.raises(PolicyCheckError) as info:
        load_policy(path)
    assert info.value.diagnostics[0].code == "TP114"


def test_missing_file(tmp_path):
    result = check_policy(str(tmp_path / "nope.tp"))
    assert codes(result) == ["TP003"]


def test_example_unknown_rule(tmp_path):
    text = HEADER + 'rule R1 "t": violates when true\n' \
        'example "e" {\n  prompt "p"\n  chosen "c"\n  rejected "r"\n  expect invert by R10\n}\n'
    diagnostic = only(check(tmp_path, text), "TP130")
    assert (diagnostic.line, diagnostic.column) == (7, 20)
    assert diagnostic.message == "example expects rule `R10`, which does not exist"
    assert diagnostic.hint == "did you mean `R1`?"


def test_example_incomplete(tmp_path):
    text = HEADER + 'rule R1 "t": violates when true\nexample "e" {\n  prompt "p"\n  expect retain by R1\n}\n'
    messages = [d.message for d in check(tmp_path, text).diagnostics if d.code == "TP131"]
    assert any("lacks `chosen`, `rejected`" in m for m in messages), messages
    assert any("no rule fires" in m for m in messages), messages


def test_example_metadata_type(tmp_path):
    text = HEADER + 'rule R1 "t": violates when response.severity_level >= 2\n' \
        'example "e" {\n  prompt "p"\n  chosen "c" { severity_level: "high" }\n  rejected "r"\n  expect retain\n}\n'
    assert "used by the policy as a number" in only(check(tmp_path, text), "TP104").message


def test_fields_checked_against_data(tmp_path):
    pair = PreferencePair.create("p", "c", "r", chosen_metadata={"severity_level": 2, "harm_categories": ["x"]},
                                 rejected_metadata={"severity_level": 0, "harm_categories": []},
                                 metadata={"prompt_source": "x"})
    schema = infer_schema([pair])
    text = HEADER + ('rule R1 "t": violates when response.severity >= 2\n'
                     'rule R2 "t": violates when response.harm_categories >= 1\n'
                     'rule R3 "t": violates when pair.prompt_source == "x" and response.severity_level > 1\n')
    result = check(tmp_path, text, schema=schema)
    missing = only(result, "TP120")
    assert missing.message == "field `response.severity` is not in the dataset"
    assert missing.hint == "did you mean `severity_level`?"
    assert "the dataset holds a list" in only(result, "TP121").message


def test_every_error_reported(tmp_path):
    text = HEADER + ('predicate a = response matches /(/\n'
                     'predicate b = undefined_name\n'
                     'predicate c = embedding(response, examples=["x"]) >= 2\n'
                     'rule R1 "t": violates when a\n'
                     'rule R1 "u": violates when len(response)\n')
    assert codes(check(tmp_path, text)) == ["TP105", "TP101", "TP106", "TP103", "TP104"]


def test_diagnostics_sorted_by_position(tmp_path):
    text = HEADER + 'rule R2 "t": violates when zz\nrule R1 "t": violates when yy\n'
    lines = [d.line for d in check(tmp_path, text).diagnostics]
    assert lines == sorted(lines)
