"""The hybrid TRACE trainer: one `transformers.Trainer` subclass with its own loss, data and sampler.

The objective is stage 3 of "The Realignment Problem: When Right becomes Wrong in LLMs"
(arXiv 2511.02623). With sequence log-probabilities summed over response tokens and
Delta(x, a, b) = [log p_theta(a|x) - log p_ref(a|x)] - [log p_theta(b|x) - log p_ref(b|x)]:

- INVERT pairs, the inversion loss on the flipped pair (the old rejected response is the winner):
  the paper's inversion term, which its algorithm and reference code write in the DPO sigmoid
  form -log sigmoid(beta * Delta(x, y_l, y_w)) (`inversion_loss='sigmoid'`), or the IPO form
  (Delta - 1/(2 beta))^2 that the paper's text names (`'ipo'`);
- SUPPRESS pairs, the paper's dual NPO term
  -log sigmoid(-beta * log(p_theta(y_w|x)/p_ref(y_w|x))) - the same for y_l, without a 2/beta
  factor as in the reference code; with `suppress_mode='corrected'`, the inversion loss of a
  generated compliant response over the old winner instead, and dual NPO for a pair whose
  generation failed;
- RETAIN pairs, the paper's KL anchor: token-level forward KL(p_ref || p_theta) over the full
  vocabulary on the chosen response's tokens, averaged over those tokens, times alpha_KL;
- the total L = sum_I w_i l_inv + sum_S w_j l_npo + alpha_KL L_KL, with w the alignment impact
  scores (RETAIN terms are not weighted).

The reference model is the base model with the LoRA adapter disabled (peft `disable_adapter()`),
never a second copy in memory. Reference log-probabilities of every sequence a term compares are
computed once before training; only the KL term needs reference logits at each step, from one
extra forward pass over the RETAIN sequences with the adapter disabled.

Gradient accumulation, seeding, the learning-rate schedule with warm-up, checkpoints, resume and
multi-process training under `accelerate launch` all come from `transformers.Trainer`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from trace_dsl.runtime import logprobs as lp
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.runtime.losses import dual_npo_loss, inversion_loss, token_kl
from trace_dsl.runtime.reference import reference_logprobs, reference_response_logits
from trace_dsl.runtime.rundir import append_jsonl
from trace_dsl.triage.verdict import Category

Objective = Literal["inversion", "npo", "kl"]
_OBJECTIVE_CODES: dict[str, int] = {"inversion": 0, "npo": 1, "kl": 2}
_CATEGORY_CODES: dict[Category, int] = {Category.INVERT: 0, Category.SUPPRESS: 1, Category.RETAIN: 2}

# Names of the logged loss terms: each is the term's weighted contribution to `loss/total`.
TERM_NAMES = ("loss/inversion", "loss/npo", "loss/kl", "loss/total")


@dataclass(frozen=True)
class TrainingItem:
    """One triaged pair as the hybrid objective trains it.

    Attributes:
        pair_id: the pair's id.
        category: invert, suppress or retain (the triage verdict).
        objective: 'inversion' (first preferred over second), 'npo' (push both down) or
            'kl' (anchor the first to the reference).
        messages: the conversation up to the response.
        first: inversion: the winner; npo: the old chosen response; kl: the chosen response.
        second: inversion: the loser; npo: the old rejected response; kl: None.
        weight: the impact weight of a conflict pair (1 for RETAIN, whose term is unweighted).
        ref_first: reference log-probability of `first`, None until computed.
        ref_second: reference log-probability of `second`, None until computed or for kl.
    """

    pair_id: str
    category: Category
    objective: Objective
    messages: tuple[Mapping[str, str], ...]
    first: str
    second: str | None
    weight: float = 1.0
    ref_first: float | None = None
    ref_second: float | None = None

    def sequences(self) -> list[str]:
        """Return the responses whose log-probabilities the objective needs, in order."""
        return [self.first] if self.second is None else [self.first, self.second]


def build_training_items(
    pairs: Sequence[Any],
    categories: Mapping[str, Category],
    weights: Mapping[str, float],
    *,
    ref_logprobs: Mapping[tuple[str, str], float] | None = None,
    corrected: Mapping[str, str | None] | None = None,
) -> list[TrainingItem]:
    """Turn triaged pairs into training items, in the order of `pairs`.

    Args:
        pairs: the training pairs (`PreferencePair`).
        categories: the triage category of each pair id; pairs in `error` must be removed first.
        weights: the impact weight of each conflict pair id (already scaled); a conflict pair
            without one gets 1.0.
        ref_logprobs: known reference log-probabilities keyed by (pair id, 'chosen' or
            'rejected'), as `ImpactResult.ref_logprobs`; the others are computed later.
        corrected: for `suppress_mode='corrected'`: the generated compliant response of each
            SUPPRESS pair, or None where generation failed (that pair falls back to dual NPO).
    """
    ref_logprobs = ref_logprobs or {}
    items = []
    for pair in pairs:
        category = categories[pair.id]
        ref_chosen = ref_logprobs.get((pair.id, "chosen"))
        ref_rejected = ref_logprobs.get((pair.id, "rejected"))
        messages = tuple(pair.messages())
        weight = float(weights.get(pair.id, 1.0))
        if category is Category.INVERT:
            # The flipped pair: the old rejected response is the new winner.
            item = TrainingItem(pair.id, category, "inversion", messages, pair.rejected, pair.chosen, weight, ref_rejected, ref_chosen)
        elif category is Category.SUPPRESS:
            generated = corrected.get(pair.id) if corrected is not None else None
            if generated:
                item = TrainingItem(pair.id, category, "inversion", messages, generated, pair.chosen, weight, None, ref_chosen)
            else:
                item = TrainingItem(pair.id, category, "npo", messages, pair.chosen, pair.rejected, weight, ref_chosen, ref_rejected)
        elif category is Category.RETAIN:
            item = TrainingItem(pair.id, category, "kl", messages, pair.chosen, None, 1.0, ref_chosen, None)
        else:
            raise ValueError(f"pair {pair.id} has category {category.value!r}, which cannot be trained on")
        items.append(item)
    return items


def scale_weights(scores: Mapping[str, float], config: TrainingConfig) -> dict[str, float]:
    """Turn L1-normalised impact scores into the weights of the loss, as the configuration sets.

    With impact weights disabled every conflict pair weighs the same. `weight_scaling='sum'`
    keeps weights summing to 1 over the conflict set; 'mean' multiplies them by the conflict-set
    size, so the mean weight is 1 and the conflict terms keep their scale against alpha_kl.
    """
    from trace_dsl.runtime.impact import scale_scores

    if not scores:
        return {}
    if not config.impact.enabled:
        scores = {pair_id: 1.0 / len(scores) for pair_id in scores}
    return scale_scores(scores, config.impact.weight_scaling)


# --- Reference log-probabilities, computed once ----------------------------------------------


def fill_reference_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[TrainingItem],
    *,
    max_length: int,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[TrainingItem]:
    """Compute the missing reference log-probabilities of the conflict items, with the adapter disabled.

    Items whose reference values are already known (from the impact scores) are not recomputed,
    and RETAIN items get none, because the KL term uses reference logits at each step.
    Returns new items; `progress` is called with the number of sequences done after each batch.
    """
    missing: list[tuple[int, int, str]] = []
    for index, item in enumerate(items):
        # The KL term compares logits at each step; it needs no reference log-probability.
        if item.objective == "kl":
            continue
        if item.ref_first is None:
            missing.append((index, 0, item.first))
        if item.second is not None and item.ref_second is None:
            missing.append((index, 1, item.second))
    values: dict[tuple[int, int], float] = {}
    device = _model_device(model)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        batch = lp.encode_and_collate(tokenizer, [(items[i].messages, text) for i, _, text in chunk], max_length)
        scores = reference_logprobs(model, batch.to(device))
        for (index, slot, _), score in zip(chunk, scores.tolist()):
            values[(index, slot)] = score
        if progress is not None:
            progress(len(chunk))
    filled = []
    for index, item in enumerate(items):
        updates = {}
        if (index, 0) in values:
            updates["ref_first"] = values[(index, 0)]
        if (index, 1) in values:
            updates["ref_second"] = values[(index, 1)]
        filled.append(replace(item, **updates) if updates else item)
    return filled


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- Dataset, collator and samplers ----------------------------------------------------------


class EncodedItems(Dataset):
    """Training items with their responses tokenised once (chat template, truncation)."""

    def __init__(self, items: Sequence[TrainingItem], tokenizer: Any, *, max_length: int) -> None:
        missing = [item.pair_id for item in items if item.objective != "kl" and (item.ref_first is None or item.ref_second is None)]
        if missing:
            raise ValueError(f"{len(missing)} items lack reference log-probabilities (first: {missing[0]}); call fill_reference_logprobs first")
        self.items = list(items)
        self._encoded = [
            [lp.encode_example(tokenizer, item.messages, text, max_length) for text in item.sequences()]
            for item in self.items
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {
            "index": index,
            "objective": _OBJECTIVE_CODES[item.objective],
            "weight": item.weight,
            "reference": (item.ref_first or 0.0, item.ref_second or 0.0),
            "sequences": self._encoded[index],
        }

    def category_indices(self) -> dict[Category, list[int]]:
        """Item indices per category, each in dataset order."""
        groups: dict[Category, list[int]] = {}
        for index, item in enumerate(self.items):
            groups.setdefault(item.category, []).append(index)
        return groups


class HybridCollator:
    """Pad a batch of items into two token batches: conflict pairs and RETAIN responses.

    Conflict items (objective inversion or npo) put their two responses at rows 2k and 2k + 1
    of the `conflict_*` batch, with `conflict_objective`, `conflict_weight` and
    `conflict_reference` (one row per item). RETAIN items put their chosen response in the
    `retain_*` batch. `batch_items` is the number of items. Keeping the two kinds apart means no
    sequence runs through the model twice with gradients: the conflict terms need only
    log-probabilities, the KL term needs full-vocabulary logits.
    """

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        conflict = [f for f in features if f["objective"] != _OBJECTIVE_CODES["kl"]]
        retain = [f for f in features if f["objective"] == _OBJECTIVE_CODES["kl"]]
        batch: dict[str, torch.Tensor] = {"batch_items": torch.tensor(len(features))}
        if conflict:
            encoded = [sequence for f in conflict for sequence in f["sequences"]]
            batch.update(_flatten("conflict", lp.collate(encoded, self.pad_token_id)))
            batch["conflict_objective"] = torch.tensor([f["objective"] for f in conflict], dtype=torch.long)
            batch["conflict_weight"] = torch.tensor([f["weight"] for f in conflict], dtype=torch.float32)
            batch["conflict_reference"] = torch.tensor([list(f["reference"]) for f in conflict], dtype=torch.float32)
        if retain:
            batch.update(_flatten("retain", lp.collate([f["sequences"][0] for f in retain], self.pad_token_id)))
        return batch


_TOKEN_BATCH_FIELDS = ("input_ids", "position_ids", "labels", "sequence_index", "attention_mask")


def _flatten(prefix: str, batch: lp.TokenBatch) -> dict[str, torch.Tensor]:
    """Flatten a `TokenBatch` into prefixed tensors, which `Trainer` moves to the device."""
    flat = {f"{prefix}_{name}": getattr(batch, name) for name in _TOKEN_BATCH_FIELDS if getattr(batch, name) is not None}
    flat[f"{prefix}_num_sequences"] = torch.tensor(batch.num_sequences)
    return flat


def _unflatten(prefix: str, inputs: Mapping[str, torch.Tensor]) -> lp.TokenBatch | None:
    """Return the `TokenBatch` stored under `prefix`, or None when the batch has none."""
    if f"{prefix}_input_ids" not in inputs:
        return None
    return lp.TokenBatch(
        input_ids=inputs[f"{prefix}_input_ids"],
        position_ids=inputs[f"{prefix}_position_ids"],
        labels=inputs[f"{prefix}_labels"],
        sequence_index=inputs[f"{prefix}_sequence_index"],
        attention_mask=inputs.get(f"{prefix}_attention_mask"),
        num_sequences=int(inputs[f"{prefix}_num_sequences"]),
    )


class SeededShuffleSampler(Sampler[int]):
    """One shuffled stream of every item, reshuffled each epoch from `seed + epoch`.

    The order depends only on the seed and the epoch, so resuming from a checkpoint replays the
    same order and `Trainer` can skip the batches already seen.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class PerCategorySampler(Sampler[int]):
    """Sampler whose indices put `per_category` items of each category into every batch.

    This is the paper's algorithm (a batch from each category per step), so the data loader's
    batch size must be `per_category` times the number of categories. An epoch is as long as
    the largest category needs; smaller categories are reshuffled and cycled. Seeded per epoch,
    like `SeededShuffleSampler`.
    """

    def __init__(self, groups: Mapping[Category, Sequence[int]], per_category: int, seed: int) -> None:
        self.groups = [list(groups[category]) for category in sorted(groups, key=lambda c: _CATEGORY_CODES[c]) if groups[category]]
        if not self.groups:
            raise ValueError("no items to sample from")
        self.per_category = per_category
        self.seed = seed
        self.epoch = 0
        self.batches = max(math.ceil(len(group) / per_category) for group in self.groups)

    @property
    def batch_size(self) -> int:
        """Items per batch: `per_category` from each non-empty category."""
        return self.per_category * len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        streams = []
        needed = self.batches * self.per_category
        for group in self.groups:
            stream: list[int] = []
            while len(stream) < needed:
                stream.extend(group[i] for i in torch.randperm(len(group), generator=generator).tolist())
            streams.append(stream[:needed])
        order = []
        for batch in range(self.batches):
            for stream in streams:
                order.extend(stream[batch * self.per_category : (batch + 1) * self.per_category])
        return iter(order)


# --- The loss ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossTerms:
    """The loss of one batch and its parts; `total` carries the gradient.

    Attributes:
        total: inversion + npo + kl, the value to minimise.
        inversion: weighted inversion losses, divided by the batch divisor.
        npo: weighted dual NPO losses, divided by the batch divisor.
        kl: alpha_kl times the token KL, divided by the batch divisor.
        kl_raw: mean token KL over the RETAIN items of the batch (0 when there is none).
    """

    total: torch.Tensor
    inversion: torch.Tensor
    npo: torch.Tensor
    kl: torch.Tensor
    kl_raw: torch.Tensor


def hybrid_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], config: TrainingConfig) -> LossTerms:
    """Compute the hybrid objective of one collated batch (see the module docstring).

    One forward pass with the adapter gives the log-probabilities of the conflict responses.
    Another gives the policy logits of the RETAIN responses, and a third, without gradients and
    with the adapter disabled, their reference logits. The weighted terms are summed over the
    items and divided by the number of items in the batch (`batching='mixed'`) or by the items
    per category (`'per-category'`), so that each category adds its own batch mean, as the
    paper's algorithm does.
    """
    conflict = _unflatten("conflict", batch)
    retain = _unflatten("retain", batch)
    device = batch["batch_items"].device
    zero = torch.zeros((), device=device)
    inversion_sum, npo_sum, kl_sum, kl_raw = zero, zero, zero, zero

    if conflict is not None:
        logps = lp.sequence_logprobs(model, conflict)
        first, second = logps[0::2], logps[1::2]
        objective = batch["conflict_objective"]
        weight = batch["conflict_weight"]
        reference = batch["conflict_reference"]

        inversion_rows = objective == _OBJECTIVE_CODES["inversion"]
        if inversion_rows.any():
            losses = inversion_loss(
                first[inversion_rows],
                second[inversion_rows],
                reference[inversion_rows, 0],
                reference[inversion_rows, 1],
                config.beta,
                config.inversion_loss,
            )
            inversion_sum = (weight[inversion_rows] * losses).sum()

        npo_rows = objective == _OBJECTIVE_CODES["npo"]
        if npo_rows.any():
            losses = dual_npo_loss(
                first[npo_rows], reference[npo_rows, 0], second[npo_rows], reference[npo_rows, 1], config.beta
            )
            npo_sum = (weight[npo_rows] * losses).sum()

    if retain is not None:
        policy = lp.response_token_logits(model, retain)
        # Under `accelerate launch` the model is wrapped (DistributedDataParallel); the adapter
        # switch lives on the peft model inside.
        reference = reference_response_logits(getattr(model, "module", model), retain)
        per_item = token_kl(reference.logits, policy.logits, policy.mask)
        kl_sum = per_item.sum()
        kl_raw = per_item.detach().mean()

    if config.batching == "per-category":
        divisor = float(config.per_device_batch_size)
    else:
        divisor = float(batch["batch_items"])
    inversion_term = inversion_sum / divisor
    npo_term = npo_sum / divisor
    kl_term = config.alpha_kl * kl_sum / divisor
    return LossTerms(inversion_term + npo_term + kl_term, inversion_term, npo_term, kl_term, kl_raw)


# --- The trainer ------------------------------------------------------------------------------


class HybridTrainer(Trainer):
    """`transformers.Trainer` with the hybrid TRACE objective, its collator and its sampler.

    Everything else (optimiser, schedule, gradient accumulation, checkpoints, resume,
    distributed training) is the library's. Each logged step adds the loss terms
    `loss/inversion`, `loss/npo`, `loss/kl`, `loss/total` and `kl` (the unweighted mean KL),
    averaged over the micro-batches since the previous log and over processes.
    """

    def __init__(self, *args: Any, trace_config: TrainingConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trace_config = trace_config
        # The loss is a mean per micro-batch, so the library's division by the accumulation
        # steps gives the mean over the optimiser step.
        self.model_accepts_loss_kwargs = False
        self._term_sums = torch.zeros(5, dtype=torch.float64)
        self._term_count = 0

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler[int]:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.trace_config.batching == "per-category":
            return PerCategorySampler(dataset.category_indices(), self.trace_config.per_device_batch_size, self.args.seed)
        return SeededShuffleSampler(len(dataset), self.args.seed)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = hybrid_loss(model, inputs, self.trace_config)
        values = torch.stack([terms.inversion, terms.npo, terms.kl, terms.total, terms.kl_raw]).detach()
        self._term_sums += values.to(device="cpu", dtype=torch.float64)
        self._term_count += 1
        if return_outputs:
            return terms.total, {"inversion": terms.inversion, "npo": terms.npo, "kl": terms.kl}
        return terms.total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            means = self._term_sums / self._term_count
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean").cpu()
            for name, value in zip(TERM_NAMES + ("kl",), means.tolist()):
                logs[name] = value
            self._term_sums.zero_()
            self._term_count = 0
        super().log(logs, start_time)


# --- Callbacks: metrics file and progress bar -------------------------------------------------


class MetricsFileCallback(TrainerCallback):
    """Append every training log row (one per optimiser step) to `metrics.jsonl`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_time = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 (Trainer callback signature)
        if not state.is_world_process_zero or not logs or "loss/total" not in logs:
            return
        now = time.perf_counter()
        row = {"step": state.global_step, "epoch": logs.get("epoch"), "learning_rate": logs.get("learning_rate")}
        row.update({name: logs[name] for name in TERM_NAMES + ("kl",) if name in logs})
        row["grad_norm"] = logs.get("grad_norm")
        row["step_seconds"] = round(now - self._last_time, 4)
        self._last_time = now
        append_jsonl(self.path, row)


class RichProgressCallback(TrainerCallback):
    """A rich progress bar on stderr over optimiser steps, showing the loss of each term."""

    def __init__(self, console: Any = None) -> None:
        self.console = console
        self._progress = None
        self._task = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[terms]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=state.max_steps, completed=state.global_step, terms="")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self._progress is not None and logs and "loss/total" in logs:
            terms = " ".join(f"{name.split('/')[1]} {logs[name]:.4f}" for name in TERM_NAMES)
            self._progress.update(self._task, terms=terms)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# --- Building a trainer -----------------------------------------------------------------------


def training_arguments(config: TrainingConfig, output_dir: Path, *, n_categories: int = 3, report_to: str = "none") -> TrainingArguments:
    """Build the `TrainingArguments` for a hybrid run from the TRACE configuration.

    In per-category batching the data loader's batch contains `per_device_batch_size` items of
    each of `n_categories` categories.
    """
    batch_size = config.per_device_batch_size
    if config.batching == "per-category":
        batch_size *= max(1, n_categories)
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        seed=config.seed,
        data_seed=config.seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to=report_to,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: EncodedItems,
    config: TrainingConfig,
    output_dir: Path,
    *,
    metrics_path: Path | None = None,
    progress: bool = True,
    console: Any = None,
) -> HybridTrainer:
    """Build a `HybridTrainer` over an encoded dataset; checkpoints go under `output_dir`.

    `metrics_path` receives one JSON row per optimiser step; `progress` draws a rich bar on
    `console` (stderr by default).
    """
    n_categories = len([group for group in dataset.category_indices().values() if group])
    args = training_arguments(config, output_dir, n_categories=n_categories)
    callbacks: list[TrainerCallback] = []
    if metrics_path is not None:
        callbacks.append(MetricsFileCallback(metrics_path))
    if progress:
        callbacks.append(RichProgressCallback(console))
    trainer = HybridTrainer(
        model=model,
        args=args,
        data_collator=HybridCollator(tokenizer.pad_token_id),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        trace_config=config,
    )
    # Results belong on stdout and progress on stderr: drop the library's printers.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def optimiser_steps(config: TrainingConfig, dataset: EncodedItems, *, processes: int = 1) -> int:
    """The number of optimiser steps `Trainer` will run for this dataset and configuration."""
    if config.max_steps is not None:
        return config.max_steps
    groups = [group for group in dataset.category_indices().values() if group]
    if config.batching == "per-category":
        batches = max(math.ceil(len(group) / config.per_device_batch_size) for group in groups)
    else:
        batches = math.ceil(len(dataset) / config.per_device_batch_size)
    batches = math.ceil(batches / processes)
    per_epoch = max(1, batches // config.gradient_accumulation_steps)
    return math.ceil(per_epoch * config.epochs)
