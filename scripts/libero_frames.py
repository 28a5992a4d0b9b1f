#!/usr/bin/env python3
"""Record LIBERO frames of fixed states, and compare two recordings: kit vs full installation, EGL vs OSMesa.

    # one recording: the benchmark reset of (task, init state, seed), then fixed actions; frames + sim states
    python scripts/libero_frames.py dump --suite libero_spatial --backend osmesa --out a.npz
    python scripts/libero_frames.py compare a.npz b.npz          # exit 0 when frames and states are identical

What a recording holds, per point (0 = right after `set_init_state` with no physics step, 1 = after the reset's 10
settle steps, then one per action chunk): both camera frames (uint8, as MuJoCo renders them), the flattened sim state
and the proprio. Point 0 depends on MuJoCo's kinematics and the renderer only, so it is the fair comparison between
machines whose physics may round differently; the later points also compare the physics.

`compare` prints, per point and camera, the number of differing pixels, the largest and the mean absolute difference,
and whether the states are equal; its exit code is 0 only if everything is identical (--tolerance relaxes frames).
The recording also notes the rendering backend the process really used (MUJOCO_GL, the EGL device and its CUDA index
as EGL itself reports them, the GL renderer string).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np


def fixed_actions(seed: int, chunks: int, chunk_size: int) -> np.ndarray:
    """Deterministic action chunks [chunks, chunk_size, 7]: small random motions, gripper open then closed."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-0.5, 0.5, (chunks, chunk_size, 7))
    actions[..., 6] = np.where(np.arange(chunks)[:, None] % 2 == 0, -1.0, 1.0)
    return actions


def gl_renderer_string() -> str | None:
    """GL_RENDERER of the current context (e.g. 'NVIDIA H200/PCIe/SSE2' or 'llvmpipe (LLVM 15.0.6, 256 bits)')."""
    try:
        from OpenGL import GL

        value = GL.glGetString(GL.GL_RENDERER)
        return value.decode() if isinstance(value, bytes) else str(value)
    except Exception as error:  # noqa: BLE001 -- a diagnostic only
        return f"unavailable ({type(error).__name__}: {error})"


def dump(args) -> int:
    from trainer.envs.libero import LiberoEnv
    from trainer.envs.render import describe_render_device

    start = time.perf_counter()
    env = LiberoEnv(args.suite, camera_size=args.camera_size, render_backend=args.backend)
    points, names = [], []
    try:
        # point 0: the init state with no physics step, rendered directly
        env.reset(args.task, args.init_state, seed=args.seed)
        sim_env = env.sim_env
        sim_env.set_init_state(env.init_states(args.task)[args.init_state])
        size = args.camera_size
        frames = [sim_env.sim.render(camera_name=camera, height=size, width=size)
                  for camera in ("agentview", "robot0_eye_in_hand")]
        points.append((frames[0], frames[1], sim_env.get_sim_state().copy(), np.zeros(8, np.float32)))
        names.append("init state, no physics")
        # point 1: the benchmark reset (init state + settle steps) through the env
        observation = env.reset(args.task, args.init_state, seed=args.seed)
        points.append((observation.primary_image, observation.wrist_image, sim_env.get_sim_state().copy(),
                       observation.proprio))
        names.append("after reset (10 settle steps)")
        renderer = gl_renderer_string()
        for index, chunk in enumerate(fixed_actions(args.seed, args.chunks, args.chunk_size)):
            result = env.step(chunk)
            o = result.observation
            points.append((o.primary_image, o.wrist_image, sim_env.get_sim_state().copy(), o.proprio))
            names.append(f"after chunk {index + 1} ({args.chunk_size} actions)")
            if result.done:
                break
        render = describe_render_device()
        if args.hold_s > 0:  # keep the GL context alive, e.g. for nvidia-smi to see this process on its GPU
            print(json.dumps({"holding": os.getpid(), "render": render}), flush=True)
            time.sleep(args.hold_s)
    finally:
        env.close()
    info = {"suite": args.suite, "task": args.task, "init_state": args.init_state, "seed": args.seed,
            "camera_size": args.camera_size, "points": names, "gl_renderer": renderer, "render": render,
            "python": sys.version.split()[0], "seconds": time.perf_counter() - start}
    try:
        import mujoco

        info["mujoco"] = mujoco.__version__
        info["mujoco_file"] = mujoco.__file__
    except ImportError:
        pass
    np.savez_compressed(args.out, primary=np.stack([p[0] for p in points]), wrist=np.stack([p[1] for p in points]),
                        state=np.stack([p[2] for p in points]), proprio=np.stack([p[3] for p in points]),
                        info=json.dumps(info))
    print(json.dumps(info))
    return 0


def compare_recordings(a: dict, b: dict, tolerance: float = 0.0) -> tuple[bool, list[dict]]:
    """Per point and camera: differing pixels, max / mean absolute difference; whether the states are equal."""
    rows, identical = [], True
    names = json.loads(str(a["info"]))["points"]
    if a["primary"].shape != b["primary"].shape:
        return False, [{"error": f"shapes differ: {a['primary'].shape} vs {b['primary'].shape}"}]
    for index, name in enumerate(names):
        row = {"point": name, "state_equal": bool(np.array_equal(a["state"][index], b["state"][index])),
               "state_max_abs_diff": float(np.abs(a["state"][index] - b["state"][index]).max())}
        for camera in ("primary", "wrist"):
            difference = np.abs(a[camera][index].astype(np.int16) - b[camera][index].astype(np.int16))
            row[f"{camera}_pixels_differing"] = int((difference.max(axis=-1) > 0).sum())
            row[f"{camera}_max_abs_diff"] = int(difference.max())
            row[f"{camera}_mean_abs_diff"] = float(difference.mean())
            if row[f"{camera}_mean_abs_diff"] > tolerance or (tolerance == 0 and row[f"{camera}_max_abs_diff"]):
                identical = False
        if not row["state_equal"]:
            identical = False
        rows.append(row)
    return identical, rows


def compare(args) -> int:
    a, b = np.load(args.a), np.load(args.b)
    identical, rows = compare_recordings(a, b, args.tolerance)
    for label, recording in (("a", a), ("b", b)):
        info = json.loads(str(recording["info"]))
        print(f"{label}: {getattr(args, label)}: python {info.get('python')}, mujoco {info.get('mujoco')}, "
              f"GL {info.get('gl_renderer')}, render {info.get('render')}")
    for row in rows:
        print(json.dumps(row))
    verdict = "IDENTICAL" if identical else "DIFFERENT"
    print(f"frames compare: {verdict} ({len(rows)} points)")
    if args.json:
        Path(args.json).write_text(json.dumps({"identical": identical, "rows": rows}, indent=1))
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dump_parser = commands.add_parser("dump")
    dump_parser.add_argument("--suite", default="libero_spatial")
    dump_parser.add_argument("--task", type=int, default=0)
    dump_parser.add_argument("--init-state", type=int, default=0)
    dump_parser.add_argument("--seed", type=int, default=0)
    dump_parser.add_argument("--chunks", type=int, default=3)
    dump_parser.add_argument("--chunk-size", type=int, default=8)
    dump_parser.add_argument("--camera-size", type=int, default=256)
    dump_parser.add_argument("--backend", choices=["egl", "osmesa"], default=None)
    dump_parser.add_argument("--out", required=True)
    dump_parser.add_argument("--hold-s", type=float, default=0.0, help="stay alive this long after rendering")
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("a")
    compare_parser.add_argument("b")
    compare_parser.add_argument("--tolerance", type=float, default=0.0, help="allowed mean absolute pixel difference")
    compare_parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    return dump(args) if args.command == "dump" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
