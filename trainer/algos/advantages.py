"""Advantage estimators: GRPO group-relative, absolute (no baseline), the DAPO dynamic-sampling filter, and GAE.

All functions are pure: they take tensors that the caller has already gathered across ranks (a GRPO group may span
ranks, so its statistics must be computed on the gathered rewards) and return new tensors. Nothing here needs grad;
the results are constants for the policy / value losses.
"""

from __future__ import annotations

import torch

GRPO_SCALES = ("group", "batch", "none")


def _per_group(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Group statistics broadcast back to the episodes.

    Args:
        rewards: [N] float rewards, one per episode.
        group_ids: [N] integer group id per episode (any values, need not be contiguous or sorted).

    Returns:
        (mean, std, all_equal), each [N]: the mean of the episode's group, its population std (divide by n, not n-1),
        and whether every reward of the group is exactly equal (always True for a group of size 1).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of the same length, got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    # inverse[i] is the dense index 0..G-1 of episode i's group.
    unique_ids, inverse = torch.unique(group_ids, return_inverse=True)
    zeros = rewards.new_zeros(unique_ids.numel())

    counts = zeros.scatter_add(0, inverse, torch.ones_like(rewards))
    sums = zeros.scatter_add(0, inverse, rewards)
    group_mean = sums / counts
    mean = group_mean[inverse]
    # Two-pass variance (deviations from the mean) is more accurate than E[x^2] - E[x]^2.
    sq_dev = zeros.scatter_add(0, inverse, (rewards - mean) ** 2)
    std = (sq_dev / counts).sqrt()[inverse]

    group_max = zeros.scatter_reduce(0, inverse, rewards, reduce="amax", include_self=False)
    group_min = zeros.scatter_reduce(0, inverse, rewards, reduce="amin", include_self=False)
    all_equal = (group_max == group_min)[inverse]
    return mean, std, all_equal


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO group-relative advantages, one per episode.

    advantage_i = (r_i - mean_{g(i)}) / (std + eps), where mean_{g(i)} is the mean reward of episode i's group and std
    is chosen by `scale` (the option is named as TRL's `scale_rewards`):
        "group": the population std of the episode's group (GRPO, SimpleVLA-RL),
        "batch": the population std of all N rewards (more robust when groups are small),
        "none":  no division, advantage = r_i - mean (Dr. GRPO).
    All stds are population stds (divide by n, not n - 1): rewards [1, 0, 0, 1] give advantages ±1.

    A group whose rewards are all equal (including a group of size 1) gets advantage exactly 0 for every member: it
    carries no relative signal, and forcing 0 avoids both 0/0 and the float noise of (r - mean) for non-binary rewards.

    Args:
        rewards: [N] per-episode rewards (bool / int / float), gathered over all ranks.
        group_ids: [N] integer group id per episode (episodes with the same id were rolled out from the same task and
            initial state).
        scale: "group" | "batch" | "none".
        eps: added to the std before dividing.

    Returns:
        advantages: [N] float tensor (float32 unless rewards are float64), on rewards' device.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale must be one of {GRPO_SCALES}, got {scale!r}")
    rewards = rewards.detach()
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    mean, group_std, all_equal = _per_group(rewards, group_ids)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std(unbiased=False) + eps)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


@torch.no_grad()
def absolute_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Advantage = reward, no baseline.

    Offered as an option (some VLA-RL code bases use it with binary success rewards: successes are reinforced,
    failures give no gradient). It has higher variance than a baseline and never pushes probability away from failed
    actions; prefer `grpo_advantages` unless you mean this.

    Args:
        rewards: [N] per-episode rewards.

    Returns:
        advantages: [N] float copy of rewards.
    """
    rewards = rewards.detach()
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32)).clone()


@torch.no_grad()
def dynamic_sampling_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: keep only episodes whose group has rewards that are not all equal.

    An all-success or all-fail group has zero group-relative advantage, so it contributes no policy gradient but still
    dilutes the token-mean; DAPO drops such groups. A group of size 1 is always dropped (nothing to compare with).

    Args:
        rewards: [N] per-episode rewards, gathered over all ranks.
        group_ids: [N] integer group id per episode.

    Returns:
        keep: [N] bool, True for episodes to train on.
    """
    rewards = rewards.detach()
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    _, _, all_equal = _per_group(rewards, group_ids)
    return ~all_equal


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    lam: float,
    last_value: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over time, CleanRL-style backward recursion.

        delta_t      = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)
        advantage_t  = delta_t + gamma * lam * (1 - done_t) * advantage_{t+1}
        return_t     = advantage_t + V(s_t)          (the value-function target)

    Layout: row b is one stream of policy steps (here: one episode, right-padded). Step t is valid where mask[b, t].
    `dones[b, t]` means the episode *terminated* after step t (success or a true failure state): nothing is
    bootstrapped past it, and the recursion restarts, so one row may also hold several episodes back to back.

    Truncation (time limit, or the end of the collected window) is *not* a done: at the last valid step of a row
    that is not done, V(s_{t+1}) is bootstrapped from `last_value[b]`, the value of the observation after that step
    (0 when `last_value` is None, i.e. treat the cut as reward-free from then on). The mask must be a prefix per row
    (valid steps first, then padding); padded steps get advantage 0 and return 0. Mark a mid-row truncation as done
    (as CleanRL does): its bootstrap value is not in `values`.

    Args:
        rewards: [B, T] reward received after step t.
        values: [B, T] V(s_t) from the rollout (detached).
        dones: [B, T] bool / 0-1, episode terminated after step t.
        gamma: discount factor.
        lam: GAE lambda (1 = Monte-Carlo returns minus V, 0 = one-step TD error).
        last_value: [B] V of the observation after each row's last valid step, or None.
        mask: [B, T] bool / 0-1, valid steps; None = all valid.

    Returns:
        (advantages, returns): both [B, T], float32 (or float64 if values are), zero at padded steps.
    """
    if rewards.dim() != 2 or values.shape != rewards.shape or dones.shape != rewards.shape:
        raise ValueError(
            "rewards, values and dones must all be [B, T], got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(dones.shape)}"
        )
    dtype = torch.promote_types(values.dtype, torch.float32)
    rewards = rewards.detach().to(dtype)
    values = values.detach().to(dtype)
    num_rows, num_steps = rewards.shape

    if mask is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    else:
        if mask.shape != rewards.shape:
            raise ValueError(f"mask must be {tuple(rewards.shape)}, got {tuple(mask.shape)}")
        valid = mask.bool()
        if (valid[:, 1:] & ~valid[:, :-1]).any():
            raise ValueError("mask must be a prefix per row (valid steps first, then padding)")
    if last_value is None:
        last_value = torch.zeros(num_rows, dtype=dtype, device=rewards.device)
    else:
        if last_value.shape != (num_rows,):
            raise ValueError(f"last_value must be [B]=[{num_rows}], got {tuple(last_value.shape)}")
        last_value = last_value.detach().to(dtype)

    # Padding contributes nothing (and may hold garbage): zero it before the recursion.
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    values = torch.where(valid, values, torch.zeros_like(values))
    nonterminal = 1.0 - dones.to(dtype)

    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(last_value)
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            next_valid = torch.zeros_like(valid[:, t])
            nextvalues_in_row = last_value
        else:
            next_valid = valid[:, t + 1]
            nextvalues_in_row = values[:, t + 1]
        # At a row's last valid step the successor is not in `values`: bootstrap from last_value instead. Nothing is
        # carried back from padding because lastgaelam is reset to 0 at every padded step.
        nextvalues = torch.where(next_valid, nextvalues_in_row, last_value)
        nextnonterminal = nonterminal[:, t]
        delta = rewards[:, t] + gamma * nextvalues * nextnonterminal - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        lastgaelam = torch.where(valid[:, t], lastgaelam, torch.zeros_like(lastgaelam))
        advantages[:, t] = lastgaelam
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


@torch.no_grad()
def moment_sums(values: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """The local sums that a global mean and std are made of: {prefix + "count", "sum", "sum_sq"}.

    Sum these over ranks (e.g. `Dist.sum_metrics`, several prefixed sets in one call) and pass the result to
    `mean_std_from_sums`: every rank then uses the statistics of the whole global batch, whatever the world size.

    Args:
        values: any shape; every element counts once.
        prefix: put before each key, to sum the moments of several quantities in one all-reduce.

    Returns:
        {"<prefix>count", "<prefix>sum", "<prefix>sum_sq"}, as Python floats (accumulated in float64).
    """
    flat = values.detach().double().reshape(-1)
    return {f"{prefix}count": float(flat.numel()), f"{prefix}sum": float(flat.sum()),
            f"{prefix}sum_sq": float((flat * flat).sum())}


def mean_std_from_sums(sums: dict[str, float], prefix: str = "") -> tuple[float, float]:
    """Mean and population std (divide by n) from `moment_sums` summed over ranks; (0, 0) for no elements.

    E[x^2] - E[x]^2 in float64: for advantages and returns (values of order 1, at most millions of them) the
    cancellation loses nothing that matters, and it needs one all-reduce instead of two passes.
    """
    count, total, total_sq = sums[f"{prefix}count"], sums[f"{prefix}sum"], sums[f"{prefix}sum_sq"]
    if count <= 0:
        return 0.0, 0.0
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)
    return mean, variance**0.5


def critic_diagnostics(returns: tuple[float, float], residuals: tuple[float, float]) -> dict[str, float]:
    """How well the rollout's value predictions V(s_t) explained the returns, over the global batch.

    Args:
        returns: (mean, std) of the value targets R_t (GAE returns).
        residuals: (mean, std) of R_t - V(s_t), with V from the rollout (the critic that made the advantages).

    Returns:
        {"critic/value_loss": 0.5 * E[(R - V)^2],
         "critic/explained_variance": 1 - Var[R - V] / Var[R] (CleanRL's, on the rollout values): 1 = perfect,
             0 = no better than predicting the mean return, < 0 = worse; NaN when the returns do not vary}.
        At explained variance <= 0 the critic is useless: GAE's advantages are then the returns minus noise, and a
        GRPO-style baseline would serve better (raise optim.value_lr, warm the critic up, or use GRPO).
    """
    (_, return_std), (residual_mean, residual_std) = returns, residuals
    value_loss = 0.5 * (residual_std**2 + residual_mean**2)
    explained = 1.0 - residual_std**2 / return_std**2 if return_std > 0 else float("nan")
    return {"critic/value_loss": value_loss, "critic/explained_variance": explained}


@torch.no_grad()
def normalize_advantages(advantages: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """(advantages - mean) / (std + eps): PPO's advantage normalisation ("whitening").

    CleanRL (`norm_adv`), TRL's PPO, veRL and RL4VLA all do it. Why it matters here: with a sparse success reward
    and a critic that starts near 0, raw GAE advantages are ~0 for every failed episode and positive for the
    successes, so the policy gets no push away from what failed; centring gives failures a negative advantage, and
    scaling makes the step size independent of the reward scale and of how good the critic is.

    Pass the mean and std of the GLOBAL batch (all ranks; see `moment_sums`), not of a rank's or a micro-batch's
    share: then a run on 2 ranks normalises exactly as the same global batch on 1 rank does.

    Args:
        advantages: any shape, float.
        mean, std: statistics of the global batch (`mean_std_from_sums`).
        eps: added to the std (a batch of equal advantages gives zeros instead of 0/0).

    Returns:
        a new tensor of the same shape and dtype.
    """
    return (advantages.detach() - mean) / (std + eps)
