"""Faults 2-10 of issue #16, each reproduced (fault 1, SIGTERM to a real launcher: test_reliability_launch.py).

docs/reliability.md lists what survives what from these tests. One tiny run (2 iterations, a checkpoint after each) is
trained once per module and copied into every test that damages it.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import trainer.checkpoint
from trainer.checkpoint import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    OLD_OPTIMIZER,
    OPTIMIZER_TENSORS,
    CheckpointError,
    MissingCheckpointError,
    checkpoint_problem,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from trainer.config import ConfigError, dump
from trainer.dist import Dist
from trainer.logging import read_metrics
from trainer.train import build_run_policy, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_toy_cpu.yaml")
FAST = ["--env.groups_per_iteration", "2", "--rollout.num_generations", "2", "--env.num_workers", "4",
        "--algo.ppo_epochs", "1", "--algo.num_mini_batches", "1", "--algo.micro_batch_size", "64",
        "--train.eval_every", "0", "--log.progress", "false", "--log.plots", "false", "--log.wandb", "false",
        # every iteration takes an optimizer step (with 2 samples per group, dynamic sampling may drop them all), so
        # that the checkpoints hold optimizer state to damage
        "--algo.grpo.dynamic_sampling", "false"]


def _config(output_dir: Path, *extra: str):
    return load_config(["--config", CONFIG, "--train.output_dir", str(output_dir), *FAST, *extra])


def _run_config(run: Path, *extra: str):
    """The run's own config.yaml, writing into this copy of the run (config.yaml names the original's folder)."""
    return load_config(["--config", str(run / "config.yaml"), "--train.output_dir", str(run), *extra])


def _engine(config):
    from trainer.build import build_optimizer
    from trainer.engine import setup_engine

    dist = Dist.create(config.dist)
    policy = build_run_policy(config, dist)
    optimizer, scheduler = build_optimizer(config.optim, policy, config.train.iterations, config.quant.optimizer_8bit)
    return setup_engine(dist, policy, optimizer, config.optim), scheduler


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 2 iterations with checkpoint_every 1: iter-000001 and iter-000002, `latest` -> iter-000002. The end of
    the run does not save iteration 2 a second time (a re-save was the window of fault 2)."""
    from trainer.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    import trainer.train as recipe

    saved = []

    original = recipe.save_checkpoint

    def recording_save(output_dir, engine, scheduler, state, *args):
        saved.append(state["iteration"])
        return original(output_dir, engine, scheduler, state, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "save_checkpoint", recording_save)
        train(_config(run, "--train.iterations", "2", "--train.checkpoint_every", "1"))
    assert saved == [1, 2]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _iter(run: Path, n: int) -> Path:
    return run / CHECKPOINTS / f"iter-{n:06d}"


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --- 2. a kill between the steps of a re-save -----------------------------------------------------------------------


class _Kill(BaseException):
    """Stands for SIGKILL at one filesystem step of the save: nothing after it runs."""


def test_a_kill_at_any_step_of_resaving_the_latest_iteration_leaves_a_loadable_latest(run, monkeypatch):
    config = _run_config(run)
    engine, scheduler = _engine(config)
    state = load_checkpoint(latest_checkpoint(run), engine, scheduler)
    assert state["iteration"] == 2
    expected = load_file(str(_iter(run, 2) / "adapter_model.safetensors"))
    real_replace, real_rmtree = trainer.checkpoint.os.replace, trainer.checkpoint.shutil.rmtree
    kills = 0
    for kill_at in range(1, 20):  # the k-th rename or removal of the save never happens
        calls = []

        def step(real):
            def wrapped(*args, **kwargs):
                calls.append(real.__name__)
                if len(calls) == kill_at:
                    raise _Kill
                return real(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(trainer.checkpoint.os, "replace", step(real_replace))
        monkeypatch.setattr(trainer.checkpoint.shutil, "rmtree", step(real_rmtree))
        try:
            save_checkpoint(run, engine, scheduler, state, dump(config))
            finished = True
        except _Kill:
            finished, kills = False, kills + 1
        monkeypatch.setattr(trainer.checkpoint.os, "replace", real_replace)
        monkeypatch.setattr(trainer.checkpoint.shutil, "rmtree", real_rmtree)
        # Whatever step the kill hit, resume finds a complete checkpoint of iteration 2 with its weights.
        path = latest_checkpoint(run, report=lambda message: None)
        assert path is not None and checkpoint_problem(path) is None, (kill_at, path)
        assert load_checkpoint(path, engine, scheduler)["iteration"] == 2, kill_at
        assert load_file(str(path / "adapter_model.safetensors")).keys() == expected.keys()
        if finished:
            break
    assert finished and kills >= 4  # every rename and removal of the save was hit once
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["iter-000001", "iter-000002", LATEST]


# --- 3. a refused resume leaves the run as it was --------------------------------------------------------------------


def test_a_resume_with_another_lora_rank_is_refused_and_keeps_config_yaml(run, capsys):
    from trainer.cli import main

    before = (run / "config.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(run / "config.yaml"), "--train.output_dir", str(run), "--lora.rank", "8",
              "--train.iterations", "3"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "adapter_model.safetensors" in message and "has shape" in message, message
    assert "rank 16" in message and "Traceback" not in message, message
    assert (run / "config.yaml").read_text() == before
    # eval / export read config.yaml: it still describes the checkpoint, whose weights load into it.
    policy = build_run_policy(_run_config(run), Dist.create())
    assert load_weights(latest_checkpoint(run), policy)["iteration"] == 2


# --- 4. a dangling or damaged newest checkpoint: the newest complete one, named ----------------------------------


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint_and_says_so(run):
    shutil.rmtree(_iter(run, 2))
    messages = []
    assert latest_checkpoint(run, report=messages.append) == _iter(run, 1)
    assert len(messages) == 1 and "'iter-000002'" in messages[0] and "iter-000001" in messages[0], messages
    assert "does not exist" in messages[0]


def test_a_truncated_file_in_the_newest_checkpoint_falls_back_with_the_file_named(run):
    _truncate(_iter(run, 2) / OPTIMIZER_TENSORS)
    messages = []
    assert latest_checkpoint(run, report=messages.append) == _iter(run, 1)
    assert f"{OPTIMIZER_TENSORS} has 100 bytes" in messages[0] and "iter-000001" in messages[0], messages
    with pytest.raises(CheckpointError, match=OPTIMIZER_TENSORS):
        load_checkpoint(_iter(run, 2), *_engine(_run_config(run)))


def test_resume_after_a_fallback_continues_from_the_older_checkpoint(run, capsys):
    from trainer.train import train

    shutil.rmtree(_iter(run, 2))
    train(_run_config(run, "--train.iterations", "2"))
    assert "using iter-000001, the newest complete checkpoint" in capsys.readouterr().err
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert latest_checkpoint(run) == _iter(run, 2) and checkpoint_problem(_iter(run, 2)) is None


def test_with_no_complete_checkpoint_left_the_error_says_how_to_start_over(run):
    shutil.rmtree(_iter(run, 1))
    shutil.rmtree(_iter(run, 2))
    with pytest.raises(MissingCheckpointError, match="to start over, remove"):
        latest_checkpoint(run)


# --- 5. validation across sections -----------------------------------------------------------------------------------


def test_a_kl_penalty_without_lora_is_refused_by_validation():
    with pytest.raises(ConfigError, match=r"algo.beta = 0.1.*lora.enabled true"):
        load_config(["--config", CONFIG, "--algo.beta", "0.1", "--lora.enabled", "false"])


# --- 6. a torn last line of metrics.jsonl ----------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_message_and_the_run_resumes(run, capsys):
    from trainer.train import train

    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 3, "rollout/succ')  # a crash or a full disk mid-append
    train(_run_config(run, "--train.iterations", "3"))
    assert "left out its last line" in capsys.readouterr().out
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n{"itera\n{"iteration": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl, line 2"):
        read_metrics(path)


# --- 7. corrupt files name the file and the fix; a full disk says so ----------------------------------------------


def _without_manifests(run: Path) -> None:
    """As written before manifests existed (or with the manifest lost): the loaders' own checks must name the file."""
    for manifest in (run / CHECKPOINTS).glob(f"*/{MANIFEST}"):
        manifest.unlink()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", OPTIMIZER_TENSORS, "scheduler.pt",
                                  "trainer_state.json"])
def test_a_truncated_file_of_an_unverified_checkpoint_is_named(run, name):
    _without_manifests(run)
    _truncate(_iter(run, 2) / name, keep=20)
    engine, scheduler = _engine(_run_config(run))
    with pytest.raises(CheckpointError, match=rf"{name} cannot be read .*remove .*iter-000002"):
        load_checkpoint(_iter(run, 2), engine, scheduler)


def test_a_truncated_old_optimizer_pt_is_named(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "fixtures" / "old_run_e165e4f", old)
    checkpoint = latest_checkpoint(old)
    _truncate(checkpoint / OLD_OPTIMIZER, keep=300)
    with pytest.warns(FutureWarning):  # the fixture's config.yaml uses renamed options
        config = load_config(["--config", str(old / "config.yaml")])
    engine, scheduler = _engine(config)
    with pytest.raises(CheckpointError, match=rf"{OLD_OPTIMIZER} cannot be read"):
        load_checkpoint(checkpoint, engine, scheduler)


def test_an_empty_latest_is_named_and_the_newest_checkpoint_used(run):
    (run / CHECKPOINTS / LATEST).write_text("")
    messages = []
    assert latest_checkpoint(run, report=messages.append) == _iter(run, 2)
    assert "it is empty" in messages[0]


def test_a_missing_adapter_file_is_reported_as_missing_not_as_saved_without_lora(run):
    _without_manifests(run)
    (_iter(run, 2) / "adapter_model.safetensors").unlink()
    policy = build_run_policy(_run_config(run), Dist.create())
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors is missing \(the checkpoint is incomplete"):
        load_weights(_iter(run, 2), policy)


@pytest.mark.parametrize("failure", ["enospc", "torch_unexpected_pos"])
def test_a_full_disk_during_a_save_says_no_space_left_and_keeps_latest(run, monkeypatch, failure):
    config = _run_config(run)
    engine, scheduler = _engine(config)
    state = load_checkpoint(latest_checkpoint(run), engine, scheduler)
    if failure == "enospc":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(trainer.checkpoint, "save_file", full)
    else:  # what torch.save says when the disk fills: nothing about space
        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 331072 vs 330960")
        monkeypatch.setattr(trainer.checkpoint.torch, "save", full)
        monkeypatch.setattr(trainer.checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(CheckpointError, match=r"no space left on the device .* resumes from iter-000002"):
        save_checkpoint(run, engine, scheduler, {**state, "iteration": 3}, dump(config))
    assert latest_checkpoint(run) == _iter(run, 2)


# --- 8. silent corruption --------------------------------------------------------------------------------------------


def test_flipped_bytes_in_a_weights_file_are_caught_by_the_checksum(run):
    adapter = _iter(run, 2) / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the file still parses
    adapter.write_bytes(bytes(data))
    assert load_file(str(adapter))  # the library alone would load it
    messages = []
    assert latest_checkpoint(run, report=messages.append) == _iter(run, 1)
    assert "adapter_model.safetensors does not match the SHA-256" in messages[0], messages


def test_non_finite_weights_in_an_unverified_checkpoint_are_refused(run):
    _without_manifests(run)
    adapter = _iter(run, 2) / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, str(adapter))
    policy = build_run_policy(_run_config(run), Dist.create())
    with pytest.raises(CheckpointError, match="holds inf or nan values"):
        load_weights(_iter(run, 2), policy)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_number_option_is_refused(value):
    with pytest.raises(ConfigError, match=rf"optim.lr = {value.replace('-', '-?')}; expected a finite number"):
        load_config(["--config", CONFIG, f"--optim.lr={value}"])


# --- 9. config files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_an_empty_config_file_is_named(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path} holds no options \(it is empty or only comments\)"):
        load_config(["--config", str(path)])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  iterations: 3\n  seed: [1\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML at line 4"):
        load_config(["--config", str(path)])


def test_a_config_file_that_is_not_sections_is_named(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- iterations\n")
    with pytest.raises(ConfigError, match=rf"{path} holds a list"):
        load_config(["--config", str(path)])


def test_config_errors_print_no_traceback_unless_debug(tmp_path, capsys):
    from trainer.cli import main

    path = tmp_path / "empty.yaml"
    path.write_text("")
    for argv, traceback_shown in ((["train", "--config", str(path)], False),
                                  (["--debug", "train", "--config", str(path)], True)):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "holds no options" in err and ("Traceback" in err) == traceback_shown, err


# --- 10. noise -------------------------------------------------------------------------------------------------------


def test_no_third_party_noise_at_import():
    """bitsandbytes' kernels-community line (logged when peft imports it) and robosuite's three macro-file lines."""
    code = "import trainer.cli, robosuite"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "gemm_4bit_forward" not in output and "macro file" not in output, output


def test_the_int8_matmul_cast_message_is_silenced_at_its_logger(caplog):
    import bitsandbytes.autograd._functions as source

    with caplog.at_level(logging.WARNING):
        source.logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization",
                              torch.float32)
        source.logger.warning("another bitsandbytes message")  # the logger still speaks
    assert [r.getMessage() for r in caplog.records if r.name == source.logger.name] == [
        "another bitsandbytes message"]


def test_a_save_raises_no_peft_warning(run, recwarn):
    config = _run_config(run)
    engine, scheduler = _engine(config)
    state = load_checkpoint(latest_checkpoint(run), engine, scheduler)
    save_checkpoint(run, engine, scheduler, {**state, "iteration": 3}, dump(config))
    assert not [w for w in recwarn if "embedding" in str(w.message)], [str(w.message) for w in recwarn]


def test_zero_iterations_end_without_a_plot_failure(tmp_path, capsys):
    from trainer.train import train

    config = _config(tmp_path / "run", "--train.iterations", "0", "--log.plots", "true")
    train(config)
    out = capsys.readouterr()
    assert "plots failed" not in out.out + out.err
    assert latest_checkpoint(tmp_path / "run").name == "iter-000000"


def test_act_on_a_model_directory_says_loaded_not_random_init(tmp_path, capsys):
    from trainer.checkpoint import save_merged_model
    from trainer.cli import main

    config = _config(tmp_path / "run", "--lora.enabled", "false")
    save_merged_model(build_run_policy(config, Dist.create()), tmp_path / "model")
    with pytest.raises(SystemExit):
        main(["act", "--model", str(tmp_path / "model")])
    out = capsys.readouterr().out
    assert f"loaded from {tmp_path / 'model'}" in out and "random init" not in out, out


def test_a_model_without_statistics_for_the_suite_names_unnorm_key():
    config = load_config(["--model.source", "tiny", "--env.suite", "libero_spatial"])
    with pytest.raises(ConfigError, match=r"env.unnorm_key: .*'libero_spatial'.*\['toy'\].*--env.unnorm_key"):
        build_run_policy(config, Dist.create())
