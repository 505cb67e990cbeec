"""Generated responses: greedy responses for `trace eval`, and corrected responses for training.

`generate_responses` generates a response to each conversation with any causal language model (a
peft model included, with or without its adapter). `corrected_responses` prompts a generator model to write a
compliant response to each SUPPRESS prompt, for `suppress_mode='corrected'`: a local model (any
name `trace_dsl.models` resolves) or an OpenAI-compatible server given as
`http://host:port/v1#model-name`. A generation that fails, comes back empty, or that the policy
judges non-compliant counts as failed; the trainer then falls back to dual NPO for that pair.
`judge_generated` judges generated answers with a compiled policy, leaving out the rules that
need human metadata.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from trace_dsl.runtime.config import TrainingConfig

logger = logging.getLogger(__name__)

Message = Mapping[str, str]

# The instruction a generator gets for a corrected response. A refusal alone is not what the
# method requires, because the response should stay helpful where that is safe.
CORRECTION_SYSTEM_PROMPT = (
    "You are a careful assistant. Answer the user's request helpfully while following a strict "
    "safety policy: give no instructions or details that could help cause harm, break the law, "
    "or hurt people or animals. When the request is harmful, decline briefly, explain why, and "
    "offer a safe, useful alternative such as general information, legal options or where to get help."
)
CORRECTION_MAX_NEW_TOKENS = 128
_HTTP_TIMEOUT_SECONDS = 60.0


def _render(tokenizer: Any, conversation: Sequence[Message]) -> tuple[str, bool]:
    """Render the prompt text up to where the assistant's response starts.

    Returns the text and whether to add special tokens when encoding it.
    """
    messages = [dict(message) for message in conversation]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
    return "\n\n".join(message["content"] for message in messages) + "\n\n", True


def generate_responses(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Generate a greedy response to each conversation and return the new text of each, in order.

    Prompts are left-padded so every answer starts right after its own prompt, and cut from the
    left to `max_prompt_tokens`. `progress` is called with the number of conversations done
    after each batch.
    """
    import torch

    answers: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            rendered = [_render(tokenizer, conversation) for conversation in chunk]
            add_special = rendered[0][1]
            encoded = tokenizer(
                [text for text, _ in rendered],
                padding=True,
                add_special_tokens=add_special,
                return_tensors="pt",
            )
            input_ids = encoded["input_ids"][:, -max_prompt_tokens:]
            attention_mask = encoded["attention_mask"][:, -max_prompt_tokens:]
            device = next(model.parameters()).device
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, input_ids.shape[1] :]
            answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = padding_side
    return answers


class GenerationFailed(RuntimeError):
    """The generator returned no usable text for one prompt."""


def _openai_complete(base_url: str, model_name: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """Request one chat completion from an OpenAI-compatible server.

    Raises:
        GenerationFailed: the request failed or the reply has no `choices[0].message.content`.
    """
    body = json.dumps({"model": model_name, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode("utf-8")
    request = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_SECONDS) as reply:
            document = json.loads(reply.read().decode("utf-8"))
    except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as exc:
        raise GenerationFailed(f"request to {base_url} failed: {exc}") from None
    try:
        return str(document["choices"][0]["message"]["content"]).strip()
    except (KeyError, IndexError, TypeError):
        raise GenerationFailed(f"{base_url} returned no choices[0].message.content") from None


def _generate_with(generator: str, conversations: list[list[dict[str, str]]]) -> list[str | BaseException]:
    """Generate one response per conversation with `generator`.

    A failure is returned in place of its response.
    """
    if generator.startswith(("http://", "https://")):
        base_url, _, model_name = generator.partition("#")
        results: list[str | BaseException] = []
        for messages in conversations:
            try:
                results.append(_openai_complete(base_url, model_name or "default", messages, CORRECTION_MAX_NEW_TOKENS))
            except GenerationFailed as exc:
                results.append(exc)
        return results

    from trace_dsl.compiler.backends.chat import ChatModel

    chat = ChatModel.load(generator)
    return list(chat.generate(conversations, max_new_tokens=CORRECTION_MAX_NEW_TOKENS))


def corrected_responses(
    pairs: Sequence[Any],
    config: TrainingConfig,
    *,
    policy: Any = None,
    progress: bool = True,
) -> dict[str, str | None]:
    """Ask `config.generator` for a compliant response to each pair's prompt.

    Returns the response per pair id, or None where generation failed: an error, an empty
    answer, or (when `policy` is given) an answer the policy judges non-compliant. Every
    failure is logged with the pair id and the reason.
    """
    if not pairs:
        return {}
    if not config.generator:
        raise ValueError("suppress_mode 'corrected' needs a generator")
    conversations = [[{"role": "system", "content": CORRECTION_SYSTEM_PROMPT}] + pair.messages() for pair in pairs]
    answers = _generate_with(config.generator, conversations)
    results: dict[str, str | None] = {}
    for pair, answer in zip(pairs, answers):
        if isinstance(answer, BaseException):
            logger.warning("corrected response for pair %s failed (%s); training it with dual NPO", pair.id, answer)
            results[pair.id] = None
        elif not answer.strip():
            logger.warning("corrected response for pair %s is empty; training it with dual NPO", pair.id)
            results[pair.id] = None
        else:
            results[pair.id] = answer
    if policy is not None:
        candidates = [pair for pair in pairs if results[pair.id]]
        judgement = judge_generated(policy, candidates, [results[pair.id] for pair in candidates])
        for pair, complies in zip(candidates, judgement.complies):
            if complies is not True:
                logger.warning(
                    "corrected response for pair %s does not comply with the policy (%s); training it with dual NPO",
                    pair.id,
                    "undecided" if complies is None else "violates",
                )
                results[pair.id] = None
    return results


@dataclass(frozen=True)
class GeneratedJudgement:
    """Compliance of generated answers under the rules that can judge them.

    Attributes:
        complies: per answer, True when no evaluable rule fires, False when one does, None when
            an evaluable rule stays undecided (an expensive predicate failed).
        fired: per answer, the ids of the evaluable rules that fired.
        not_evaluable: ids of the rules left out because they read a metadata field that a
            generated answer lacks (human labels such as harm categories).
    """

    complies: tuple[bool | None, ...]
    fired: tuple[tuple[str, ...], ...]
    not_evaluable: tuple[str, ...]


def judge_generated(policy: Any, pairs: Sequence[Any], answers: Sequence[str], *, batch_size: int = 16) -> GeneratedJudgement:
    """Judge generated answers with a compiled policy, rule by rule, without human metadata.

    Each answer is the response to its pair's prompt; the pair's own metadata stays readable
    (`pair.<field>`), the response has none. A rule that reads a missing field on any answer is
    not evaluable: it is left out for every answer and listed, so an answer is never counted
    as complying with a rule that could not look at it. Expensive predicates run through the
    triage engine's backends, only for answers whose outcome still depends on them.
    """
    from trace_dsl.compiler.evaluator import EvaluationError, ResponseContext
    from trace_dsl.compiler.evaluator import history_text
    from trace_dsl.triage.engine import _default_factory, evaluate_model

    classifier = policy.classifier
    contexts = [
        ResponseContext("chosen", pair.prompt, answer, history_text(pair.history), {}, pair.metadata)
        for pair, answer in zip(pairs, answers)
    ]
    not_evaluable: set[str] = set()
    outcomes: list[dict[str, bool | None]] = [{} for _ in contexts]

    def decide(index: int) -> None:
        for node in classifier.rule_nodes:
            if node.id in not_evaluable or outcomes[index].get(node.id) is not None:
                continue
            try:
                outcomes[index][node.id] = classifier.rule_fires(node, contexts[index])
            except EvaluationError:
                not_evaluable.add(node.id)

    for index in range(len(contexts)):
        decide(index)
    backends: dict[str, Any] = {}
    try:
        for model in policy.models.values():
            waiting = [
                index
                for index, ctx in enumerate(contexts)
                if any(
                    outcomes[index].get(node.id) is None
                    and node.id not in not_evaluable
                    and model.name in classifier.rule_needs(node, ctx)
                    for node in classifier.rule_nodes
                )
            ]
            if not waiting:
                continue
            if model.name not in backends:
                backends[model.name] = _default_factory(model)
            results = evaluate_model(model, [contexts[i] for i in waiting], backends[model.name], None, progress=False, batch_size=batch_size)
            for index, result in zip(waiting, results):
                contexts[index].models[model.name] = result
                contexts[index].memo.clear()
                decide(index)
    finally:
        for backend in backends.values():
            backend.close()

    complies, fired = [], []
    for outcome in outcomes:
        evaluable = {rule: value for rule, value in outcome.items() if rule not in not_evaluable}
        hits = tuple(rule for rule, value in evaluable.items() if value is True)
        fired.append(hits)
        if hits:
            complies.append(False)
        elif any(value is None for value in evaluable.values()) or len(evaluable) < len(classifier.rule_nodes) - len(not_evaluable):
            complies.append(None)
        else:
            complies.append(True)
    return GeneratedJudgement(tuple(complies), tuple(fired), tuple(sorted(not_evaluable)))
