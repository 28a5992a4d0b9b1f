#!/usr/bin/env python3
"""Show, on a multi-GPU host, that each rank's LIBERO workers render on that rank's GPU, and compare EGL frames with
OSMesa frames of the same states.

    python scripts/egl_demo.py --out $OUT/egl_demo.json [--reference .libero_kit/osmesa_reference_libero_spatial.npz]

Three parts, each independent of the others' failure:
1. EGL's view: the EGL devices and their CUDA indices (EGL_CUDA_DEVICE_NV) with all GPUs visible and with
   CUDA_VISIBLE_DEVICES=<each GPU>.
2. Per rank, two launch layouts: "node" (all GPUs visible, LOCAL_RANK=r, as accelerate/torchrun start ranks on one
   node) and "one GPU per process" (CUDA_VISIBLE_DEVICES=r, LOCAL_RANK=0, as the two-node emulation does). For each,
   the parent computes the workers' rendering variables exactly as the trainer does (choose_render_env with the rank's
   local rank), and a LIBERO process with those variables (scripts/libero_frames.py dump: LiberoEnv, the class the env
   workers run) renders a fixed episode, reports the EGL device of the display robosuite opened and that device's
   CUDA index as EGL itself reports them, and stays alive while nvidia-smi is sampled: nvidia-smi must list its pid on
   physical GPU r. The ranks run at the same time, as on a node.
   Then the real path: an EnvPool for rank 1 (2 LIBERO workers) with the trainer's variables; nvidia-smi must list
   the workers' pids on GPU 1.
3. Frames: the EGL frames of rank 0 against OSMesa frames of the same states rendered on this host (when OSMesa
   loads: a carried one is found through OSMESA_LIBRARY_PATH) and against --reference (OSMesa frames made on the CPU
   machine); per point and camera the number of differing pixels and the max / mean absolute difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import numpy as np

FRAMES_SCRIPT = REPO_ROOT / "scripts" / "libero_frames.py"
NVIDIA_SMI_PROCESS = re.compile(r"^\|\s+(\d+)\s+\S+\s+\S+\s+(\d+)\s+(\S+)\s+(.*?)\s+(\d+)MiB\s*\|")


def gpu_processes() -> dict[int, dict]:
    """{pid: {"gpu": index, "type": "G"/"C"/"C+G", "mib": used}} from nvidia-smi's process table."""
    try:
        text = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    processes = {}
    for line in text.splitlines():
        match = NVIDIA_SMI_PROCESS.match(line)
        if match:
            gpu, pid, kind, _, mib = match.groups()
            processes[int(pid)] = {"gpu": int(gpu), "type": kind, "mib": int(mib)}
    return processes


class Sampler:
    """Samples nvidia-smi's process table in a thread; `seen[pid]` is the set of GPUs a pid was listed on."""

    def __init__(self, period_s: float = 0.5):
        self.seen: dict[int, set[int]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def _run(self, period_s: float):
        while not self._stop.is_set():
            for pid, row in gpu_processes().items():
                self.seen.setdefault(pid, set()).add(row["gpu"])
            self.samples += 1
            self._stop.wait(period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def egl_view() -> dict:
    """EGL's devices and their CUDA indices, with all GPUs visible and with each GPU alone."""
    script = "import json; from trainer.envs.render import probe_egl; p = probe_egl(); " \
             "print(json.dumps({'cuda_indices': p.cuda_indices, 'error': p.error}))"
    views = {}
    try:
        gpu_count = len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
                        .stdout.strip().splitlines())
    except OSError:  # no NVIDIA driver on this host
        gpu_count = 0
    for visible in [None] + [str(i) for i in range(gpu_count)]:
        environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        environ.pop("CUDA_VISIBLE_DEVICES", None)
        if visible is not None:
            environ["CUDA_VISIBLE_DEVICES"] = visible
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environ,
                                timeout=60, check=False)
        key = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "all visible"
        views[key] = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else result.stderr
    return {"gpu_count": gpu_count, "views": views}


def rank_environ(layout: str, rank: int) -> tuple[dict, dict]:
    """The environment a rank's env worker gets: the rank's own variables plus the trainer's rendering choice."""
    from trainer.envs.render import choose_render_env, detect_gpu_count

    environ = {key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK")}
    if layout == "node":
        environ["LOCAL_RANK"] = str(rank)
    else:  # one GPU per process
        environ["CUDA_VISIBLE_DEVICES"] = str(rank)
        environ["LOCAL_RANK"] = "0"
    render_env = choose_render_env(environ, detect_gpu_count(environ), None, int(environ["LOCAL_RANK"]))
    return {**environ, **render_env, "PYTHONPATH": str(REPO_ROOT)}, render_env


def run_ranks(layout: str, ranks: list[int], workdir: Path, hold_s: float) -> list[dict]:
    processes, results = [], []
    with Sampler() as sampler:
        for rank in ranks:
            environ, render_env = rank_environ(layout, rank)
            out = workdir / f"{layout}_rank{rank}_egl.npz"
            process = subprocess.Popen([sys.executable, str(FRAMES_SCRIPT), "dump", "--backend", "egl", "--out",
                                        str(out), "--hold-s", str(hold_s)], env=environ, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            processes.append((rank, render_env, out, process))
        for rank, render_env, out, process in processes:
            stdout, stderr = process.communicate(timeout=600)
            lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            info = next((line for line in lines if "points" in line), {})
            render = info.get("render", {})
            physical_gpus = sorted(sampler.seen.get(process.pid, set()))
            expected_cuda = 0 if layout != "node" else rank
            results.append({
                "layout": layout, "rank": rank, "pid": process.pid, "exit_code": process.returncode,
                "trainer_render_env": render_env, "render": render, "gl_renderer": info.get("gl_renderer"),
                "nvidia_smi_gpus_of_pid": physical_gpus, "nvidia_smi_samples": sampler.samples,
                "egl_display_cuda_device_ok": render.get("display_cuda_device") == expected_cuda,
                "nvidia_smi_ok": physical_gpus == [rank],
                "frames": str(out) if out.exists() else None,
                "stderr_tail": stderr[-1500:] if process.returncode else "",
            })
    return results


def run_pool(rank: int, workers: int) -> dict:
    from trainer.envs.pool import EnvPool, ResetRequest
    from trainer.envs.render import choose_render_env, detect_gpu_count

    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = str(rank)  # the workers inherit the rank's environment, as under a launcher
    try:
        render_env = choose_render_env(os.environ, detect_gpu_count(), None, rank)
        with Sampler() as sampler, EnvPool("libero_spatial", workers, {"max_steps": 50}, env_vars=render_env,
                                           start_timeout_s=300, reset_timeout_s=300) as pool:
            replies = pool.reset({i: ResetRequest(i, 0, seed=i) for i in range(workers)})
            pool.step({i: np.zeros((8, 7)) for i, r in replies.items() if r.ok})
            time.sleep(3.0)  # a few more nvidia-smi samples with the contexts alive
            pids = pool.worker_pids
            notes = pool.render_notes
        gpus = {pid: sorted(sampler.seen.get(pid, set())) for pid in pids}
        return {"rank": rank, "workers": workers, "trainer_render_env": render_env, "worker_render_notes": notes,
                "reset_errors": [r.env_error for r in replies.values() if not r.ok],
                "nvidia_smi_gpus_of_worker_pids": gpus, "ok": all(g == [rank] for g in gpus.values())}
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved


def compare_frames(egl_npz: Path, other_npz: Path, label: str) -> dict:
    from libero_frames import compare_recordings

    a, b = dict(np.load(egl_npz)), dict(np.load(other_npz))
    points = min(len(a["primary"]), len(b["primary"]))
    for recording in (a, b):
        for key in ("primary", "wrist", "state", "proprio"):
            recording[key] = recording[key][:points]
    info = json.loads(str(a["info"]))
    info["points"] = info["points"][:points]
    a["info"] = json.dumps(info)
    identical, rows = compare_recordings(a, b)
    return {"against": label, "identical": identical, "rows": rows}


def osmesa_frames(workdir: Path) -> Path | None:
    environ = {key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES",)}
    environ.update({"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa", "PYTHONPATH": str(REPO_ROOT)})
    if os.environ.get("OSMESA_LIBRARY_PATH"):
        environ["LD_LIBRARY_PATH"] = f"{os.environ['OSMESA_LIBRARY_PATH']}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    out = workdir / "osmesa.npz"
    result = subprocess.run([sys.executable, str(FRAMES_SCRIPT), "dump", "--backend", "osmesa", "--out", str(out)],
                            env=environ, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        print(f"    OSMesa did not render on this host: {result.stderr[-800:]}", flush=True)
        return None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--reference", type=Path, help="OSMesa frames recorded on another machine (same states)")
    parser.add_argument("--hold-s", type=float, default=6.0)
    parser.add_argument("--pool-workers", type=int, default=2)
    parser.add_argument("--skip-pool", action="store_true")
    args = parser.parse_args(argv)
    report: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="egl_demo_"))

    def part(name: str, function):
        print(f"=== {name}", flush=True)
        try:
            report[name] = function()
        except Exception as error:  # noqa: BLE001 -- one failed part must not lose the others
            report[name] = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(report[name], default=str)[:3000], flush=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))

    part("egl_view", egl_view)
    gpu_count = report["egl_view"].get("gpu_count", 0) if isinstance(report["egl_view"], dict) else 0
    ranks = list(range(min(gpu_count, 2))) or [0]
    part("ranks_node", lambda: run_ranks("node", ranks, workdir, args.hold_s))
    part("ranks_one_gpu_each", lambda: run_ranks("one_gpu_each", ranks, workdir, args.hold_s))
    if not args.skip_pool:
        part("pool_rank1", lambda: run_pool(ranks[-1], args.pool_workers))
    egl_npz = workdir / "node_rank0_egl.npz"
    comparisons = []
    if egl_npz.exists():
        osmesa = osmesa_frames(workdir)
        if osmesa is not None:
            comparisons.append(lambda: compare_frames(egl_npz, osmesa, "OSMesa on this host"))
        if args.reference and args.reference.exists():
            comparisons.append(lambda: compare_frames(egl_npz, args.reference, f"OSMesa reference {args.reference}"))
        other_rank = workdir / "node_rank1_egl.npz"
        if other_rank.exists():
            comparisons.append(lambda: compare_frames(egl_npz, other_rank, "EGL on the other GPU"))
    part("frames", lambda: [compare() for compare in comparisons])

    ranks_ok = [r.get("egl_display_cuda_device_ok") and r.get("nvidia_smi_ok")
                for key in ("ranks_node", "ranks_one_gpu_each") if isinstance(report.get(key), list)
                for r in report[key]]
    frames = report.get("frames") if isinstance(report.get("frames"), list) else []
    frame_summary = "; ".join(
        f"{c['against']}: " + ("identical" if c["identical"] else "max |diff| " + str(max(
            max(r.get("primary_max_abs_diff", 0), r.get("wrist_max_abs_diff", 0)) for r in c["rows"])) + ", mean "
            + f"{max(max(r.get('primary_mean_abs_diff', 0), r.get('wrist_mean_abs_diff', 0)) for r in c['rows']):.3f}")
        for c in frames)
    pool = report.get("pool_rank1", {})
    print(f"SUMMARY egl_demo: ranks on their own GPU (EGL's answer and nvidia-smi): {sum(map(bool, ranks_ok))}/"
          f"{len(ranks_ok)}; rank {ranks[-1]} pool workers on GPU {ranks[-1]}: {pool.get('ok')}; frames: "
          f"{frame_summary or 'no comparison'}", flush=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":  # the guard that EnvPool's spawned workers need
    sys.exit(main())
