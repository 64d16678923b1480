"""The policy loss on hand-computed numbers: PPO clip, AReaL's decoupled objective, k3 KL."""
import math

import pytest
import torch

from himac.learner.loss import kl_k3, policy_loss, token_logprobs


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_ppo_clip_by_hand():
    # token 0: ratio e^0.5 = 1.6487 > 1.2 with A=+1 -> clipped to 1.2
    # token 1: ratio e^-0.5 = 0.6065 < 0.8 with A=+1 -> min picks the unclipped 0.6065
    # token 2: ratio 1 with A=-2 -> -2
    logp, behav, adv, mask = t(0.0, -1.0, -0.3), t(-0.5, -0.5, -0.3), t(1.0, 1.0, -2.0), t(1, 1, 1)
    parts = policy_loss(logp, behav, adv, mask, denom=3, objective="ppo", clip_eps=0.2)
    expected = -(1.2 + math.exp(-0.5) - 2.0) / 3
    assert float(parts.loss) == pytest.approx(expected)
    assert float(parts.clipped) == 1


def test_masked_tokens_take_no_part():
    logp, behav, adv = t(0.0, 5.0), t(0.0, 0.0), t(1.0, 100.0)
    parts = policy_loss(logp, behav, adv, t(1, 0), denom=1, objective="ppo")
    assert float(parts.loss) == pytest.approx(-1.0)


def test_decoupled_gradient_is_behaviour_weighted_policy_gradient():
    # one update per batch: pi_prox = pi_theta, so the ratio is 1 and d loss / d logp = -w * A / denom,
    # with w = pi_prox / pi_behav; tokens with w > cap are dropped (AReaL's behav_imp_weight_cap)
    logp = t(-1.0, -1.0, -1.0).requires_grad_(True)
    behav = t(-1.0, -1.5, -4.0)  # w = 1, e^0.5, e^3 = 20.1 > cap 5
    adv = t(1.0, 1.0, 1.0)
    parts = policy_loss(logp, behav, adv, t(1, 1, 1), denom=3, objective="decoupled", cap=5.0)
    parts.loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1 / 3, -math.exp(0.5) / 3, 0.0])
    assert float(parts.capped) == 1
    assert float(parts.loss) == pytest.approx(-(1 + math.exp(0.5)) / 3)


def test_decoupled_clips_against_the_proximal_policy():
    logp, prox, behav, adv = t(0.0), t(-0.5), t(-0.5), t(1.0)  # ratio to prox e^0.5 -> clipped 1.2; w = 1
    parts = policy_loss(logp, behav, adv, t(1), denom=1, objective="decoupled", prox_logp=prox)
    assert float(parts.loss) == pytest.approx(-1.2)


def test_k3_kl_by_hand_and_in_the_loss():
    logp, ref = t(-1.0, -2.0), t(-1.5, -2.0)
    d = -0.5
    assert kl_k3(logp, ref).tolist() == pytest.approx([math.exp(d) - d - 1, 0.0])
    parts = policy_loss(logp, logp.detach(), t(0.0, 0.0), t(1, 1), denom=2, objective="ppo", ref_logp=ref,
                        kl_beta=0.01)
    assert float(parts.loss) == pytest.approx(0.01 * (math.exp(d) - d - 1) / 2)
    assert float(parts.kl_sum) == pytest.approx(math.exp(d) - d - 1)


def test_token_logprobs_respects_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp1 = token_logprobs(logits, torch.tensor([[0]]), 1.0)
    lp2 = token_logprobs(logits, torch.tensor([[0]]), torch.tensor([2.0]))
    assert float(lp1) == pytest.approx(math.log(math.exp(2) / (math.exp(2) + 1)))
    assert float(lp2) == pytest.approx(math.log(math.exp(1) / (math.exp(1) + 1)))
