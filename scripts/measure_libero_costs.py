#!/usr/bin/env python3
"""Per-step costs of real LIBERO on this host, per rendering backend, and the throughput of a pool of env workers.

    python scripts/measure_libero_costs.py                                   # EGL where there is a GPU, else OSMesa
    python scripts/measure_libero_costs.py --backends egl,osmesa --pool-workers 8,16 --json costs.json

For each backend, in a fresh process (MuJoCo's backend is fixed per process), one simulator of `--suite` task 0 with
the benchmark's 256 px cameras (trainer.envs.libero.LiberoEnv, as the env workers run it):
- simulator build + first reset (task 0), and the build + reset of another task's simulator (task 1);
- the soft reset (init state + 10 settle steps, frames of the last one only);
- physics alone: one control step with no frame rendered (as the actions inside a chunk run);
- rendering the two cameras alone (agentview + wrist, 256 px);
- env.step with chunk 1 (both cameras rendered after every action) and chunk 8 (rendered once per chunk).
Each figure: median and minimum of --repeats timed calls after a warm-up (wall-clock). The first step after the
first reset (numba compiles robosuite's controllers) is left out and reported on its own.
Each backend's record also says what the process really rendered with (trainer.envs.render.describe_render_device:
MUJOCO_GL, the EGL device and its CUDA index as EGL reports them, a fallback to OSMesa and why) and the GL renderer.

Pool: `--pool-workers N[,M]` EnvPools (trainer.envs.pool.EnvPool, the trainer's env workers) of N processes with the
rendering env the trainer gives its workers (trainer.envs.render.choose_render_env for local rank 0); the time to start
them and for their first reset; then --pool-rounds batched steps of 8-action chunks: env actions/s over the pool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import numpy as np
from measure_rollout_costs import Table, timed

CHUNK = 8  # OpenVLA-OFT's action chunk


def random_actions(rng: np.random.Generator, count: int) -> np.ndarray:
    actions = rng.uniform(-0.3, 0.3, (count, 7))
    actions[:, 6] = -1.0  # gripper open
    return actions


def host_info() -> dict:
    info = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(), "machine": platform.node(),
            "python": sys.version.split()[0], "load_average": os.getloadavg()}
    try:
        info["gpus"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                                      check=False).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        info["gpus"] = []
    return info


def measure_one_backend(suite: str, backend: str, repeats: int) -> dict:
    """All single-simulator figures for one backend (run in a process of its own)."""
    from trainer.envs.libero import PRIMARY_CAMERA, WRIST_CAMERA, LiberoEnv
    from trainer.envs.render import describe_render_device

    rng = np.random.default_rng(0)
    table = Table()
    start = time.perf_counter()
    env = LiberoEnv(suite, max_steps=10_000, render_backend=backend)
    table.add("LIBERO", "create env (imports, benchmark tables)", time.perf_counter() - start)
    try:
        start = time.perf_counter()
        env.reset(0, 0, seed=0)
        table.add("LIBERO", "build task 0's simulator + first reset", time.perf_counter() - start)
        start = time.perf_counter()
        env.step(random_actions(rng, 1))
        table.add("LIBERO", "first step (numba compiles controllers)", time.perf_counter() - start)
        from OpenGL import GL  # noqa: F401 -- after the first render: the GL context of this process exists

        renderer = _gl_renderer()
        start = time.perf_counter()
        env.reset(1, 0, seed=0)
        table.add("LIBERO", "build another task's simulator + reset", time.perf_counter() - start)

        def reset():
            env.reset(1, 1, seed=1)

        table.add("LIBERO", "reset (soft: init state + 10 settle steps)", timed(reset, max(repeats // 2, 3)))
        reset()

        def step(chunk: int):
            def call():
                if env.elapsed_steps + chunk > env.max_steps - 1 or env.sim_env.env.timestep > 900:
                    reset()
                env.step(random_actions(rng, chunk))

            return call

        table.add("LIBERO", "step, chunk 1 (2 cameras rendered per action)", timed(step(1), repeats * 2), "action", 1)
        table.add("LIBERO", f"step, chunk {CHUNK} (2 cameras rendered per chunk)", timed(step(CHUNK), repeats),
                  "action", CHUNK)
        sim_env = env.sim_env

        def physics_only():
            if sim_env.env.timestep > 900:
                reset()
            env._request_frames(False)
            sim_env.step(random_actions(rng, 1)[0])

        table.add("LIBERO", "physics only (control step, no rendering)", timed(physics_only, repeats * 2), "action", 1)
        reset()
        size = env.camera_size

        def render_both():
            sim_env.sim.render(camera_name=PRIMARY_CAMERA, height=size, width=size)
            sim_env.sim.render(camera_name=WRIST_CAMERA, height=size, width=size)

        table.add("LIBERO", f"render 2 cameras ({size} px, {backend})", timed(render_both, repeats * 2), "frame", 2)
        render = describe_render_device()
    finally:
        env.close()
    return {"backend_requested": backend, "render": render, "gl_renderer": renderer, "rows": table.rows}


def _gl_renderer() -> str:
    try:
        from OpenGL import GL

        value = GL.glGetString(GL.GL_RENDERER)
        return value.decode() if isinstance(value, bytes) else str(value)
    except Exception as error:  # noqa: BLE001 -- a diagnostic
        return f"unavailable ({type(error).__name__})"


def measure_pool(suite: str, workers: int, backend: str | None, rounds: int) -> dict:
    from trainer.envs.pool import EnvPool, ResetRequest
    from trainer.envs.render import choose_render_env, detect_gpu_count

    render_env = choose_render_env(os.environ, detect_gpu_count(), backend, local_rank=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with EnvPool(suite, workers, {"max_steps": 10_000}, env_vars=render_env, start_timeout_s=400,
                 reset_timeout_s=400, step_timeout_s=120) as pool:
        started = time.perf_counter() - start
        num_tasks = pool.info.num_tasks
        start = time.perf_counter()
        replies = pool.reset({i: ResetRequest(i % num_tasks, i % 50, seed=i) for i in range(workers)})
        first_reset = time.perf_counter() - start
        errors = [r.env_error for r in replies.values() if not r.ok]
        live = [i for i, r in replies.items() if r.ok]
        start = time.perf_counter()
        pool.step({i: random_actions(rng, 1) for i in live})  # numba compiles in every worker
        first_step = time.perf_counter() - start
        actions, start = 0, time.perf_counter()
        for _ in range(rounds):
            replies = pool.step({i: random_actions(rng, CHUNK) for i in live})
            actions += sum(r.result.steps_executed for r in replies.values() if r.ok)
            errors += [r.env_error for r in replies.values() if not r.ok]
            live = [i for i, r in replies.items() if r.ok and not r.result.done]
        seconds = time.perf_counter() - start
        summary = pool.stats.summary()
        notes = pool.render_notes
    return {"workers": workers, "render_env": render_env, "start_seconds": started, "first_reset_seconds": first_reset,
            "first_step_seconds": first_step, "rounds": rounds, "actions": actions, "seconds": seconds,
            "env_actions_per_s": actions / seconds, "round_seconds_mean": seconds / rounds,
            "env_step_seconds_mean_in_worker": summary["env_step_seconds_mean"], "env_errors": errors[:5],
            "render_notes": notes[:2], "backends_used": sorted({str((n or {}).get("MUJOCO_GL")) for n in notes}),
            "fallbacks": sorted({str((n or {}).get("fallback_reason")) for n in notes if (n or {}).get(
                "fallback_reason")})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--backends", default=None, help="comma-separated: egl, osmesa (default: egl on a GPU host)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pool-workers", default="", help="comma-separated pool sizes to measure (default: none)")
    parser.add_argument("--pool-backend", default=None, help="the pools' backend (default: the trainer's choice)")
    parser.add_argument("--pool-rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one backend in this process
    args = parser.parse_args(argv)

    if args.single:
        result = measure_one_backend(args.suite, args.single, args.repeats)
        args.json.write_text(json.dumps(result))
        return 0

    from trainer.envs.render import detect_gpu_count

    backends = args.backends.split(",") if args.backends else ["egl" if detect_gpu_count() > 0 else "osmesa"]
    report = {"host": host_info(), "suite": args.suite, "single": {}, "pool": []}
    for backend in backends:
        out = Path(f"/tmp/measure_libero_costs_{os.getpid()}_{backend}.json")
        print(f"=== {backend}: one simulator", flush=True)
        environ = dict(os.environ)
        if backend == "osmesa" and os.environ.get("OSMESA_LIBRARY_PATH"):  # a carried OSMesa (bench_gpu.sh)
            environ["LD_LIBRARY_PATH"] = f"{os.environ['OSMESA_LIBRARY_PATH']}:{os.environ.get('LD_LIBRARY_PATH', '')}"
        completed = subprocess.run([sys.executable, __file__, "--suite", args.suite, "--single", backend,
                                    "--repeats", str(args.repeats), "--json", str(out)], env=environ, check=False)
        if completed.returncode == 0 and out.exists():
            report["single"][backend] = json.loads(out.read_text())
            out.unlink()
            render = report["single"][backend]["render"]
            print(f"    rendered with {render.get('MUJOCO_GL')} (GL: {report['single'][backend]['gl_renderer']}; "
                  f"EGL device {render.get('display_egl_device')}, CUDA {render.get('display_cuda_device')}; "
                  f"fallback: {render.get('fallback_reason')})", flush=True)
        else:
            report["single"][backend] = {"error": f"exit code {completed.returncode}"}
            print(f"    FAILED (exit code {completed.returncode}); the other measurements go on", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))
    def save() -> None:  # after every part: a later part that runs out of time must not lose the earlier ones
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))

    save()
    for workers in [int(w) for w in args.pool_workers.split(",") if w]:
        print(f"=== pool of {workers} workers ({args.pool_backend or 'the trainer’s backend'})", flush=True)
        try:
            result = measure_pool(args.suite, workers, args.pool_backend, args.pool_rounds)
            print(f"    start {result['start_seconds']:.1f} s, first reset {result['first_reset_seconds']:.1f} s, "
                  f"{result['env_actions_per_s']:.1f} env actions/s ({result['round_seconds_mean']:.3f} s per "
                  f"batched {CHUNK}-action step), backends {result['backends_used']}, errors {len(result['env_errors'])}",
                  flush=True)
        except Exception as error:  # noqa: BLE001 -- one failed pool size must not lose the others
            result = {"workers": workers, "error": f"{type(error).__name__}: {error}"}
            print(f"    FAILED: {result['error']}", flush=True)
        report["pool"].append(result)
        save()
    report["host"]["load_average_after"] = os.getloadavg()
    for backend, result in report["single"].items():
        for row in result.get("rows", []):
            unit = f"{row['ms_per_unit']:.2f} ms/{row['per']}" if "per" in row else ""
            print(f"| {backend} | {row['setting']} | {row['ms_per_call']:.2f} | {row['ms_per_call_min']:.2f} | {unit} |")
    ok = all("error" not in r for r in report["single"].values()) and all("error" not in r for r in report["pool"])
    print(f"SUMMARY measure_libero_costs: {'ok' if ok else 'PARTLY FAILED'}; " + "; ".join(
        f"{b}: step chunk {CHUNK} {_figure(r, f'step, chunk {CHUNK}')} ms, render 2 cams {_figure(r, 'render 2')} ms, "
        f"physics {_figure(r, 'physics only')} ms" for b, r in report["single"].items()) + "; " + "; ".join(
        f"pool {p['workers']}: {p.get('env_actions_per_s', float('nan')):.1f} actions/s" for p in report["pool"]))
    save()
    return 0 if ok else 1


def _figure(result: dict, setting_prefix: str) -> str:
    for row in result.get("rows", []):
        if row["setting"].startswith(setting_prefix):
            return f"{row['ms_per_call']:.1f}"
    return "n/a"


if __name__ == "__main__":  # the guard that EnvPool's spawned workers need
    sys.exit(main())
