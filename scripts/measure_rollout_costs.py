"""Measure the per-step costs of a rollout on CPU and print a table.

    .venv/bin/python scripts/measure_rollout_costs.py                 # everything (LIBERO too, ~2-3 minutes)
    .venv/bin/python scripts/measure_rollout_costs.py --no-libero     # policy and toy only
    .venv/bin/python scripts/measure_rollout_costs.py --json costs.json

What is measured (median and minimum of --repeats timed calls after a warm-up call; wall-clock, so other load on the
machine shows up in the medians: the script prints the load average before and after):
- policy: VLAPolicy.prepare and VLAPolicy.act (sampled) of the tiny presets at batch 1 / 4 / 16 on toy observations
  (`tiny`: one prefill + 6 cached decoding steps for 1 action; `tiny-oft`: one forward for a chunk of 8 actions),
  with 1 and with 2 torch threads (--threads): on a CPU that other processes keep busy, intra-op threads that wait
  for each other can cost far more than they save;
  and the LIBERO image pipeline (rotate, JPEG round trip, Lanczos resize, centre crop) of one 256 px frame, at the
  tiny model's 32 px and at OpenVLA's 224 px.
- toy env: ToyReachEnv.step in-process (chunk 1 and 8), and one batched EnvPool.step round trip over 4 subprocess
  workers (what the collector pays per policy step when the toy task runs in an EnvPool).
- LIBERO (one simulator in this process, 256 px cameras, OSMesa on CPU): env.step with chunk 1 (both cameras rendered
  after every action) and chunk 8 (rendered once per chunk), the physics alone (no frame rendered), rendering the two
  cameras alone, the soft reset (init state + 10 settle steps), and building the simulator of a task.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np

LIBERO_SUITE = "libero_spatial"


def timed(function, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, minimum) seconds of one call. On a shared machine the minimum is the better estimate of the cost
    itself, the median of what a rollout would see under the same load."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples)


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, component: str, setting: str, seconds: float | tuple[float, float], per: str | None = None,
            count: int = 1):
        median, minimum = seconds if isinstance(seconds, tuple) else (seconds, seconds)
        row = {"component": component, "setting": setting,
               "ms_per_call": median * 1e3, "ms_per_call_min": minimum * 1e3}
        if per is not None:
            row["per"] = per
            row["ms_per_unit"] = median * 1e3 / count
        self.rows.append(row)
        print(f"  {component:<22} {setting:<48} {self._cells(row)}", flush=True)

    @staticmethod
    def _cells(row: dict) -> str:
        unit = f"{row['ms_per_unit']:.2f} / {row['per']}" if "per" in row else ""
        return f"| {row['ms_per_call']:>10.2f} | {row['ms_per_call_min']:>10.2f} | {unit:>20} |"

    def print(self) -> None:
        print()
        print(f"| {'component':<22} | {'setting':<48} | {'ms / call':>10} | {'(min)':>10} | {'ms / unit':>20} |")
        print(f"|{'-' * 24}|{'-' * 50}|{'-' * 12}|{'-' * 12}|{'-' * 22}|")
        for row in self.rows:
            print(f"| {row['component']:<22} | {row['setting']:<48} {self._cells(row)}")


def toy_observations(count: int):
    from trainer.envs.toy import ToyReachEnv

    env = ToyReachEnv(max_steps=1000)
    observations = []
    for index in range(count):
        observations.append(env.reset(index % 3, index % 50, seed=index))
    return observations


def timed_interleaved(functions: dict, repeats: int) -> dict:
    """timed() for several functions, called round-robin so that changes of the machine's load hit all alike."""
    for function in functions.values():
        function()  # warm-up
    samples = {key: [] for key in functions}
    for _ in range(repeats):
        for key, function in functions.items():
            start = time.perf_counter()
            function()
            samples[key].append(time.perf_counter() - start)
    return {key: (statistics.median(values), min(values)) for key, values in samples.items()}


def measure_policy(table: Table, repeats: int, threads: int, report_prepare: bool = True) -> None:
    import torch

    from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    functions, chunks = {}, {}
    for name in ("tiny", "tiny-oft"):
        model, tokenizer = load_model_and_tokenizer(name, seed=0)
        policy = VLAPolicy(model, tokenizer, EnvSettings("none", False, "toy"), value_head=True).eval()
        chunks[name] = policy.chunk_size
        for batch in (1, 4, 16):
            observations = toy_observations(batch)
            inputs = policy.prepare(observations)
            functions[name, "act", batch] = lambda p=policy, i=inputs: p.act(i, temperature=1.0, generator=generator)
            functions[name, "prepare", batch] = lambda p=policy, o=observations: p.prepare(o)
    results = timed_interleaved(functions, repeats)
    for (name, what, batch), seconds in results.items():
        chunk = chunks[name]
        if what == "act":
            actions = f"{chunk} action{'s' if chunk > 1 else ''}/env"
            table.add(f"policy {name}", f"act, batch {batch} ({actions}), {threads} thread{'s' * (threads > 1)}",
                      seconds, "env-action", batch * chunk)
        elif report_prepare:  # numpy and tensor packing: the thread count does not matter
            table.add(f"policy {name}", f"prepare (toy frames), batch {batch}", seconds, "env", batch)


def measure_image_pipeline(table: Table, repeats: int) -> None:
    from trainer.models.processor import ImagePipeline

    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for size in (32, 224):
        pipeline = ImagePipeline("libero", size=size)
        seconds = timed(lambda p=pipeline: p(frame), repeats * 4)
        table.add("image pipeline", f"LIBERO 256 px frame -> {size} px", seconds, "frame", 1)


def measure_toy(table: Table, repeats: int) -> None:
    from trainer.envs.pool import EnvPool, ResetRequest
    from trainer.envs.toy import ToyReachEnv

    env = ToyReachEnv(max_steps=10**9)
    env.reset(0, 0, seed=0)
    for chunk in (1, 8):
        actions = np.full((chunk, 7), 0.01)
        table.add("toy env (in process)", f"step, chunk {chunk}", timed(lambda a=actions: env.step(a), repeats * 50),
                  "action", chunk)
    workers = 4
    with EnvPool("toy", workers, {"max_steps": 10**9}, step_timeout_s=30) as pool:
        pool.reset({i: ResetRequest(i % 3, i, seed=i) for i in range(workers)})
        for chunk in (1, 8):
            actions = {i: np.full((chunk, 7), 0.01) for i in range(workers)}
            seconds = timed(lambda a=actions: pool.step(a), repeats * 10)
            table.add("toy EnvPool", f"batched step, {workers} workers, chunk {chunk}", seconds, "env", workers)


def measure_libero(table: Table, repeats: int) -> None:
    from trainer.envs.libero import PRIMARY_CAMERA, WRIST_CAMERA, LiberoEnv

    rng = np.random.default_rng(0)

    def random_actions(count: int) -> np.ndarray:
        actions = rng.uniform(-0.3, 0.3, (count, 7))
        actions[:, 6] = -1.0  # gripper open
        return actions

    env = LiberoEnv(LIBERO_SUITE, max_steps=600)
    try:
        start = time.perf_counter()
        env.reset(0, 0, seed=0)
        table.add("LIBERO", "build the task's simulator + first reset", time.perf_counter() - start)
        env.step(random_actions(1))  # the first step compiles numba code (~9 s on CPU): not part of the figures

        def reset():
            env.reset(0, 1, seed=1)

        table.add("LIBERO", "reset (soft: init state + 10 settle steps)", timed(reset, max(repeats // 2, 2)))
        reset()

        def step(chunk: int):
            def call():
                if env.elapsed_steps + chunk > env.max_steps:
                    reset()
                env.step(random_actions(chunk))

            return call

        table.add("LIBERO", "step, chunk 1 (2 cameras rendered per action)", timed(step(1), repeats * 2), "action", 1)
        table.add("LIBERO", "step, chunk 8 (2 cameras rendered per chunk)", timed(step(8), repeats), "action", 8)

        # The physics alone: the same control step with no frame rendered (the env's frame gates closed), as the
        # actions inside a chunk run.
        sim_env = env.sim_env

        def physics_only():
            if env.elapsed_steps + 1 > env.max_steps or sim_env.env.timestep >= sim_env.env.horizon - 1:
                reset()
            env._request_frames(False)
            sim_env.step(random_actions(1)[0])

        table.add("LIBERO", "physics only (control step, no rendering)", timed(physics_only, repeats * 2), "action", 1)
        reset()

        size = env.camera_size

        def render_both():
            sim_env.sim.render(camera_name=PRIMARY_CAMERA, height=size, width=size)
            sim_env.sim.render(camera_name=WRIST_CAMERA, height=size, width=size)

        table.add("LIBERO", f"render 2 cameras ({size} px, OSMesa)", timed(render_both, repeats * 2), "frame", 2)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (more for cheap calls)")
    parser.add_argument("--no-libero", action="store_true", help="skip the LIBERO measurements")
    parser.add_argument("--threads", default="1,2", help="torch intra-op thread counts to measure the policy with")
    parser.add_argument("--json", type=Path, help="also write the rows (and the load conditions) here")
    args = parser.parse_args(argv)

    import torch

    thread_counts = [int(t) for t in args.threads.split(",")]
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    print(f"CPU cores: {os.cpu_count()}, torch threads by default: {default_threads}, "
          f"load average before (1/5/15 min): {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    table = Table()
    for threads in thread_counts:
        measure_policy(table, args.repeats, threads, report_prepare=threads == thread_counts[0])
    measure_image_pipeline(table, args.repeats)
    torch.set_num_threads(default_threads)
    measure_toy(table, args.repeats)
    if not args.no_libero:
        measure_libero(table, args.repeats)
    load_after = os.getloadavg()
    table.print()
    print(f"\nload average after (1/5/15 min): {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": table.rows, "load_before": load_before, "load_after": load_after,
                                         "cpu_count": os.cpu_count(), "torch_threads_default": default_threads},
                                        indent=2))
    return 0


if __name__ == "__main__":  # the guard that EnvPool's spawned workers need
    sys.exit(main())
