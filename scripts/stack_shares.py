"""Where a sampled run's time went: shares of named frames in py-spy's collapsed stacks (`--format raw`, plain or
.gz), for the trainer's main thread and for its env workers, as `scripts/bench_gpu.sh` records them (PYSPY_AT).

    python scripts/stack_shares.py docs/bench/2026-12-01_h200x2_s4_call2_pyspy_oft.txt.gz

A frame's share is inclusive: the fraction of the thread's samples whose stack contains it (waits included: the run
was sampled with --idle). Each collapsed line is `process;thread-or-frame;...;frame count`.
"""

from __future__ import annotations

import argparse
import gzip
from collections import Counter

MAIN_FRAMES = ["Learner.update", "collect_episodes", "Rollout.collect", "Rollout.start_episodes", "EnvPool.reset_end",
               "EnvPool.step_end", "Rollout.act", "VLAPolicy.act", "Rollout.draws", "sampling_noise",
               "Rollout.record", "VLAPolicy.prepare"]
WORKER_FRAMES = ["_ConnectionBase.recv", "TransformedEnv.reset", "LiberoEnv._simulator_for", "TransformedEnv.step",
                 "MujocoEnv.step", "PrepareViews.__call__"]


def read_stacks(path: str) -> list[tuple[list[str], int]]:
    opener = gzip.open if path.endswith(".gz") else open
    stacks = []
    with opener(path, "rt") as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            stacks.append((stack.split(";"), int(count)))
    return stacks


def function_name(frame: str) -> str:
    """`Class.method (file:line)` -> `Class.method`; a private class's underscore dropped (the rollout's class was
    `_Rollout` in the profiles of 2026-12-01, `Rollout` since)."""
    return frame.split(" (")[0].lstrip("_")


def inclusive_shares(stacks: list[tuple[list[str], int]], names: list[str]) -> tuple[int, dict[str, float]]:
    """Samples in these stacks, and per name the share of them with a frame of that function."""
    total = sum(count for _, count in stacks)
    counts = Counter()
    for frames, count in stacks:
        functions = {function_name(frame) for frame in frames}
        counts.update({name: count for name in names if name.lstrip("_") in functions})
    return total, {name: counts[name] / max(total, 1) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", help="py-spy raw output (collapsed stacks), optionally gzipped")
    args = parser.parse_args()
    stacks = read_stacks(args.stacks)
    main_thread = [(f, n) for f, n in stacks if len(f) > 1 and f[1].startswith("_run_module_as_main")]
    workers = [(f, n) for f, n in stacks if any(frame.startswith("_worker_main ") for frame in f)]
    for label, part, names in (("trainer main thread", main_thread, MAIN_FRAMES),
                               ("env workers (all)", workers, WORKER_FRAMES)):
        total, shares = inclusive_shares(part, names)
        print(f"{label}: {total} samples")
        for name, share in shares.items():
            print(f"  {share:6.3f}  {name}")


if __name__ == "__main__":
    main()
