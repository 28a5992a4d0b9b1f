"""Rebuilds of LIBERO simulators in a rollout: workers that keep their task (Rollout.next_item) against items taken
in order (the rule before 2026-12-01), on real LIBERO on the CPU (OSMesa).

Two workers, libero_spatial tasks 0 and 1, two episodes of each (8 steps, 128 px cameras), the tiny policy. Taken in
order, each worker runs one episode of task 0 and then one of task 1, and so builds a second simulator mid-rollout;
keeping their task, neither does. Each variant runs on a fresh pool (the first resets build a simulator either way),
`--repeats` times, alternating. Prints, per run, the rollout's wall time, its env waits and the time spent inside
the workers' resets, and the task sequence of each worker; writes them as JSON with --out.

    PYTHONPATH=. python scripts/measure_task_affinity.py --repeats 2 --out docs/bench/task_affinity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import pairwise

from trainer.envs.pool import EnvPool
from trainer.envs.sharding import build_work_items
from trainer.rollout import Rollout

SUITE = "libero_spatial"
ENV_KWARGS = {"max_steps": 8, "camera_size": 128}
# plausible q01 / q99 bounds of LIBERO's delta actions (random weights need some; the values do not matter here)
NORM_STATS = {"action": {"q01": [-0.75, -0.66, -0.94, -0.11, -0.21, -0.18, 0.0],
                         "q99": [0.94, 0.87, 0.94, 0.14, 0.18, 0.35, 1.0], "mask": [True] * 6 + [False]}}


def tiny_libero_policy():
    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    model.config.norm_stats[SUITE] = NORM_STATS
    return VLAPolicy(model, tokenizer, EnvSettings("libero", True, SUITE), value_head=False).eval()


def one_run(policy, keep_task: bool) -> dict:
    items = build_work_items([(0, 0), (1, 0)], samples_per_group=2)
    with EnvPool(SUITE, 2, ENV_KWARGS, start_timeout_s=600, reset_timeout_s=600, step_timeout_s=600) as pool:
        tasks: dict[int, list[int]] = {0: [], 1: []}
        reset = pool.reset

        def recording_reset(requests, timeout_s=None):
            for worker, request in requests.items():
                tasks[worker].append(request.task_id)
            return reset(requests, timeout_s)

        pool.reset = recording_reset
        started = time.perf_counter()
        # keep_tasks false: every free worker takes the earliest pending item (the rule before 2026-12-01)
        episodes, stats = Rollout(policy, pool, items, run_seed=0, keep_tasks=keep_task).collect()
        wall = time.perf_counter() - started
        reset_seconds = [w.reset_seconds for w in pool.stats.workers]
    assert all(e.env_error is None for e in episodes), [e.env_error for e in episodes]
    return {"keep_task": keep_task, "rollout_seconds": wall, "env_wait_seconds": stats.env_seconds,
            "worker_reset_seconds": reset_seconds, "tasks_per_worker": tasks,
            "simulators_built": sum(1 + sum(a != b for a, b in pairwise(t)) for t in tasks.values())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    policy = tiny_libero_policy()
    runs = []
    for _ in range(args.repeats):
        for keep_task in (False, True):
            run = one_run(policy, keep_task)
            runs.append(run)
            print(json.dumps(run), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"suite": SUITE, "env_kwargs": ENV_KWARGS, "render": "OSMesa (CPU)", "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
