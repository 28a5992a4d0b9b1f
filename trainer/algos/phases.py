"""Training phases: behaviour-cloning warm-up, then an epsilon-greedy hand-over, then RL.

    iterations [0, W)          "bc_warmup": rollouts take the greedy (teacher) action at every step (epsilon = 1);
                                            the update is `behaviour_cloning_loss` on those actions.
    iterations [W, W + H)      "handover":  each env step takes the greedy action with probability epsilon, else the
                                            sampled one; epsilon falls linearly from epsilon_start to 0 over H
                                            iterations; the update is the RL loss.
    iterations [W + H, ...)    "rl":        sampled actions only (epsilon = 0), RL loss.

with W = bc_warmup_iterations and H = handover_iterations. Iterations count from 0. With W = H = 0 every iteration is
RL. Why a hand-over at all: switching from the teacher's actions straight to the sampled policy drops success (and so
the reward signal) abruptly; mixing the two lets the RL phase start from episodes that still succeed.
"""

from __future__ import annotations

from dataclasses import dataclass

BC_WARMUP = "bc_warmup"
HANDOVER = "handover"
RL = "rl"


@dataclass(frozen=True)
class PhaseSchedule:
    """Step budgets of the phases (the same names as the `algo` section of the run config)."""

    bc_warmup_iterations: int = 0
    """Iterations of behaviour-cloning warm-up on greedy / teacher actions (0 = none)."""
    handover_iterations: int = 0
    """Iterations over which epsilon decays linearly from epsilon_start to 0 (0 = switch straight to RL)."""
    epsilon_start: float = 1.0
    """Probability that an env step takes the greedy action at the first hand-over iteration (1.0 = all greedy)."""

    def __post_init__(self) -> None:
        for name in ("bc_warmup_iterations", "handover_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.epsilon_start <= 1.0:
            raise ValueError(f"epsilon_start is a probability and must be in [0, 1], got {self.epsilon_start!r}")


@dataclass(frozen=True)
class Phase:
    """The phase of one iteration: its name ("bc_warmup" | "handover" | "rl") and epsilon, the probability that an
    env step takes the greedy action instead of the sampled one."""

    name: str
    epsilon: float


def phase_at(iteration: int, schedule: PhaseSchedule) -> Phase:
    """The phase and epsilon of a 0-based training iteration.

    In the hand-over, epsilon = epsilon_start * (1 - k / H) at its k-th iteration (k = 0 .. H - 1): epsilon_start at
    the first hand-over iteration, epsilon_start / H at the last, 0 from the first RL iteration on.

    Args:
        iteration: 0-based iteration index (a resumed run passes its restored counter).
        schedule: the step budgets.

    Returns:
        Phase(name, epsilon).
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    warmup_end = schedule.bc_warmup_iterations
    handover_end = warmup_end + schedule.handover_iterations
    if iteration < warmup_end:
        return Phase(BC_WARMUP, 1.0)
    if iteration < handover_end:
        progress = (iteration - warmup_end) / schedule.handover_iterations
        return Phase(HANDOVER, schedule.epsilon_start * (1.0 - progress))
    return Phase(RL, 0.0)


def rl_token_mask(token_mask, took_greedy_action: bool):
    """The tokens of one policy step that the RL loss trains on: none of a step that took the greedy action.

    What the hand-over trains on: only the actions the policy SAMPLED. A greedy step's action was the argmax, not a
    draw from the policy, so PPO's ratio pi_new(a) / pi_old(a) has no meaning for it, and training on it anyway acts
    as advantage-weighted behaviour cloning of the argmax, which drains the entropy that GRPO needs (a group whose
    samples all act alike has equal rewards and no signal). The greedy steps still count: they carry their episodes
    to the outcome whose reward the sampled steps are credited with.

    Args:
        token_mask: [n_tokens] 0/1 tensor of the step's executed tokens (Episode.token_masks).
        took_greedy_action: the step's Episode.greedy flag.

    Returns:
        token_mask itself, or zeros of its shape and dtype.
    """
    return token_mask * 0 if took_greedy_action else token_mask
