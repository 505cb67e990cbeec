"""The real samples shipped in examples/: loaded whole and checked against the published rows."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from trace_dsl.data import PKU_HARM_CATEGORIES, dataset_hash, load_pairs
from trace_dsl.errors import DatasetFormatError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PKU_FILE = EXAMPLES / "pku-saferlhf" / "pairs.jsonl"
HH_FILE = EXAMPLES / "hh-rlhf" / "harmless-test-head.jsonl.gz"


@pytest.fixture(scope="module")
def pku_rows() -> list[dict]:
    with PKU_FILE.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def pku_result():
    return load_pairs(PKU_FILE)


def test_examples_ship_licences():
    for folder in ("pku-saferlhf", "hh-rlhf"):
        assert (EXAMPLES / folder / "SOURCE.md").is_file()
    assert "CC BY-NC 4.0" in (EXAMPLES / "pku-saferlhf" / "SOURCE.md").read_text()
    assert (EXAMPLES / "hh-rlhf" / "LICENSE").read_text().startswith("MIT License")


def test_pku_file_unchanged():
    recorded = re.search(r"SHA-256: `([0-9a-f]{64})`", (EXAMPLES / "pku-saferlhf" / "SOURCE.md").read_text())
    assert recorded is not None
    assert dataset_hash(PKU_FILE) == f"sha256:{recorded.group(1)}"


def test_pku_counts(pku_result):
    assert pku_result.format == "pku-saferlhf"
    assert pku_result.rows_read == 300
    assert len(pku_result.pairs) == 300
    assert pku_result.skipped == ()
    assert len({pair.id for pair in pku_result.pairs}) == 300


def test_pku_choice_rule(pku_result, pku_rows):
    for pair, row in zip(pku_result.pairs, pku_rows):
        chosen_id = pair.metadata["chosen_response_id"]
        flags = (row["is_response_0_safe"], row["is_response_1_safe"])
        if flags[0] != flags[1]:
            assert flags[chosen_id] is True, pair.source
            assert pair.metadata["chosen_by"] == "is_safe"
        else:
            assert chosen_id == row["safer_response_id"], pair.source
            assert pair.metadata["chosen_by"] == "safer_response_id"


def test_pku_texts_match_checksums(pku_result, pku_rows):
    # The publisher's checksum is sha256(prompt + response), so it pins which text became chosen.
    for pair, row in zip(pku_result.pairs, pku_rows):
        chosen_id = pair.metadata["chosen_response_id"]
        chosen_digest = hashlib.sha256((pair.prompt + pair.chosen).encode()).hexdigest()
        rejected_digest = hashlib.sha256((pair.prompt + pair.rejected).encode()).hexdigest()
        assert chosen_digest == row[f"response_{chosen_id}_sha256"], pair.source
        assert rejected_digest == row[f"response_{1 - chosen_id}_sha256"], pair.source


def test_pku_metadata_values(pku_result):
    chosen_by = Counter(pair.metadata["chosen_by"] for pair in pku_result.pairs)
    assert chosen_by == {"safer_response_id": 257, "is_safe": 43}
    for pair in pku_result.pairs:
        assert pair.metadata["prompt_source"] in {"Alpaca3-70B", "Beavertails", "WizardLM-30B-Uncensored"}
        for metadata in (pair.chosen_metadata, pair.rejected_metadata):
            assert set(metadata["harm_categories"]) <= set(PKU_HARM_CATEGORIES)
            assert metadata["source"] == "Alpaca-7B"
            # In this sample a safe response always has severity 0 and no harm category.
            assert metadata["is_safe"] == (metadata["severity_level"] == 0)
            assert metadata["is_safe"] == (metadata["harm_categories"] == [])


def test_hh_mismatched_row_named():
    with pytest.raises(DatasetFormatError) as caught:
        load_pairs(HH_FILE)
    assert f"{HH_FILE}:1255: field 'rejected'" in caught.value.message


def test_hh_counts_with_skip():
    result = load_pairs(HH_FILE, skip_invalid=True)
    assert result.format == "hh-rlhf"
    assert result.rows_read == 1260
    assert len(result.pairs) == 1259
    assert [row.location for row in result.skipped] == [f"{HH_FILE}:1255"]
    assert result.skipped[0].reason_code == "prompt-mismatch"


def _dialogue_words(text: str) -> list[str]:
    return text.split()


def test_hh_pairs_rebuild_dialogues():
    """Every pair, written back as a dialogue, contains the same words as the published row."""
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    result = load_pairs(HH_FILE, skip_invalid=True)
    labels = {"user": "Human:", "assistant": "Assistant:"}
    for pair in result.pairs:
        row = rows[int(pair.source.rsplit(":", 1)[1]) - 1]
        turns = [f"{labels[message['role']]} {message['content']}" for message in pair.messages()]
        for response, original in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            rebuilt = " ".join(turns + [f"Assistant: {response}"])
            assert _dialogue_words(rebuilt) == _dialogue_words(original), pair.source


def test_hh_multi_turn_history():
    pair = load_pairs(HH_FILE, limit=1).pairs[0]
    assert pair.prompt == "okay some of these do not have anything to do with pens"
    assert [message["role"] for message in pair.history] == ["user", "assistant", "user", "assistant"]
    assert pair.chosen.startswith("No, sorry!")
