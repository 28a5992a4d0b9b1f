"""Seeds derived from the run seed, so that a run is reproducible for a fixed world size (DESIGN invariant 4).

Every stream is a pure function of a path of non-negative integers under the run seed, hashed by numpy's
SeedSequence: nearby paths give unrelated seeds, and resuming at episode N reproduces the seed a fresh run would have
used for episode N. The first element of each path names the kind of stream, so episode seeds and iteration seeds
can never coincide.

Evaluation does not use derived seeds: it asks for OFFICIAL_SCENE, the scene of the official protocol (below).
"""

from __future__ import annotations

import numpy as np

# Not a numpy seed (np.random.seed takes values below 2**32): a reset with this seed asks the env for the scene that the
# official evaluation shows for that initial state. LIBERO: the official evaluation seeds one env per task with 0 once
# and runs trial k after k earlier resets; everything the initial state does not pin down (fixtures such as cabinets
# and stoves) is drawn from numpy's global random state during each reset (trainer/envs/libero.py rebuilds it).
OFFICIAL_SCENE = 2**32

_EPISODE_STREAM = 0
_ITERATION_STREAM = 1
_SAMPLING_STREAM = 2
_EPISODE_SAMPLING_STREAM = 3


def _check_seed_inputs(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"seeds are derived from non-negative integers; got {name} = {value!r}")


def _seed_from_path(run_seed: int, path: tuple[int, ...]) -> int:
    sequence = np.random.SeedSequence(entropy=int(run_seed), spawn_key=tuple(int(v) for v in path))
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def derive_seed(run_seed: int, rank: int, worker: int, episode: int) -> int:
    """Seed in [0, 2**32) for one episode: `episode` counts the episodes that `worker` of `rank` has run."""
    _check_seed_inputs(run_seed=run_seed, rank=rank, worker=worker, episode=episode)
    return _seed_from_path(run_seed, (_EPISODE_STREAM, rank, worker, episode))


def iteration_seed(run_seed: int, iteration: int) -> int:
    """Seed in [0, 2**32) shared by all ranks for one iteration (e.g. to choose which init states to train on)."""
    _check_seed_inputs(run_seed=run_seed, iteration=iteration)
    return _seed_from_path(run_seed, (_ITERATION_STREAM, iteration))


def sampling_seed(run_seed: int, rank: int, episode_offset: int) -> int:
    """Seed in [0, 2**32) for a rank's action sampling in a rollout whose episodes start at `episode_offset`."""
    _check_seed_inputs(run_seed=run_seed, rank=rank, episode_offset=episode_offset)
    return _seed_from_path(run_seed, (_SAMPLING_STREAM, rank, episode_offset))


def episode_sampling_seed(base_seed: int, episode: int) -> int:
    """Seed in [0, 2**32) of one episode's action-sampling stream in a rollout whose streams derive from `base_seed`
    (trainer.rollout: each episode samples from its own stream, whatever batch its env is in)."""
    _check_seed_inputs(base_seed=base_seed, episode=episode)
    return _seed_from_path(base_seed, (_EPISODE_SAMPLING_STREAM, episode))
