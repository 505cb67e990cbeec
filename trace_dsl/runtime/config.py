"""Settings for the runtime: impact scores, the hybrid objective and training.

Defaults are the TRACE reference settings (arXiv 2511.02623 and its reference code): beta 0.3,
alpha_KL 0.1, gamma 1, learning rate 1e-4 with a cosine schedule and 100 warm-up steps, one
epoch, batch 1 with gradient accumulation 4, LoRA r 32, alpha 16, dropout 0.1 on q_proj and
v_proj, max length 256. The effective configuration is written into every run directory.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Settings):
    """LoRA adapter through peft."""

    r: int = Field(32, ge=1, description="Rank of the LoRA update matrices.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None takes the model alias's default, else q_proj and v_proj."
    )


class ImpactConfig(_Settings):
    """Alignment impact scores: w_i = (1/gamma) <g_J, g_i>, clipped at zero, L1-normalised."""

    enabled: bool = Field(True, description="False gives every conflict pair the same weight (ablation).")
    gold_batch_size: int = Field(64, ge=3, description="Pairs in the gold batch that defines g_J.")
    gamma: float = Field(1.0, gt=0, description="Hessian approximation H = gamma I; cancels after normalisation.")
    method: Literal["directional", "loop"] = Field(
        "directional",
        description="'directional': batched directional derivatives along g_J (no per-sample gradients); "
        "'loop': one backward pass per response, as the reference code.",
    )
    batch_size: int = Field(4, ge=1, description="Responses per forward pass when scoring.")
    weight_scaling: Literal["sum", "mean"] = Field(
        "mean",
        description="'sum': weights sum to 1 over the conflict set, as the method states; "
        "'mean': the same weights times the conflict-set size, so the mean weight is 1 and the "
        "conflict terms keep their scale against alpha_kl.",
    )


class TrainingConfig(_Settings):
    """The hybrid objective and the optimiser loop."""

    # Objective
    beta: float = Field(0.3, gt=0, description="Inverse temperature of the inversion and NPO losses.")
    alpha_kl: float = Field(0.1, ge=0, description="Weight of the KL(p_ref || p_theta) retain term.")
    inversion_loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="'sigmoid': -log sigmoid(beta Delta), as the reference code; 'ipo': (Delta - 1/(2 beta))^2."
    )
    suppress_mode: Literal["npo", "corrected"] = Field(
        "npo",
        description="'npo': dual NPO on both responses; 'corrected': a generator writes a compliant "
        "response trained over the old winner, falling back to NPO when generation fails.",
    )
    generator: str | None = Field(None, description="Model or judge name that writes corrected responses.")

    # Batches
    batching: Literal["mixed", "per-category"] = Field(
        "mixed",
        description="'mixed': one shuffled stream of all categories (reference code); "
        "'per-category': every step samples from each category (the paper's algorithm).",
    )
    per_device_batch_size: int = Field(1, ge=1, description="Pairs per forward pass on one device.")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Forward passes per optimiser step.")
    max_length: int = Field(256, ge=16, description="Maximum tokens of prompt plus response.")

    # Optimiser
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (overrides epochs).")
    seed: int = Field(0, description="Seed for sampling, the held-out split and initialisation.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many optimiser steps.")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="Share of pairs kept out of training for `trace eval`.")

    lora: LoraSettings = Field(default_factory=LoraSettings)
    impact: ImpactConfig = Field(default_factory=ImpactConfig)

    @model_validator(mode="after")
    def _check_conflicts(self) -> "TrainingConfig":
        if self.suppress_mode == "corrected" and not self.generator:
            raise ValueError("suppress_mode 'corrected' needs a generator: set generator to a model name or judge name")
        return self
