"""The episodes of one iteration as work items, and their split over ranks.

One GRPO group is G episodes (samples) from the same (task, init state). An iteration's items are built in the same
order on every rank, then each rank takes its own contiguous slice. Contiguous rather than strided: the items are
ordered by task, so a rank's slice touches as few tasks as possible, and for LIBERO switching a worker to another task
means rebuilding its simulator (seconds). A group may span two ranks; that is fine because group statistics come from
a global gather (DESIGN invariant 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkItem:
    task_id: int
    init_state_id: int
    sample_index: int  # 0..G-1 within its group
    group_id: int  # the group's position in this iteration's list of (task, init state) pairs


def all_groups(num_init_states_per_task: Sequence[int]) -> list[tuple[int, int]]:
    """Every (task_id, init_state_id) pair, task by task: tasks x init states."""
    return [
        (task_id, init_state_id)
        for task_id, count in enumerate(num_init_states_per_task)
        for init_state_id in range(count)
    ]


def sample_groups(num_init_states_per_task: Sequence[int], num_groups: int, seed: int) -> list[tuple[int, int]]:
    """num_groups distinct (task_id, init_state_id) pairs chosen uniformly with `seed`, returned in task order.

    Every rank must pass the same seed (e.g. seeding.iteration_seed(run_seed, iteration)) so that all build the
    same items.
    """
    candidates = all_groups(num_init_states_per_task)
    if not 1 <= num_groups <= len(candidates):
        raise ValueError(
            f"num_groups must be in 1..{len(candidates)} (the number of (task, init state) pairs), got {num_groups}"
        )
    chosen = np.random.default_rng(seed).choice(len(candidates), size=num_groups, replace=False)
    return [candidates[i] for i in sorted(chosen)]


def build_work_items(groups: Sequence[tuple[int, int]], samples_per_group: int) -> list[WorkItem]:
    """G = samples_per_group items per (task_id, init_state_id) pair; group_id is the pair's index in `groups`."""
    if samples_per_group < 1:
        raise ValueError(f"samples_per_group must be >= 1, got {samples_per_group}")
    return [
        WorkItem(task_id=task_id, init_state_id=init_state_id, sample_index=sample_index, group_id=group_id)
        for group_id, (task_id, init_state_id) in enumerate(groups)
        for sample_index in range(samples_per_group)
    ]


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous slice; the first num_items % world_size ranks get one item more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size and world_size >= 1, got rank={rank}, world_size={world_size}")
    base, remainder = divmod(num_items, world_size)
    start = rank * base + min(rank, remainder)
    end = start + base + (1 if rank < remainder else 0)
    return start, end


def shard_work_items(items: Sequence[WorkItem], rank: int, world_size: int) -> list[WorkItem]:
    """This rank's items: every item goes to exactly one rank, and rank sizes differ by at most one."""
    start, end = shard_bounds(len(items), rank, world_size)
    return list(items[start:end])
