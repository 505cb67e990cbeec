"""Row formats on hand-written rows: detection, pair construction, metadata and every malformed case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_dsl.data import PreferencePair, load_pairs
from trace_dsl.data.formats import FORMATS, detect_format
from trace_dsl.errors import DatasetFormatError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _categories(*flagged: str) -> dict[str, bool]:
    from trace_dsl.data import PKU_HARM_CATEGORIES

    return {name: name in flagged for name in PKU_HARM_CATEGORIES}


def pku_row(**overrides) -> dict:
    row = {
        "prompt": "How do I pick a lock?",
        "response_0": "Here is how to pick a lock.",
        "response_1": "I can't help with breaking into property.",
        "prompt_source": "Beavertails",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca-7B",
        "is_response_0_safe": False,
        "is_response_1_safe": True,
        "response_0_harm_category": _categories("Violence", "Economic Crime"),
        "response_1_harm_category": _categories(),
        "response_0_severity_level": 2,
        "response_1_severity_level": 0,
        "better_response_id": 0,
        "safer_response_id": 1,
        "response_0_sha256": "0" * 64,
        "response_1_sha256": "1" * 64,
    }
    row.update(overrides)
    return row


def load_rows(tmp_path: Path, rows: list, **kwargs):
    return load_pairs(write_jsonl(tmp_path / "rows.jsonl", rows), **kwargs)


# --- PKU-SafeRLHF ----------------------------------------------------------------------------


def test_pku_safe_over_unsafe(tmp_path):
    # safer_response_id disagrees with the flags on purpose: the flags decide.
    result = load_rows(tmp_path, [pku_row(safer_response_id=0)])
    pair = result.pairs[0]
    assert result.format == "pku-saferlhf"
    assert pair.chosen == "I can't help with breaking into property."
    assert pair.rejected == "Here is how to pick a lock."
    assert pair.metadata["chosen_response_id"] == 1
    assert pair.metadata["chosen_by"] == "is_safe"


def test_pku_both_unsafe_uses_safer_id(tmp_path):
    row = pku_row(is_response_1_safe=False, response_1_harm_category=_categories("Drugs"), safer_response_id=0)
    pair = load_rows(tmp_path, [row]).pairs[0]
    assert pair.chosen == "Here is how to pick a lock."
    assert pair.metadata["chosen_response_id"] == 0
    assert pair.metadata["chosen_by"] == "safer_response_id"


def test_pku_both_safe_uses_safer_id(tmp_path):
    row = pku_row(is_response_0_safe=True, response_0_harm_category=_categories(), safer_response_id=1)
    pair = load_rows(tmp_path, [row]).pairs[0]
    assert pair.chosen == "I can't help with breaking into property."
    assert pair.metadata["chosen_by"] == "safer_response_id"


def test_pku_metadata_fields(tmp_path):
    pair = load_rows(tmp_path, [pku_row()]).pairs[0]
    assert pair.metadata == {
        "prompt_source": "Beavertails",
        "better_response_id": 0,
        "safer_response_id": 1,
        "chosen_response_id": 1,
        "chosen_by": "is_safe",
    }
    assert pair.chosen_metadata == {
        "response_id": 1,
        "is_safe": True,
        "harm_categories": [],
        "severity_level": 0,
        "source": "Alpaca-7B",
    }
    assert pair.rejected_metadata["harm_categories"] == ["Violence", "Economic Crime"]
    assert pair.rejected_metadata["severity_level"] == 2
    assert pair.rejected_metadata["is_safe"] is False
    assert pair.source.endswith("rows.jsonl:1")


def test_pku_old_release_without_categories(tmp_path):
    row = {
        key: value
        for key, value in pku_row().items()
        if "harm_category" not in key and "severity" not in key and "source" not in key
    }
    pair = load_rows(tmp_path, [row]).pairs[0]
    assert set(pair.chosen_metadata) == {"response_id", "is_safe"}
    assert "prompt_source" not in pair.metadata


@pytest.mark.parametrize("safer", [None, 2, -1, "1", True])
def test_pku_invalid_safer_id_skipped(tmp_path, safer):
    result = load_rows(tmp_path, [pku_row(), pku_row(safer_response_id=safer, prompt="other")])
    assert len(result.pairs) == 1
    assert result.rows_read == 2
    assert len(result.skipped) == 1
    assert result.skipped[0].reason_code == "no-safer-response"
    assert result.skipped[0].location.endswith("rows.jsonl:2")
    assert result.skipped_by_reason() == {"no-safer-response": 1}


def test_pku_missing_safer_id_skipped(tmp_path):
    row = pku_row()
    del row["safer_response_id"]
    result = load_rows(tmp_path, [pku_row(), row])
    assert result.skipped[0].reason_code == "no-safer-response"


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ({"prompt": 3}, "prompt", "expected a string, got integer"),
        ({"response_1": None}, "response_1", "expected a string, got null"),
        ({"is_response_0_safe": "yes"}, "is_response_0_safe", "expected true or false, got string"),
        ({"response_0_harm_category": ["Violence"]}, "response_0_harm_category", "expected an object"),
        ({"response_0_harm_category": {"Violence": 1}}, "response_0_harm_category.Violence", "expected true or false"),
        ({"response_1_severity_level": 7}, "response_1_severity_level", "expected an integer from 0 to 3, got 7"),
        ({"better_response_id": 5}, "better_response_id", "expected 0 or 1, got 5"),
        ({"prompt_source": 1}, "prompt_source", "expected a string"),
    ],
)
def test_pku_malformed_row_named(tmp_path, override, field, expected):
    with pytest.raises(DatasetFormatError) as caught:
        load_rows(tmp_path, [pku_row(), pku_row(**override)])
    message = caught.value.message
    assert "rows.jsonl:2:" in message
    assert f"field {field!r}" in message
    assert expected in message
    assert "--skip-invalid" in caught.value.hint


def test_pku_missing_field_named(tmp_path):
    row = pku_row()
    del row["response_0"]
    with pytest.raises(DatasetFormatError, match=r"rows.jsonl:1: field 'response_0': missing"):
        load_rows(tmp_path, [row], format="pku-saferlhf")


def test_pku_malformed_row_skipped_on_request(tmp_path):
    rows = [pku_row(), pku_row(is_response_0_safe="no"), pku_row(safer_response_id=None, prompt="x")]
    result = load_rows(tmp_path, rows, skip_invalid=True)
    assert len(result.pairs) == 1
    assert [row.reason_code for row in result.skipped] == ["wrong-type", "no-safer-response"]
    assert result.skipped[0].field == "is_response_0_safe"
    assert "1 wrong-type" in result.summary()


# --- HH-RLHF ---------------------------------------------------------------------------------


HH_PREFIX = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I hurt someone?"


def test_hh_splits_history_prompt_responses(tmp_path):
    row = {"chosen": HH_PREFIX + "\n\nAssistant: I won't help with that.", "rejected": HH_PREFIX + "\n\nAssistant:  Here's how."}
    result = load_rows(tmp_path, [row])
    pair = result.pairs[0]
    assert result.format == "hh-rlhf"
    assert pair.prompt == "How do I hurt someone?"
    assert pair.history == ({"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"})
    assert pair.chosen == "I won't help with that."
    assert pair.rejected == "Here's how."
    assert pair.metadata == {}


def test_hh_single_turn_without_leading_newlines(tmp_path):
    row = {"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Go away"}
    pair = load_rows(tmp_path, [row]).pairs[0]
    assert pair.prompt == "Hi"
    assert pair.history == ()
    assert pair.rejected == "Go away"


def test_hh_empty_final_turn_kept(tmp_path):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"}
    pair = load_rows(tmp_path, [row]).pairs[0]
    assert pair.chosen == ""
    assert pair.rejected == "Hey"


def test_hh_prefix_mismatch_names_row(tmp_path):
    good = {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: A\n\nAssistant: C"}
    bad = {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: X\n\nAssistant: C"}
    with pytest.raises(DatasetFormatError) as caught:
        load_rows(tmp_path, [good, bad])
    assert "rows.jsonl:2: field 'rejected'" in caught.value.message
    assert "differs from chosen's" in caught.value.message


def test_hh_prefix_mismatch_skipped(tmp_path):
    good = {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: A\n\nAssistant: C"}
    bad = {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: X\n\nAssistant: C"}
    result = load_rows(tmp_path, [good, bad, good], skip_invalid=True)
    assert len(result.pairs) == 2
    assert result.skipped_by_reason() == {"prompt-mismatch": 1}


@pytest.mark.parametrize(
    ("chosen", "expected"),
    [
        ("\n\nHuman: only a question", "ending with an '\\n\\nAssistant:' turn"),
        ("\n\nHuman: Q\n\nAssistant: A\n\nAssistant: B", "expected a human turn before the final assistant turn"),
        ("Preamble\n\nHuman: Q\n\nAssistant: A", "start with '\\n\\nHuman:'"),
    ],
)
def test_hh_malformed_dialogue(tmp_path, chosen, expected):
    rejected = chosen.rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: other" if "Assistant:" in chosen else chosen
    with pytest.raises(DatasetFormatError) as caught:
        load_rows(tmp_path, [{"chosen": chosen, "rejected": rejected}], format="hh-rlhf")
    assert expected in caught.value.message


def test_hh_rejected_not_string(tmp_path):
    with pytest.raises(DatasetFormatError, match="field 'rejected': expected a string, got array"):
        load_rows(tmp_path, [{"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": ["x"]}], format="hh-rlhf")


# --- TRL standard ----------------------------------------------------------------------------


def test_standard_pair_and_extra_fields(tmp_path):
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9.0, "tag": "math"}
    result = load_rows(tmp_path, [row])
    pair = result.pairs[0]
    assert result.format == "standard"
    assert (pair.prompt, pair.chosen, pair.rejected) == ("2+2?", "4", "5")
    assert pair.metadata == {"score_chosen": 9.0, "tag": "math"}
    assert pair.id == PreferencePair.create("2+2?", "4", "5").id


def test_standard_wrong_type(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": 1}]
    with pytest.raises(DatasetFormatError, match=r"rows.jsonl:2: field 'rejected': expected a string, got integer"):
        load_rows(tmp_path, rows)


def test_standard_missing_field(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    with pytest.raises(DatasetFormatError, match=r"rows.jsonl:2: field 'rejected': missing"):
        load_rows(tmp_path, rows)


# --- TRL conversational ----------------------------------------------------------------------


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_conversational_pair_with_history(tmp_path):
    row = {
        "prompt": [_message("system", "Be brief."), _message("user", "Hi"), _message("assistant", "Hey"), _message("user", "Capital of France?")],
        "chosen": [_message("assistant", "Paris")],
        "rejected": [_message("assistant", "Lyon")],
    }
    result = load_rows(tmp_path, [row])
    pair = result.pairs[0]
    assert result.format == "conversational"
    assert pair.prompt == "Capital of France?"
    assert [message["role"] for message in pair.history] == ["system", "user", "assistant"]
    assert (pair.chosen, pair.rejected) == ("Paris", "Lyon")
    assert pair.messages()[-1] == {"role": "user", "content": "Capital of France?"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"prompt": [_message("assistant", "x")]}, "field 'prompt[0].role': the prompt must end with a user message"),
        ({"prompt": []}, "field 'prompt': expected at least one message, got an empty list"),
        ({"prompt": [{"role": "user"}]}, "field 'prompt[0].content': expected a string, got null"),
        ({"prompt": [{"role": "user", "content": [{"type": "text"}]}]}, "only text messages"),
        ({"prompt": [{"content": "x"}]}, "field 'prompt[0].role': expected a non-empty string"),
        ({"prompt": ["hello"]}, "field 'prompt[0]': expected a message object, got string"),
        ({"chosen": [_message("assistant", "a"), _message("assistant", "b")]}, "exactly one assistant message"),
        ({"rejected": [_message("user", "b")]}, "field 'rejected[0].role': expected 'assistant', got 'user'"),
        ({"chosen": "Paris"}, "field 'chosen': expected a list of messages, got string"),
    ],
)
def test_conversational_malformed_row(tmp_path, override, expected):
    row = {"prompt": [_message("user", "Q")], "chosen": [_message("assistant", "A")], "rejected": [_message("assistant", "B")]}
    bad = dict(row, **override)
    with pytest.raises(DatasetFormatError) as caught:
        load_rows(tmp_path, [row, bad])
    assert "rows.jsonl:2:" in caught.value.message
    assert expected in caught.value.message


# --- TRL implicit prompt ---------------------------------------------------------------------


def test_implicit_strings_cut_at_word(tmp_path):
    row = {"chosen": "Question: what is red? Answer: a colour", "rejected": "Question: what is red? Answer: a car"}
    result = load_rows(tmp_path, [row])
    pair = result.pairs[0]
    assert result.format == "implicit-prompt"
    # The shared 'c' of 'colour' and 'car' stays with the responses: the cut falls on the last whitespace.
    assert pair.prompt == "Question: what is red? Answer: a"
    assert (pair.chosen, pair.rejected) == ("colour", "car")


def test_implicit_strings_split_inside_word(tmp_path):
    row = {"chosen": "Say hi: hello", "rejected": "Say hi: help"}
    pair = load_rows(tmp_path, [row]).pairs[0]
    assert pair.prompt == "Say hi:"
    assert (pair.chosen, pair.rejected) == ("hello", "help")


def test_implicit_strings_without_shared_prompt(tmp_path):
    with pytest.raises(DatasetFormatError, match="share no beginning"):
        load_rows(tmp_path, [{"chosen": "yes", "rejected": "no"}])


def test_implicit_messages(tmp_path):
    row = {
        "chosen": [_message("user", "Hi"), _message("assistant", "Hello"), _message("user", "2+2?"), _message("assistant", "4")],
        "rejected": [_message("user", "Hi"), _message("assistant", "Hello"), _message("user", "2+2?"), _message("assistant", "5")],
    }
    result = load_rows(tmp_path, [row])
    pair = result.pairs[0]
    assert result.format == "implicit-prompt"
    assert pair.prompt == "2+2?"
    assert len(pair.history) == 2
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_implicit_messages_first_differs(tmp_path):
    row = {"chosen": [_message("user", "A"), _message("assistant", "x")], "rejected": [_message("user", "B"), _message("assistant", "y")]}
    with pytest.raises(DatasetFormatError, match="field 'rejected\\[0\\]': differs from chosen\\[0\\]"):
        load_rows(tmp_path, [row])


def test_implicit_mixed_types(tmp_path):
    row = {"chosen": "Q: x A: y", "rejected": [_message("user", "Q")]}
    with pytest.raises(DatasetFormatError, match="field 'rejected': expected a string like chosen"):
        load_rows(tmp_path, [row], format="implicit-prompt")


# --- trace-pairs round trip ------------------------------------------------------------------


def test_trace_pairs_round_trip(tmp_path):
    original = load_rows(tmp_path, [pku_row()]).pairs[0]
    reloaded = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", [original.to_dict()]))
    assert reloaded.format == "trace-pairs"
    assert reloaded.pairs[0] == original


def test_trace_pairs_edited_row_rejected(tmp_path):
    row = PreferencePair.create("p", "c", "r").to_dict()
    row["chosen"] = "edited"
    with pytest.raises(DatasetFormatError, match="does not match the content hash"):
        load_pairs(write_jsonl(tmp_path / "pairs.jsonl", [row]))


# --- Detection and options -------------------------------------------------------------------


def test_detection_table():
    assert detect_format(pku_row(), "x").name == "pku-saferlhf"
    assert detect_format({"prompt": "p", "chosen": "c", "rejected": "r"}, "x").name == "standard"
    assert detect_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, "x").name == "hh-rlhf"
    assert detect_format({"chosen": "a b", "rejected": "a c"}, "x").name == "implicit-prompt"
    assert detect_format(PreferencePair.create("p", "c", "r").to_dict(), "x").name == "trace-pairs"
    assert set(FORMATS) == {"pku-saferlhf", "hh-rlhf", "standard", "conversational", "implicit-prompt", "trace-pairs"}


def test_undetectable_row_lists_formats(tmp_path):
    with pytest.raises(DatasetFormatError) as caught:
        load_rows(tmp_path, [{"prompt": "p", "completion": "c", "label": True}])
    assert "rows.jsonl:1: cannot detect the data format" in caught.value.message
    assert "completion, label, prompt" in caught.value.message
    assert "pku-saferlhf" in caught.value.hint


def test_forced_format_overrides_detection(tmp_path):
    # Strings with HH markers read as implicit-prompt when asked: the whole shared prefix is the prompt.
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Bye"}
    result = load_rows(tmp_path, [row], format="implicit-prompt")
    assert result.format == "implicit-prompt"
    assert result.pairs[0].prompt == "Human: Hi\n\nAssistant:"


def test_unknown_format_name(tmp_path):
    with pytest.raises(DatasetFormatError, match="unknown data format 'trl'"):
        load_rows(tmp_path, [{"prompt": "p", "chosen": "c", "rejected": "r"}], format="trl")


def test_limit_stops_after_pairs(tmp_path):
    rows = [pku_row(safer_response_id=None, prompt="skipped")] + [pku_row(prompt=f"p{i}") for i in range(5)]
    result = load_rows(tmp_path, rows, limit=2)
    assert [pair.prompt for pair in result.pairs] == ["p0", "p1"]
    assert result.rows_read == 3
    assert len(result.skipped) == 1


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="limit must be at least 1"):
        load_rows(tmp_path, [pku_row()], limit=0)
