"""`trace eval`: what re-alignment changed, measured on held-out pairs of a run.

Every figure compares the trained model (base plus the run's adapter) with the base model,
which is also the reference model (the adapter disabled):

- inversion accuracy: over held-out INVERT pairs, the share where the implicit reward
  beta * (log p_theta(y|x) - log p_ref(y|x)) of the new winner (the old rejected response) is
  above that of the old winner. A tie (margins within `TIE_TOLERANCE` nats) counts as half a
  pair, so the base model, where every implicit reward is 0, scores exactly 0.5, the chance level.
  The log-probability preference (log p(new winner) > log p(old winner)) is given beside it for
  both models, since that figure is not tied at the base;
- suppression: mean change of the log-probability of SUPPRESS responses (both responses of each
  held-out SUPPRESS pair), trained minus base; negative means suppressed;
- retention: mean token-level KL(p_ref || p_theta) on the chosen responses of held-out RETAIN
  pairs, and the share of those pairs where the chosen response has the higher log-probability,
  base and trained (ties count half);
- utility: perplexity on a general text (default: the bundled Model Spec excerpt), base and trained;
- policy agreement: both models generate greedy responses to held-out prompts, and the run's
  compiled policy judges them rule by rule. The figure is the share judged compliant by the rules
  that can judge generated text. Rules that read human metadata (a generated answer has none) are listed in
  `rules_not_evaluable` and left out, never counted as complied with.

A figure computed on fewer than `FEW_PAIRS` pairs is flagged `few_pairs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from trace_dsl.errors import ConfigurationError, RunDirectoryError, TrainingDataError
from trace_dsl.runtime import logprobs as lp
from trace_dsl.runtime.apply import Split, load_config, triage_with_cache, unique_pairs
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.losses import token_kl
from trace_dsl.runtime.reference import reference_model
from trace_dsl.runtime.rundir import RunDirectory, read_json, read_jsonl, utc_now, write_json
from trace_dsl.triage.verdict import Category, Verdict

EVAL_SCHEMA_VERSION = 1
FEW_PAIRS = 10
TIE_TOLERANCE = 1e-6
DEFAULT_UTILITY_TEXT = Path(__file__).resolve().parents[2] / "examples" / "general-text" / "model_spec_best_work.txt"
_SCORE_BATCH = 8


@dataclass(frozen=True)
class EvalRequest:
    """Parameters of one `trace eval` measurement.

    Attributes:
        run: the run directory.
        data: held-out pairs to use instead of the run's split (triaged with the run's policy).
        data_format: the format of `data`, None to detect it.
        skip_invalid: skip malformed rows of `data` instead of stopping.
        generate_n: held-out prompts answered for policy agreement (0 skips it).
        max_pairs: evaluate at most this many held-out pairs per category, the same seeded
            sample every time (None evaluates all).
        max_new_tokens: tokens generated per response.
        utility_text: the plain-text file for perplexity; None takes the bundled sample.
        progress: draw progress bars on stderr.
    """

    run: Path
    data: str | None = None
    data_format: str | None = None
    skip_invalid: bool = False
    generate_n: int = 16
    max_new_tokens: int = 64
    max_pairs: int | None = 100
    utility_text: Path | None = None
    progress: bool = True


# --- Held-out pairs ----------------------------------------------------------------------------


def _heldout_pairs(request: EvalRequest, run: RunDirectory, manifest: Mapping[str, Any]) -> tuple[list[Any], dict[str, Verdict], Any, str]:
    """Return the held-out pairs with their verdicts, the compiled policy, and the source of the pairs."""
    from trace_dsl.compiler.policy import load_policy
    from trace_dsl.data import load_pairs

    policy_path = Path(manifest["policy"]["path"])
    policy = load_policy(policy_path)
    if manifest["policy"].get("hash") and getattr(policy, "hash", None) != manifest["policy"]["hash"]:
        raise RunDirectoryError(
            f"policy {policy_path} changed since the run was trained (hash {getattr(policy, 'hash', '?')}, "
            f"run {manifest['policy']['hash']})",
            hint="evaluate with the policy the run was trained with (for example from git), or train a new run",
        )
    split = Split.from_dict(read_json(run.split))
    if request.data is None:
        data = manifest["data"]
        loaded = load_pairs(data["path"], format=data.get("format"), limit=data.get("limit"), skip_invalid=data.get("skip_invalid", False))
        wanted = set(split.heldout)
        pairs = [pair for pair in unique_pairs(loaded.pairs) if pair.id in wanted]
        if len(pairs) != len(wanted):
            raise RunDirectoryError(
                f"{len(wanted) - len(pairs)} held-out pairs of the run are no longer in {data['path']}",
                hint="the data file changed since training; pass the held-out pairs with --data",
            )
        verdicts = {row["pair_id"]: Verdict.from_dict(row) for row in read_jsonl(run.triage) if row["pair_id"] in wanted}
        return pairs, verdicts, policy, "split"

    loaded = load_pairs(request.data, format=request.data_format, skip_invalid=request.skip_invalid)
    trained = set(split.train)
    pairs = [pair for pair in unique_pairs(loaded.pairs) if pair.id not in trained]
    if not pairs:
        raise TrainingDataError(f"{request.data}: every pair was used in training; nothing is held out")
    verdicts = {verdict.pair_id: verdict for verdict in triage_with_cache(policy, pairs, progress=request.progress)}
    return pairs, verdicts, policy, str(request.data)


# --- Scoring ------------------------------------------------------------------------------------


def _logprobs(model: Any, tokenizer: Any, items: Sequence[tuple[Any, str]], max_length: int, *, reference: bool) -> list[float]:
    """Sequence log-probabilities of (messages, response) items, trained or reference."""
    device = next(model.parameters()).device
    values: list[float] = []
    for start in range(0, len(items), _SCORE_BATCH):
        batch = lp.encode_and_collate(tokenizer, items[start : start + _SCORE_BATCH], max_length).to(device)
        with torch.no_grad():
            if reference:
                with reference_model(model):
                    values.extend(lp.sequence_logprobs(model, batch).tolist())
            else:
                values.extend(lp.sequence_logprobs(model, batch).tolist())
    return values


def _mean_token_kl(model: Any, tokenizer: Any, items: Sequence[tuple[Any, str]], max_length: int) -> float:
    """Mean over responses of the token-level KL(p_ref || p_theta) on the response tokens."""
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(items), _SCORE_BATCH):
        batch = lp.encode_and_collate(tokenizer, items[start : start + _SCORE_BATCH], max_length).to(device)
        with torch.no_grad():
            policy = lp.response_token_logits(model, batch)
            with reference_model(model):
                reference = lp.response_token_logits(model, batch)
        total += token_kl(reference.logits, policy.logits, policy.mask).sum().item()
    return total / len(items)


def _preference_share(margins: Sequence[float]) -> float:
    """Return the share of positive margins. A tie (|margin| <= TIE_TOLERANCE) counts as half."""
    score = 0.0
    for margin in margins:
        if margin > TIE_TOLERANCE:
            score += 1.0
        elif abs(margin) <= TIE_TOLERANCE:
            score += 0.5
    return score / len(margins)


def _flag(count: int) -> dict[str, Any]:
    return {"count": count, "few_pairs": count < FEW_PAIRS}


def _inversion(model, tokenizer, pairs, beta: float, max_length: int) -> dict[str, Any]:
    if not pairs:
        return {**_flag(0), "trained": None, "base": None}
    new_winners = [(pair.messages(), pair.rejected) for pair in pairs]
    old_winners = [(pair.messages(), pair.chosen) for pair in pairs]
    trained_new = _logprobs(model, tokenizer, new_winners, max_length, reference=False)
    trained_old = _logprobs(model, tokenizer, old_winners, max_length, reference=False)
    base_new = _logprobs(model, tokenizer, new_winners, max_length, reference=True)
    base_old = _logprobs(model, tokenizer, old_winners, max_length, reference=True)
    reward_margins = [beta * ((tn - bn) - (to - bo)) for tn, bn, to, bo in zip(trained_new, base_new, trained_old, base_old)]
    return {
        **_flag(len(pairs)),
        "trained": _preference_share(reward_margins),
        # At the reference model every implicit reward is 0: all ties, 0.5 by the tie rule.
        "base": _preference_share([0.0] * len(pairs)),
        "trained_logprob_preference": _preference_share([n - o for n, o in zip(trained_new, trained_old)]),
        "base_logprob_preference": _preference_share([n - o for n, o in zip(base_new, base_old)]),
        "mean_reward_margin": sum(reward_margins) / len(reward_margins),
    }


def _suppression(model, tokenizer, pairs, max_length: int) -> dict[str, Any]:
    if not pairs:
        return {**_flag(0), "mean_logprob_change": None}
    responses = [(pair.messages(), pair.chosen) for pair in pairs] + [(pair.messages(), pair.rejected) for pair in pairs]
    trained = _logprobs(model, tokenizer, responses, max_length, reference=False)
    base = _logprobs(model, tokenizer, responses, max_length, reference=True)
    changes = [t - b for t, b in zip(trained, base)]
    half = len(pairs)
    return {
        **_flag(len(pairs)),
        "mean_logprob_change": sum(changes) / len(changes),
        "mean_logprob_change_chosen": sum(changes[:half]) / half,
        "mean_logprob_change_rejected": sum(changes[half:]) / half,
        "share_suppressed": sum(1 for c in changes if c < -TIE_TOLERANCE) / len(changes),
    }


def _retention(model, tokenizer, pairs, max_length: int) -> dict[str, Any]:
    if not pairs:
        return {**_flag(0), "kl": None, "trained_accuracy": None, "base_accuracy": None}
    chosen = [(pair.messages(), pair.chosen) for pair in pairs]
    rejected = [(pair.messages(), pair.rejected) for pair in pairs]
    trained_c = _logprobs(model, tokenizer, chosen, max_length, reference=False)
    trained_r = _logprobs(model, tokenizer, rejected, max_length, reference=False)
    base_c = _logprobs(model, tokenizer, chosen, max_length, reference=True)
    base_r = _logprobs(model, tokenizer, rejected, max_length, reference=True)
    return {
        **_flag(len(pairs)),
        "kl": _mean_token_kl(model, tokenizer, chosen, max_length),
        "trained_accuracy": _preference_share([c - r for c, r in zip(trained_c, trained_r)]),
        "base_accuracy": _preference_share([c - r for c, r in zip(base_c, base_r)]),
    }


def perplexity(model: Any, tokenizer: Any, text: str, *, window: int = 256) -> tuple[float, int]:
    """Perplexity of `text` in consecutive windows of `window` tokens; returns it and the token count."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    total_nll, counted = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]], device=device)
        if chunk.shape[1] < 2:
            break
        with torch.no_grad():
            logits = model(input_ids=chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        total_nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        counted += targets.numel()
    return math.exp(total_nll / max(counted, 1)), counted


_MANIFEST_FIELDS = (("policy", "path"), ("data", "path"), ("model", "name"))


def _manifest_config(run: RunDirectory, manifest: Mapping[str, Any]) -> TrainingConfig:
    """Check the manifest fields `trace eval` reads and return the run's training configuration.

    A manifest edited by hand or written by another version of the toolkit may lack a field or
    carry a setting this version does not know. Either case raises an error naming the field.
    """
    for section, field in _MANIFEST_FIELDS:
        if not isinstance(manifest.get(section), Mapping) or not manifest[section].get(field):
            raise RunDirectoryError(
                f"{run.manifest}: field {section}.{field} is missing", hint="the manifest was edited or is incomplete; train the run again"
            )
    try:
        return load_config(base=manifest.get("config") or {})
    except ConfigurationError as exc:
        raise RunDirectoryError(
            f"{run.manifest}: {exc.message}",
            hint="the manifest was edited or written by another version of trace-dsl; train the run again",
        ) from None


def _read_utility_text(path: Path) -> str:
    """Read the perplexity text; called before any model work, so a bad file wastes none of it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RunDirectoryError(f"cannot read the utility text {path}: {exc.strerror}", hint="pass --utility-text FILE") from None
    except UnicodeDecodeError as exc:
        raise RunDirectoryError(
            f"utility text {path} is not UTF-8 text (byte {exc.start})", hint="pass a plain-text file with --utility-text"
        ) from None
    if not text.strip():
        raise RunDirectoryError(f"utility text {path} is empty", hint="pass a plain-text file with --utility-text")
    return text


def _utility(model, tokenizer, path: Path, text: str, window: int) -> dict[str, Any]:
    trained, tokens = perplexity(model, tokenizer, text, window=window)
    with reference_model(model):
        base, _ = perplexity(model, tokenizer, text, window=window)
    return {"text": str(path), "tokens": tokens, "trained_perplexity": trained, "base_perplexity": base}


def _policy_agreement(model, tokenizer, policy, pairs, request: EvalRequest, max_length: int) -> dict[str, Any]:
    from trace_dsl.runtime.generate import generate_responses, judge_generated

    chosen = _unique_prompts(pairs)[: request.generate_n]
    if not chosen:
        return {**_flag(0), "trained": None, "base": None, "rules_not_evaluable": []}
    conversations = [pair.messages() for pair in chosen]
    options = dict(max_new_tokens=request.max_new_tokens, max_prompt_tokens=max_length)
    trained_answers = generate_responses(model, tokenizer, conversations, **options)
    with reference_model(model):
        base_answers = generate_responses(model, tokenizer, conversations, **options)
    trained = judge_generated(policy, chosen, trained_answers)
    base = judge_generated(policy, chosen, base_answers)
    not_evaluable = sorted(set(trained.not_evaluable) | set(base.not_evaluable))
    evaluable = [rule for rule in policy.rule_ids if rule not in not_evaluable]

    def share(judgement) -> float | None:
        # Undecided responses count as not complying.
        if not evaluable:
            return None
        return sum(1 for value in judgement.complies if value is True) / len(judgement.complies)

    return {
        **_flag(len(chosen)),
        "trained": share(trained),
        "base": share(base),
        "trained_undecided": sum(1 for value in trained.complies if value is None),
        "base_undecided": sum(1 for value in base.complies if value is None),
        "rules_evaluated": evaluable,
        "rules_not_evaluable": not_evaluable,
        "max_new_tokens": request.max_new_tokens,
        "samples": [
            {"pair_id": pair.id, "prompt": pair.prompt, "base": b, "trained": t, "base_rules": list(bf), "trained_rules": list(tf)}
            for pair, b, t, bf, tf in zip(chosen, base_answers, trained_answers, base.fired, trained.fired)
        ][:5],
    }


def _sample(pairs: Sequence[Any], limit: int, seed: int) -> list[Any]:
    """At most `limit` pairs, a seeded sample that does not depend on the input order."""
    import random

    ordered = sorted(pairs, key=lambda pair: pair.id)
    if len(ordered) <= limit:
        return ordered
    return sorted(random.Random(seed).sample(ordered, limit), key=lambda pair: pair.id)


def _unique_prompts(pairs: Sequence[Any]) -> list[Any]:
    seen, unique = set(), []
    for pair in sorted(pairs, key=lambda p: p.id):
        if pair.prompt not in seen:
            seen.add(pair.prompt)
            unique.append(pair)
    return unique


# --- The command ----------------------------------------------------------------------------------


def evaluate_run(request: EvalRequest) -> dict[str, Any]:
    """Measure a run on held-out pairs, write `eval.json` into the run directory, return the report.

    Raises:
        RunDirectoryError: the run directory is incomplete (no adapter: training did not finish),
            or its data or policy changed since training.
        TrainingDataError: the given data contains no pair that was not trained on.
    """
    from peft import PeftModel

    from trace_dsl.models import load_model_and_tokenizer, resolve_model

    run = RunDirectory(Path(request.run))
    manifest = run.read_manifest()
    if not (run.adapter / "adapter_config.json").exists():
        raise RunDirectoryError(
            f"{run.root} has no trained adapter (status: {manifest.get('status', 'unknown')})",
            hint=f"finish training first: trace apply ... -o {run.root} --resume",
        )
    config = _manifest_config(run, manifest)
    utility_path = request.utility_text or DEFAULT_UTILITY_TEXT
    utility_text = _read_utility_text(utility_path)
    pairs, verdicts, policy, source = _heldout_pairs(request, run, manifest)
    by_category: dict[Category, list[Any]] = {category: [] for category in Category}
    for pair in pairs:
        by_category[verdicts[pair.id].category].append(pair)
    available = {category.value: len(group) for category, group in by_category.items()}
    if request.max_pairs is not None:
        by_category = {category: _sample(group, request.max_pairs, config.seed) for category, group in by_category.items()}

    base, tokenizer = load_model_and_tokenizer(resolve_model(manifest["model"]["name"]))
    try:
        model = PeftModel.from_pretrained(base, run.adapter)
    except Exception as exc:  # noqa: BLE001 - peft, safetensors and json raise many types for a damaged file
        raise RunDirectoryError(
            f"cannot load the adapter in {run.adapter}: {type(exc).__name__}: {exc}",
            hint="the adapter files are damaged; train the run again with trace apply --overwrite",
        ) from None
    model.eval()

    max_length = config.max_length
    report: dict[str, Any] = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "run": str(run.root),
        "evaluated_at": utc_now(),
        "heldout": {
            "source": source,
            "counts": {category.value: len(by_category[category]) for category in Category},
            "available": available,
            "max_pairs": request.max_pairs,
        },
        "tie_rule": f"a margin within {TIE_TOLERANCE} nats counts as half a pair; at the base model every implicit reward ties",
        "few_pairs_threshold": FEW_PAIRS,
        "inversion": _inversion(model, tokenizer, by_category[Category.INVERT], config.beta, max_length),
        "suppression": _suppression(model, tokenizer, by_category[Category.SUPPRESS], max_length),
        "retention": _retention(model, tokenizer, by_category[Category.RETAIN], max_length),
        "utility": _utility(model, tokenizer, utility_path, utility_text, max_length),
    }
    if request.generate_n > 0:
        decided = [pair for category, group in by_category.items() if category is not Category.ERROR for pair in group]
        report["policy_agreement"] = _policy_agreement(model, tokenizer, policy, decided, request, max_length)
    write_json(run.eval, report)
    return report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(report: Mapping[str, Any]) -> list[str]:
    """Format the report as an aligned text table, one metric per line.

    `(n<10)` marks a metric measured on fewer than `FEW_PAIRS` pairs.
    """

    def count(section: Mapping[str, Any]) -> str:
        flag = f" (n<{FEW_PAIRS})" if section.get("few_pairs") else ""
        return f"{section.get('count', 0)}{flag}"

    rows = [("metric", "pairs", "base", "trained")]
    inversion = report["inversion"]
    rows.append(("inversion accuracy (implicit reward)", count(inversion), _fmt(inversion.get("base")), _fmt(inversion.get("trained"))))
    rows.append(("inversion log-prob preference", count(inversion), _fmt(inversion.get("base_logprob_preference")), _fmt(inversion.get("trained_logprob_preference"))))
    suppression = report["suppression"]
    # The base model is the reference, so its change and its KL are 0 by definition, where
    # there is a figure at all: with no pair both columns read "-".
    change = suppression.get("mean_logprob_change")
    rows.append(("suppression: mean log-prob change", count(suppression), "-" if change is None else "0", _fmt(change)))
    retention = report["retention"]
    kl = retention.get("kl")
    rows.append(("retention: KL(ref || trained)", count(retention), "-" if kl is None else "0", "-" if kl is None else f"{kl:.3g}"))
    rows.append(("retention: preference accuracy", count(retention), _fmt(retention.get("base_accuracy")), _fmt(retention.get("trained_accuracy"))))
    utility = report["utility"]
    rows.append(("utility: perplexity", f"{utility['tokens']} tokens", _fmt(utility["base_perplexity"], 2), _fmt(utility["trained_perplexity"], 2)))
    agreement = report.get("policy_agreement")
    if agreement:
        rows.append(("policy agreement", count(agreement), _fmt(agreement.get("base")), _fmt(agreement.get("trained"))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"ties count half; (n<{FEW_PAIRS}) marks a figure on fewer than {FEW_PAIRS} pairs")
    if agreement and agreement.get("rules_not_evaluable"):
        lines.append("rules not evaluable on generated text (need human metadata): " + ", ".join(agreement["rules_not_evaluable"]))
    return lines
