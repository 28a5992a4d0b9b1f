#!/usr/bin/env python3
"""Two "nodes" on one host: run whole iterations, then kill one node and record how the other one ends.

    python scripts/multinode_emulation.py --out-dir OUT [--gpus 0,1] [--accelerate-config FILE] [--config CFG] \
        [-- extra trainer arguments]

Node r is `scripts/launch_multinode.sh` (torchrun, static rendezvous on 127.0.0.1) started with NNODES=2,
NODE_RANK=r, one process, and CUDA_VISIBLE_DEVICES=<its GPU> when --gpus is given (each node sees one GPU, as a real
node would see its own). The driver waits until iteration --kill-after-iteration is logged in metrics.jsonl (by global
rank 0, on node 0), then SIGKILLs node 1 whole (its launcher, the trainer process and the trainer's env workers: a
node that loses power), and measures how long node 0 takes to exit, its exit code, and what it printed: the lines
that name the missing rank or node, timeouts and NCCL / gloo errors. Node 0 is killed after --exit-wait-s if it has
not exited by then ("did not exit" is a result too). Writes OUT/multinode.json and the two nodes' logs.

The bound on how long the survivor waits: `--collective-timeout-s` is passed to the trainer as
`--dist.peer_timeout_s` (the peer heartbeat that names the lost rank; `dist.timeout_minutes` is the NCCL/gloo
collective timeout behind it, 30 minutes by default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

COLLECTIVE_TIMEOUT_FLAG = "--dist.peer_timeout_s"

REPO_ROOT = Path(__file__).resolve().parents[1]
INTERESTING = re.compile(r"rank\s*1\b|node\s*1\b|missing|timed?\s*out|timeout|watchdog|NCCL|gloo|peer|"
                         r"connection (reset|closed)|heartbeat|SIGKILL|exit(ed)? (with|code)|Traceback|Error",
                         re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (from /proc), children after parents."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def logged_iterations(metrics_file: Path) -> int:
    if not metrics_file.exists():
        return 0
    iterations = [json.loads(line).get("iteration", 0) for line in metrics_file.read_text().splitlines() if line]
    return max(iterations, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--config", default="configs/bench_libero_oft.yaml")
    parser.add_argument("--gpus", default="", help="e.g. 0,1: node r sees only GPU r (default: leave them as they are)")
    parser.add_argument("--accelerate-config", default="", help="e.g. accelerate_configs/fsdp_multinode.yaml")
    parser.add_argument("--kill-after-iteration", type=int, default=1)
    parser.add_argument("--collective-timeout-s", type=float, default=60.0)
    parser.add_argument("--start-wait-s", type=float, default=420.0, help="give up if no iteration by then")
    parser.add_argument("--exit-wait-s", type=float, default=240.0, help="kill node 0 if it has not exited by then")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("trainer_args", nargs="*", help="after --: more `python -m trainer train` arguments")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = args.out_dir / "run"
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        metrics_file.unlink()
    trainer_args = ["--config", args.config, "--train.output_dir", str(run_dir), "--train.checkpoint_every", "0",
                    "--train.eval_every", "0", "--log.progress", "false", *args.trainer_args]
    if COLLECTIVE_TIMEOUT_FLAG:
        trainer_args += [COLLECTIVE_TIMEOUT_FLAG, str(args.collective_timeout_s)]
    port = str(free_port())
    gpus = [g for g in args.gpus.split(",") if g]
    nodes, logs = [], []
    started = time.monotonic()
    for node_rank in range(2):
        environ = {**os.environ, "NNODES": "2", "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port, "NPROC_PER_NODE": "1", "PYTHON": args.python, "PYTHONUNBUFFERED": "1"}
        if gpus:
            environ["CUDA_VISIBLE_DEVICES"] = gpus[node_rank]
        if args.accelerate_config:
            environ["ACCELERATE_CONFIG"] = args.accelerate_config
        log = open(args.out_dir / f"node{node_rank}.log", "w")  # noqa: SIM115 -- open for the node's lifetime
        logs.append(log)
        nodes.append(subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "launch_multinode.sh"), *trainer_args],
                                      cwd=REPO_ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    report: dict = {"collective_timeout_flag": COLLECTIVE_TIMEOUT_FLAG or None,
                    "collective_timeout_s": args.collective_timeout_s if COLLECTIVE_TIMEOUT_FLAG else None,
                    "gpus": gpus, "accelerate_config": args.accelerate_config or None, "trainer_args": trainer_args}
    try:
        while logged_iterations(metrics_file) < args.kill_after_iteration:
            if any(node.poll() is not None for node in nodes):
                report["error"] = f"a node exited before iteration {args.kill_after_iteration}: " \
                                  f"exit codes {[node.poll() for node in nodes]}"
                break
            if time.monotonic() - started > args.start_wait_s:
                report["error"] = f"no iteration {args.kill_after_iteration} within {args.start_wait_s:.0f} s"
                break
            time.sleep(0.5)
        report["iterations_before_kill"] = logged_iterations(metrics_file)
        report["seconds_to_iteration"] = time.monotonic() - started
        if "error" not in report:
            victims = descendants(nodes[1].pid)
            kill_all(victims)
            killed_at = time.monotonic()
            report["node1_processes_killed"] = len(victims)
            while nodes[0].poll() is None and time.monotonic() - killed_at < args.exit_wait_s:
                time.sleep(0.2)
            report["node0_exited"] = nodes[0].poll() is not None
            report["node0_exit_code"] = nodes[0].poll()
            report["node0_seconds_to_exit_after_kill"] = (time.monotonic() - killed_at) if report["node0_exited"] \
                else None
    finally:
        leftovers = [pid for node in nodes for pid in descendants(node.pid) if alive(pid)]
        kill_all(leftovers)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for log in logs:
            log.close()
        report["processes_killed_at_the_end"] = len(leftovers)

    node0_log = (args.out_dir / "node0.log").read_text(errors="replace").splitlines()
    report["node0_tail"] = node0_log[-40:]
    report["node0_interesting_lines"] = [line for line in node0_log if INTERESTING.search(line)][-30:]
    report["names_missing_rank"] = any(re.search(r"rank\s*1\b|node\s*1\b", line, re.IGNORECASE)
                                       for line in report["node0_interesting_lines"])
    if "error" in report:
        summary = f"FAILED before the kill: {report['error']}"
    elif report["node0_exited"]:
        summary = (f"{report['iterations_before_kill']} iteration(s) on 2 nodes in {report['seconds_to_iteration']:.0f}"
                   f" s; node 1 killed ({report['node1_processes_killed']} processes); node 0 exited after "
                   f"{report['node0_seconds_to_exit_after_kill']:.1f} s with code {report['node0_exit_code']}")
    else:
        summary = (f"{report['iterations_before_kill']} iteration(s) on 2 nodes; node 1 killed; node 0 did NOT exit "
                   f"within {args.exit_wait_s:.0f} s (killed by this script)")
    # the trainer's own error (rank-prefixed by torchrun) says more than torchrun's closing ChildFailedError lines
    trainer_errors = [line for line in report["node0_interesting_lines"]
                      if line.startswith("[rank") and re.search(r"Error|rank\s*1\b|missing|timed?\s*out", line)]
    message = (trainer_errors or report["node0_interesting_lines"] or ["(nothing)"])[-1]
    report["node0_message"] = message
    (args.out_dir / "multinode.json").write_text(json.dumps(report, indent=1))
    print(f"SUMMARY multinode: {summary}; names the missing rank: {report['names_missing_rank']}; node 0's error: "
          f"{message[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
