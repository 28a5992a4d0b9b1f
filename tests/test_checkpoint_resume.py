"""Resume is exact, a SIGTERM mid-iteration leaves a loadable checkpoint, checkpoint writes are atomic, checkpoints of
earlier versions (optimizer.pt) still resume.

`export` (merging a checkpoint's LoRA) is tested in test_cli.py.

All runs use the tiny model on the toy task with small settings (CPU, a few seconds per iteration).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import (
    CHECKPOINTS,
    LATEST,
    OLD_OPTIMIZER,
    OPTIMIZER_TENSORS,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from trainer.config import dump
from trainer.dist import Dist
from trainer.logging import read_metrics
from trainer.train import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_toy_cpu.yaml")
# Small and fast, and one optimizer step per iteration whatever the shipped config says (the tests count steps).
FAST = ["--env.groups_per_iteration", "4", "--rollout.num_generations", "4", "--env.num_workers", "16",
        "--algo.ppo_epochs", "1", "--algo.num_mini_batches", "1", "--algo.epsilon", "0.2", "--algo.epsilon_high", "0.28",
        "--train.eval_episodes_per_task", "4", "--algo.micro_batch_size", "64", "--log.progress", "false",
        "--log.plots", "false", "--log.wandb", "false"]
SUBPROCESS_ENV = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _config(output_dir: Path, *extra: str):
    return load_config(["--config", CONFIG, "--train.output_dir", str(output_dir), *FAST, *extra])


def _train(output_dir: Path, *extra: str) -> dict:
    from trainer.train import train

    return train(_config(output_dir, *extra))


def _is_timing(key: str) -> bool:
    return key.startswith("time/") or "seconds" in key


def _comparable(records: list[dict]) -> dict[int, dict]:
    return {r["iteration"]: {k: v for k, v in r.items() if not _is_timing(k)} for r in records}


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run_dir)
    tensors = {f"adapter/{k}": v for k, v in load_file(str(checkpoint / "adapter_model.safetensors")).items()}
    if (checkpoint / "trainable.safetensors").is_file():
        tensors.update({f"trainable/{k}": v for k, v in load_file(str(checkpoint / "trainable.safetensors")).items()})
    return tensors


def _engine(config):
    """Policy, optimizer and engine built as train() builds them (one process)."""
    from trainer.build import build_optimizer
    from trainer.engine import setup_engine
    from trainer.train import build_run_policy

    dist = Dist.create(config.dist)
    policy = build_run_policy(config, dist)
    optimizer, scheduler = build_optimizer(config.optim, policy, config.train.iterations, config.quant.optimizer_8bit)
    return setup_engine(dist, policy, optimizer, config.optim), scheduler


# --- 1. resume exactness ---------------------------------------------------------------------------------------------


class _Crash(Exception):
    """Stands for a hard kill (SIGKILL, node failure): no handler runs, nothing is saved."""


def _interrupt_after(monkeypatch, iteration: int, how: str) -> None:
    """Interrupt a run right after `iteration` is logged: SIGTERM to this process (the graceful path: finish the
    iteration, save, exit) or a crash (the hard path: the loop dies, only periodic checkpoints exist)."""
    import signal as signals

    import trainer.logging

    original = trainer.logging.RunLogger.log

    def log(self, it, metrics):
        original(self, it, metrics)
        if it == iteration:
            if how == "sigterm":
                signals.raise_signal(signals.SIGTERM)
            else:
                raise _Crash(f"simulated hard kill after iteration {it}")

    monkeypatch.setattr(trainer.logging.RunLogger, "log", log)


@pytest.mark.parametrize("algo, how", [("grpo", "sigterm"), ("ppo", "crash")])
def test_two_plus_two_iterations_after_resume_equal_four_uninterrupted(tmp_path, monkeypatch, algo, how):
    """Weights (LoRA adapter, and the value head for PPO), optimizer moments and every non-timing metric of
    iterations 0..4 (0: the evaluation before training; `lr` included) are BIT-IDENTICAL (torch.equal / ==) between
    4 straight iterations and the same run interrupted, resumed and finished:
      grpo: SIGTERM after iteration 2 -> checkpoint of iteration 2 -> resume runs 3 and 4;
      ppo:  hard crash after iteration 3 was logged, before its checkpoint (checkpoint_every 2) -> resume from
            iteration 2 drops the orphan metrics line of iteration 3 and runs 3 and 4 again."""
    # LoRA dropout draws from torch's global RNG during the update: the resumed run matches only if the checkpoint
    # restored that stream too (every other stream is derived from the run seed). A cosine schedule with warm-up
    # makes the learning rate depend on the restored scheduler state.
    common = ["--algo.name", algo, "--train.deterministic", "true", "--algo.grpo.dynamic_sampling", "false",
              "--train.eval_every", "2", "--train.checkpoint_every", "2", "--lora.dropout", "0.1", "--optim.scheduler", "cosine",
              "--optim.warmup_iterations", "1", "--train.iterations", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, *common)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2 if how == "sigterm" else 3, how)
        if how == "sigterm":
            _train(resumed, *common)
        else:
            with pytest.raises(_Crash):
                _train(resumed, *common)
    assert latest_checkpoint(resumed).name == "iter-000002"
    logged = [r["iteration"] for r in read_metrics(resumed / "metrics.jsonl")]
    assert logged == ([0, 1, 2] if how == "sigterm" else [0, 1, 2, 3])
    _train(resumed, *common)
    assert latest_checkpoint(resumed).name == "iter-000004"

    a, b = _final_tensors(straight), _final_tensors(resumed)
    assert a.keys() == b.keys()
    assert any(k.startswith("adapter/") and "lora_" in k for k in a)
    if algo == "ppo":
        assert any(k.startswith("trainable/value_head") for k in a), sorted(a)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume (max abs diff " \
                                            f"{(a[key] - b[key]).abs().max().item():.3g})"
    # The weights moved: the comparison is not trivially true (a run that never stepped would also "match").
    first = load_file(str(straight / CHECKPOINTS / "iter-000002" / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], a[f"adapter/{k}"]) for k in first), "no optimizer step in iterations 3-4"

    # Optimizer moments (AdamW exp_avg / exp_avg_sq / step, keyed "<parameter>/<slot>") agree as well.
    opt_a = load_file(str(latest_checkpoint(straight) / OPTIMIZER_TENSORS))
    opt_b = load_file(str(latest_checkpoint(resumed) / OPTIMIZER_TENSORS))
    assert opt_a.keys() == opt_b.keys() and opt_a
    assert {key.rpartition("/")[2] for key in opt_a} == {"exp_avg", "exp_avg_sq", "step"}
    for key, value in opt_a.items():
        assert torch.equal(value, opt_b[key]), key

    records_a, records_b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    # One line per iteration, in order: none duplicated by the resume (the crash's orphan line 3 was dropped).
    assert [r["iteration"] for r in records_a] == [r["iteration"] for r in records_b] == [0, 1, 2, 3, 4]
    ma, mb = _comparable(records_a), _comparable(records_b)
    assert all("eval/greedy_success_rate" in ma[i] for i in (0, 2, 4))
    for iteration in (0, 1, 2, 3, 4):
        assert ma[iteration] == mb[iteration], f"iteration {iteration} metrics differ after resume"
    assert sum(ma[i].get("train/samples", 0) for i in (3, 4)) > 0
    # The logged rate is the one each update used: warm-up (1 + 0) / (1 + 1) of 3e-3, then cosine from the peak.
    assert [ma[i]["lr"] for i in (1, 2)] == pytest.approx([1.5e-3, 3e-3])
    assert len({ma[i]["lr"] for i in (1, 2, 3, 4)}) == 4
    state = json.loads((latest_checkpoint(resumed) / "trainer_state.json").read_text())
    assert state["iteration"] == 4


# --- 2. SIGTERM mid-iteration ----------------------------------------------------------------------------------------


def _iteration_lines(metrics: Path) -> int:
    """Completed iteration lines (>= 1) of a metrics file that another process may be appending to."""
    if not metrics.exists():
        return 0
    count = 0
    for line in metrics.read_text().split("\n")[:-1]:  # the part after the last newline may be half-written
        if line.strip() and json.loads(line).get("iteration", 0) >= 1:
            count += 1
    return count


def test_sigterm_mid_iteration_saves_a_loadable_checkpoint_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "trainer", "train", "--config", CONFIG, "--train.output_dir", str(run), *FAST,
            "--train.iterations", "50", "--train.eval_every", "0", "--train.checkpoint_every", "0"]
    log = tmp_path / "train.log"
    with log.open("w") as sink:
        process = subprocess.Popen(args, cwd=ROOT, env=SUBPROCESS_ENV, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while _iteration_lines(run / "metrics.jsonl") < 1:
            assert process.poll() is None, f"training ended early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no iteration finished in time"
            time.sleep(0.05)
        # Iteration 1 is logged (not checkpointed: checkpoint_every 0); iteration 2 has just started its rollout.
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, output
    assert "stop requested" in output, output

    done = _iteration_lines(run / "metrics.jsonl")
    assert done in (1, 2)  # 1 when the stop came during iteration 2's rollout (almost always), 2 in its update
    pointer = run / CHECKPOINTS / LATEST
    assert pointer.is_file()
    checkpoint = latest_checkpoint(run)
    assert checkpoint == run / CHECKPOINTS / pointer.read_text().strip()
    assert checkpoint.name == f"iter-{done:06d}"  # the last COMPLETED iteration, not the interrupted one
    assert not list((run / CHECKPOINTS).glob(".*incomplete"))

    # It loads into a freshly built policy: every adapter tensor is the saved one.
    from peft import get_peft_model_state_dict

    from trainer.train import build_run_policy

    config = load_config(["--config", str(run / "config.yaml")])
    policy = build_run_policy(config, Dist.create())
    state = load_weights(checkpoint, policy)
    assert state["iteration"] == done
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(policy.vla)
    assert saved.keys() == loaded.keys() and saved
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key

    # Resuming continues from the next iteration: one more line, numbered done + 1, nothing repeated.
    from trainer.train import train

    train(load_config(["--config", str(run / "config.yaml"), "--train.iterations", str(done + 1)]))
    iterations = [r["iteration"] for r in read_metrics(run / "metrics.jsonl") if r.get("iteration", 0) >= 1]
    assert iterations == list(range(1, done + 2))
    assert latest_checkpoint(run).name == f"iter-{done + 1:06d}"


def test_stop_in_the_first_rollout_or_mid_evaluation_logs_nothing_partial_and_resumes_cleanly(tmp_path, monkeypatch):
    """SIGTERM in iteration 1's rollout -> checkpoint of iteration 0; the resumed run does not repeat the baseline
    evaluation (no second line 0). SIGTERM during an evaluation -> that partial evaluation is not logged."""
    import signal as signals

    import trainer.train

    run = tmp_path / "run"
    common = ["--train.eval_every", "1", "--train.checkpoint_every", "0", "--log.plots", "false"]
    evaluate_policy = trainer.train.evaluate_policy

    class StoppedRollout(trainer.train.Rollout):  # the training loop's rollouts (not evaluations')
        def collect(self, **kwargs):
            signals.raise_signal(signals.SIGTERM)
            return super().collect(**kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.train, "Rollout", StoppedRollout)
        _train(run, *common, "--train.iterations", "3")
    assert latest_checkpoint(run).name == "iter-000000"
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [0]

    calls = []

    def evaluation_stopped_on_iteration_2(config, engine, pool, counts, iteration, stop=None):
        calls.append(iteration)
        if iteration == 2:
            signals.raise_signal(signals.SIGTERM)
        return evaluate_policy(config, engine, pool, counts, iteration, stop)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.train, "evaluate_policy", evaluation_stopped_on_iteration_2)
        _train(run, *common, "--train.iterations", "3")
    assert calls == [1, 2]  # no second baseline evaluation at iteration 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert "eval/greedy_success_rate" in records[1]
    assert not any(k.startswith("eval/") for k in records[2]), records[2]  # the interrupted evaluation
    assert latest_checkpoint(run).name == "iter-000002"


# --- atomic writes ---------------------------------------------------------------------------------------------------


def test_a_crash_mid_save_never_moves_latest_and_the_leftover_is_replaced(tmp_path, monkeypatch):
    """A save that dies half-way leaves only `.iter-XXXXXX.incomplete`; `latest` keeps naming the last complete
    checkpoint, which still loads; the next save of that iteration replaces the leftover."""
    import trainer.checkpoint

    config = _config(tmp_path, "--algo.name", "ppo")
    engine, scheduler = _engine(config)
    state = {"iteration": 3, "skipped_steps": 0, "skip_reasons": {}, "env_errors": 0, "best_eval_success": -1.0}
    save_checkpoint(tmp_path, engine, scheduler, state, dump(config))
    root = tmp_path / CHECKPOINTS
    assert (root / LATEST).read_text().strip() == "iter-000003"

    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):  # weights and optimizer are written, then the process "dies"
        real_save(obj, path, *args, **kwargs)
        raise KeyboardInterrupt("simulated crash while writing the scheduler state")

    monkeypatch.setattr(trainer.checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, engine, scheduler, {**state, "iteration": 4}, dump(config))
    monkeypatch.setattr(trainer.checkpoint.torch, "save", real_save)

    leftover = root / ".iter-000004.incomplete"
    assert leftover.is_dir() and any(leftover.iterdir())  # half-written
    assert not (root / "iter-000004").exists()
    assert (root / LATEST).read_text().strip() == "iter-000003"
    assert latest_checkpoint(tmp_path) == root / "iter-000003"
    assert load_checkpoint(latest_checkpoint(tmp_path), engine, scheduler)["iteration"] == 3
    assert not list(root.glob(f"{LATEST}.tmp-*"))  # the pointer is replaced atomically, never left half-written

    # The next successful save of iteration 4 clears the leftover and moves `latest`.
    save_checkpoint(tmp_path, engine, scheduler, {**state, "iteration": 4}, dump(config))
    assert not leftover.exists()
    assert latest_checkpoint(tmp_path) == root / "iter-000004"
    assert load_weights(root / "iter-000004", engine.policy)["iteration"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["iter-000003", "iter-000004", LATEST]


def test_latest_pointing_at_a_removed_folder_is_a_clear_error(tmp_path):
    root = tmp_path / CHECKPOINTS
    root.mkdir()
    (root / LATEST).write_text("iter-000007")
    with pytest.raises(FileNotFoundError, match="iter-000007"):
        latest_checkpoint(tmp_path)


# --- checkpoints of earlier versions ---------------------------------------------------------------------------------

OLD_RUN = ROOT / "tests" / "fixtures" / "old_run_e165e4f"  # written by commit e165e4f (make_old_run_e165e4f.py)


def test_a_checkpoint_of_an_earlier_version_loads_by_position_and_resumes_exactly(tmp_path):
    """An old run directory: config.yaml under the old option names, optimizer.pt keyed by position (PPO: a value head
    in a second param group, LoRA r=2, one iteration done). Its optimizer state reaches the named parameters the old
    code optimized at each position (the old code's own order, recorded in optimizer_param_order.json); resuming
    from it then runs exactly like resuming from the same state saved in today's format."""
    import shutil
    import warnings

    from safetensors.torch import load_file as read

    from trainer.checkpoint import read_optimizer, read_trainable
    from trainer.config import RenamedOptionWarning
    from trainer.train import TrainState, train

    old_checkpoint = OLD_RUN / CHECKPOINTS / "iter-000001"
    assert (old_checkpoint / OLD_OPTIMIZER).is_file() and not (old_checkpoint / OPTIMIZER_TENSORS).exists()
    with pytest.warns(RenamedOptionWarning):
        config = load_config(["--config", str(OLD_RUN / "config.yaml"), "--train.output_dir", str(tmp_path / "x"),
                              "--train.iterations", "2", "--log.plots", "false"])
    engine, scheduler = _engine(config)
    old_order = json.loads((OLD_RUN / "optimizer_param_order.json").read_text())
    assert engine.param_group_names == old_order  # the same parameters in the same order as the old run's

    # 1. position i of optimizer.pt is the parameter at position i of the old run's order, and every slot arrives
    state = TrainState(**load_checkpoint(old_checkpoint, engine, scheduler))
    assert state.iteration == 1
    saved = torch.load(old_checkpoint / OLD_OPTIMIZER, weights_only=True)
    loaded = engine.optimizer_state()
    names = [name for group in old_order for name in group]
    assert len(saved["state"]) == len(names) == len(loaded["state"]) and len(old_order) == 2  # LoRA + value head
    assert any(float(slots["exp_avg"].abs().sum()) > 0 for slots in saved["state"].values())  # not all zeros
    for index, slots in saved["state"].items():
        for slot, value in slots.items():
            assert torch.equal(loaded["state"][names[index]][slot], value), (names[index], slot)
    assert [g["lr"] for g in loaded["param_groups"]] == [g["lr"] for g in saved["param_groups"]]
    trainable, files = engine.trainable_state(), read_trainable(old_checkpoint, engine.policy)
    assert trainable.keys() == files.keys() == set(names)  # every trainable weight came from the checkpoint
    for name, value in read(str(old_checkpoint / "trainable.safetensors")).items():  # the value head, by name
        assert torch.equal(trainable[name], value), name
    assert all(torch.equal(trainable[name], value) for name, value in files.items())
    assert read_optimizer(old_checkpoint, engine.param_group_names)["state"].keys() == set(names)

    # 2. resuming from the old layout equals resuming from the same state in today's layout
    old_copy, new_copy = tmp_path / "old", tmp_path / "new"
    shutil.copytree(OLD_RUN, old_copy)
    shutil.copytree(OLD_RUN, new_copy)
    shutil.rmtree(new_copy / CHECKPOINTS / "iter-000001")
    engine, scheduler = _engine(config)
    restored = load_checkpoint(old_checkpoint, engine, scheduler)
    save_checkpoint(new_copy, engine, scheduler, restored, dump(config))
    assert (new_copy / CHECKPOINTS / "iter-000001" / OPTIMIZER_TENSORS).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RenamedOptionWarning)
        for run in (old_copy, new_copy):
            train(load_config(["--config", str(run / "config.yaml"), "--train.output_dir", str(run),
                               "--train.iterations", "2", "--log.progress", "false", "--log.plots", "false"]))
    records = [_comparable(read_metrics(run / "metrics.jsonl")) for run in (old_copy, new_copy)]
    assert list(records[0]) == list(records[1]) == [1, 2]
    assert records[0][2] == records[1][2] and records[0][2]["train/samples"] > 0
    a, b = _final_tensors(old_copy), _final_tensors(new_copy)
    assert a.keys() == b.keys() and any(k.startswith("trainable/value_head") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    moments = [read(str(latest_checkpoint(run) / OPTIMIZER_TENSORS)) for run in (old_copy, new_copy)]
    assert moments[0].keys() == moments[1].keys() and all(torch.equal(v, moments[1][k]) for k, v in moments[0].items())


def test_an_old_checkpoint_of_other_parameters_is_refused_with_the_counts(tmp_path):
    """optimizer.pt holds no names: a run whose trainable parameters differ (here: LoRA on the LLM only) must not
    take its state by position (its weights are refused as well, by name)."""
    import warnings

    from trainer.checkpoint import read_optimizer
    from trainer.config import RenamedOptionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RenamedOptionWarning)
        config = load_config(["--config", str(OLD_RUN / "config.yaml"), "--lora.target_modules", "llm-linear"])
    engine, scheduler = _engine(config)
    with pytest.raises(ValueError, match=r"holds \[68, 6\] parameters per param group but this run optimizes \[30, 6\]"):
        read_optimizer(OLD_RUN / CHECKPOINTS / "iter-000001", engine.param_group_names)
    with pytest.raises(ValueError, match="has tensors this model does not"):
        load_checkpoint(OLD_RUN / CHECKPOINTS / "iter-000001", engine, scheduler)
