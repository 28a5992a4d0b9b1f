"""Run outputs: resolved config, metrics.jsonl, a console table per iteration, progress bars, wandb, PNG plots.

Only rank 0 writes (DESIGN invariant 5). wandb is optional and never fatal: with no API key it runs offline, and any
wandb error is reported once and then ignored.
"""

from __future__ import annotations

import json
import logging
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


# The iteration table: one fixed set of columns (key, title, width), so that every row lines up under one header,
# whether or not the iteration evaluated (its eval columns then show "-"). PPO adds the critic's columns.
CONSOLE_COLUMNS = [
    ("iteration", "iter", 5), ("phase", "phase", 13), ("rollout/success_rate", "success", 7),
    ("eval/greedy_success_rate", "greedy", 6), ("eval/sampled_success_rate", "sampled", 7),
    ("train/loss", "loss", 8), ("train/approx_kl", "approx_kl", 9), ("train/clip_frac", "clip_frac", 9),
    ("train/entropy", "entropy", 7), ("train/grad_norm", "grad_norm", 9), ("train/samples", "samples", 7),
    ("guard/skipped_steps_total", "skips", 5), ("rollout/env_errors", "env_err", 7),
    ("time/iteration_seconds", "sec", 6),
]
# The rollout critic's quality (algos.critic_diagnostics): its value loss and explained variance on the batch whose
# advantages it made.
CRITIC_COLUMNS = [("critic/value_loss", "value_loss", 10), ("critic/explained_variance", "expl_var", 8)]
HEADER_EVERY = 25  # rows between repeated headers, so that a long log stays readable without scrolling back
USELESS_CRITIC_ITERATIONS = 5  # explained variance <= 0 this many iterations in a row: say so once


def useless_critic_note(explained_variances: list) -> str | None:
    """A note when the last USELESS_CRITIC_ITERATIONS explained variances are all <= 0 (NaN, a batch whose returns did
    not vary, says nothing either way and breaks the run of iterations), else None."""
    recent = explained_variances[-USELESS_CRITIC_ITERATIONS:]
    if len(recent) < USELESS_CRITIC_ITERATIONS or not all(isinstance(v, (int, float)) and v <= 0 for v in recent):
        return None
    return (f"critic: explained variance <= 0 for {USELESS_CRITIC_ITERATIONS} iterations in a row: the value head "
            "predicts the returns no better than their mean, so the GAE advantages are returns minus noise. Raise "
            "optim.value_lr, warm the critic up, or use algo.name grpo.")


class ConsoleTable:
    """Fixed-width text rows under one header (repeated every HEADER_EVERY rows): the columns never move."""

    def __init__(self, columns: list[tuple[str, str, int]]):
        self.columns = columns
        self.rows_printed = 0

    def header(self) -> str:
        return "  ".join(f"{title:>{width}}" for _, title, width in self.columns)

    def row(self, record: dict) -> str:
        return "  ".join(f"{_format(record.get(key), width):>{width}}" for key, _, width in self.columns)

    def lines_for(self, record: dict) -> list[str]:
        """The line(s) to print for one record: the header first when it is due, then the row."""
        lines = [self.header()] if self.rows_printed % HEADER_EVERY == 0 else []
        self.rows_printed += 1
        return lines + [self.row(record)]


# Third-party messages printed at every start that say nothing a user can act on, silenced at their loggers:
# (logger name, start of the message).
THIRD_PARTY_NOISE = [
    # bitsandbytes' optional CPU 4-bit kernel (we use 8-bit only), logged when peft imports bitsandbytes
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # bitsandbytes' int8 matmul computes in float16 and logs so at every call (784 lines per toy iteration on the CPU)
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
    # robosuite without a private macro file (the defaults are what LIBERO expects), three lines per import
    ("robosuite_logs", "No private macro file found"),
    ("robosuite_logs", "It is recommended to use a private macro file"),
    ("robosuite_logs", "To setup, run: python"),
]


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_third_party_noise() -> None:
    """Install filters for THIRD_PARTY_NOISE on their loggers (before the libraries are imported: `trainer`'s
    __init__ calls this, so worker processes get it too)."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in THIRD_PARTY_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))



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
        self.table = ConsoleTable(CONSOLE_COLUMNS + (CRITIC_COLUMNS if config.algo.name == "ppo" else []))
        self._explained_variances: list = []
        self._critic_note_printed = False
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
    def progress(self, description: str, total: int | None, unit: str | None = None):
        """A transient progress bar; `unit` names what one update(1) counts (default: "episodes" when a total is
        given, as for a rollout, else "micro-batches", as for an update)."""
        if not (self.active and self.config.log.progress):
            yield _NoProgress()
            return
        from tqdm import tqdm

        unit = unit or ("episodes" if total else "micro-batches")
        with tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, unit=f" {unit}") as bar:
            yield bar

    # --- metrics ----------------------------------------------------------------------------------------------------

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop lines of iterations that the restored checkpoint does not contain."""
        if not (self.active and self.metrics_path.exists()):
            return
        records = read_metrics(self.metrics_path, report=self.print)
        kept = [record for record in records if record.get("iteration", 0) <= iteration]
        self.metrics_path.write_text("".join(json.dumps(record) + "\n" for record in kept))

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
        for line in self.table.lines_for(record):
            self.print(line)
        if "critic/explained_variance" in record:
            self._explained_variances.append(record["critic/explained_variance"])
            note = useless_critic_note(self._explained_variances)
            if note and not self._critic_note_printed:
                self.print(note)
                self._critic_note_printed = True

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
        plot_path = None
        if self.config.log.plots and self.metrics_path.exists() and read_metrics(self.metrics_path):
            try:
                plot_path = write_plots(self.metrics_path, self.output_dir / "plots")[0]
            except Exception as error:  # noqa: BLE001 -- plots are a convenience
                self.print(f"plots failed: {error}")
        summary = summarize(self.metrics_path, plot_path) if self.metrics_path.exists() else ""
        if summary:
            self.print(summary)
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def summarize(metrics_path: Path, plot_path: Path | None = None) -> str:
    """The run in one line, from the first and last evaluation in metrics.jsonl, plus where the curve is:

        greedy success 0.188 -> 0.927, sampled 0.094 -> 0.865 (iteration 0 -> 60, 212 s of training)
        curve: runs/tiny_toy_cpu/plots/success.png

    The seconds are the iterations' own (rollout, update and evaluation), without start-up and the first evaluation.
    """
    records = read_metrics(metrics_path)
    parts, span = [], None
    for key, name in (("eval/greedy_success_rate", "greedy success"), ("eval/sampled_success_rate", "sampled")):
        points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if len(points) >= 2:
            (first_it, first), (last_it, last) = points[0], points[-1]
            parts.append(f"{name} {first:.3f} -> {last:.3f}")
            span = span or f"(iteration {first_it} -> {last_it}"
    if not parts:
        return ""
    seconds = sum(r["time/iteration_seconds"] for r in records if isinstance(r.get("time/iteration_seconds"), (int, float)))
    span += f", {seconds:.0f} s of training)" if seconds else ")"
    lines = [", ".join(parts) + f" {span}"]
    if plot_path is not None:
        lines.append(f"curve: {plot_path}")
    return "\n".join(lines)


def read_metrics(path: Path, report=None) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a crash or a full disk mid-append) is left out, with a
    message to `report` when given; a damaged line before it is an error naming the file and line."""
    lines = Path(path).read_text().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if any(rest.strip() for rest in lines[number:]):
                from trainer.config import ConfigError

                raise ConfigError(f"{path}, line {number}, is not a JSON record ({error}); delete that line and "
                                 "start again") from error
            if report is not None:
                report(f"{path}: left out its last line, written only in part (the process ended mid-write): "
                       f"{line[:60]!r}")
    return records


def write_plots(metrics_path: Path, plot_dir: Path) -> list[Path]:
    """success.png (rollout and eval success per iteration; returned first) and loss.png (the update's diagnostics:
    loss, approx KL, clip fraction, entropy, grad norm, and for PPO the rollout critic's value loss and explained
    variance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = {
        "success.png": ["rollout/success_rate", "eval/greedy_success_rate", "eval/sampled_success_rate"],
        "loss.png": ["train/loss", "train/approx_kl", "train/clip_frac", "train/entropy", "train/grad_norm"]
        + [key for key in ("critic/value_loss", "critic/explained_variance")
           if any(isinstance(r.get(key), (int, float)) for r in records)],
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
                if axis.get_legend_handles_labels()[0]:  # matplotlib warns about a legend of nothing
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


def _format(value, width: int = 10) -> str:
    """A cell of at most `width` characters where the value allows: 4 significant digits, fewer in exponent form
    when they do not fit (so that one tiny approx_kl does not push the rest of its row out of line)."""
    if value is None:  # e.g. train/loss of an iteration without an update, or eval columns between evaluations
        return "-"
    if isinstance(value, float):
        text = f"{value:.4g}"
        for precision in (2, 1, 0):
            if len(text) <= width:
                break
            text = f"{value:.{precision}e}"
        return text
    return str(value)


def _config_dict(config) -> dict:
    return asdict(config)
