"""Training phases: behaviour-cloning warm-up, then an epsilon-greedy hand-over, then RL.

    iterations [0, W)          "bc_warmup": rollouts take the greedy (teacher) action at every step (greedy
                                            probability 1); the update is `behaviour_cloning_loss` on those actions.
    iterations [W, W + H)      "handover":  each env step takes the greedy action with the greedy probability, else
                                            the sampled one; it falls linearly from handover_greedy_start to 0 over H
                                            iterations; the update is the RL loss.
    iterations [W + H, ...)    "rl":        sampled actions only (greedy probability 0), RL loss.

with W = bc_warmup_iterations and H = handover_iterations. Iterations count from 0. With W = H = 0 every iteration is
RL. Why a hand-over at all: switching from the teacher's actions straight to the sampled policy drops success (and so
the reward signal) abruptly; mixing the two lets the RL phase start from episodes that still succeed.

The greedy probability is the "epsilon" of epsilon-greedy exploration; it is named for what it is here because the
run config's `epsilon` is PPO's clip range (TRL's name).
"""

from __future__ import annotations

from dataclasses import dataclass

BC_WARMUP = "bc_warmup"
HANDOVER = "handover"
RL = "rl"


@dataclass(frozen=True)
class PhaseSchedule:
    """Step budgets of the phases (the run config's `algo.phases` section). Validated on construction."""

    bc_warmup_iterations: int = 0
    """Iterations of behaviour-cloning warm-up on greedy / teacher actions (0 = none)."""
    handover_iterations: int = 0
    """Iterations over which the greedy probability decays linearly from handover_greedy_start to 0 (0 = switch
    straight to RL)."""
    handover_greedy_start: float = 0.75
    """Probability that an env step takes the greedy action at the first hand-over iteration (1.0 = all greedy). Below
    1 so that the first hand-over iteration has sampled steps to train on: the RL loss trains only on sampled actions
    (`rl_token_mask`), and at 1.0 that iteration trained on nothing (docs/learning.md, the BC run)."""

    def problems(self) -> list[str]:
        found = []
        for name in ("bc_warmup_iterations", "handover_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                found.append(f"{name} = {value!r}; expected an integer >= 0")
        if not 0.0 <= self.handover_greedy_start <= 1.0:
            found.append(f"handover_greedy_start = {self.handover_greedy_start!r}; expected a probability in [0, 1]")
        return found

    def __post_init__(self) -> None:
        found = self.problems()
        if found:
            raise ValueError("; ".join(found))


@dataclass(frozen=True)
class Phase:
    """The phase of one iteration: its name ("bc_warmup" | "handover" | "rl") and greedy probability, the chance that
    an env step takes the greedy action instead of the sampled one."""

    name: str
    greedy_probability: float


def phase_at(iteration: int, schedule: PhaseSchedule) -> Phase:
    """The phase and greedy probability of a 0-based training iteration.

    In the hand-over, the greedy probability is handover_greedy_start * (1 - k / H) at its k-th iteration
    (k = 0 .. H - 1): handover_greedy_start at the first hand-over iteration, handover_greedy_start / H at the last,
    0 from the first RL iteration on.

    Args:
        iteration: 0-based iteration index (a resumed run passes its restored counter).
        schedule: the step budgets.

    Returns:
        Phase(name, greedy_probability).
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    warmup_end = schedule.bc_warmup_iterations
    handover_end = warmup_end + schedule.handover_iterations
    if iteration < warmup_end:
        return Phase(BC_WARMUP, 1.0)
    if iteration < handover_end:
        progress = (iteration - warmup_end) / schedule.handover_iterations
        return Phase(HANDOVER, schedule.handover_greedy_start * (1.0 - progress))
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
