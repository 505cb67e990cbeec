"""Data sources: every file type, compressed variants, saved and cached datasets, and broken files."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trace_dsl.data import dataset_hash, file_sha256, load_pairs, pairs_hash
from trace_dsl.errors import DatasetFormatError, DatasetNotFoundError

ROWS = [
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Colour of the sky?", "chosen": "Blue", "rejected": "Green"},
]
CONVERSATIONAL_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }
]


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _prompts(result) -> list[str]:
    return [pair.prompt for pair in result.pairs]


# --- File types ------------------------------------------------------------------------------


def test_jsonl_with_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(ROWS[:1]) + "\n   \n" + _jsonl(ROWS[1:]))
    result = load_pairs(path)
    assert _prompts(result) == [row["prompt"] for row in ROWS]
    assert result.rows_read == 3
    # Line numbers count the blank lines, so they match an editor's.
    assert result.pairs[1].source == f"{path}:4"


def test_jsonl_gz(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(ROWS).encode()))
    result = load_pairs(path)
    assert _prompts(result) == [row["prompt"] for row in ROWS]
    assert result.pairs[2].source == f"{path}:3"


def test_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2))
    result = load_pairs(path)
    assert _prompts(result) == [row["prompt"] for row in ROWS]
    assert result.pairs[0].source == f"{path}:row 1"


def test_json_object_wrapping_rows(tmp_path):
    path = tmp_path / "data.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"version": 2, "data": ROWS}).encode()))
    assert len(load_pairs(path).pairs) == 3


def test_json_single_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(ROWS[0]))
    assert _prompts(load_pairs(path)) == ["Capital of France?"]


def test_json_lines_under_json_name(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(_jsonl(ROWS))
    result = load_pairs(path)
    assert len(result.pairs) == 3
    assert result.pairs[1].source == f"{path}:2"


def test_parquet_conversational(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(CONVERSATIONAL_ROWS * 3), path)
    result = load_pairs(path)
    assert result.format == "conversational"
    assert len(result.pairs) == 3
    assert result.pairs[0].rejected == "Go away"
    assert result.pairs[2].source == f"{path}:row 3"


def test_parquet_gz(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), plain)
    path = tmp_path / "data.parquet.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    assert _prompts(load_pairs(path)) == [row["prompt"] for row in ROWS]


def test_saved_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    result = load_pairs(folder)
    assert _prompts(result) == [row["prompt"] for row in ROWS]
    assert result.pairs[0].source == f"{folder}:row 1"


def test_saved_dataset_dict_without_train(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(folder))
    with pytest.raises(DatasetFormatError, match="no 'train' split"):
        load_pairs(folder)


def _cache_hub_dataset(tmp_path: Path, repo: str) -> None:
    """Put `ROWS` into the datasets cache the way `load_dataset(repo)` leaves it after a download."""
    import datasets

    source = tmp_path / "train.jsonl"
    source.write_text(_jsonl(ROWS))
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    built = tmp_path / "built"
    datasets.load_dataset("json", data_files={"train": str(source)}, split="train", cache_dir=str(built))
    config_folder = next(path for path in (built / "json").iterdir() if path.is_dir())
    organisation, name = repo.split("/")
    target = cache / f"{organisation}___{name}" / "default"
    shutil.copytree(config_folder, target)
    for arrow in target.rglob("json-train.arrow"):
        arrow.rename(arrow.with_name(f"{name}-train.arrow"))


def test_hub_id_from_cache(tmp_path):
    _cache_hub_dataset(tmp_path, "trace-test/cached-prefs")
    result = load_pairs("trace-test/cached-prefs")
    assert _prompts(result) == [row["prompt"] for row in ROWS]
    assert result.pairs[0].source == "trace-test/cached-prefs:train:row 1"


def test_hub_id_not_cached():
    with pytest.raises(DatasetNotFoundError) as caught:
        load_pairs("trace-test/never-downloaded:test")
    assert "dataset 'trace-test/never-downloaded' (split 'test') could not be loaded" in caught.value.message
    assert "huggingface-cli download --repo-type dataset trace-test/never-downloaded" in caught.value.hint


# --- Broken sources --------------------------------------------------------------------------


def test_missing_file():
    with pytest.raises(DatasetNotFoundError, match="no-such-file.jsonl: no such file"):
        load_pairs("no-such-file.jsonl")


def test_missing_relative_file_not_taken_for_dataset_id():
    with pytest.raises(DatasetNotFoundError) as caught:
        load_pairs("data/pairs.jsonl.gz")
    assert caught.value.message == "data/pairs.jsonl.gz: no such file"


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DatasetFormatError, match="unsupported file type"):
        load_pairs(path)


def test_plain_folder_rejected(tmp_path):
    with pytest.raises(DatasetFormatError, match="is a folder"):
        load_pairs(tmp_path)


def test_invalid_json_line_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(ROWS[:2]) + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DatasetFormatError) as caught:
        load_pairs(path)
    assert f"{path}:3: invalid JSON" in caught.value.message


def test_invalid_json_line_not_skipped(tmp_path):
    # A line that is not JSON at all breaks the file, not one row, so --skip-invalid does not hide it.
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(ROWS[:1]) + "not json\n")
    with pytest.raises(DatasetFormatError, match=":2: invalid JSON"):
        load_pairs(path, skip_invalid=True)


def test_non_object_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(ROWS[:1]) + "[1, 2]\n")
    with pytest.raises(DatasetFormatError, match=":2: expected a JSON object with the pair's fields, got list"):
        load_pairs(path)


def test_invalid_json_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(DatasetFormatError, match=r"data.json:2: invalid JSON"):
        load_pairs(path)


def test_json_array_of_non_objects(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ROWS[0], "text"]))
    with pytest.raises(DatasetFormatError, match="data.json:row 2: expected a JSON object"):
        load_pairs(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetFormatError, match="contains no rows"):
        load_pairs(path)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    compressed = gzip.compress(_jsonl(ROWS * 50).encode())
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DatasetFormatError, match="damaged or truncated gzip file"):
        load_pairs(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DatasetFormatError, match="not UTF-8 text"):
        load_pairs(path)


def test_not_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(DatasetFormatError, match="not a readable Parquet file"):
        load_pairs(path)


# --- Hashes ----------------------------------------------------------------------------------


def test_dataset_hash_of_file_bytes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(ROWS))
    first = dataset_hash(path)
    assert first == file_sha256(path)
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 64
    path.write_text(_jsonl(ROWS) + "\n")
    assert dataset_hash(path) != first


def test_dataset_hash_of_saved_dataset(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    pairs = load_pairs(folder).pairs
    assert dataset_hash(folder) == pairs_hash(pairs)
    assert pairs_hash(pairs) != pairs_hash(reversed(pairs))
