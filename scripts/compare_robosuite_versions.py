"""Run the same scripted LIBERO episodes under two robosuite versions and compare states and frames.

    # robosuite 1.4.1 (what the OpenVLA / OFT LIBERO requirements pin) in a scratch venv, LIBERO from the project's
    python3.11 -m venv /tmp/rs141 && /tmp/rs141/bin/pip install robosuite==1.4.1 mujoco==3.8.1
    MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa /tmp/rs141/bin/python scripts/compare_robosuite_versions.py run /tmp/rs141.npz
    MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa .venv/bin/python scripts/compare_robosuite_versions.py run /tmp/rs140.npz
    .venv/bin/python scripts/compare_robosuite_versions.py compare /tmp/rs140.npz /tmp/rs141.npz

`run` appends the project's site-packages *after* the interpreter's own, so robosuite and mujoco come from the venv
that runs it and LIBERO (with its assets) from the project's. Each episode: the official scene procedure, 10 no-op
steps, then 50 scripted steps that drive the gripper down onto the objects and close it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EPISODES = [("libero_spatial", 0), ("libero_object", 0)]


def run(out: str) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.append(str(next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))))
    from trainer.envs.libero_setup import ensure_libero_ready
    from trainer.envs.render import apply_render_env

    apply_render_env("osmesa")
    ensure_libero_ready()
    import mujoco
    import robosuite
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv

    records = {}
    for suite, task_id in EPISODES:
        task_suite = benchmark.get_benchmark_dict()[suite]()
        env = OffScreenRenderEnv(bddl_file_name=task_suite.get_task_bddl_file_path(task_id), camera_heights=128,
                                 camera_widths=128)
        env.seed(0)
        env.reset()
        env.set_init_state(task_suite.get_task_init_states(task_id)[0])
        rng = np.random.default_rng(0)
        states, frames = [], []
        for t in range(60):
            if t < 10:
                action = [0, 0, 0, 0, 0, 0, -1]
            else:
                action = [0.3 + 0.1 * rng.normal(), 0.1 * rng.normal(), -0.6, 0, 0, 0.1 * rng.normal(),
                          1.0 if t > 40 else -1.0]
            obs, _, _, _ = env.step(action)
            states.append(env.get_sim_state().copy())
            frames.append(obs["agentview_image"].copy())
        records[f"{suite}_states"], records[f"{suite}_frames"] = np.stack(states), np.stack(frames)
        records[f"{suite}_ngeom"] = np.array(env.env.sim.model.ngeom)
        env.close()
    np.savez_compressed(out, robosuite=np.array(robosuite.__version__), mujoco=np.array(mujoco.__version__), **records)
    print(f"robosuite {robosuite.__version__}, mujoco {mujoco.__version__} -> {out}")


def compare(first: str, second: str) -> None:
    a, b = np.load(first), np.load(second)
    print(f"robosuite {a['robosuite']} vs {b['robosuite']} (mujoco {a['mujoco']} / {b['mujoco']})")
    for suite, _ in EPISODES:
        states_a, states_b = a[f"{suite}_states"], b[f"{suite}_states"]
        frames = np.abs(a[f"{suite}_frames"].astype(int) - b[f"{suite}_frames"].astype(int))
        steps = np.abs(states_a - states_b).max(axis=1) > 0
        print(f"{suite}: geoms {a[f'{suite}_ngeom']} vs {b[f'{suite}_ngeom']}; steps whose state differs "
              f"{int(steps.sum())}/{len(steps)}; frames differing {int((frames.reshape(len(frames), -1).max(1) > 0).sum())}"
              f"/{len(frames)} (max {frames.max()} levels)")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        compare(sys.argv[2], sys.argv[3])
