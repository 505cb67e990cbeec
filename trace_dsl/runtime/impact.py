"""Alignment impact scores: how much training on each conflict pair helps the new policy.

From "The Realignment Problem: When Right becomes Wrong in LLMs" (Sen Sharma et al., arXiv
2511.02623), stage 2. With the Hessian taken as gamma * I, the score of a conflict pair i is a
gradient dot product at the starting weights theta_ref:

    w_i = (1/gamma) * <g_J, g_i>,   g_J = grad J(theta_ref),   g_i = grad L_i(theta_ref)

where J is the DPO loss summed over a gold batch (`build_gold_batch`) and L_i is the loss that
trains pair i: the inversion loss on the flipped pair for INVERT, dual NPO for SUPPRESS. Scores
are clipped at zero and L1-normalised over the conflict set. RETAIN pairs get no score.

Why directional derivatives suffice. The model is a peft model with a fresh LoRA adapter, whose
B matrices are zero, so theta = theta_ref and every log-ratio log p_theta - log p_ref is 0.
Write d(y) = <g_J, grad log p_theta(y|x)>. Then:

- INVERT, trained on the flipped pair (y_l preferred over y_w), Delta = r(y_l) - r(y_w) with
  r(y) = log p_theta(y|x) - log p_ref(y|x):
  sigmoid: grad[-log sigmoid(beta Delta)] = -beta * sigmoid(-beta Delta) * grad Delta, and
  sigmoid(0) = 1/2, so g_i = -(beta/2) (grad log p(y_l) - grad log p(y_w)) and
  <g_J, g_i> = -(beta/2) (d(y_l) - d(y_w)).
  ipo: grad[(Delta - 1/(2 beta))^2] = 2 (Delta - 1/(2 beta)) grad Delta = -(1/beta) grad Delta
  at Delta = 0, so <g_J, g_i> = -(1/beta) (d(y_l) - d(y_w)).
- SUPPRESS: grad[-log sigmoid(-beta r)] = beta * sigmoid(beta r) * grad r = (beta/2) grad r at
  r = 0, for each response, so g_i = (beta/2) (grad log p(y_w) + grad log p(y_l)) and
  <g_J, g_i> = (beta/2) (d(y_w) + d(y_l)).

So every score needs only d(y) for the two responses of each conflict pair. Two methods get it:

- 'loop' (the reference code's way): one backward pass per response, the flattened gradient
  dotted with g_J. Simple, and the ground truth in tests.
- 'directional': no per-sample gradient is formed. LoRA computes W x + s * B A x. Since B = 0,
  the gradient of anything with respect to A (s * B^T (dL/dout) x^T) is exactly 0, so g_J lives
  in the B matrices only (checked at run time). Each example i in a batch gets its own scalar
  t_i, and its LoRA branch uses B = t_i * g_J[B]. Then log p_i depends on t_i alone, and
  d log p_i / d t_i at t = 0 is exactly d(y_i). One backward pass of sum_i log p_i with
  respect to the vector t gives all of them, and no weight gradient is computed. At t = 0 the
  forward pass is the reference model's, so it also yields the reference log-probabilities the
  trainer needs, which `ImpactResult.ref_logprobs` returns.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from trace_dsl.data.records import PreferencePair
from trace_dsl.errors import TrainingDataError
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.logprobs import EncodedExample, TokenBatch, collate, encode_example, pack, sequence_logprobs
from trace_dsl.triage.verdict import Category, Verdict

Side = Literal["chosen", "rejected"]
"""Response of a pair: the old chosen or the old rejected one."""

Layout = Literal["packed", "padded"]


@dataclass(frozen=True, slots=True)
class GoldItem:
    """One preference of the gold batch that defines the new policy's direction g_J.

    Attributes:
        pair_id: id of the pair whose prompt the item uses.
        category: the category of that pair (RETAIN, INVERT or SUPPRESS).
        messages: the conversation before the response, as `{"role", "content"}` dicts.
        chosen: the response preferred under the new policy.
        rejected: the response dispreferred under the new policy.
        chosen_from: id of the pair the chosen response was taken from (differs from `pair_id`
            for SUPPRESS items, whose compliant response is borrowed from another pair).
    """

    pair_id: str
    category: Category
    messages: tuple[Mapping[str, str], ...]
    chosen: str
    rejected: str
    chosen_from: str


@dataclass(frozen=True)
class ImpactResult:
    """Alignment impact scores of the conflict set, and what was computed on the way.

    Attributes:
        scores: per conflict pair id, max(0, w_i) L1-normalised over the conflict set, so they
            sum to 1 (or are all 0 when no score is positive). With impact scores disabled,
            every pair gets 1/N.
        weights: `scores` scaled as `config.impact.weight_scaling` sets: 'sum' leaves them,
            'mean' multiplies them by the conflict-set size N so their mean is 1.
        raw: per conflict pair id, (1/gamma) <g_J, g_i> before clipping; empty when disabled.
        ref_logprobs: reference log-probability of both responses of every conflict pair,
            keyed by (pair id, "chosen" or "rejected"), encoded with `config.max_length`.
        gold_pair_ids: ids of the pairs whose prompts make up the gold batch, in batch order.
        method: 'directional', 'loop', or 'uniform' when impact scores are disabled.
        timings: seconds spent on 'gold_gradient', 'responses' and 'total'.
    """

    scores: dict[str, float]
    weights: dict[str, float]
    raw: dict[str, float]
    ref_logprobs: dict[tuple[str, str], float]
    gold_pair_ids: tuple[str, ...]
    method: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict; `from_dict` reverses it."""
        return {
            "method": self.method,
            "scores": dict(self.scores),
            "weights": dict(self.weights),
            "raw": dict(self.raw),
            "ref_logprobs": [
                {"pair_id": pair_id, "side": side, "logprob": value}
                for (pair_id, side), value in self.ref_logprobs.items()
            ],
            "gold_pair_ids": list(self.gold_pair_ids),
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "ImpactResult":
        """Rebuild a result written by `to_dict`."""
        return cls(
            scores={k: float(v) for k, v in data["scores"].items()},
            weights={k: float(v) for k, v in data["weights"].items()},
            raw={k: float(v) for k, v in data.get("raw", {}).items()},
            ref_logprobs={(row["pair_id"], row["side"]): float(row["logprob"]) for row in data.get("ref_logprobs", [])},
            gold_pair_ids=tuple(data.get("gold_pair_ids", ())),
            method=data["method"],
            timings={k: float(v) for k, v in data.get("timings", {}).items()},
        )


# Triage categories


def _verdict_map(verdicts: Mapping[str, Verdict] | Iterable[Verdict]) -> dict[str, Verdict]:
    if isinstance(verdicts, Mapping):
        return dict(verdicts)
    return {verdict.pair_id: verdict for verdict in verdicts}


def split_by_category(
    pairs: Sequence[PreferencePair], verdicts: Mapping[str, Verdict] | Iterable[Verdict]
) -> dict[Category, list[PreferencePair]]:
    """Group pairs by their verdict's category, keeping the input order within each group.

    Raises:
        TrainingDataError: a pair has no verdict, or some verdicts are `error`.
    """
    by_id = _verdict_map(verdicts)
    groups: dict[Category, list[PreferencePair]] = {category: [] for category in Category}
    missing = []
    for pair in pairs:
        verdict = by_id.get(pair.id)
        if verdict is None:
            missing.append(pair)
            continue
        groups[verdict.category].append(pair)

    if missing:
        first = missing[0]
        raise TrainingDataError(
            f"{len(missing)} pair(s) have no verdict, first {first.id}" + (f" ({first.source})" if first.source else ""),
            hint="triage the same data with the policy first, so every pair has a verdict",
        )
    errors = groups[Category.ERROR]
    if errors:
        raise TrainingDataError(
            f"{len(errors)} pair(s) have verdict 'error' and cannot be trained on, first {errors[0].id}",
            hint=f"run `trace explain POLICY --data DATA --pair {errors[0].id}` to see which predicate failed",
        )
    return groups


# Gold batch


def build_gold_batch(
    pairs: Sequence[PreferencePair],
    verdicts: Mapping[str, Verdict] | Iterable[Verdict],
    size: int,
    seed: int,
) -> list[GoldItem]:
    """Draw the gold batch that stands for the new policy, seeded.

    Up to size // 3 RETAIN pairs as they are, up to size // 3 INVERT pairs flipped (the old
    rejected response preferred), and the rest of `size` from SUPPRESS pairs. Each SUPPRESS item
    keeps its prompt, takes a compliant response drawn at random from the RETAIN chosen and
    INVERT rejected responses as the preferred one, and its old chosen response as the
    dispreferred one. The batch is smaller than `size` when the categories run out, and has no
    SUPPRESS items when no compliant response exists. Items come in the order RETAIN, INVERT,
    SUPPRESS. The same pairs, verdicts, size and seed give the same batch.

    Raises:
        TrainingDataError: a pair has no verdict or an `error` verdict.
    """
    groups = split_by_category(pairs, verdicts)
    rng = random.Random(seed)
    third = size // 3

    retained = rng.sample(groups[Category.RETAIN], min(third, len(groups[Category.RETAIN])))
    inverted = rng.sample(groups[Category.INVERT], min(third, len(groups[Category.INVERT])))
    items = [
        GoldItem(p.id, Category.RETAIN, tuple(p.messages()), p.chosen, p.rejected, p.id) for p in retained
    ] + [
        GoldItem(p.id, Category.INVERT, tuple(p.messages()), p.rejected, p.chosen, p.id) for p in inverted
    ]

    compliant = [(p.id, p.chosen) for p in groups[Category.RETAIN]] + [
        (p.id, p.rejected) for p in groups[Category.INVERT]
    ]
    remaining = size - len(items)
    if compliant and remaining > 0:
        suppressed = rng.sample(groups[Category.SUPPRESS], min(remaining, len(groups[Category.SUPPRESS])))
        for pair in suppressed:
            source_id, response = rng.choice(compliant)
            items.append(GoldItem(pair.id, Category.SUPPRESS, tuple(pair.messages()), response, pair.chosen, source_id))
    return items


# Model checks and the LoRA layers


def _trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def _check_fresh_adapter(model) -> dict[str, torch.nn.Parameter]:
    """Return the trainable parameters after checking the model is a peft model at theta_ref.

    Raises:
        TypeError: the model has no adapter or no trainable parameter.
        ValueError: a LoRA B matrix is not zero, so the model is not at its starting point.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"impact scores need a peft model with a fresh LoRA adapter, got {type(model).__name__}")
    parameters = _trainable_parameters(model)
    if not parameters:
        raise TypeError("the model has no trainable parameters; impact scores are gradients over the adapter's")
    for name, parameter in parameters.items():
        if "lora_B" in name and torch.count_nonzero(parameter.detach()) > 0:
            raise ValueError(
                f"LoRA matrix {name} is not zero, so the model is not at its starting weights; "
                "compute impact scores on a freshly initialised adapter, before training"
            )
    return parameters


def _lora_layers(model) -> list[tuple[str, torch.nn.Linear]]:
    """Find every active LoRA B module of the model, with the name of its weight parameter.

    Raises:
        ValueError: the adapter is not plain LoRA on linear layers (a LoRA variant such as DoRA,
            an embedding adapter, merged weights, or trainable parameters outside LoRA), which
            the directional method cannot handle exactly.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    layers = []
    covered = set()
    for module in model.modules():
        if not hasattr(module, "lora_B") or not isinstance(module.lora_B, torch.nn.ModuleDict):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_B:
                continue
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "merged", False):
                raise ValueError(
                    "the directional impact method handles plain LoRA only; use impact.method 'loop'"
                )
            linear_a, linear_b = module.lora_A[adapter], module.lora_B[adapter]
            layers.append((names[id(linear_b.weight)], linear_b))
            covered.update({id(linear_a.weight), id(linear_b.weight)})
    uncovered = [n for n, p in _trainable_parameters(model).items() if id(p) not in covered]
    if uncovered:
        raise ValueError(
            f"trainable parameters outside plain LoRA linear layers ({uncovered[0]}, ...) are not "
            "handled by the directional impact method; use impact.method 'loop'"
        )
    if not layers:
        raise ValueError("the model has no active LoRA layer")
    return layers


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# Batching helpers


def _length_sorted_chunks(examples: Sequence[EncodedExample], batch_size: int) -> list[list[int]]:
    """Indices of `examples` in chunks of `batch_size`, longest first, so padding stays small
    and the largest batch comes first (an out-of-memory error shows at once)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]), reverse=True)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _layout(examples: Sequence[EncodedExample], layout: Layout, pad_token_id: int | None) -> TokenBatch:
    return pack(examples) if layout == "packed" else collate(examples, pad_token_id)


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield a function that advances a rich progress bar on stderr (a no-op when disabled)."""
    if not enabled:
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# The gold gradient


def gold_gradient(
    model,
    tokenizer,
    gold: Sequence[GoldItem],
    config: TrainingConfig,
    *,
    layout: Layout = "padded",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """g_J: the gradient of the DPO loss summed over the gold batch, at the current weights.

    J = sum_k -log sigmoid(beta * Delta_k), with Delta_k from `losses.preference_margin`. The
    model must be at theta_ref, so the reference log-probabilities equal the policy's and are
    taken as detached copies of them (exact, with no second forward pass). Returns one tensor per
    trainable parameter name, in float32.
    """
    parameters = _trainable_parameters(model)
    names = list(parameters)
    totals = {name: torch.zeros_like(parameters[name], dtype=torch.float32) for name in names}
    device = _model_device(model)
    beta = config.beta

    # Each gold item contributes two examples, kept next to each other so one pass scores both.
    examples = []
    for item in gold:
        examples.append(encode_example(tokenizer, item.messages, item.chosen, config.max_length))
        examples.append(encode_example(tokenizer, item.messages, item.rejected, config.max_length))
    pair_lengths = [len(examples[2 * k]) + len(examples[2 * k + 1]) for k in range(len(gold))]
    order = sorted(range(len(gold)), key=lambda k: pair_lengths[k], reverse=True)
    batch_pairs = max(1, config.impact.batch_size // 2)

    with _progress_bar(progress, "gold gradient", len(gold)) as advance:
        for start in range(0, len(order), batch_pairs):
            chunk = order[start:start + batch_pairs]
            batch_examples = [examples[2 * k + side] for k in chunk for side in (0, 1)]
            batch = _layout(batch_examples, layout, tokenizer.pad_token_id).to(device)
            logps = sequence_logprobs(model, batch)
            chosen, rejected = logps[0::2], logps[1::2]
            delta = (chosen - chosen.detach()) - (rejected - rejected.detach())
            loss = -F.logsigmoid(beta * delta).sum()
            grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    totals[name] += grad.float()
            advance(len(chunk))
    return totals


# Directional derivatives d(y) = <g_J, grad log p(y|x)>


def directional_derivatives_loop(
    model, tokenizer, examples: Sequence[EncodedExample], direction: Mapping[str, torch.Tensor], *, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(y) by one backward pass per example, as TRACE's reference code does.

    Returns d(y) and the log-probability at the current weights, each of shape [examples], in
    float64 on the CPU.
    """
    parameters = _trainable_parameters(model)
    names = [n for n in parameters if n in direction]
    device = _model_device(model)
    derivatives = torch.zeros(len(examples), dtype=torch.float64)
    logprobs = torch.zeros(len(examples), dtype=torch.float64)

    with _progress_bar(progress, "impact scores (loop)", len(examples)) as advance:
        for index, example in enumerate(examples):
            batch = collate([example], tokenizer.pad_token_id).to(device)
            logp = sequence_logprobs(model, batch)[0]
            grads = torch.autograd.grad(logp, [parameters[n] for n in names], allow_unused=True)
            dot = sum(
                (grad.double() * direction[name].to(grad.device).double()).sum()
                for name, grad in zip(names, grads)
                if grad is not None
            )
            derivatives[index] = float(dot)
            logprobs[index] = logp.item()
            advance(1)
    return derivatives, logprobs


@contextlib.contextmanager
def _lora_b_along(layers: Sequence[tuple[str, torch.nn.Linear]], direction: Mapping[str, torch.Tensor]):
    """Set each LoRA B matrix to g_J's B-part and scale its output per token by t of its example.

    Yields a function that installs the per-token scale for the next forward pass. On exit the
    B matrices are zero again and their `requires_grad` flags are restored.
    """
    state: dict[str, torch.Tensor | None] = {"scale": None}

    def hook(_module, _inputs, output):
        return output * state["scale"].to(output.dtype)

    saved_flags = []
    handles = []
    try:
        with torch.no_grad():
            for name, linear in layers:
                saved_flags.append(linear.weight.requires_grad)
                linear.weight.requires_grad_(False)
                linear.weight.copy_(direction[name].to(linear.weight.dtype))
                handles.append(linear.register_forward_hook(hook))

        def set_scale(scale: torch.Tensor) -> None:
            state["scale"] = scale

        yield set_scale
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for (_, linear), flag in zip(layers, saved_flags):
                linear.weight.zero_()
                linear.weight.requires_grad_(flag)


def directional_derivatives_batched(
    model,
    tokenizer,
    examples: Sequence[EncodedExample],
    direction: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    layout: Layout = "padded",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(y) for a batch at a time by the per-example scalar t, with no weight gradient computed.

    See the module docstring for why this is exact. Examples are sorted by length and laid out
    `batch_size` per forward pass, packed into one row or padded. Returns d(y) and the
    log-probability at the current weights (the reference model's, since B = 0), each of shape
    [examples], in float64 on the CPU.

    Raises:
        ValueError: the adapter is not plain LoRA, or g_J has a non-zero part outside the B
            matrices (which would mean the adapter was not fresh).
    """
    layers = _lora_layers(model)
    layer_names = {name for name, _ in layers}
    for name, tensor in direction.items():
        if name not in layer_names and torch.count_nonzero(tensor) > 0:
            raise ValueError(f"g_J is non-zero on {name}, outside the LoRA B matrices; the adapter is not fresh")

    device = _model_device(model)
    # float64 models get float64 scalars so tests can compare at tight tolerances.
    scale_dtype = torch.float64 if layers[0][1].weight.dtype == torch.float64 else torch.float32
    derivatives = torch.zeros(len(examples), dtype=torch.float64)
    logprobs = torch.zeros(len(examples), dtype=torch.float64)

    with _lora_b_along(layers, direction) as set_scale, _progress_bar(
        progress, "impact scores", len(examples)
    ) as advance:
        for chunk in _length_sorted_chunks(examples, batch_size):
            batch = _layout([examples[i] for i in chunk], layout, tokenizer.pad_token_id).to(device)
            t = torch.zeros(len(chunk), dtype=scale_dtype, device=device, requires_grad=True)
            # t of each token's example; padding (index -1) gets 0.
            owners = batch.sequence_index
            token_scale = torch.where(owners >= 0, t[owners.clamp(min=0)], torch.zeros((), device=device))
            set_scale(token_scale.unsqueeze(-1))
            logp = sequence_logprobs(model, batch)
            (gradient,) = torch.autograd.grad(logp.sum(), t)
            derivatives[chunk] = gradient.detach().double().cpu()
            logprobs[chunk] = logp.detach().double().cpu()
            advance(len(chunk))
    return derivatives, logprobs


# Scores


def normalise_scores(raw: Mapping[str, float]) -> dict[str, float]:
    """Clip at zero and L1-normalise: max(0, w_i) / sum_j |max(0, w_j)|, dividing by 1 when the sum is 0."""
    clipped = {pair_id: max(0.0, value) for pair_id, value in raw.items()}
    total = sum(abs(value) for value in clipped.values())
    if total == 0:
        total = 1.0
    return {pair_id: value / total for pair_id, value in clipped.items()}


def scale_scores(scores: Mapping[str, float], weight_scaling: Literal["sum", "mean"]) -> dict[str, float]:
    """Weights from normalised scores: 'sum' keeps them, 'mean' multiplies them by their count."""
    factor = float(len(scores)) if weight_scaling == "mean" else 1.0
    return {pair_id: value * factor for pair_id, value in scores.items()}


def _inversion_factor(config: TrainingConfig) -> float:
    """c in <g_J, g_i> = -c (d(y_l) - d(y_w)) for INVERT pairs; see the module docstring."""
    return config.beta / 2.0 if config.inversion_loss == "sigmoid" else 1.0 / config.beta


def raw_impact_scores(
    invert: Sequence[PreferencePair],
    suppress: Sequence[PreferencePair],
    derivatives: Mapping[tuple[str, Side], float],
    config: TrainingConfig,
) -> dict[str, float]:
    """Combine directional derivatives into raw scores (1/gamma) <g_J, g_i>, before clipping.

    `derivatives` maps (pair id, "chosen" or "rejected") to d(y) = <g_J, grad log p(y|x)>. The
    factors are derived in the module docstring: -c (d(y_l) - d(y_w)) for INVERT, with c = beta/2
    for the sigmoid inversion loss and 1/beta for IPO, and (beta/2) (d(y_w) + d(y_l)) for
    SUPPRESS.
    """
    gamma = config.impact.gamma
    inversion_factor = _inversion_factor(config)
    raw = {}
    for pair in invert:
        raw[pair.id] = -inversion_factor * (derivatives[(pair.id, "rejected")] - derivatives[(pair.id, "chosen")]) / gamma
    for pair in suppress:
        raw[pair.id] = (config.beta / 2.0) * (derivatives[(pair.id, "chosen")] + derivatives[(pair.id, "rejected")]) / gamma
    return raw


def conflict_examples(
    tokenizer, conflicts: Sequence[PreferencePair], max_length: int
) -> tuple[list[EncodedExample], list[tuple[str, Side]]]:
    """Encode both responses of every conflict pair, with the (pair id, side) key of each."""
    examples, keys = [], []
    for pair in conflicts:
        messages = pair.messages()
        examples.append(encode_example(tokenizer, messages, pair.chosen, max_length))
        keys.append((pair.id, "chosen"))
        examples.append(encode_example(tokenizer, messages, pair.rejected, max_length))
        keys.append((pair.id, "rejected"))
    return examples, keys


def _reference_logprobs_only(model, tokenizer, examples, batch_size: int, layout: Layout) -> torch.Tensor:
    device = _model_device(model)
    values = torch.zeros(len(examples), dtype=torch.float64)
    with torch.no_grad():
        for chunk in _length_sorted_chunks(examples, batch_size):
            batch = _layout([examples[i] for i in chunk], layout, tokenizer.pad_token_id).to(device)
            values[chunk] = sequence_logprobs(model, batch).double().cpu()
    return values


def compute_impact_scores(
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    verdicts: Mapping[str, Verdict] | Iterable[Verdict],
    config: TrainingConfig,
    *,
    progress: bool = True,
    layout: Layout = "padded",
) -> ImpactResult:
    """Score every INVERT and SUPPRESS pair by its alignment impact, at the starting weights.

    Args:
        model: a peft model whose LoRA adapter is freshly initialised (B = 0). It runs in eval
            mode here, so LoRA dropout is off and the scores are deterministic, and its mode is
            restored afterwards.
        tokenizer: the model's tokenizer; responses are encoded as `logprobs.encode_example`
            does, with `config.max_length`.
        pairs: every pair to train on; RETAIN pairs feed the gold batch only.
        verdicts: a verdict per pair, as a mapping from pair id or an iterable.
        config: beta, gamma, max length, the inversion loss kind, the seed (for the gold batch)
            and `config.impact` (method, gold batch size, batch size, weight scaling, enabled).
        progress: draw progress bars on stderr.
        layout: 'padded' (length-sorted batches, one response per row) or 'packed' (one row
            without padding) for the gold gradient and the directional method.

    Returns:
        The scores, weights, raw values and the reference log-probabilities of both responses of
        every conflict pair (see `ImpactResult`).

    Raises:
        TrainingDataError: no INVERT or SUPPRESS pair, a pair without verdict or with an `error`
            verdict, or an empty gold batch.
        TypeError, ValueError: the model is not a peft model at its starting weights, or (for
            'directional') its adapter is not plain LoRA.
    """
    with _eval_mode(model):
        return _compute_impact_scores(model, tokenizer, pairs, verdicts, config, progress=progress, layout=layout)


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Switch dropout off for the block (LoRA dropout would make scores random), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _compute_impact_scores(model, tokenizer, pairs, verdicts, config: TrainingConfig, *, progress: bool, layout: Layout):
    started = time.perf_counter()
    groups = split_by_category(pairs, verdicts)
    invert, suppress = groups[Category.INVERT], groups[Category.SUPPRESS]
    conflicts = invert + suppress
    if not conflicts:
        raise TrainingDataError(
            f"no INVERT or SUPPRESS pair among {len(pairs)} pairs, so there is nothing to re-align",
            hint="check that the policy's rules fire on this data with `trace triage`",
        )
    _check_fresh_adapter(model)
    impact = config.impact
    examples, keys = conflict_examples(tokenizer, conflicts, config.max_length)

    if not impact.enabled:
        logprobs = _reference_logprobs_only(model, tokenizer, examples, impact.batch_size, layout)
        scores = {pair.id: 1.0 / len(conflicts) for pair in conflicts}
        return ImpactResult(
            scores=scores,
            weights=scale_scores(scores, impact.weight_scaling),
            raw={},
            ref_logprobs={key: float(value) for key, value in zip(keys, logprobs)},
            gold_pair_ids=(),
            method="uniform",
            timings={"gold_gradient": 0.0, "responses": time.perf_counter() - started, "total": time.perf_counter() - started},
        )

    gold = build_gold_batch(pairs, verdicts, impact.gold_batch_size, config.seed)
    if not gold:
        raise TrainingDataError(
            "the gold batch is empty: no RETAIN or INVERT pair provides a compliant response",
            hint="add pairs whose chosen or rejected response complies, or set impact.enabled to false",
        )
    gold_started = time.perf_counter()
    direction = gold_gradient(model, tokenizer, gold, config, layout=layout, progress=progress)
    gold_seconds = time.perf_counter() - gold_started

    responses_started = time.perf_counter()
    if impact.method == "loop":
        derivatives, logprobs = directional_derivatives_loop(model, tokenizer, examples, direction, progress=progress)
    else:
        derivatives, logprobs = directional_derivatives_batched(
            model, tokenizer, examples, direction, batch_size=impact.batch_size, layout=layout, progress=progress
        )
    responses_seconds = time.perf_counter() - responses_started

    derivative_map = {key: float(value) for key, value in zip(keys, derivatives)}
    raw = raw_impact_scores(invert, suppress, derivative_map, config)
    if not all(math.isfinite(value) for value in raw.values()):
        raise ValueError("impact scores are not finite; check the model's dtype and the data for empty responses")

    scores = normalise_scores(raw)
    return ImpactResult(
        scores=scores,
        weights=scale_scores(scores, impact.weight_scaling),
        raw=raw,
        ref_logprobs={key: float(value) for key, value in zip(keys, logprobs)},
        gold_pair_ids=tuple(item.pair_id for item in gold),
        method=impact.method,
        timings={"gold_gradient": gold_seconds, "responses": responses_seconds, "total": time.perf_counter() - started},
    )
