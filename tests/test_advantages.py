"""Advantage maths against numbers computed by hand."""
import numpy as np
import pytest

from himac.learner.advantages import anchor_step_advantages, discounted_returns, group_advantages


def test_grpo_mean_std_by_hand():
    # R = [1, 0, 0, 1]: mean 0.5, population std 0.5 -> A = +-0.5 / (0.5 + 1e-6)
    g = group_advantages([1, 0, 0, 1], "mean_std", 1e-6)
    a = 0.5 / (0.5 + 1e-6)
    assert g.advantages == pytest.approx([a, -a, -a, a], abs=1e-12)
    assert not g.degenerate
    # R = [3, 1, 2]: mean 2, std sqrt(2/3)
    g = group_advantages([3, 1, 2], "mean_std", 0.0)
    s = np.sqrt(2 / 3)
    assert g.advantages == pytest.approx([1 / s, -1 / s, 0.0])


def test_mean_only_normalisation():
    g = group_advantages([10.5, -1.5, -1.5, 4.5], "mean")
    assert g.advantages == pytest.approx([7.5, -4.5, -4.5, 1.5])


def test_all_equal_and_single_groups_are_zero_and_counted():
    for returns in ([2.0, 2.0, 2.0], [-1.5] * 8, [7.0]):
        g = group_advantages(returns)
        assert g.degenerate
        assert np.all(g.advantages == 0.0)
    assert group_advantages([]).degenerate


def test_macro_group_one_advantage_per_blueprint():
    # G = 4 blueprints of one task; returns of their executions (e.g. Sokoban: solved 10.6, failed -1.5)
    g = group_advantages([10.6, -1.5, -1.5, -1.5])
    m, s = np.mean([10.6, -1.5, -1.5, -1.5]), np.std([10.6, -1.5, -1.5, -1.5])
    assert g.advantages[0] == pytest.approx((10.6 - m) / (s + 1e-6))
    assert g.advantages[1:] == pytest.approx([(-1.5 - m) / (s + 1e-6)] * 3)
    assert g.advantages.sum() == pytest.approx(0.0, abs=1e-9)


def test_discounted_returns_by_hand():
    assert discounted_returns([1, 0, 2], 0.5) == pytest.approx([1 + 0.5 * (0 + 0.5 * 2), 0 + 0.5 * 2, 2])


def test_gigpo_anchor_states_by_hand():
    # two episodes; both start in state 7; episode 0 then visits 8, episode 1 revisits 7 then 9
    rewards = [[0.0, 1.0], [0.0, 0.0, 0.0]]
    states = [[7, 8], [7, 7, 9]]
    gamma = 0.5
    out = anchor_step_advantages(rewards, states, gamma=gamma, norm="mean")
    # returns-to-go: ep0 = [0.5, 1.0]; ep1 = [0, 0, 0]
    # anchor 7 holds ep0 t0 (0.5), ep1 t0 (0), ep1 t1 (0): mean 1/6
    assert out.per_episode[0] == pytest.approx([0.5 - 1 / 6, 0.0])  # state 8 seen once -> 0
    assert out.per_episode[1] == pytest.approx([-1 / 6, -1 / 6, 0.0])  # state 9 seen once -> 0
    assert out.anchor_groups == 1 and out.degenerate_groups == 0


def test_gigpo_equal_returns_in_an_anchor_group():
    out = anchor_step_advantages([[1.0], [1.0]], [[3], [3]], gamma=0.95, norm="mean_std")
    assert out.anchor_groups == 1 and out.degenerate_groups == 1
    assert out.per_episode[0] == pytest.approx([0.0]) and out.per_episode[1] == pytest.approx([0.0])


def test_gigpo_rejects_misaligned_inputs():
    with pytest.raises(ValueError):
        anchor_step_advantages([[1.0, 2.0]], [[1]])
