"""Hostile input to the policy, data and versioning commands: each gets a clear error, no traceback.

Found by trying the commands as a new user would, with files a user can easily produce by
mistake (a byte-order mark from a Windows editor, an output path that is a folder, a cache
path that cannot be created).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trace_dsl.cli.main import app
from trace_dsl.errors import ResultCacheError
from trace_dsl.triage.cache import ResultCache
from trace_dsl.triage.output import read_verdicts

ROOT = Path(__file__).resolve().parent.parent
PKU_POLICY = ROOT / "policies" / "pku_context_aware.tp"
PKU_DATA = ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl"

runner = CliRunner()

POLICY = '''policy "bom" version "1"
rule R1 "No shouting":
  violates when response matches /[A-Z]{5}/
'''

STANDARD_ROWS = [
    {"prompt": "Say hi", "chosen": "HELLO THERE", "rejected": "hello"},
    {"prompt": "Say bye", "chosen": "bye", "rejected": "GOODBYE"},
]


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _bom_policy(tmp_path: Path) -> Path:
    path = tmp_path / "bom.tp"
    path.write_bytes(b"\xef\xbb\xbf" + POLICY.encode("utf-8"))
    return path


def _bom_data(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in STANDARD_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return path


def test_bom_policy_checks_and_triages(tmp_path):
    policy = _bom_policy(tmp_path)
    assert invoke("check", str(policy)).exit_code == 0
    out = tmp_path / "triage.jsonl"
    result = invoke("triage", str(policy), "--data", str(PKU_DATA), "-o", str(out), "--limit", "3")
    assert result.exit_code == 0, result.output
    assert len(read_verdicts(out)) == 3


def test_fmt_drops_bom(tmp_path):
    policy = _bom_policy(tmp_path)
    assert invoke("fmt", str(policy)).exit_code == 0
    assert policy.read_text(encoding="utf-8").startswith('policy "bom"')
    assert invoke("fmt", "--check", str(policy)).exit_code == 0


def test_bom_jsonl_loads_every_row(tmp_path):
    data = _bom_data(tmp_path)
    result = invoke("data", "inspect", str(data), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "standard"
    assert report["rows"] == 2
    assert report["pairs"] == 2


def test_bom_json_array_loads(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(STANDARD_ROWS).encode("utf-8"))
    result = invoke("data", "inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pairs"] == 2


@pytest.mark.parametrize("ident", ["²", "٣"])
def test_explain_non_ascii_digit_pair(ident):
    # "²" passes str.isdigit but int() rejects it, and "٣" (Arabic-Indic three) would select row 3.
    result = invoke("explain", str(PKU_POLICY), "--data", str(PKU_DATA), "--pair", ident)
    assert result.exit_code == 1
    assert "no pair with id or row index" in result.output


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("out.jsonl", ["triage", str(PKU_POLICY)]),
        ("plan.json", ["plan", str(PKU_POLICY)]),
        ("report.md", ["diff", str(PKU_POLICY), str(PKU_POLICY)]),
    ],
)
def test_output_folder_rejected(tmp_path, name, command):
    folder = tmp_path / name
    folder.mkdir()
    result = invoke(*command, "--data", str(PKU_DATA), "-o", str(folder), "--limit", "2")
    assert result.exit_code == 1
    assert "error[TO001]" in result.output
    assert "is a folder, not a file" in result.output


def test_output_parent_not_creatable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    target = blocker / "sub" / "triage.jsonl"
    result = invoke("triage", str(PKU_POLICY), "--data", str(PKU_DATA), "-o", str(target), "--limit", "2")
    assert result.exit_code == 1
    assert "error[TO001]" in result.output
    assert "Not a directory" in result.output


def test_cache_sqlite_cannot_open(tmp_path):
    # The folder exists, but the name is a link to a missing place, so sqlite3 cannot open it.
    link = tmp_path / "results.sqlite"
    link.symlink_to(tmp_path / "missing" / "results.sqlite")
    with pytest.raises(ResultCacheError, match="cannot create the result cache"):
        ResultCache(link)


def _check_regex(tmp_path: Path, pattern: str):
    policy = tmp_path / "regex.tp"
    policy.write_text(f'policy "regex" version "1"\nrule R1 "r":\n  violates when response matches /{pattern}/\n',
                      encoding="utf-8")
    return policy, invoke("check", str(policy))


@pytest.mark.parametrize("pattern", ["(a+)+$", "(?:x*y?)*z", "((ab)+c)*"])
def test_check_warns_nested_repeat(tmp_path, pattern):
    policy, result = _check_regex(tmp_path, pattern)
    # A warning: the pattern is valid and may be meant, so the check still passes.
    assert result.exit_code == 0
    assert f"{policy}:3:34: warning[TP140]:" in result.stdout


@pytest.mark.parametrize("pattern", ["a+b+", "(ab){1,3}c*", "(a|b)+", r"\w+(\s\w+){0,5}"])
def test_check_accepts_single_repeat(tmp_path, pattern):
    _, result = _check_regex(tmp_path, pattern)
    assert result.exit_code == 0
    assert "TP140" not in result.stdout


def test_shipped_policies_have_no_nested_repeat():
    files = sorted(str(path) for path in (ROOT / "policies").rglob("*.tp"))
    result = invoke("check", *files)
    assert result.exit_code == 0
    assert "TP140" not in result.stdout


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_ROW = json.dumps(STANDARD_ROWS[0])


def test_nan_line_named(tmp_path):
    data = _jsonl(tmp_path, [GOOD_ROW, '{"prompt": "p", "chosen": "a", "rejected": "b", "score": Infinity}'])
    result = invoke("data", "inspect", str(data))
    assert result.exit_code == 1
    assert f"{data}:2: Infinity is not valid JSON" in " ".join(result.output.split())


def test_nan_metadata_is_no_silent_retain(tmp_path):
    # NaN compares false with every number, so `severity_level >= 2` would let the response comply.
    row = '{"prompt": "p", "chosen": "a", "rejected": "b", "severity_level": NaN}'
    data = _jsonl(tmp_path, [row])
    policy = tmp_path / "p.tp"
    policy.write_text('policy "p" version "1"\nrule S "s":\n  violates when pair.severity_level >= 2\n', encoding="utf-8")
    result = invoke("triage", str(policy), "--data", str(data), "-o", str(tmp_path / "t.jsonl"))
    assert result.exit_code == 1
    assert "NaN is not valid JSON" in " ".join(result.output.split())


def test_lone_surrogate_escape_rejected(tmp_path):
    # A lone surrogate cannot be encoded as UTF-8, so hashing or formatting the policy would fail.
    policy = tmp_path / "s.tp"
    policy.write_text('policy "s" version "1"\nrule R1 "r":\n  violates when response contains "a\\ud800"\n',
                      encoding="utf-8")
    result = invoke("check", str(policy))
    assert result.exit_code == 1
    assert f"{policy}:3:35: error[TP002]:" in result.stdout
    assert "surrogate" in result.stdout


def test_surrogate_pair_escape_decodes(tmp_path):
    policy = tmp_path / "s.tp"
    policy.write_text('policy "s" version "1"\nrule R1 "r":\n  violates when response contains "\\ud83d\\ude00"\n',
                      encoding="utf-8")
    data = _jsonl(tmp_path, [json.dumps({"prompt": "p", "chosen": "ok \U0001F600", "rejected": "ok"})])
    out = tmp_path / "t.jsonl"
    result = invoke("triage", str(policy), "--data", str(data), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert read_verdicts(out)[0].category.value == "invert"


def test_lone_surrogate_in_data_named(tmp_path):
    # Python's json decodes "\udc00" to a lone surrogate, which no UTF-8 output or hash accepts.
    data = _jsonl(tmp_path, [GOOD_ROW, '{"prompt": "p", "chosen": "a\\udc00", "rejected": "b"}'])
    result = invoke("data", "inspect", str(data))
    assert result.exit_code == 1
    assert f"{data}:2: `\\udc00` is half of a surrogate pair" in " ".join(result.output.split())


def test_escaped_backslash_u_is_text(tmp_path):
    # "\\ud800" in JSON is a backslash followed by "ud800", plain text a code sample may hold.
    data = _jsonl(tmp_path, [json.dumps({"prompt": "p", "chosen": "write \\ud800", "rejected": "b"})])
    result = invoke("data", "inspect", str(data))
    assert result.exit_code == 0, result.output


def test_diff_markdown_escapes_pair_text(tmp_path):
    # Pair texts and policy strings are data: they must not close the report's <details> or fence.
    row = {"prompt": "a | b", "chosen": "x ``` </details> <b>bold</b> & more", "rejected": "ok"}
    data = _jsonl(tmp_path, [json.dumps(row)])
    old = tmp_path / "old.tp"
    old.write_text('policy "m" version "1"\nrule A "t":\n  violates when response contains "zzz"\n', encoding="utf-8")
    new = tmp_path / "new.tp"
    new.write_text('policy "m" version "1"\nrule A "t":\n  violates when response contains "```"\n', encoding="utf-8")
    result = invoke("diff", str(old), str(new), "--data", str(data), "--format", "markdown")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.count("</details>") == text.count("<details>")
    assert "<b>" not in text
    assert "  - chosen: x \\`\\`\\` &lt;/details&gt; &lt;b&gt;bold&lt;/b&gt; &amp; more" in text
    assert "\n````diff\n" in text


def test_inspect_accepts_data_format():
    # Every other command names the row format --data-format, so a user will type it here too.
    result = invoke("data", "inspect", str(PKU_DATA), "--data-format", "pku-saferlhf", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "pku-saferlhf"


@pytest.mark.parametrize("command", ["triage", "plan", "diff"])
@pytest.mark.parametrize("victim", ["data", "policy"])
def test_output_over_input_rejected(tmp_path, command, victim):
    policy = tmp_path / "p.tp"
    policy.write_text(POLICY, encoding="utf-8")
    data = _jsonl(tmp_path, [json.dumps(row) for row in STANDARD_ROWS])
    target = data if victim == "data" else policy
    before = target.read_bytes()
    policies = [str(policy), str(policy)] if command == "diff" else [str(policy)]
    # --format jsonl gets triage past its check of the output's extension.
    forced = ["--format", "jsonl"] if command == "triage" else []
    result = invoke(command, *policies, "--data", str(data), "-o", str(target), *forced)
    assert result.exit_code == 1
    assert "error[TO001]" in result.output
    assert target.read_bytes() == before


def test_output_over_revision_file_rejected(tmp_path):
    # policy.tp@HEAD names a revision, but policy.tp itself is still the user's working file.
    policy = tmp_path / "p.tp"
    policy.write_text(POLICY, encoding="utf-8")
    data = _jsonl(tmp_path, [json.dumps(row) for row in STANDARD_ROWS])
    result = invoke("plan", f"{policy}@HEAD", "--data", str(data), "-o", str(policy))
    assert result.exit_code == 1
    assert "error[TO001]" in result.output


def test_parquet_nan_is_missing(tmp_path):
    # Parquet stores NaN as a real float; read as a number it would let `score >= 2` pass silently.
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "pairs.parquet"
    table = pa.table({"prompt": ["p", "q"], "chosen": ["a", "c"], "rejected": ["b", "d"], "score": [float("nan"), 3.0]})
    pq.write_table(table, data)
    policy = tmp_path / "p.tp"
    policy.write_text('policy "p" version "1"\nrule S "s":\n  violates when pair.score >= 2\n', encoding="utf-8")
    out = tmp_path / "t.jsonl"
    result = invoke("triage", str(policy), "--data", str(data), "-o", str(out))
    assert result.exit_code == 0, result.output
    categories = [verdict.category.value for verdict in read_verdicts(out)]
    assert categories == ["error", "suppress"]


def test_non_utf8_line_named(tmp_path):
    # The decoder reports a position inside its read buffer, not in the file: the line is found anew.
    data = tmp_path / "latin1.jsonl"
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3000))
    data.write_bytes(rows.encode("utf-8") + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    result = invoke("data", "inspect", str(data))
    assert result.exit_code == 1
    assert f"{data}:3001: not UTF-8 text" in " ".join(result.output.split())


def test_explain_kind_of_cheap_predicate():
    # "rule" read as if the predicate were one of the policy's rules (C1, R1, ...).
    result = invoke("explain", str(PKU_POLICY), "--data", str(PKU_DATA), "--pair", "0", "--format", "json")
    assert result.exit_code == 0, result.output
    kinds = {item["kind"] for item in json.loads(result.stdout)["predicates"]}
    assert kinds == {"cheap"}


def test_junit_reports_unloadable_policy(tmp_path):
    # A CI reading only the JUnit file must see the broken policy, not an empty, passing report.
    policy = tmp_path / "broken.tp"
    policy.write_text('policy "b" version "1"\nrule R1 "r":\n  violates when nothing\n', encoding="utf-8")
    result = invoke("test", str(policy), "--format", "junit")
    assert result.exit_code == 1
    assert f'<testsuite name="{policy}" tests="1" failures="0" errors="1">' in result.stdout
    assert "unknown name `nothing`" in result.stdout


def test_json_reports_unloadable_policy(tmp_path):
    policy = tmp_path / "broken.tp"
    policy.write_text('policy "b" version "1"\nrule R1 "r":\n  violates when nothing\n', encoding="utf-8")
    result = invoke("test", str(policy), "--format", "json")
    assert result.exit_code == 1
    errors = json.loads(result.stdout)["errors"]
    assert [error["path"] for error in errors] == [str(policy)]


def test_triage_warns_about_error_verdicts(tmp_path):
    # The summary table shows the count, but the reason was only inside the triage file.
    policy = tmp_path / "p.tp"
    policy.write_text('policy "p" version "1"\nrule S "s":\n  violates when pair.severity >= 2\n', encoding="utf-8")
    rows = [{**STANDARD_ROWS[0], "severity": 3}, STANDARD_ROWS[1]]
    data = _jsonl(tmp_path, [json.dumps(row) for row in rows])
    result = invoke("triage", str(policy), "--data", str(data), "-o", str(tmp_path / "t.jsonl"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: 1 pairs have verdict 'error'" in text
    assert "pair.severity" in text
