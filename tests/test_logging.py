"""The console: one iteration table whose columns never move, progress units, the one-line summary, critic notes."""

import json
import re
from types import SimpleNamespace

import pytest

from trainer.logging import (
    CONSOLE_COLUMNS,
    CRITIC_COLUMNS,
    HEADER_EVERY,
    USELESS_CRITIC_ITERATIONS,
    ConsoleTable,
    RunLogger,
    summarize,
    useless_critic_note,
)

TRAIN_ROW = {"iteration": 3, "phase": "rl", "rollout/success_rate": 0.15625, "train/loss": -1.234e-05,
             "train/approx_kl": 0.0123456, "train/clip_frac": 0.0875, "train/entropy": 5.4321, "train/grad_norm": 0.25,
             "train/samples": 490.0, "guard/skipped_steps_total": 0.0, "rollout/env_errors": 0.0,
             "time/iteration_seconds": 5.3172}
EVAL_ROW = {**TRAIN_ROW, "iteration": 10, "eval/greedy_success_rate": 0.21875, "eval/sampled_success_rate": 0.1875}
BASELINE_ROW = {"iteration": 0, "eval/greedy_success_rate": 0.1875, "eval/sampled_success_rate": 0.09375}


def cell_spans(line: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", line)]


def test_every_row_lines_up_under_one_header_with_or_without_an_evaluation():
    table = ConsoleTable(CONSOLE_COLUMNS)
    lines = table.lines_for(BASELINE_ROW) + table.lines_for(TRAIN_ROW) + table.lines_for(EVAL_ROW)
    header, baseline, train, evaluated = lines  # the header once, then one line per record
    assert header.split()[:5] == ["iter", "phase", "success", "greedy", "sampled"]
    ends = [end for _, end in cell_spans(header)]
    for line in (baseline, train, evaluated):
        assert len(line) == len(header)
        assert [end for _, end in cell_spans(line)] == ends  # right-aligned: every cell ends where its title does
    assert train.split()[3:5] == ["-", "-"]  # no evaluation this iteration: placeholders, not a new table
    assert evaluated.split()[3:5] == ["0.2188", "0.1875"]
    assert baseline.split()[:5] == ["0", "-", "-", "0.1875", "0.09375"]


def test_the_header_repeats_every_so_many_rows_and_only_then():
    table = ConsoleTable(CONSOLE_COLUMNS)
    lines = [line for i in range(2 * HEADER_EVERY + 1) for line in table.lines_for({**TRAIN_ROW, "iteration": i})]
    headers = [i for i, line in enumerate(lines) if line.split()[0] == "iter"]
    assert headers == [0, HEADER_EVERY + 1, 2 * HEADER_EVERY + 2]


def test_small_and_large_numbers_keep_their_column_width():
    table = ConsoleTable(CONSOLE_COLUMNS)
    widths = {key: width for key, _, width in CONSOLE_COLUMNS}
    row = table.row({**TRAIN_ROW, "train/loss": -0.000123456789, "train/approx_kl": 1.5e-07,
                     "train/grad_norm": 123456.789})
    assert len(row) == len(table.header())
    cells = dict(zip([key for key, _, _ in CONSOLE_COLUMNS], row.split()))
    assert float(cells["train/loss"]) == pytest.approx(-1.2e-4, rel=0.05)
    assert float(cells["train/approx_kl"]) == pytest.approx(1.5e-07, rel=0.05)
    assert all(len(cells[key]) <= widths[key] for key in ("train/loss", "train/approx_kl", "train/grad_norm"))


def make_logger(tmp_path, algo="grpo", progress=True):
    config = SimpleNamespace(algo=SimpleNamespace(name=algo), log=SimpleNamespace(wandb=False, plots=True,
                                                                                  progress=progress))
    return RunLogger(config, SimpleNamespace(is_main=True), tmp_path)


def test_ppo_runs_show_the_critic_columns_and_grpo_runs_do_not(tmp_path):
    grpo, ppo = make_logger(tmp_path / "g"), make_logger(tmp_path / "p", algo="ppo")
    assert [key for key, _, _ in grpo.table.columns] == [key for key, _, _ in CONSOLE_COLUMNS]
    assert [key for key, _, _ in ppo.table.columns][-2:] == [key for key, _, _ in CRITIC_COLUMNS]
    assert ppo.table.header().split()[-2:] == ["value_loss", "expl_var"]


def test_progress_bars_name_what_they_count(tmp_path, capsys):
    logger = make_logger(tmp_path)
    with logger.progress("rollout 1", total=4) as bar:
        assert bar.unit == " episodes"
        bar.update(4)
    with logger.progress("update 1", total=None) as bar:
        assert bar.unit == " micro-batches"
    with logger.progress("eval", total=2, unit="episodes") as bar:
        assert bar.unit == " episodes"
    assert " mb" not in capsys.readouterr().err


def test_a_critic_that_explains_nothing_is_reported_once(tmp_path, capsys):
    assert useless_critic_note([0.4, -0.1, -0.2, 0.0, -0.3]) is None  # only 4 bad ones in the window
    assert useless_critic_note([-0.1] * (USELESS_CRITIC_ITERATIONS - 1)) is None
    assert "explained variance <= 0" in useless_critic_note([0.5] + [-0.1] * USELESS_CRITIC_ITERATIONS)
    assert useless_critic_note([-0.1, -0.2, "nan", -0.1, -0.3]) is None  # undefined is no evidence
    logger = make_logger(tmp_path, algo="ppo", progress=False)
    for i in range(2 * USELESS_CRITIC_ITERATIONS):
        logger.log(i + 1, {**TRAIN_ROW, "critic/explained_variance": -0.05, "critic/value_loss": 0.1})
    assert capsys.readouterr().out.count("explained variance <= 0") == 1


def test_summary_is_one_before_after_line_and_the_plot_path(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [BASELINE_ROW, TRAIN_ROW, EVAL_ROW,
            {**EVAL_ROW, "iteration": 20, "eval/greedy_success_rate": 0.9375, "eval/sampled_success_rate": 0.8646}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(path, tmp_path / "plots" / "success.png").splitlines()
    assert summary == ["greedy success 0.188 -> 0.938, sampled 0.094 -> 0.865 (iteration 0 -> 20, 16 s of training)",
                       f"curve: {tmp_path / 'plots' / 'success.png'}"]
    assert summarize(path).count("\n") == 0  # without plots: the line alone
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("time/")}) + "\n" for r in rows))
    assert summarize(path).endswith("(iteration 0 -> 20)")  # no timings recorded: none shown


def test_finish_writes_the_plots_and_prints_their_path(tmp_path, capsys):
    logger = make_logger(tmp_path, progress=False)
    for row in (BASELINE_ROW, TRAIN_ROW, EVAL_ROW):
        logger.log(row["iteration"], row)
    logger.finish()
    out = capsys.readouterr().out
    assert (tmp_path / "plots" / "success.png").is_file() and (tmp_path / "plots" / "loss.png").is_file()
    assert "greedy success 0.188 -> 0.219, sampled 0.094 -> 0.188 (iteration 0 -> 10, 11 s of training)" in out
    assert f"curve: {tmp_path / 'plots' / 'success.png'}" in out
