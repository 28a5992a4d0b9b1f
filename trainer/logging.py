"""Run outputs: resolved config, metrics.jsonl, a console table per iteration, progress bars, wandb, PNG plots.

Only rank 0 writes (DESIGN invariant 5). wandb is optional and never fatal: with no API key it runs offline, and any
wandb error is reported once and then ignored.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class LogConfig:
    """Where a run's progress goes (rank 0 only). metrics.jsonl and config.yaml in output_dir are always written."""

    wandb: bool = False
    """Log to Weights & Biases; offline (under output_dir/wandb) when there is no WANDB_API_KEY. Never fatal."""
    wandb_project: str = "vla-rl"
    """wandb project name."""
    wandb_run_name: str | None = None
    """wandb run name (default: wandb's)."""
    plots: bool = True
    """Write output_dir/plots/success.png and loss.png at the end of the run."""
    progress: bool = True
    """Progress bars for rollouts and updates."""

CONSOLE_KEYS = [
    ("iteration", "iter"), ("phase", "phase"), ("rollout/success_rate", "success"),
    ("eval/greedy_success_rate", "eval greedy"), ("eval/sampled_success_rate", "eval sampled"),
    ("train/loss", "loss"), ("train/grad_norm", "grad norm"), ("train/approx_kl", "approx kl"),
    ("train/clip_frac", "clip frac"), ("train/entropy", "entropy"), ("train/samples", "samples"),
    ("guard/skipped_steps_total", "skips"), ("rollout/env_errors", "env err"), ("time/iteration_seconds", "sec"),
]


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass


class RunLogger:
    def __init__(self, config, dist, output_dir: Path):
        self.config = config
        self.dist = dist
        self.output_dir = Path(output_dir)
        self.active = dist.is_main
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._wandb = None
        self._console = None
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        from rich.console import Console

        self._console = Console(highlight=False, width=200)
        if config.log.wandb:
            self._start_wandb()

    # --- plain output -----------------------------------------------------------------------------------------------

    def print(self, message: str) -> None:
        if self.active:
            self._console.print(message, markup=False)

    def write_config(self, text: str) -> None:
        if self.active:
            (self.output_dir / "config.yaml").write_text(text)

    @contextmanager
    def progress(self, description: str, total: int | None):
        if not (self.active and self.config.log.progress):
            yield _NoProgress()
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, unit="ep" if total else "mb") as bar:
            yield bar

    # --- metrics ----------------------------------------------------------------------------------------------------

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop lines of iterations that the restored checkpoint does not contain."""
        if not (self.active and self.metrics_path.exists()):
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, iteration: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"iteration": iteration, **{k: _plain(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._console_row(record)
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=iteration)
            except Exception as error:  # noqa: BLE001 -- a logging service never stops a training run
                self.print(f"wandb logging failed ({error}); continuing without wandb")
                self._wandb = None

    def _console_row(self, record: dict) -> None:
        from rich.table import Table

        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        shown = [(key, title) for key, title in CONSOLE_KEYS if key in record]
        for _, title in shown:
            table.add_column(title, justify="right")
        table.add_row(*[_format(record[key]) for key, _ in shown])
        self._console.print(table)

    def _start_wandb(self) -> None:
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self._wandb = wandb.init(project=self.config.log.wandb_project, name=self.config.log.wandb_run_name,
                                     dir=str(self.output_dir), mode=mode, config=_config_dict(self.config),
                                     settings=wandb.Settings(init_timeout=60, silent=True))
            self.print(f"wandb: {mode} run in {self.output_dir / 'wandb'}")
        except Exception as error:  # noqa: BLE001
            self.print(f"wandb could not start ({error}); continuing without it")
            self._wandb = None

    # --- end of run -------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        if not self.active:
            return
        summary = summarize(self.metrics_path) if self.metrics_path.exists() else ""
        if summary:
            self.print(summary)
        if self.config.log.plots:
            try:
                write_plots(self.metrics_path, self.output_dir / "plots")
            except Exception as error:  # noqa: BLE001 -- plots are a convenience
                self.print(f"plots failed: {error}")
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def summarize(metrics_path: Path) -> str:
    """Success before and after training, from the first and last evaluation in metrics.jsonl."""
    lines = []
    records = read_metrics(metrics_path)
    for key in ("eval/greedy_success_rate", "eval/sampled_success_rate"):
        points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if len(points) >= 2:
            (first_it, first), (last_it, last) = points[0], points[-1]
            lines.append(f"{key.split('/')[1].replace('_', ' ')}: {first:.3f} at iteration {first_it} -> "
                         f"{last:.3f} at iteration {last_it}")
    return ("success before -> after training\n  " + "\n  ".join(lines)) if lines else ""


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_plots(metrics_path: Path, plot_dir: Path) -> list[Path]:
    """success.png (rollout and eval success per iteration) and loss.png (loss, grad norm, approx KL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = {
        "success.png": ["rollout/success_rate", "eval/greedy_success_rate", "eval/sampled_success_rate"],
        "loss.png": ["train/loss", "train/grad_norm", "train/approx_kl", "train/entropy"],
    }
    for name, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys) if name == "loss.png" else 1, figsize=(4 * len(keys), 3.2),
                                 squeeze=False)
        for index, key in enumerate(keys):
            axis = axes[0][index if name == "loss.png" else 0]
            points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                      and math.isfinite(r[key])]
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, marker="o" if len(points) < 30 else None, label=key.split("/")[-1])
            axis.set_xlabel("iteration")
            axis.set_title(key if name == "loss.png" else "success rate")
            if name == "success.png":
                axis.set_ylim(-0.02, 1.02)
                axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=100)
        plt.close(fig)
        written.append(plot_dir / name)
    return written


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _format(value) -> str:
    if value is None:  # e.g. train/loss of an iteration without an update
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _config_dict(config) -> dict:
    return asdict(config)
