"""Tiny random Llama models with a tokenizer trained in code, for fast runtime tests.

`build_tiny_model_dir(folder)` writes a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` both load offline. It contains a `LlamaForCausalLM` with random
weights (2 layers, hidden size 48 by default) and a byte-level BPE tokenizer trained on the
prompts and responses of the PKU-SafeRLHF sample, with pad and eos tokens and a chat template. The
same seed gives the same weights and the same tokenizer. It takes well under two seconds.

`sample_pairs(n)` builds real preference pairs from the same sample file, without going through
the data loaders, so runtime tests do not depend on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trace_dsl.data.records import PreferencePair

# The shipped PKU-SafeRLHF example: the first 300 published rows, unedited.
PKU_SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pku-saferlhf" / "pairs.jsonl"

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|end|>"
BOS_TOKEN = "<|begin|>"
UNK_TOKEN = "<unk>"

# A ChatML-like template: each turn is "<|begin|>role\ncontent<|end|>\n", and the generation
# prompt opens an assistant turn. Kept short so prompts stay short in tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|begin|>' + message['role'] + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|begin|>assistant\n' }}{% endif %}"
)


def _sample_file() -> Path:
    """Return the shipped PKU-SafeRLHF example file."""
    return PKU_SAMPLE


def _sample_rows(limit: int | None = None) -> list[dict]:
    rows = []
    with _sample_file().open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def sample_texts(limit: int = 300) -> list[str]:
    """Prompts and both responses of the first `limit` rows of the PKU-SafeRLHF sample."""
    texts = []
    for row in _sample_rows(limit):
        texts.extend([row["prompt"], row["response_0"], row["response_1"]])
    return texts


def sample_pairs(n: int, *, offset: int = 0) -> list[PreferencePair]:
    """Build `n` real preference pairs from the PKU-SafeRLHF sample, safer response as chosen.

    Rows without a valid `safer_response_id` are skipped, as the old-policy pairs are built.
    """
    pairs = []
    for line_number, row in enumerate(_sample_rows(), start=1):
        if line_number <= offset:
            continue
        safer = row.get("safer_response_id")
        if safer not in (0, 1):
            continue
        chosen, rejected = row[f"response_{safer}"], row[f"response_{1 - safer}"]
        pairs.append(
            PreferencePair.create(row["prompt"], chosen, rejected, source=f"{_sample_file().name}:{line_number}")
        )
        if len(pairs) == n:
            break
    if len(pairs) < n:
        raise ValueError(f"the PKU-SafeRLHF sample has only {len(pairs)} usable rows after offset {offset}, {n} requested")
    return pairs


def build_tokenizer(vocab_size: int = 512, *, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (default: the PKU-SafeRLHF sample).

    The result has pad, eos, bos and unk tokens and `CHAT_TEMPLATE`. Training is deterministic
    for the same texts and vocabulary size.
    """
    texts = texts if texts is not None else sample_texts()
    special_tokens = [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN]

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # The byte-level post-processor only fixes offsets and adds no special tokens, so the
    # encoded text is exactly the chat template's text.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 48,
    num_heads: int = 4,
    intermediate_size: int = 96,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """Build a `LlamaForCausalLM` with random weights drawn under `seed`, sized for `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    # A larger init spread than the default 0.02 so log-probabilities differ visibly between
    # responses and gradients are not all near zero.
    config.initializer_range = 0.1
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model


def build_tiny_model_dir(folder: str | Path, *, seed: int = 0, **model_options) -> Path:
    """Write a tiny model and its tokenizer to `folder` and return the folder.

    `model_options` go to `build_tiny_model`. The folder loads with `from_pretrained(folder)`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **model_options)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
