"""Each TRACE loss term against a value worked out by hand with `math`, and its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from trace_dsl.runtime.losses import dual_npo_loss, inversion_loss, npo_loss, preference_margin, token_kl


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_preference_margin_value():
    margin = preference_margin(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.5]))
    # (-10 - -11) - (-12 - -11.5) = 1 - (-0.5) = 1.5
    assert margin.item() == pytest.approx(1.5)


def test_inversion_sigmoid_value():
    beta = 0.3
    loss = inversion_loss(
        torch.tensor([-10.0, -20.0]),
        torch.tensor([-12.0, -18.0]),
        torch.tensor([-11.0, -20.0]),
        torch.tensor([-11.5, -20.0]),
        beta,
    )
    # Pair 1: Delta = 1.5, loss = -log sigmoid(0.45). Pair 2: Delta = 0 - 2 = -2.
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(-math.log(_sigmoid(0.3 * 1.5)), rel=1e-6)
    assert loss[1].item() == pytest.approx(-math.log(_sigmoid(0.3 * -2.0)), rel=1e-6)


def test_inversion_sigmoid_at_reference_is_log_two():
    zeros = torch.zeros(3)
    loss = inversion_loss(zeros - 5, zeros - 7, zeros - 5, zeros - 7, beta=0.3)
    assert torch.allclose(loss, torch.full((3,), math.log(2.0)))


def test_inversion_sigmoid_stable_at_large_margin():
    loss = inversion_loss(torch.tensor([0.0]), torch.tensor([5000.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    # -log sigmoid(-5000) = 5000 + log(1 + e^-5000), which is 5000 in float32.
    assert torch.isfinite(loss).all()
    assert loss.item() == pytest.approx(5000.0)


def test_inversion_ipo_value():
    beta = 0.3
    loss = inversion_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.5]), beta, kind="ipo"
    )
    # (Delta - 1/(2 beta))^2 = (1.5 - 1/0.6)^2
    assert loss.item() == pytest.approx((1.5 - 1 / 0.6) ** 2, rel=1e-6)


def test_inversion_unknown_kind_raises():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown inversion loss kind"):
        inversion_loss(x, x, x, x, beta=0.3, kind="hinge")


def test_npo_value():
    beta = 0.3
    loss = npo_loss(torch.tensor([-8.0, -14.0]), torch.tensor([-10.0, -10.0]), beta)
    # Log-ratio +2 and -4: -log sigmoid(-0.6) and -log sigmoid(1.2).
    assert loss[0].item() == pytest.approx(-math.log(_sigmoid(-0.6)), rel=1e-6)
    assert loss[1].item() == pytest.approx(-math.log(_sigmoid(1.2)), rel=1e-6)


def test_dual_npo_sums_both_responses():
    beta = 0.3
    loss = dual_npo_loss(torch.tensor([-8.0]), torch.tensor([-10.0]), torch.tensor([-14.0]), torch.tensor([-10.0]), beta)
    expected = -math.log(_sigmoid(-0.6)) - math.log(_sigmoid(1.2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_token_kl_value():
    # One example, two response tokens, vocabulary of 2, and one padded position.
    reference_logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    policy_logits = torch.tensor([[[math.log(4.0), 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # Token 1: p_ref = (1/2, 1/2), p_theta = (4/5, 1/5). Token 2: p_ref = (3/4, 1/4), p_theta = (1/2, 1/2).
    kl_first = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    kl_second = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss = token_kl(reference_logits, policy_logits, mask)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx((kl_first + kl_second) / 2, rel=1e-6)


def test_token_kl_zero_when_equal_and_empty():
    logits = torch.randn(2, 4, 7)
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])
    loss = token_kl(logits, logits.clone(), mask)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-6)


def test_token_kl_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))


def test_inversion_gradient_at_reference():
    # At theta = theta_ref, d/d(pi_w) of -log sigmoid(beta Delta) is -beta/2 and d/d(pi_l) is +beta/2.
    beta = 0.3
    policy_chosen = torch.tensor([-5.0], requires_grad=True)
    policy_rejected = torch.tensor([-7.0], requires_grad=True)
    loss = inversion_loss(policy_chosen, policy_rejected, torch.tensor([-5.0]), torch.tensor([-7.0]), beta)
    loss.sum().backward()
    assert policy_chosen.grad.item() == pytest.approx(-beta / 2)
    assert policy_rejected.grad.item() == pytest.approx(beta / 2)


def test_ipo_gradient_at_reference():
    # d/dDelta of (Delta - 1/(2 beta))^2 at Delta = 0 is -1/beta.
    beta = 0.3
    policy_chosen = torch.tensor([-5.0], requires_grad=True)
    loss = inversion_loss(policy_chosen, torch.tensor([-7.0]), torch.tensor([-5.0]), torch.tensor([-7.0]), beta, kind="ipo")
    loss.sum().backward()
    assert policy_chosen.grad.item() == pytest.approx(-1 / beta)


def test_dual_npo_gradient_at_reference():
    # d/d(pi) of -log sigmoid(-beta (pi - ref)) = beta * sigmoid(beta (pi - ref)), beta/2 at pi = ref.
    beta = 0.3
    policy_chosen = torch.tensor([-5.0], requires_grad=True)
    policy_rejected = torch.tensor([-9.0], requires_grad=True)
    loss = dual_npo_loss(policy_chosen, torch.tensor([-5.0]), policy_rejected, torch.tensor([-7.0]), beta)
    loss.sum().backward()
    assert policy_chosen.grad.item() == pytest.approx(beta / 2)
    assert policy_rejected.grad.item() == pytest.approx(beta * _sigmoid(beta * -2.0))


def test_token_kl_gradient_matches_softmax_difference():
    # d KL(p_ref || softmax(z)) / dz = softmax(z) - p_ref for the one token in the mask.
    reference_logits = torch.tensor([[[1.0, 0.0, -1.0]]])
    policy_logits = torch.tensor([[[0.0, 0.5, 0.0]]], requires_grad=True)
    loss = token_kl(reference_logits, policy_logits, torch.tensor([[True]]))
    loss.sum().backward()
    expected = torch.softmax(policy_logits.detach(), -1) - torch.softmax(reference_logits, -1)
    assert torch.allclose(policy_logits.grad, expected, atol=1e-6)


def test_token_kl_masked_positions_get_no_gradient():
    policy_logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = token_kl(torch.randn(1, 3, 5), policy_logits, torch.tensor([[True, False, True]]))
    loss.sum().backward()
    assert torch.count_nonzero(policy_logits.grad[0, 1]) == 0
    assert torch.count_nonzero(policy_logits.grad[0, 0]) > 0
