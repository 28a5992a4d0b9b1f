"""Phase schedule boundaries: warm-up -> epsilon-greedy hand-over -> RL."""

import dataclasses
import itertools

import pytest

from trainer.algos import BC_WARMUP, HANDOVER, RL, Phase, PhaseSchedule, phase_at


def test_warmup_handover_rl_boundaries():
    schedule = PhaseSchedule(bc_warmup_iterations=3, handover_iterations=4, handover_greedy_start=1.0)
    # warm-up: iterations 0, 1, 2, all greedy
    # hand-over: iterations 3..6, greedy probability = 1 - k/4 for k = 0..3 -> 1, .75, .5, .25
    # RL from iteration 7 on
    expected = [
        Phase(BC_WARMUP, 1.0),
        Phase(BC_WARMUP, 1.0),
        Phase(BC_WARMUP, 1.0),
        Phase(HANDOVER, 1.0),
        Phase(HANDOVER, 0.75),
        Phase(HANDOVER, 0.5),
        Phase(HANDOVER, 0.25),
        Phase(RL, 0.0),
        Phase(RL, 0.0),
    ]
    assert [phase_at(i, schedule) for i in range(9)] == expected
    assert phase_at(10_000, schedule) == Phase(RL, 0.0)


def test_handover_greedy_start_scales_the_handover():
    schedule = PhaseSchedule(bc_warmup_iterations=0, handover_iterations=2, handover_greedy_start=0.5)
    assert phase_at(0, schedule) == Phase(HANDOVER, 0.5)
    assert phase_at(1, schedule) == Phase(HANDOVER, 0.25)
    assert phase_at(2, schedule) == Phase(RL, 0.0)


def test_warmup_straight_to_rl_and_default_is_all_rl():
    schedule = PhaseSchedule(bc_warmup_iterations=2)
    assert [phase_at(i, schedule).name for i in range(3)] == [BC_WARMUP, BC_WARMUP, RL]
    assert phase_at(0, PhaseSchedule()) == Phase(RL, 0.0)


def test_greedy_probability_is_monotone_non_increasing():
    schedule = PhaseSchedule(bc_warmup_iterations=5, handover_iterations=7, handover_greedy_start=0.9)
    probabilities = [phase_at(i, schedule).greedy_probability for i in range(20)]
    assert all(a >= b for a, b in itertools.pairwise(probabilities))


def test_schedule_is_frozen_and_validated():
    schedule = PhaseSchedule(1, 2, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.handover_iterations = 3
    with pytest.raises(ValueError, match="bc_warmup_iterations"):
        PhaseSchedule(bc_warmup_iterations=-1)
    with pytest.raises(ValueError, match="handover_iterations"):
        PhaseSchedule(handover_iterations=2.5)
    with pytest.raises(ValueError, match="handover_greedy_start"):
        PhaseSchedule(handover_greedy_start=1.5)
    with pytest.raises(ValueError, match="iteration"):
        phase_at(-1, schedule)


def test_the_rl_loss_skips_the_tokens_of_greedy_steps_only():
    import torch

    from trainer.algos import rl_token_mask

    executed = torch.tensor([1.0, 1.0, 1.0, 0.0])  # an OFT-like step whose last action was not executed
    assert torch.equal(rl_token_mask(executed, took_greedy_action=False), executed)
    skipped = rl_token_mask(executed, took_greedy_action=True)
    assert torch.equal(skipped, torch.zeros(4)) and skipped.dtype == executed.dtype
