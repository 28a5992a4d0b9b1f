"""Compare evaluation resets (seed=OFFICIAL_SCENE) with the official sequential procedure, run with LIBERO directly.

    PYTHONPATH=$PWD .venv/bin/python scripts/compare_official_scenes.py 4 libero_spatial:0 libero_spatial:4 libero_goal:0

For each suite:task: the official procedure (one OffScreenRenderEnv with its default hard resets, env.seed(0) once,
then per trial: reset, set_init_state, 10 no-op steps) for trials 0..K-1; then our LiberoEnv resetting to the official
scene of the same trials in the order 2, 0, 1, 3, ... (as parallel workers would take them). Prints, per trial, whether
numpy's random state after the reset, the fixture poses and the whole sim state after the wait steps are equal, and how
far the fixtures land from the official ones with per-episode derived seeds (what evaluation did before).
One LIBERO env at a time (each holds ~2.5 GB); hard resets take seconds each on a CPU.
"""

from __future__ import annotations

import gc
import sys
import time

import numpy as np


def fixture_poses(inner) -> dict[str, np.ndarray]:
    poses = {}
    for name, fixture in sorted(inner.fixtures_dict.items()):
        body = inner.sim.model.body_name2id(fixture.root_body)
        poses[name] = np.concatenate([inner.sim.model.body_pos[body], inner.sim.model.body_quat[body]])
    return poses


def compare(suite: str, task_id: int, trials: int) -> None:
    from libero.libero.envs import OffScreenRenderEnv

    from trainer.envs.libero import NUM_STEPS_WAIT, WAIT_ACTION, LiberoEnv
    from trainer.envs.seeding import OFFICIAL_SCENE, derive_seed

    ours = LiberoEnv(suite, camera_size=128)
    init_states = ours.init_states(task_id)
    official = OffScreenRenderEnv(bddl_file_name=ours._benchmark.get_task_bddl_file_path(task_id), camera_heights=128,
                                  camera_widths=128)
    reference = []
    started = time.perf_counter()
    official.seed(0)
    for trial in range(trials):
        official.reset()
        random_state, poses = np.random.get_state(), fixture_poses(official.env)
        official.set_init_state(init_states[trial])
        for _ in range(NUM_STEPS_WAIT):
            official.step(WAIT_ACTION)
        reference.append((random_state, poses, official.get_sim_state().copy()))
    official_seconds = time.perf_counter() - started
    official.close()
    del official
    gc.collect()

    order = [2, 0, 1] + list(range(3, trials)) if trials >= 3 else list(range(trials))
    started = time.perf_counter()
    lines = []
    for trial in order:
        ours.reset(task_id, trial, seed=OFFICIAL_SCENE)
        random_state = ours._official_random_state[2]
        same_random_state = random_state[2] == reference[trial][0][2] and np.array_equal(random_state[1],
                                                                                        reference[trial][0][1])
        poses = fixture_poses(ours.sim_env.env)
        pose_diff = max([float(np.abs(poses[n] - reference[trial][1][n]).max()) for n in poses] or [0.0])
        same_state = np.array_equal(ours.sim_env.get_sim_state(), reference[trial][2])
        lines.append(f"  trial {trial}: random state equal {same_random_state}, fixture max |diff| {pose_diff:.1e}, "
                     f"sim state equal {same_state}")
    ours_seconds = time.perf_counter() - started
    before = []
    for trial in range(trials):
        ours.reset(task_id, trial, seed=derive_seed(0, 0, 0, trial))
        poses = fixture_poses(ours.sim_env.env)
        before.append(max([float(np.abs(poses[n][:3] - reference[trial][1][n][:3]).max()) for n in poses] or [0.0]))
    print(f"{suite}:{task_id} fixtures {sorted(reference[0][1])}: ours {ours_seconds:.1f} s "
          f"({ours.scene_replay_resets} replayed resets), official {official_seconds:.1f} s")
    print("\n".join(lines))
    print(f"  derived seeds: fixture position max |diff| per trial (m) {[round(b, 4) for b in before]}", flush=True)
    ours.close()


def main(argv: list[str]) -> int:
    from trainer.envs.libero_setup import ensure_libero_ready
    from trainer.envs.render import apply_render_env

    apply_render_env("osmesa")
    ensure_libero_ready()
    trials = int(argv[0])
    for spec in argv[1:]:
        suite, task_id = spec.split(":")
        compare(suite, int(task_id), trials)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
