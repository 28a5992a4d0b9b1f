"""Losses against hand-computed values and gradients."""

import math

import pytest
import torch

from trainer.algos import (
    behaviour_cloning_loss,
    entropy_bonus,
    explained_variance,
    kl_to_reference,
    masked_mean,
    ppo_clip_loss,
    value_loss,
)


def scalar(value):
    return torch.tensor(value, dtype=torch.float32)


def one_token(ratio, advantage, **kwargs):
    """PPO loss of a single token with the given ratio; returns (loss, diagnostics, d loss / d log_prob)."""
    old_log_probs = torch.zeros(1, 1)
    log_probs = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, diagnostics = ppo_clip_loss(
        log_probs, old_log_probs, torch.tensor([advantage]), torch.ones(1, 1, dtype=torch.bool), **kwargs
    )
    loss.backward()
    return loss, diagnostics, log_probs.grad[0, 0]


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_ignores_masked_garbage_and_never_nans():
    values = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("-inf"), 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    mean = masked_mean(values, mask)
    torch.testing.assert_close(mean, scalar(4.0))  # (1 + 3 + 5 + 7) / 4
    mean.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.25, 0.25, 0.0], [0.25, 0.0, 0.25]]))
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(masked_mean(values, mask, denominator=8), scalar(2.0))  # 16 / 8
    torch.testing.assert_close(masked_mean(values, torch.zeros(2, 3)), scalar(0.0))  # fully masked -> 0
    torch.testing.assert_close(masked_mean(values, torch.zeros(2, 3), denominator=0), scalar(0.0))


# ---------------------------------------------------------------- PPO clip


def test_ratio_above_upper_clip_with_positive_advantage_is_clipped_at_1_28():
    # -A * ratio = -1.5, -A * clip(1.5, 0.8, 1.28) = -1.28; max = -1.28, a constant -> zero gradient.
    # k3: (1.5 - 1) - ln 1.5 = 0.0945349
    loss, diagnostics, grad = one_token(1.5, 1.0)
    torch.testing.assert_close(loss, scalar(-1.28))
    torch.testing.assert_close(grad, scalar(0.0))
    torch.testing.assert_close(diagnostics["clip_frac_high"], scalar(1.0))
    torch.testing.assert_close(diagnostics["clip_frac_low"], scalar(0.0))
    torch.testing.assert_close(diagnostics["clip_frac"], scalar(1.0))
    torch.testing.assert_close(diagnostics["ratio_mean"], scalar(1.5))
    torch.testing.assert_close(diagnostics["approx_kl"], scalar(0.5 - math.log(1.5)))


def test_ratio_below_lower_clip_with_negative_advantage_is_clipped_at_0_8():
    # -A * ratio = 0.5, -A * clip(0.5, 0.8, 1.28) = 0.8; max = 0.8, constant -> zero gradient.
    # k3: (0.5 - 1) - ln 0.5 = 0.1931472
    loss, diagnostics, grad = one_token(0.5, -1.0)
    torch.testing.assert_close(loss, scalar(0.8))
    torch.testing.assert_close(grad, scalar(0.0))
    torch.testing.assert_close(diagnostics["clip_frac_low"], scalar(1.0))
    torch.testing.assert_close(diagnostics["clip_frac_high"], scalar(0.0))
    torch.testing.assert_close(diagnostics["approx_kl"], scalar(-0.5 + math.log(2.0)))


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss",
    [
        (1.5, -1.0, 1.5),  # max(1.5, 1.28): the pessimistic unclipped term wins, the gradient flows
        (0.5, 1.0, -0.5),  # max(-0.5, -0.8): unclipped
        (1.25, 1.0, -1.25),  # inside [0.8, 1.28]: clip-higher leaves it alone (symmetric 0.2 would clip at 1.2)
        (0.9, 2.0, -1.8),  # inside the range
    ],
)
def test_unclipped_tokens_have_the_policy_gradient(ratio, advantage, expected_loss):
    # d(-A * exp(logp - old)) / d logp = -A * ratio
    loss, diagnostics, grad = one_token(ratio, advantage)
    torch.testing.assert_close(loss, scalar(expected_loss))
    torch.testing.assert_close(grad, scalar(-advantage * ratio))
    torch.testing.assert_close(diagnostics["clip_frac"], scalar(0.0))


def test_symmetric_clip_when_epsilon_high_equals_epsilon():
    loss, _, grad = one_token(1.25, 1.0, epsilon=0.2, epsilon_high=0.2)
    torch.testing.assert_close(loss, scalar(-1.2))
    torch.testing.assert_close(grad, scalar(0.0))
    loss, _, _ = one_token(0.79, -1.0)  # 0.79 < 0.8: clipped at 0.8
    torch.testing.assert_close(loss, scalar(0.8))


def test_log_ratio_clamp_keeps_the_loss_finite():
    # log-ratio 50 is clamped to 20 before exp: ratio e^20, negative advantage -> loss e^20, no gradient.
    old_log_probs = torch.tensor([[-60.0]])
    log_probs = torch.tensor([[-10.0]], requires_grad=True)
    loss, diagnostics = ppo_clip_loss(log_probs, old_log_probs, torch.tensor([-1.0]), torch.ones(1, 1))
    torch.testing.assert_close(loss, scalar(math.exp(20.0)))
    loss.backward()
    assert log_probs.grad.item() == 0.0
    torch.testing.assert_close(diagnostics["approx_kl"], scalar(math.exp(20.0) - 1.0 - 20.0))
    loss, _ = ppo_clip_loss(log_probs, old_log_probs, torch.tensor([-1.0]), torch.ones(1, 1), log_ratio_clamp=1.0)
    torch.testing.assert_close(loss, scalar(math.e))


def test_advantage_clamp():
    # ratio 1, A = 10 clamped to 3 -> loss -3; A = -10 -> +3
    loss, _, _ = one_token(1.0, 10.0, advantage_clamp=3.0)
    torch.testing.assert_close(loss, scalar(-3.0))
    loss, _, _ = one_token(1.0, -10.0, advantage_clamp=3.0)
    torch.testing.assert_close(loss, scalar(3.0))


def test_token_mean_versus_seq_mean_token_mean():
    # ratio 1 everywhere, so each token's loss is -A.
    # seq 0: one active token, A = 3; seq 1: three tokens, A = [1, 2, 3]
    # token_mean          = -(3 + 1 + 2 + 3) / 4     = -2.25
    # seq_mean_token_mean = -(3 + (1 + 2 + 3) / 3) / 2 = -2.5
    log_probs = torch.zeros(2, 3)
    advantages = torch.tensor([[3.0, 99.0, 99.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    token_mean, _ = ppo_clip_loss(log_probs, log_probs, advantages, mask, loss_type="token_mean")
    seq_mean, _ = ppo_clip_loss(log_probs, log_probs, advantages, mask, loss_type="seq_mean_token_mean")
    torch.testing.assert_close(token_mean, scalar(-2.25))
    torch.testing.assert_close(seq_mean, scalar(-2.5))


def test_seq_mean_skips_sequences_without_active_tokens():
    log_probs = torch.zeros(2, 2)
    advantages = torch.tensor([1.0, 5.0])
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, _ = ppo_clip_loss(log_probs, log_probs, advantages, mask, loss_type="seq_mean_token_mean")
    torch.testing.assert_close(loss, scalar(-1.0))


def test_sequence_advantages_broadcast_over_tokens():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 4)
    old_log_probs = log_probs + 0.3 * torch.randn(3, 4)
    advantages = torch.randn(3)
    mask = torch.rand(3, 4) > 0.3
    broadcast, diag_b = ppo_clip_loss(log_probs, old_log_probs, advantages, mask)
    explicit, diag_e = ppo_clip_loss(log_probs, old_log_probs, advantages[:, None].expand(3, 4), mask)
    torch.testing.assert_close(broadcast, explicit)
    for key in diag_b:
        torch.testing.assert_close(diag_b[key], diag_e[key])


def _random_batch(seed=0, batch=6, tokens=7):
    generator = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(batch, tokens, generator=generator, dtype=torch.float64) * 3
    old_log_probs = log_probs + 0.4 * torch.randn(batch, tokens, generator=generator, dtype=torch.float64)
    advantages = torch.randn(batch, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 2, 7, 3])
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    return log_probs.float(), old_log_probs.float(), advantages.float(), mask


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_with_global_count_sum_to_the_full_batch_loss_and_gradient(loss_type):
    log_probs, old_log_probs, advantages, mask = _random_batch()
    full_lp = log_probs.clone().requires_grad_(True)
    full_loss, _ = ppo_clip_loss(full_lp, old_log_probs, advantages, mask, loss_type=loss_type)
    full_loss.backward()

    if loss_type == "token_mean":
        global_kwargs = {"num_tokens_global": int(mask.sum())}  # 24 tokens
    else:
        global_kwargs = {"num_sequences_global": int(mask.any(-1).sum())}  # 6 sequences
    split_lp = log_probs.clone().requires_grad_(True)
    parts = [slice(0, 2), slice(2, 6)]  # uneven micro-batches: 8 and 16 tokens
    summed = sum(
        ppo_clip_loss(split_lp[p], old_log_probs[p], advantages[p], mask[p], loss_type=loss_type, **global_kwargs)[0]
        for p in parts
    )
    summed.backward()
    torch.testing.assert_close(summed, full_loss)
    torch.testing.assert_close(split_lp.grad, full_lp.grad)

    if loss_type == "token_mean":
        # Why the global count matters: averaging the local token means weighs the 8-token micro-batch like the
        # 16-token one, which is not the full-batch token mean.
        local_means = [ppo_clip_loss(log_probs[p], old_log_probs[p], advantages[p], mask[p])[0] for p in parts]
        assert not torch.allclose(sum(local_means) / 2, full_loss)


@pytest.mark.parametrize("log_ratio_clamp", [20.0, None])
def test_padding_garbage_gives_finite_loss_and_zero_gradient_there(log_ratio_clamp):
    log_probs = torch.tensor([[-1.0, float("-inf")], [-2.0, float("nan")]], requires_grad=True)
    old_log_probs = torch.tensor([[-1.2, float("nan")], [-1.9, 0.0]])
    advantages = torch.tensor([[1.0, float("nan")], [-1.0, float("inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    loss, diagnostics = ppo_clip_loss(log_probs, old_log_probs, advantages, mask, log_ratio_clamp=log_ratio_clamp)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in diagnostics.values())
    assert torch.isfinite(log_probs.grad).all()
    assert (log_probs.grad[:, 1] == 0).all()
    # Active tokens: ratios e^0.2 = 1.2214 (A = 1, unclipped) and e^-0.1 = 0.9048 (A = -1, unclipped)
    torch.testing.assert_close(loss, scalar((-math.exp(0.2) + math.exp(-0.1)) / 2))


def test_ppo_argument_errors():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        ppo_clip_loss(x, x, torch.zeros(2), mask, loss_type="sum")
    with pytest.raises(ValueError, match="num_sequences_global"):
        ppo_clip_loss(x, x, torch.zeros(2), mask, loss_type="seq_mean_token_mean", num_tokens_global=6)
    with pytest.raises(ValueError, match="num_tokens_global"):
        ppo_clip_loss(x, x, torch.zeros(2), mask, num_sequences_global=2)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(x, x, torch.zeros(3), mask)


# ---------------------------------------------------------------- value loss, explained variance


@pytest.mark.parametrize(
    "value, expected_loss, expected_grad, clipped",
    [
        # old .. 1.0, returns 2.0, clip 0.2
        (1.5, 0.32, 0.0, 1.0),  # unclipped (1.5-2)^2 = .25, clipped (1.2-2)^2 = .64 -> max .64, x .5 = .32
        (2.5, 0.32, 0.0, 1.0),  # overshoot: unclipped .25, clipped .64 -> .32
        (1.1, 0.405, -0.9, 0.0),  # inside the clip: both (1.1-2)^2 = .81 -> .405; grad (1.1 - 2) = -.9
        (0.5, 1.125, -1.5, 0.0),  # moved away: unclipped 2.25 > clipped (0.8-2)^2 = 1.44 -> 1.125; grad -1.5
    ],
)
def test_clipped_value_loss_by_hand(value, expected_loss, expected_grad, clipped):
    values = torch.tensor([value], requires_grad=True)
    loss, diagnostics = value_loss(values, torch.tensor([1.0]), torch.tensor([2.0]), clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(loss, scalar(expected_loss))
    torch.testing.assert_close(values.grad[0], scalar(expected_grad))
    torch.testing.assert_close(diagnostics["value_clip_frac"], scalar(clipped))


def test_value_loss_unclipped_and_masked():
    values = torch.tensor([[1.5, 7.0], [3.0, float("nan")]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    # 0.5 * ((1.5-2)^2 + (3-2)^2) / 2 = 0.5 * 1.25 / 2 = 0.3125
    loss, _ = value_loss(values, values.detach(), returns, clip_range=None, mask=mask)
    torch.testing.assert_close(loss, scalar(0.3125))
    loss.backward()
    assert torch.isfinite(values.grad).all()
    # grad = 0.5 * 2 * (v - R) / 2 = (v - R) / 2 -> -.25 and .5
    torch.testing.assert_close(values.grad, torch.tensor([[-0.25, 0.0], [0.5, 0.0]]))
    # Global normalisation: the same sum over 5 entries instead of 2.
    loss, _ = value_loss(values, values.detach(), returns, clip_range=None, mask=mask, num_values_global=5)
    torch.testing.assert_close(loss, scalar(0.5 * 1.25 / 5))


def test_explained_variance_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(explained_variance(returns, returns), scalar(1.0))
    torch.testing.assert_close(explained_variance(torch.full((3,), 2.0), returns), scalar(0.0))
    # residuals [0, 0, 1]: population var 2/9; var(returns) = 2/3 -> 1 - 1/3 = 2/3
    torch.testing.assert_close(explained_variance(torch.tensor([1.0, 2.0, 2.0]), returns), scalar(2.0 / 3.0))
    # a masked-out entry is ignored
    masked = explained_variance(
        torch.tensor([1.0, 2.0, 2.0, 50.0]), torch.tensor([1.0, 2.0, 3.0, 0.0]), mask=torch.tensor([1, 1, 1, 0])
    )
    torch.testing.assert_close(masked, scalar(2.0 / 3.0))
    assert torch.isnan(explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])))


# ---------------------------------------------------------------- KL, entropy, behaviour cloning


def test_kl_to_reference_k3_by_hand():
    # pi = .5, pi_ref = .25: log_r = ln .5; k3 = .5 - ln .5 - 1 = 0.1931472. Second token equal -> 0.
    # d k3 / d logp = 1 - exp(log_r) = .5 for the first token; mean over 2 tokens -> .25
    log_probs = torch.tensor([[math.log(0.5), math.log(0.3), 0.0]], requires_grad=True)
    ref_log_probs = torch.tensor([[math.log(0.25), math.log(0.3), float("nan")]])
    mask = torch.tensor([[1, 1, 0]])
    loss, diagnostics = kl_to_reference(log_probs, ref_log_probs, mask)
    expected = (0.5 + math.log(2.0) - 1.0) / 2
    torch.testing.assert_close(loss, scalar(expected))
    torch.testing.assert_close(diagnostics["kl"], scalar(expected))
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.25, 0.0, 0.0]]))


def test_entropy_bonus_is_the_masked_mean():
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]], requires_grad=True)
    loss, diagnostics = entropy_bonus(entropy, torch.tensor([[1, 1], [1, 0]]))
    torch.testing.assert_close(loss, scalar(2.0))
    torch.testing.assert_close(diagnostics["entropy"], scalar(2.0))
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[1 / 3, 1 / 3], [1 / 3, 0.0]]))


def test_behaviour_cloning_cross_entropy_by_hand():
    # logits [0, ln 3] -> softmax [1/4, 3/4]. Target 1: -ln(3/4) = 0.2876821; target 0: -ln(1/4) = 1.3862944.
    # Third token masked with target -100 and NaN logits. Argmax is 1 for both -> accuracy 1/2.
    row = [0.0, math.log(3.0)]
    logits = torch.tensor([[row, row, [float("nan"), 0.0]]], requires_grad=True)
    target_ids = torch.tensor([[1, 0, -100]])
    mask = torch.tensor([[True, True, False]])
    loss, diagnostics = behaviour_cloning_loss(logits, target_ids, mask)
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    torch.testing.assert_close(loss, scalar(expected))
    torch.testing.assert_close(diagnostics["bc_loss"], scalar(expected))
    torch.testing.assert_close(diagnostics["bc_accuracy"], scalar(0.5))
    loss.backward()
    # d CE / d logits = softmax - onehot, / 2 tokens
    expected_grad = torch.tensor([[[0.25, -0.25], [-0.75, 0.75], [0.0, 0.0]]]) / 2
    torch.testing.assert_close(logits.grad, expected_grad)


def test_the_reported_value_loss_is_the_optimised_clipped_one_as_a_local_mean():
    """values 1.5, rollout values 1.0, return 2.0, clip 0.2: the clipped prediction 1.2 has the larger error (0.64 vs
    0.25), so the optimised loss is 0.5 * 0.64 = 0.32, not the plain 0.5 * MSE = 0.125. With a global denominator the
    loss is this call's share (0.32 / 4), the diagnostic stays the local mean."""
    values = torch.tensor([1.5], requires_grad=True)
    loss, diagnostics = value_loss(values, torch.tensor([1.0]), torch.tensor([2.0]), clip_range=0.2)
    torch.testing.assert_close(loss, scalar(0.32))
    torch.testing.assert_close(diagnostics["value_loss"], scalar(0.32))
    shared, diagnostics = value_loss(values, torch.tensor([1.0]), torch.tensor([2.0]), clip_range=0.2,
                                     num_values_global=4)
    torch.testing.assert_close(shared, scalar(0.08))
    torch.testing.assert_close(diagnostics["value_loss"], scalar(0.32))
