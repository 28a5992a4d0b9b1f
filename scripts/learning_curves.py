"""Record the toy task's learning curves and write them to docs/learning/ (kept in the repository).

    .venv/bin/python scripts/learning_curves.py                      # every run below, ~50 CPU minutes on 2 cores
    .venv/bin/python scripts/learning_curves.py --runs grpo ppo      # some of them (the report keeps the others)
    .venv/bin/python scripts/learning_curves.py --iterations 20 --out /tmp/curves   # a quick look elsewhere
    .venv/bin/python scripts/learning_curves.py --report-only        # rewrite the report from the kept runs

Each run is the real trainer (`python -m trainer train`, the 2-rank ones under torchrun with gloo, the launch that
tests/test_distributed.py uses) on a shipped config. The trainer writes into a scratch directory (checkpoints stay
out of the repository); the script keeps each run's metrics.jsonl, config.yaml, console log and timing in
docs/learning/runs/ and writes, over every run kept there:
- curves.md: per run, per iteration: greedy and sampled success (at evaluations), rollout success, the update's
  approx_kl and clip fraction (the health of the PPO-style step), entropy, samples;
- curves.csv and curves.json: the same numbers, one row per (run, iteration);
- curves.png: greedy, sampled, approx_kl and clip fraction against the iteration, one line per run.
Time is measured twice: wall time, and the CPU seconds the run's processes used (user + system, all ranks), which on
a busy shared machine is the better estimate of what the run costs on an idle one (each process computes on one
thread: OMP_NUM_THREADS=1). The 1-minute load average (`uptime`) before and after each run is kept with its timing,
because wall times measured on a loaded machine are inflated.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    name: str
    config: str
    ranks: int = 1
    overrides: tuple[str, ...] = ()
    description: str = ""


RUNS = {run.name: run for run in [
    Run("grpo", "configs/tiny_toy_cpu.yaml", description="GRPO, the demo config, seed 0"),
    Run("grpo_seed1", "configs/tiny_toy_cpu.yaml", overrides=("--train.seed", "1"),
        description="GRPO, seed 1 (the seed-to-seed noise)"),
    Run("grpo_2ranks", "configs/tiny_toy_cpu.yaml", ranks=2,
        description="GRPO on 2 gloo ranks, the same global batch, seed 0"),
    Run("ppo", "configs/tiny_toy_ppo_cpu.yaml", description="PPO + GAE, seed 0"),
    Run("ppo_2ranks", "configs/tiny_toy_ppo_cpu.yaml", ranks=2, description="PPO + GAE on 2 gloo ranks, seed 0"),
    *[Run(f"{algo}_2ranks_seed{seed}", config, ranks=2, overrides=("--train.seed", str(seed)),
          description=f"{label} on 2 gloo ranks, seed {seed} (does the shipped config learn on other seeds?)")
      for algo, config, label in (("grpo", "configs/tiny_toy_cpu.yaml", "GRPO"),
                                  ("ppo", "configs/tiny_toy_ppo_cpu.yaml", "PPO + GAE")) for seed in (1, 2)],
    Run("bc_handover", "configs/tiny_toy_cpu.yaml",
        overrides=("--algo.phases.bc_warmup_iterations", "4", "--algo.phases.handover_iterations", "4"),
        description="GRPO after 4 behaviour-cloning warm-up iterations and a 4-iteration epsilon-greedy hand-over "
                    "(greedy probability 1 -> 0.25), seed 0; the same 70 iterations in all"),
]}
CURVE_KEYS = ["eval/greedy_success_rate", "eval/sampled_success_rate", "rollout/success_rate", "train/approx_kl",
              "train/clip_frac", "train/entropy", "train/samples", "train/loss", "phase", "critic/explained_variance",
              "time/iteration_seconds"]


@dataclass
class Result:
    run: Run
    records: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    load: tuple = (None, None)  # 1-minute load average before and after the run

    @property
    def evaluations(self) -> list[dict]:
        return [r for r in self.records if "eval/greedy_success_rate" in r]

    @property
    def iterations(self) -> list[dict]:
        return [r for r in self.records if "train/approx_kl" in r or "train/samples" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_for(run: Run, output_dir: Path, extra: list[str]) -> list[str]:
    trainer = ["-m", "trainer", "train", "--config", str(ROOT / run.config), "--train.output_dir", str(output_dir),
               "--train.resume", "false", "--train.checkpoint_every", "0", "--log.progress", "false",
               *run.overrides, *extra]
    if run.ranks == 1:
        return [sys.executable, *trainer]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(run.ranks), "--master-port",
            str(_free_port()), *trainer]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def record(run: Run, out: Path, scratch: Path, extra: list[str]) -> Result:
    output_dir = scratch / run.name  # the trainer's outputs, checkpoints included; only the small files are kept
    kept = out / "runs" / run.name
    log = out / "runs" / f"{run.name}.log"
    kept.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before, uptime_before = os.getloadavg(), _uptime()
    started = time.perf_counter()
    with log.open("w") as handle:
        subprocess.run(command_for(run, output_dir, extra), cwd=ROOT, env=env, stdout=handle,
                       stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_seconds": time.perf_counter() - started,
              "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
              "load_average_at_start": load_before, "load_average_at_end": os.getloadavg(),
              "uptime_at_start": uptime_before, "uptime_at_end": _uptime(), "cpu_count": os.cpu_count(),
              "command": " ".join(command_for(run, Path("<scratch>") / run.name, extra)[1:])}
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copy(output_dir / name, kept / name)
    (out / "runs" / f"{run.name}.timing.json").write_text(json.dumps(timing, indent=1))
    return load(run, out)


def load(run: Run, out: Path) -> Result:
    """A recorded run: its metrics.jsonl and the timing written beside it."""
    timing = json.loads((out / "runs" / f"{run.name}.timing.json").read_text())
    result = Result(run, wall_seconds=timing["wall_seconds"], cpu_seconds=timing["cpu_seconds"],
                    load=(timing.get("load_average_at_start", [None])[0], timing["load_average_at_end"][0]))
    metrics = out / "runs" / run.name / "metrics.jsonl"
    result.records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return result


def _cell(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def markdown(results: list[Result], command: str) -> str:
    lines = ["# Learning curves on the toy task", "",
             f"Written by `{command}` (scripts/learning_curves.py); the runs' metrics.jsonl are in runs/.", "",
             "Times: `wall s` is the whole command (start-up and evaluations included), `training s` the iterations' own "
             "seconds (rollout, update, evaluation; the summary line's figure), `CPU s` all ranks' user + system time; "
             "`load` is the 1-minute load average before / after the run on a machine with "
             f"{os.cpu_count()} cores.", "",
             "| run | ranks | iterations | greedy before -> after | sampled before -> after | wall s | training s "
             "| CPU s | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        evals = result.evaluations
        first, last = evals[0], evals[-1]
        lines.append(f"| {result.run.name} | {result.run.ranks} | {last['iteration']} | "
                     f"{_cell(first['eval/greedy_success_rate'])} -> {_cell(last['eval/greedy_success_rate'])} | "
                     f"{_cell(first['eval/sampled_success_rate'])} -> {_cell(last['eval/sampled_success_rate'])} | "
                     f"{result.wall_seconds:.0f} | {training_seconds(result):.0f} | {result.cpu_seconds:.0f} | "
                     f"{_cell(result.load[0], 2)} / {_cell(result.load[1], 2)} |")
    for result in results:
        lines += ["", f"## {result.run.name}: {result.run.description}", "",
                  "| iteration | phase | greedy | sampled | rollout success | approx_kl | clip_frac | entropy | samples |"
                  + (" expl_var |" if result.run.config.endswith("ppo_cpu.yaml") else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if result.run.config.endswith("ppo_cpu.yaml") else "")]
        for r in result.records:
            row = (f"| {r['iteration']} | {r.get('phase', '-')} | {_cell(r.get('eval/greedy_success_rate'))} | "
                   f"{_cell(r.get('eval/sampled_success_rate'))} | {_cell(r.get('rollout/success_rate'))} | "
                   f"{_cell(r.get('train/approx_kl'), 4)} | {_cell(r.get('train/clip_frac'))} | "
                   f"{_cell(r.get('train/entropy'), 2)} | {_cell(r.get('train/samples'), 0)} |")
            if result.run.config.endswith("ppo_cpu.yaml"):
                row += f" {_cell(r.get('critic/explained_variance'), 2)} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def training_seconds(result: Result) -> float:
    return sum(r["time/iteration_seconds"] for r in result.records
               if isinstance(r.get("time/iteration_seconds"), (int, float)))


def rows(results: list[Result]) -> list[dict]:
    """One row per (run, iteration): the curves' numbers for curves.csv / curves.json (None where not measured)."""
    return [{"run": result.run.name, "ranks": result.run.ranks, "iteration": r["iteration"],
             **{key: r.get(key) for key in CURVE_KEYS}} for result in results for r in result.records]


def write_tables(results: list[Result], out: Path) -> None:
    table = rows(results)
    with (out / "curves.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    summary = {result.run.name: {"config": result.run.config, "ranks": result.run.ranks,
                                 "overrides": list(result.run.overrides), "description": result.run.description,
                                 "wall_seconds": result.wall_seconds, "training_seconds": training_seconds(result),
                                 "cpu_seconds": result.cpu_seconds, "load_average_1min_before_after": result.load}
               for result in results}
    (out / "curves.json").write_text(json.dumps({"runs": summary, "rows": table}, indent=1))


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for result in results:
        evals = result.evaluations
        xs = [r["iteration"] for r in evals]
        axes[0].plot(xs, [r["eval/greedy_success_rate"] for r in evals], marker="o", label=result.run.name)
        axes[1].plot(xs, [r["eval/sampled_success_rate"] for r in evals], marker="o", label=result.run.name)
        its = [r for r in result.iterations if isinstance(r.get("train/approx_kl"), (int, float))]
        axes[2].plot([r["iteration"] for r in its], [r["train/approx_kl"] for r in its], label=result.run.name)
        axes[3].plot([r["iteration"] for r in its], [r.get("train/clip_frac") for r in its], label=result.run.name)
    for axis, title in zip(axes, ("greedy success", "sampled success", "approx_kl per update",
                                  "clip fraction per update")):
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].axhspan(0.01, 0.02, color="green", alpha=0.1)  # where PPO recipes usually run
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "learning")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations of every run")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/learning_curves"),
                        help="where the trainer writes (checkpoints included); only small files are copied to --out")
    parser.add_argument("--report-only", action="store_true", help="no training: the report from the runs in --out")
    args = parser.parse_args(argv)
    extra = [] if args.iterations is None else ["--train.iterations", str(args.iterations)]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.runs:
        if args.report_only:
            results.append(load(RUNS[name], args.out))
            continue
        print(f"{name}: {RUNS[name].description} ... ({_uptime()})", flush=True)
        result = record(RUNS[name], args.out, args.scratch, extra)
        evals = result.evaluations
        print(f"  greedy {_cell(evals[0]['eval/greedy_success_rate'])} -> {_cell(evals[-1]['eval/greedy_success_rate'])}"
              f", sampled {_cell(evals[0]['eval/sampled_success_rate'])} -> "
              f"{_cell(evals[-1]['eval/sampled_success_rate'])}; {result.wall_seconds:.0f} s wall, "
              f"{result.cpu_seconds:.0f} CPU s", flush=True)
        results.append(result)
    # The report covers every run kept in --out (recorded now or earlier), in RUNS' order.
    recorded = {result.run.name for result in results}
    results += [load(run, args.out) for name, run in RUNS.items()
                if name not in recorded and (args.out / "runs" / f"{name}.timing.json").exists()]
    results.sort(key=lambda result: list(RUNS).index(result.run.name))
    command = "python scripts/learning_curves.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                              if a != "--report-only")
    (args.out / "curves.md").write_text(markdown(results, command.strip()))
    write_tables(results, args.out)
    plot(results, args.out / "curves.png")
    print(f"written: {args.out / 'curves.md'}, curves.csv, curves.json, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
