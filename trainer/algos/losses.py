"""Losses for the PPO / GRPO update and the behaviour-cloning warm-up.

Every loss returns `(loss, diagnostics)`: `loss` is a 0-d tensor to call backward on, `diagnostics` a dict of
detached 0-d tensors (left on device so that logging does not force a GPU sync per micro-batch; call `.item()` or
all-reduce them where you log).

Conventions:
- Per-token tensors are [B, T]: B sequences (one policy call each), T action tokens, with a `mask` [B, T] (bool or
  0/1) marking the active tokens. Padded positions may hold anything, even NaN or -inf: they are zeroed before any
  arithmetic, so they reach neither the loss nor the gradient.
- Everything is computed in float32 (bf16 log-probs lose too much precision in exp(log-ratio)); the gradient flows
  back through the cast.
- Normalisation across micro-batches and ranks: pass `num_tokens_global` (the number of active tokens in the whole
  optimizer-step batch, summed over micro-batches and ranks). Each call then returns sum(local) / num_tokens_global,
  and the *sum* of the per-micro-batch losses over all micro-batches and ranks is the exact global token mean
  (DAPO / TRL loss_type="dapo"). Mind what your backend does with that sum: DDP / FSDP average gradients over ranks
  and `accelerator.backward` divides by the accumulation steps, so undo those (e.g. pass
  num_tokens_global / world_size / accumulation_steps, as TRL does) to get the plain global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("token_mean", "seq_mean_token_mean")


def masked_mean(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    dim: int | None = None,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true.

    Masked positions are replaced by 0 with `torch.where` (not multiplied by 0), so NaN / inf there cannot leak into
    the result or the gradient. A fully masked input gives 0, not NaN.

    Args:
        values: any shape.
        mask: bool or 0/1, broadcastable to `values`; None = all positions.
        dim: reduce over this dim only; None = over everything (0-d result).
        denominator: divide the masked sum by this instead of the number of active positions (e.g. the number of
            active tokens of the global batch). Must be positive; 0 is treated as "nothing active" and gives 0.

    Returns:
        The masked mean: 0-d when dim is None, else `values` reduced over `dim`.
    """
    if mask is None:
        keep = torch.ones_like(values, dtype=torch.bool)
    else:
        keep = mask.bool().expand_as(values)
    kept = torch.where(keep, values, torch.zeros_like(values))
    total = kept.sum() if dim is None else kept.sum(dim)
    if denominator is None:
        count = keep.sum() if dim is None else keep.sum(dim)
        return total / count.clamp(min=1).to(total.dtype)
    denominator = torch.as_tensor(denominator, dtype=total.dtype, device=total.device)
    # A zero global count means every token everywhere is masked, so the sum is 0 too: return 0 instead of 0/0.
    return total / denominator.clamp(min=torch.finfo(total.dtype).tiny)


def _check_tokens(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of log_probs {tuple(like.shape)}, got {tuple(tensor.shape)}")


def _zero_masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, values, torch.zeros_like(values))


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float = 0.28,
    log_ratio_clamp: float | None = 20.0,
    advantage_clamp: float | None = None,
    loss_type: str = "token_mean",
    num_tokens_global: float | torch.Tensor | None = None,
    num_sequences_global: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017) with DAPO's decoupled clip range, as a loss to minimise.

        logratio = clamp(log_probs - old_log_probs, -log_ratio_clamp, log_ratio_clamp)
        ratio    = exp(logratio)
        pg_loss  = max(-A * ratio, -A * clamp(ratio, 1 - epsilon, 1 + epsilon_high))      per token

    `epsilon_high` > `epsilon` (DAPO "clip-higher", 0.2 / 0.28) lets low-probability tokens with positive advantage
    grow further before the clip stops them, which keeps entropy from collapsing. Set epsilon_high = epsilon for
    standard PPO. The log-ratio clamp keeps exp() finite when a token's probability has moved enormously (the clamp
    also zeroes the gradient of such tokens); it does not matter in normal training.

    Aggregation (`loss_type`):
        "token_mean":          sum of pg_loss over active tokens / number of active tokens (every token weighs the
                               same, DAPO). With `num_tokens_global`, divide by that instead (see module docstring).
        "seq_mean_token_mean": token mean within each sequence, then mean over sequences with >= 1 active token
                               (every policy call weighs the same, original GRPO). With `num_sequences_global`
                               (the number of such sequences in the global batch), divide the sum by that instead.

    Args:
        log_probs: [B, T] log pi_theta(token) under the current policy, with grad.
        old_log_probs: [B, T] log-probs recorded at rollout (treated as constants).
        advantages: [B] (one per sequence, broadcast over its tokens) or [B, T]; treated as constants.
        mask: [B, T] bool / 0-1, active tokens.
        epsilon: lower clip range, ratio >= 1 - epsilon.
        epsilon_high: upper clip range, ratio <= 1 + epsilon_high.
        log_ratio_clamp: |log-ratio| bound before exp; None = no clamp.
        advantage_clamp: clamp advantages to [-c, c]; None = no clamp.
        loss_type: "token_mean" | "seq_mean_token_mean".
        num_tokens_global: denominator for "token_mean" (global number of active tokens).
        num_sequences_global: denominator for "seq_mean_token_mean" (global number of active sequences).

    Returns:
        loss: 0-d tensor.
        diagnostics (detached 0-d tensors, means over this call's active tokens):
            "approx_kl":      mean of the k3 estimator (ratio - 1) - logratio, an estimate of KL(old || new),
            "clip_frac_low":  fraction of tokens where the lower clip binds (ratio < 1 - epsilon and A < 0),
            "clip_frac_high": fraction where the upper clip binds (ratio > 1 + epsilon_high and A > 0),
            "clip_frac":      their sum, the fraction of tokens that get no gradient from the clip,
            "ratio_mean":     mean ratio.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "token_mean" and num_sequences_global is not None:
        raise ValueError("num_sequences_global is for loss_type='seq_mean_token_mean'; use num_tokens_global")
    if loss_type == "seq_mean_token_mean" and num_tokens_global is not None:
        raise ValueError("num_tokens_global is for loss_type='token_mean'; use num_sequences_global")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [B, T], got {tuple(log_probs.shape)}")
    _check_tokens("old_log_probs", old_log_probs, log_probs)
    _check_tokens("mask", mask, log_probs)
    if advantages.dim() == 1 and advantages.shape[0] == log_probs.shape[0]:
        advantages = advantages[:, None].expand_as(log_probs)
    _check_tokens("advantages ([B] or [B, T])", advantages, log_probs)

    keep = mask.bool()
    log_probs = log_probs.float()
    old_log_probs = old_log_probs.detach().float()
    advantages = _zero_masked(advantages.detach().float(), keep)
    if advantage_clamp is not None:
        advantages = advantages.clamp(-advantage_clamp, advantage_clamp)

    # Zero the padding before exp so garbage there cannot produce inf/NaN in the forward or the backward pass.
    logratio = _zero_masked(log_probs - old_log_probs, keep)
    if log_ratio_clamp is not None:
        logratio = logratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(logratio)

    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    pg_losses = torch.max(pg_losses1, pg_losses2)

    if loss_type == "token_mean":
        loss = masked_mean(pg_losses, keep, denominator=num_tokens_global)
    else:
        seq_losses = masked_mean(pg_losses, keep, dim=-1)  # [B]
        loss = masked_mean(seq_losses, keep.any(dim=-1), denominator=num_sequences_global)

    with torch.no_grad():
        clipped_low = (ratio < 1.0 - epsilon) & (advantages < 0)
        clipped_high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
        clip_frac_low = masked_mean(clipped_low.float(), keep)
        clip_frac_high = masked_mean(clipped_high.float(), keep)
        diagnostics = {
            "approx_kl": masked_mean((ratio - 1.0) - logratio, keep),
            "clip_frac_low": clip_frac_low,
            "clip_frac_high": clip_frac_high,
            "clip_frac": clip_frac_low + clip_frac_high,
            "ratio_mean": masked_mean(ratio, keep),
        }
    return loss, diagnostics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_range: float | None = 0.2,
    mask: torch.Tensor | None = None,
    num_values_global: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 / CleanRL `clip_vloss`).

        v_clipped = old_values + clamp(values - old_values, -clip_range, clip_range)
        v_loss    = 0.5 * mean(max((values - returns)^2, (v_clipped - returns)^2))

    The clipped term stops the critic from moving its prediction further than clip_range away from the rollout's
    value in one update when that would only help by overshooting. clip_range=None gives 0.5 * MSE.

    Args:
        values: [B] or [B, T] current value predictions, with grad.
        old_values: same shape, values recorded at rollout (constants).
        returns: same shape, value targets, e.g. from `gae` (constants).
        clip_range: clip of the value change; None = no clipping.
        mask: same shape, bool / 0-1 active entries; None = all.
        num_values_global: divide the masked sum by this (global number of active entries) instead of the local
            count, for micro-batch / multi-rank accumulation as in `ppo_clip_loss`.

    Returns:
        loss: 0-d tensor.
        diagnostics: "value_loss": the loss above as a plain mean over this call's active entries (whatever the
            denominator), and "value_clip_frac": fraction of active entries where the clipped error is the larger one
            (the clip binds and the entry gets no gradient).
    """
    if old_values.shape != values.shape or returns.shape != values.shape:
        raise ValueError(
            "values, old_values and returns must have one shape, got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}"
        )
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool().expand_as(values)
    values = _zero_masked(values.float(), keep)
    old_values = _zero_masked(old_values.detach().float(), keep)
    returns = _zero_masked(returns.detach().float(), keep)

    v_loss_unclipped = (values - returns) ** 2
    if clip_range is None:
        v_loss_max = v_loss_unclipped
        value_clip_frac = values.new_zeros(())
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
        with torch.no_grad():
            value_clip_frac = masked_mean((v_loss_clipped > v_loss_unclipped).float(), keep)
    loss = 0.5 * masked_mean(v_loss_max, keep, denominator=num_values_global)
    return loss, {"value_loss": 0.5 * masked_mean(v_loss_max.detach(), keep), "value_clip_frac": value_clip_frac}


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the active entries (population variances).

    1 = the critic predicts the returns perfectly, 0 = no better than a constant, < 0 = worse than a constant.
    NaN when Var[returns] is 0 (undefined; CleanRL and SB3 report NaN too).

    Args:
        values: any shape, value predictions.
        returns: same shape, value targets.
        mask: same shape, bool / 0-1; None = all.

    Returns:
        0-d float tensor.
    """
    if values.shape != returns.shape:
        raise ValueError(f"values and returns must have one shape, got {tuple(values.shape)}, {tuple(returns.shape)}")
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool().expand_as(values)
    values = values.detach().float()
    returns = returns.detach().float()

    def masked_var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, keep)) ** 2, keep)

    var_returns = masked_var(returns)
    if var_returns == 0:
        return torch.tensor(float("nan"), device=values.device)
    return 1.0 - masked_var(returns - values) / var_returns


def kl_to_reference(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    mask: torch.Tensor,
    log_ratio_clamp: float | None = 20.0,
    num_tokens_global: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(pi_theta || pi_ref) per token with the k3 estimator (Schulman), masked mean; the GRPO KL penalty.

        log_r = ref_log_probs - log_probs,     kl = exp(log_r) - log_r - 1  (>= 0 per token, unbiased)

    Add `beta * loss` to the policy loss (beta = 0, i.e. off, in the SimpleVLA-RL / RLinf LIBERO recipes). The
    reference is the base model with the adapters disabled.

    Args:
        log_probs: [B, T] current policy log-probs, with grad.
        ref_log_probs: [B, T] reference log-probs (constants).
        mask: [B, T] bool / 0-1 active tokens.
        log_ratio_clamp: |log_r| bound before exp; None = no clamp.
        num_tokens_global: as in `ppo_clip_loss` with "token_mean".

    Returns:
        loss: 0-d tensor, the mean per-token KL.
        diagnostics: "kl": the same value, detached.
    """
    _check_tokens("ref_log_probs", ref_log_probs, log_probs)
    _check_tokens("mask", mask, log_probs)
    keep = mask.bool()
    log_r = _zero_masked(ref_log_probs.detach().float() - log_probs.float(), keep)
    if log_ratio_clamp is not None:
        log_r = log_r.clamp(-log_ratio_clamp, log_ratio_clamp)
    per_token_kl = torch.exp(log_r) - log_r - 1.0
    loss = masked_mean(per_token_kl, keep, denominator=num_tokens_global)
    return loss, {"kl": masked_mean(per_token_kl.detach(), keep)}


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    num_tokens_global: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked mean of the per-token policy entropy.

    It is a bonus: subtract it, `loss = pg_loss - ent_coef * entropy` (as CleanRL does), to keep the policy exploring.

    Args:
        entropy: [B, T] per-token entropy of the policy's action-token distribution, with grad.
        mask: [B, T] bool / 0-1 active tokens.
        num_tokens_global: as in `ppo_clip_loss` with "token_mean".

    Returns:
        loss: 0-d tensor, the mean entropy (positive).
        diagnostics: "entropy": the local mean entropy, detached.
    """
    _check_tokens("mask", mask, entropy)
    keep = mask.bool()
    entropy = entropy.float()
    loss = masked_mean(entropy, keep, denominator=num_tokens_global)
    return loss, {"entropy": masked_mean(entropy.detach(), keep)}


def behaviour_cloning_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor,
    num_tokens_global: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the policy's action tokens against teacher tokens, for the behaviour-cloning warm-up.

    The teacher is typically the greedy (argmax) policy or demonstration actions, discretised to the same bins.

    Args:
        logits: [B, T, V] action-token logits, with grad. V is whatever vocabulary slice the caller uses (the full
            LM vocabulary or only the 256 action bins); `target_ids` index into that last dim.
        target_ids: [B, T] int64 target index per token (any value at masked positions, e.g. -100).
        mask: [B, T] bool / 0-1 active tokens.
        num_tokens_global: as in `ppo_clip_loss` with "token_mean".

    Returns:
        loss: 0-d tensor, mean cross-entropy per active token.
        diagnostics: "bc_loss" (the same, detached, local mean) and "bc_accuracy" (fraction of active tokens whose
            argmax equals the target).
    """
    if logits.dim() != 3 or logits.shape[:2] != target_ids.shape:
        raise ValueError(
            f"logits must be [B, T, V] and target_ids [B, T], got {tuple(logits.shape)} and {tuple(target_ids.shape)}"
        )
    _check_tokens("mask", mask, target_ids)
    keep = mask.bool()
    # Masked targets may be -100 or padding ids: point them at class 0 so cross_entropy never sees an invalid index.
    safe_targets = torch.where(keep, target_ids, torch.zeros_like(target_ids)).long()
    # Zero the logits of padded tokens: NaN there would otherwise come back as NaN gradient through log_softmax.
    logits = torch.where(keep[..., None], logits.float(), torch.zeros((), device=logits.device))
    per_token_ce = F.cross_entropy(logits.flatten(0, 1), safe_targets.flatten(), reduction="none")
    per_token_ce = per_token_ce.view_as(safe_targets)
    loss = masked_mean(per_token_ce, keep, denominator=num_tokens_global)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == safe_targets).float()
        diagnostics = {
            "bc_loss": masked_mean(per_token_ce.detach(), keep),
            "bc_accuracy": masked_mean(correct, keep),
        }
    return loss, diagnostics
