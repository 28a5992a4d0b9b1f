"""Pure tensor functions for the RL update: advantages, losses and the phase schedule.

Nothing here calls torch.distributed: callers pass inputs already gathered across ranks.
"""

from trainer.algos.advantages import (
    GRPO_SCALES,
    absolute_advantages,
    critic_diagnostics,
    dynamic_sampling_mask,
    gae,
    grpo_advantages,
    mean_std_from_sums,
    moment_sums,
    normalize_advantages,
)
from trainer.algos.losses import (
    LOSS_TYPES,
    behaviour_cloning_loss,
    entropy_bonus,
    explained_variance,
    kl_to_reference,
    masked_mean,
    ppo_clip_loss,
    value_loss,
)
from trainer.algos.phases import BC_WARMUP, HANDOVER, RL, Phase, PhaseSchedule, phase_at, rl_token_mask

__all__ = [
    "BC_WARMUP",
    "GRPO_SCALES",
    "HANDOVER",
    "LOSS_TYPES",
    "RL",
    "Phase",
    "PhaseSchedule",
    "absolute_advantages",
    "behaviour_cloning_loss",
    "critic_diagnostics",
    "dynamic_sampling_mask",
    "entropy_bonus",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "kl_to_reference",
    "masked_mean",
    "mean_std_from_sums",
    "moment_sums",
    "normalize_advantages",
    "phase_at",
    "ppo_clip_loss",
    "rl_token_mask",
    "value_loss",
]
