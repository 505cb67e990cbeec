"""A local chat model: batched greedy generation and next-token scoring with transformers.

Both the local judge and the OpenAI-compatible loopback server (`openai_server`) run their
model through `ChatModel`, so one loaded copy of the weights can serve both. Generation is
greedy, uses the tokenizer's chat template, and pads on the left so that every sequence of a
batch ends at the same position and its continuation starts right after its own prompt.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from trace_dsl.compiler.backends.hf import folder_fingerprint, load_shared, resolve_model_path, torch_device
from trace_dsl.errors import JudgeError

Message = Mapping[str, str]


class ChatModel:
    """A causal language model with a chat template, loaded once and guarded by a lock.

    The lock makes the object safe to share between the threads of the HTTP server. A fast
    tokenizer can fail with "Already borrowed" when two threads use it at once, and interleaved
    batches would only compete for the same cores.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str, folder: Path, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.folder = folder
        self.device = device
        self.digest = folder_fingerprint(folder)
        self._lock = threading.RLock()

    @classmethod
    def load(cls, name: str | Path) -> "ChatModel":
        """Load (or reuse) the chat model that `name` resolves to.

        Raises:
            JudgeError: the name resolves to no folder, the folder contains no causal language
                model, or its tokenizer has no chat template.
        """
        folder = resolve_model_path(str(name))
        return load_shared("chat", folder, lambda path: cls._from_folder(str(name), path))

    @classmethod
    def _from_folder(cls, name: str, folder: Path) -> "ChatModel":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not getattr(tokenizer, "chat_template", None):
            raise JudgeError(
                f"model '{name}' at {folder} has no chat template, so it cannot be used as a judge",
                hint="use an instruction-tuned model whose tokenizer_config.json or chat_template.jinja defines one",
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        device = torch_device()
        model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        return cls(model, tokenizer, name=name, folder=folder, device=device)

    def render(self, conversation: Sequence[Message]) -> str:
        """Return the conversation as model input text, ending with the assistant's turn."""
        return self.tokenizer.apply_chat_template(
            [dict(message) for message in conversation], add_generation_prompt=True, tokenize=False
        )

    def _encode(self, conversations: Sequence[Sequence[Message]]) -> Any:
        texts = [self.render(conversation) for conversation in conversations]
        # The chat template already writes the special tokens that open a conversation.
        return self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(self.device)

    def generate(self, conversations: Sequence[Sequence[Message]], *, max_new_tokens: int) -> list[str]:
        """Continue each conversation greedily and return the new text of each, in order."""
        import torch

        if not conversations:
            return []
        with self._lock, torch.inference_mode():
            encoded = self._encode(conversations)
            output = self.model.generate(
                **encoded,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def count_tokens(self, text: str) -> int:
        """Return the number of tokens in `text`, without special tokens."""
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def next_token_log_probs(self, conversations: Sequence[Sequence[Message]], words: Sequence[str]) -> list[list[float]]:
        """Return, per conversation, the log-probability that the assistant's first token starts
        each of `words` (summed over the spellings "yes", "Yes", " yes", ...)."""
        import torch

        if not conversations:
            return []
        with self._lock:
            token_sets = [self._first_token_ids(word) for word in words]
        # A token that starts two of the words (a bare space, say) cannot tell them apart.
        counts: dict[int, int] = {}
        for ids in token_sets:
            for token in ids:
                counts[token] = counts.get(token, 0) + 1
        token_sets = [[token for token in ids if counts[token] == 1] for ids in token_sets]
        empty = [word for word, ids in zip(words, token_sets) if not ids]
        if empty:
            raise JudgeError(f"the tokenizer of '{self.name}' has no first token of its own for {empty}")
        with self._lock, torch.inference_mode():
            encoded = self._encode(conversations)
            # Only the last position's logits are needed; logits_to_keep skips the vocabulary
            # projection for the other positions (causal LMs in transformers >= 4.50).
            logits = self.model(**encoded, logits_to_keep=1).logits[:, -1, :].float()
        log_probs = torch.log_softmax(logits, dim=-1).cpu()
        return [[float(torch.logsumexp(row[ids], dim=0)) for ids in token_sets] for row in log_probs]

    def _first_token_ids(self, word: str) -> list[int]:
        spellings = {word.lower(), word.capitalize(), word.upper()}
        ids = set()
        for spelling in spellings:
            for text in (spelling, " " + spelling):
                tokens = self.tokenizer.encode(text, add_special_tokens=False)
                if tokens:
                    ids.add(tokens[0])
        return sorted(ids)
