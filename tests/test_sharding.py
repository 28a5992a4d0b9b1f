"""Work items of an iteration, their split over ranks, and seed derivation."""

from collections import Counter

import numpy as np
import pytest

from trainer.envs.seeding import derive_seed, iteration_seed, sampling_seed
from trainer.envs.sharding import (
    WorkItem,
    all_groups,
    build_work_items,
    sample_groups,
    shard_bounds,
    shard_work_items,
)


def test_build_work_items_makes_g_samples_per_group_in_group_order():
    items = build_work_items([(0, 5), (2, 7)], samples_per_group=3)
    assert items == [
        WorkItem(0, 5, 0, 0),
        WorkItem(0, 5, 1, 0),
        WorkItem(0, 5, 2, 0),
        WorkItem(2, 7, 0, 1),
        WorkItem(2, 7, 1, 1),
        WorkItem(2, 7, 2, 1),
    ]
    with pytest.raises(ValueError, match="samples_per_group must be >= 1"):
        build_work_items([(0, 0)], samples_per_group=0)


def test_all_groups_is_tasks_times_init_states():
    groups = all_groups([2, 3])
    assert groups == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    items = build_work_items(all_groups([50, 50, 50]), samples_per_group=8)
    assert len(items) == 3 * 50 * 8
    # One group id per (task, init state) pair, each with exactly G samples 0..G-1.
    by_group = {}
    for item in items:
        by_group.setdefault(item.group_id, []).append(item)
    assert len(by_group) == 150
    for members in by_group.values():
        assert len({(m.task_id, m.init_state_id) for m in members}) == 1
        assert sorted(m.sample_index for m in members) == list(range(8))


def test_sample_groups_is_deterministic_distinct_and_in_range():
    counts = [50, 50, 50]
    chosen = sample_groups(counts, num_groups=32, seed=1234)
    assert chosen == sample_groups(counts, num_groups=32, seed=1234)
    assert chosen != sample_groups(counts, num_groups=32, seed=1235)
    assert len(set(chosen)) == 32 and chosen == sorted(chosen)
    assert all(0 <= task < 3 and 0 <= init < 50 for task, init in chosen)
    assert len(sample_groups([2, 1], num_groups=3, seed=0)) == 3  # all of them
    with pytest.raises(ValueError, match=r"num_groups must be in 1..3"):
        sample_groups([2, 1], num_groups=4, seed=0)


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("num_items", [0, 1, 5, 7, 24, 97, 256])
def test_shards_cover_every_item_once_and_are_balanced(world_size, num_items):
    groups = [(g % 3, g) for g in range(num_items)]
    items = build_work_items(groups, samples_per_group=1)
    shards = [shard_work_items(items, rank, world_size) for rank in range(world_size)]
    # Concatenated in rank order the shards are exactly the items: each item on exactly one rank.
    assert [item for shard in shards for item in shard] == items
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == num_items
    # Deterministic: every rank computes the same split on its own.
    assert shards == [shard_work_items(list(items), rank, world_size) for rank in range(world_size)]


def test_groups_may_span_ranks_and_every_member_is_still_assigned_once():
    items = build_work_items(all_groups([5]), samples_per_group=8)  # 40 items over 3 ranks: 14, 13, 13
    shards = [shard_work_items(items, rank, 3) for rank in range(3)]
    assert [len(shard) for shard in shards] == [14, 13, 13]
    owners = Counter((item.group_id, item.sample_index) for shard in shards for item in shard)
    assert len(owners) == 40 and set(owners.values()) == {1}
    assert {item.group_id for item in shards[0]} & {item.group_id for item in shards[1]} == {1}


def test_shard_bounds_rejects_bad_ranks():
    assert shard_bounds(10, 0, 4) == (0, 3) and shard_bounds(10, 3, 4) == (8, 10)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_bounds(10, 4, 4)
    with pytest.raises(ValueError, match="world_size >= 1"):
        shard_bounds(10, 0, 0)


# --- seeds ---------------------------------------------------------------------------------------------------------


def test_derive_seed_is_a_pure_function_of_its_inputs():
    assert derive_seed(7, 1, 2, 3) == derive_seed(7, 1, 2, 3)
    assert derive_seed(np.int64(7), 1, 2, 3) == derive_seed(7, 1, 2, 3)
    assert 0 <= derive_seed(7, 1, 2, 3) < 2**32


def test_derive_seed_gives_different_seeds_for_different_streams():
    seeds = [
        derive_seed(run_seed, rank, worker, episode)
        for run_seed in (0, 1)
        for rank in range(4)
        for worker in range(8)
        for episode in range(50)
    ]
    assert len(set(seeds)) == len(seeds)
    # Argument order matters (rank 1 worker 2 is not rank 2 worker 1), and episode seeds are not iteration seeds.
    assert derive_seed(0, 1, 2, 0) != derive_seed(0, 2, 1, 0)
    assert {iteration_seed(0, i) for i in range(100)}.isdisjoint(set(seeds))
    assert iteration_seed(0, 5) == iteration_seed(0, 5) != iteration_seed(1, 5)
    # a rollout's default sampling stream differs per rank and per rollout, and from the other streams
    sampling = {sampling_seed(0, rank, offset) for rank in range(4) for offset in (0, 1000, 2000)}
    assert len(sampling) == 12 and sampling.isdisjoint(set(seeds))


def test_derive_seed_rejects_negative_or_non_integer_inputs():
    with pytest.raises(ValueError, match="run_seed = -1"):
        derive_seed(-1, 0, 0, 0)
    with pytest.raises(ValueError, match="episode = 1.5"):
        derive_seed(0, 0, 0, 1.5)
    with pytest.raises(ValueError, match="iteration = -2"):
        iteration_seed(0, -2)
