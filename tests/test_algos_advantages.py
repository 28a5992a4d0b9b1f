"""Advantages against hand-computed values: GRPO, absolute, dynamic sampling, GAE."""

import math

import pytest
import torch

from trainer.algos import (
    absolute_advantages,
    critic_diagnostics,
    dynamic_sampling_mask,
    gae,
    grpo_advantages,
    mean_std_from_sums,
    moment_sums,
    normalize_advantages,
)


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- GRPO


def test_grpo_one_group_population_std_gives_plus_minus_one():
    # rewards [1, 0, 0, 1]: mean 0.5; population std = sqrt(mean((±0.5)^2)) = 0.5 -> (±0.5) / 0.5 = ±1.
    # (the unbiased std sqrt(1/3) = 0.577 would give ±0.866 instead.)
    advantages = grpo_advantages(t([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]), eps=0.0)
    torch.testing.assert_close(advantages, t([1.0, -1.0, -1.0, 1.0]))


def test_grpo_default_eps_is_added_to_std():
    # 0.5 / (0.5 + 1e-6) = 0.999998
    advantages = grpo_advantages(t([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]))
    expected = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(advantages, t([expected, -expected, -expected, expected]))


def test_grpo_skewed_group():
    # rewards [1, 1, 1, 0]: mean 0.75, var = (3 * 0.0625 + 0.5625) / 4 = 0.1875, std = 0.4330127
    # successes: 0.25 / 0.4330127 = 0.5773503, failure: -0.75 / 0.4330127 = -1.7320508
    advantages = grpo_advantages(t([1.0, 1.0, 1.0, 0.0]), torch.tensor([5, 5, 5, 5]), eps=0.0)
    s = 1.0 / math.sqrt(3.0)
    torch.testing.assert_close(advantages, t([s, s, s, -math.sqrt(3.0)]))


def test_grpo_groups_are_independent_and_ids_need_not_be_contiguous():
    # group 7: [1, 0] -> mean .5, std .5 -> [1, -1]; group 3: [0.2, 0.6] -> mean .4, std .2 -> [-1, 1]
    rewards = t([1.0, 0.2, 0.0, 0.6])
    group_ids = torch.tensor([7, 3, 7, 3])
    advantages = grpo_advantages(rewards, group_ids, eps=0.0)
    torch.testing.assert_close(advantages, t([1.0, -1.0, -1.0, 1.0]))


def test_grpo_scales_batch_and_none():
    # rewards [1, 0 | 1, 1] in groups [0, 0 | 1, 1]: group means .5 and 1 -> centred [.5, -.5, 0, 0]
    # batch population std of [1, 0, 1, 1]: mean .75, var = (.0625 + .5625 + .0625 + .0625) / 4 = .1875
    rewards = t([1.0, 0.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    none = grpo_advantages(rewards, group_ids, scale="none")
    torch.testing.assert_close(none, t([0.5, -0.5, 0.0, 0.0]))
    batch = grpo_advantages(rewards, group_ids, scale="batch", eps=0.0)
    b = 0.5 / math.sqrt(0.1875)  # 1.1547005
    torch.testing.assert_close(batch, t([b, -b, 0.0, 0.0]))
    group = grpo_advantages(rewards, group_ids, scale="group", eps=0.0)
    torch.testing.assert_close(group, t([1.0, -1.0, 0.0, 0.0]))


def test_grpo_equal_rewards_and_singletons_give_exact_zero_not_nan():
    # group 0 all-success, group 1 all 0.1 (float sums leave (r - mean) ~ 1e-17, which / (0 + eps) would not be 0),
    # group 2 a single episode; all must be exactly 0 even with eps = 0.
    rewards = t([1.0, 1.0, 0.1, 0.1, 0.1, 0.7])
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    for scale in ("group", "batch", "none"):
        advantages = grpo_advantages(rewards, group_ids, scale=scale, eps=0.0)
        assert torch.isfinite(advantages).all()
        assert (advantages == 0).all(), (scale, advantages)


def test_grpo_accepts_bool_rewards_and_returns_float32():
    advantages = grpo_advantages(torch.tensor([True, False]), torch.tensor([0, 0]), eps=0.0)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, torch.tensor([1.0, -1.0]))


def test_grpo_rejects_unknown_scale_and_bad_shapes():
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(t([1.0, 0.0]), torch.tensor([0, 0]), scale="std")
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(t([1.0, 0.0]), torch.tensor([0, 0, 0]))


def test_absolute_advantages_are_the_rewards():
    rewards = torch.tensor([1, 0, 1])
    advantages = absolute_advantages(rewards)
    torch.testing.assert_close(advantages, torch.tensor([1.0, 0.0, 1.0]))
    assert advantages.dtype == torch.float32


def test_dynamic_sampling_mask_drops_all_success_all_fail_and_singletons():
    rewards = t([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    #            all 1  | all 0  | mixed | singleton
    keep = dynamic_sampling_mask(rewards, group_ids)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, False, False, True, True, False]


# ---------------------------------------------------------------- GAE

GAMMA, LAM = 0.9, 0.95  # gamma * lam = 0.855


def test_gae_three_steps_terminated_by_hand():
    # r = [0, 0, 1], V = [.5, .6, .7], terminated after step 2 (no bootstrap).
    # t=2: delta = 1 - .7 = .3;               A2 = .3
    # t=1: delta = .9 * .7 - .6 = .03;        A1 = .03 + .855 * .3    = .2865
    # t=0: delta = .9 * .6 - .5 = .04;        A0 = .04 + .855 * .2865 = .2849575
    # returns = A + V = [.7849575, .8865, 1.0]
    advantages, returns = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[0.0, 0.0, 1.0]]), GAMMA, LAM)
    torch.testing.assert_close(advantages, t([[0.2849575, 0.2865, 0.3]]))
    torch.testing.assert_close(returns, t([[0.7849575, 0.8865, 1.0]]))


def test_gae_truncation_bootstraps_from_last_value():
    # Same trajectory cut by a time limit (not done), V(s_3) = last_value = .8:
    # t=2: delta = 1 + .9 * .8 - .7 = 1.02;   A2 = 1.02
    # t=1: A1 = .03 + .855 * 1.02  = .9021
    # t=0: A0 = .04 + .855 * .9021 = .8112955
    rewards, values, dones = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[0.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, dones, GAMMA, LAM, last_value=t([0.8]))
    torch.testing.assert_close(advantages, t([[0.8112955, 0.9021, 1.02]]))
    torch.testing.assert_close(returns, advantages + values)
    # No last_value: the cut is bootstrapped with 0, the same numbers as a termination.
    advantages, _ = gae(rewards, values, dones, GAMMA, LAM)
    torch.testing.assert_close(advantages, t([[0.2849575, 0.2865, 0.3]]))


def test_gae_right_padding_with_mask():
    # Row 0 is the 3-step episode above; row 1 has 2 valid steps r = [0, 1], V = [.5, .6], done after step 1,
    # then one padded step holding garbage (which must not leak):
    # t=1: delta = 1 - .6 = .4 -> A1 = .4;  t=0: delta = .9 * .6 - .5 = .04 -> A0 = .04 + .855 * .4 = .382
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 123.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 0.6, float("nan")]])
    dones = t([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, dones, GAMMA, LAM, mask=mask)
    torch.testing.assert_close(advantages, t([[0.2849575, 0.2865, 0.3], [0.382, 0.4, 0.0]]))
    torch.testing.assert_close(returns, t([[0.7849575, 0.8865, 1.0], [0.882, 1.0, 0.0]]))


def test_gae_padded_truncated_row_bootstraps_at_its_last_valid_step():
    # Row of length 2 (then padding), truncated: V(s_2) = last_value = 2.0, V = [.5, .6], r = [0, 0].
    # t=1: delta = .9 * 2 - .6 = 1.2 -> A1 = 1.2;  t=0: delta = .9 * .6 - .5 = .04 -> A0 = .04 + .855 * 1.2 = 1.066
    rewards = t([[0.0, 0.0, 0.0]])
    values = t([[0.5, 0.6, 9.0]])
    dones = t([[0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    advantages, _ = gae(rewards, values, dones, GAMMA, LAM, last_value=t([2.0]), mask=mask)
    torch.testing.assert_close(advantages, t([[1.066, 1.2, 0.0]]))


def test_gae_two_episodes_in_one_row_do_not_leak_across_the_done():
    # r = [1 | 0, 1], dones = [1 | 0, 1]: episode 1 is one step, A0 = 1 - .5 = .5 (nothing carried from t=1);
    # episode 2 is the last two steps of the first test: A1 = .2865, A2 = .3.
    advantages, _ = gae(t([[1.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1.0, 0.0, 1.0]]), GAMMA, LAM)
    torch.testing.assert_close(advantages, t([[0.5, 0.2865, 0.3]]))


def test_gae_lambda_limits():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    dones = torch.zeros(2, 5, dtype=torch.float64)
    dones[:, -1] = 1.0
    # lam = 0: the one-step TD error.
    advantages, _ = gae(rewards, values, dones, GAMMA, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(advantages, rewards + GAMMA * next_values - values)
    # lam = 1: Monte-Carlo discounted return minus V, so `returns` is the discounted return.
    _, returns = gae(rewards, values, dones, GAMMA, 1.0)
    discounted = torch.zeros_like(rewards)
    running = torch.zeros(2, dtype=torch.float64)
    for step in reversed(range(5)):
        running = rewards[:, step] + GAMMA * running
        discounted[:, step] = running
    torch.testing.assert_close(returns, discounted)


def test_gae_rejects_non_prefix_mask_and_bad_shapes():
    x = t([[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="prefix"):
        gae(x, x, x, GAMMA, LAM, mask=torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gae(t([0.0, 1.0]), t([0.0, 1.0]), t([0.0, 1.0]), GAMMA, LAM)
    with pytest.raises(ValueError, match="last_value"):
        gae(x, x, x, GAMMA, LAM, last_value=t([1.0, 2.0]))


def test_gae_does_not_track_grad():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    advantages, returns = gae(torch.tensor([[0.0, 1.0]]), values, torch.tensor([[0.0, 1.0]]), GAMMA, LAM)
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------- advantage normalisation


def test_normalize_advantages_whitens_with_the_given_statistics():
    # [1, 2, 3, 6]: mean 3, population var (4 + 1 + 0 + 9) / 4 = 3.5
    values = t([1.0, 2.0, 3.0, 6.0])
    mean, std = mean_std_from_sums(moment_sums(values))
    assert mean == pytest.approx(3.0) and std == pytest.approx(math.sqrt(3.5))
    normalized = normalize_advantages(values, mean, std, eps=0.0)
    torch.testing.assert_close(normalized, (values - 3.0) / math.sqrt(3.5))
    assert float(normalized.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(normalized.std(unbiased=False)) == pytest.approx(1.0)


def test_normalisation_from_per_rank_sums_equals_the_whole_batch():
    # Two "ranks" hold 3 and 5 advantages: summing their moment sums gives the statistics of all 8, so each rank's
    # normalised share equals the matching slice of the single-process result.
    whole = t([0.0, 0.9, 0.0, 0.0, 0.81, 0.0, 0.0, 0.73])
    shares = [whole[:3], whole[3:]]
    sums = [moment_sums(share) for share in shares]
    total = {key: sums[0][key] + sums[1][key] for key in sums[0]}
    assert total["count"] == 8
    mean, std = mean_std_from_sums(total)
    single_mean, single_std = mean_std_from_sums(moment_sums(whole))
    assert (mean, std) == pytest.approx((single_mean, single_std))
    expected = normalize_advantages(whole, single_mean, single_std)
    torch.testing.assert_close(torch.cat([normalize_advantages(s, mean, std) for s in shares]), expected)
    # A rank's own statistics would give something else (why the statistics must be global):
    local_mean, local_std = mean_std_from_sums(sums[0])
    assert not torch.allclose(normalize_advantages(shares[0], local_mean, local_std), expected[:3])


def test_normalisation_gives_failed_episodes_negative_advantages():
    # Sparse success reward, critic still at 0: GAE gives successes a positive advantage and failures exactly 0;
    # centring turns the failures negative (a push away from what failed).
    raw = t([0.0, 0.0, 0.95, 0.0, 1.0, 0.0])
    normalized = normalize_advantages(raw, *mean_std_from_sums(moment_sums(raw)))
    assert (normalized[raw == 0] < 0).all() and (normalized[raw > 0] > 0).all()


def test_normalisation_of_equal_or_no_advantages_is_finite():
    equal = t([0.5, 0.5, 0.5])
    mean, std = mean_std_from_sums(moment_sums(equal))
    assert std == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(normalize_advantages(equal, mean, std), torch.zeros(3, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert mean_std_from_sums({"count": 0.0, "sum": 0.0, "sum_sq": 0.0}) == (0.0, 0.0)


def test_moment_sums_of_several_quantities_share_one_reduction_by_prefix():
    sums = {**moment_sums(t([1.0, 3.0]), "a/"), **moment_sums(t([2.0, 2.0, 2.0]), "b/")}
    assert sums == {"a/count": 2.0, "a/sum": 4.0, "a/sum_sq": 10.0, "b/count": 3.0, "b/sum": 6.0, "b/sum_sq": 12.0}
    assert mean_std_from_sums(sums, "a/") == (2.0, 1.0)
    assert mean_std_from_sums(sums, "b/") == (2.0, 0.0)


def test_critic_diagnostics_match_cleanrl_explained_variance_and_the_value_loss():
    returns = t([0.0, 1.0, 0.5, 0.9, 0.0])
    values = t([0.1, 0.8, 0.5, 0.7, 0.2])
    residual = returns - values
    diagnostics = critic_diagnostics(mean_std_from_sums(moment_sums(returns)), mean_std_from_sums(moment_sums(residual)))
    expected_ev = 1.0 - residual.var(unbiased=False) / returns.var(unbiased=False)  # CleanRL: 1 - var(y - p) / var(y)
    assert diagnostics["critic/explained_variance"] == pytest.approx(float(expected_ev))
    assert diagnostics["critic/value_loss"] == pytest.approx(float(0.5 * (residual**2).mean()))
    # a critic stuck at 0 explains nothing beyond the mean: EV = 1 - Var[R] / Var[R] = 0 ... a constant one as well
    zero = critic_diagnostics(mean_std_from_sums(moment_sums(returns)), mean_std_from_sums(moment_sums(returns)))
    assert zero["critic/explained_variance"] == pytest.approx(0.0)
    # one that predicts the wrong way round is worse than a constant
    wrong = critic_diagnostics(mean_std_from_sums(moment_sums(returns)),
                               mean_std_from_sums(moment_sums(returns - (1.0 - returns))))
    assert wrong["critic/explained_variance"] < 0
    assert math.isnan(critic_diagnostics((1.0, 0.0), (0.0, 0.1))["critic/explained_variance"])
