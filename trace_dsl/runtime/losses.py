"""The loss terms of TRACE's hybrid objective, as pure tensor functions.

The objective is from "The Realignment Problem: When Right becomes Wrong in LLMs" (Sen Sharma
et al., arXiv 2511.02623), stage 3:

    L = sum_{i in INVERT} w_i * l_inv + sum_{j in SUPPRESS} w_j * l_npo + alpha_KL * L_KL

Every function takes summed sequence log-probabilities (from `logprobs.sequence_logprobs`) or
logits, and returns one loss per example, so the trainer applies the impact weights and the
reduction. No function here touches a model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def preference_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> torch.Tensor:
    """Delta = [log p_theta(a|x) - log p_ref(a|x)] - [log p_theta(b|x) - log p_ref(b|x)].

    The difference of implicit rewards (log-ratios to the reference model) of the preferred
    response a and the dispreferred response b, as in DPO and in the TRACE objective.
    """
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def inversion_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    kind: Literal["sigmoid", "ipo"] = "sigmoid",
) -> torch.Tensor:
    """Inversion loss on INVERT pairs, one value per pair, shape [pairs].

    For an INVERT pair the new preferred response is the old rejected one, so callers pass the
    flipped pair: `policy_chosen` is log p_theta(y_l|x), `policy_rejected` is log p_theta(y_w|x),
    and the same for the reference. With Delta from `preference_margin`:

    - ``"sigmoid"``: -log sigmoid(beta * Delta). This is the form TRACE's algorithm and reference
      code use (arXiv 2511.02623, stage 3; the paper's text calls it IPO), the DPO loss of
      Rafailov et al. 2023. Computed with `logsigmoid` so large margins do not overflow.
    - ``"ipo"``: (Delta - 1/(2 beta))^2, the IPO loss of Azar et al. 2023, "A General Theoretical
      Paradigm to Understand Learning from Human Preferences" (arXiv 2310.12036), which pulls
      the margin toward 1/(2 beta) instead of pushing it without bound.

    Raises:
        ValueError: `kind` is neither "sigmoid" nor "ipo", or `beta` is not positive.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    delta = preference_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if kind == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown inversion loss kind {kind!r}: expected 'sigmoid' or 'ipo'")


def npo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO loss of one response, shape [examples]: -log sigmoid(-beta * (log p_theta - log p_ref)).

    Negative Preference Optimization, Zhang et al. 2024, "Negative Preference Optimization: From
    Catastrophic Collapse to Effective Unlearning" (arXiv 2404.05868), without its 2/beta
    factor, as TRACE's reference code uses it. The loss is log(2) at the reference model and
    falls toward zero as the response's log-probability drops below the reference's, with a
    gradient that fades as it does, unlike plain gradient ascent.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return -F.logsigmoid(-beta * (policy - reference))


def dual_npo_loss(
    policy_chosen: torch.Tensor,
    reference_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Suppression loss on SUPPRESS pairs, shape [pairs]: NPO on both responses, summed.

    -log sigmoid(-beta * log(p_theta(y_w|x) / p_ref(y_w|x))) - log sigmoid(-beta * log(p_theta(y_l|x) / p_ref(y_l|x))),
    the "dual NPO" term of TRACE (arXiv 2511.02623, stage 3), which pushes both the old chosen
    and the old rejected response down since neither complies with the new policy. There is no
    2/beta factor, as in TRACE's reference code.
    """
    return npo_loss(policy_chosen, reference_chosen, beta) + npo_loss(policy_rejected, reference_rejected, beta)


def token_kl(reference_logits: torch.Tensor, policy_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain term on RETAIN pairs: mean token-level forward KL(p_ref || p_theta), shape [examples].

    For each response token t, KL over the full vocabulary:
    sum_v p_ref(v|x, y_<t) * (log p_ref(v|x, y_<t) - log p_theta(v|x, y_<t)), then averaged over
    the response's tokens (TRACE, arXiv 2511.02623, stage 3: the retain term on the chosen
    response of RETAIN pairs). An example with no response tokens gets 0.

    Args:
        reference_logits: [examples, tokens, vocabulary] logits of the reference model.
        policy_logits: the same positions under the policy being trained.
        mask: [examples, tokens], True at real response tokens (`ResponseLogits.mask`).
    """
    if reference_logits.shape != policy_logits.shape:
        raise ValueError(
            f"reference and policy logits differ in shape: {tuple(reference_logits.shape)} vs {tuple(policy_logits.shape)}"
        )
    reference_logp = F.log_softmax(reference_logits.float(), dim=-1)
    policy_logp = F.log_softmax(policy_logits.float(), dim=-1)
    # kl_div(input, target, log_target=True) is exp(target) * (target - input), elementwise.
    per_token = F.kl_div(policy_logp, reference_logp, reduction="none", log_target=True).sum(dim=-1)

    mask = mask.to(per_token.dtype)
    counts = mask.sum(dim=-1)
    return (per_token * mask).sum(dim=-1) / counts.clamp(min=1)
