"""The run config: YAML + command-line overrides (draccus), validation that lists every problem, clear file errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, dump, load_config, validate
from trainer.envs import SUITES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_toy_cpu.yaml")


def test_defaults_and_the_shipped_config_are_valid():
    validate(RunConfig())
    config = load_config(["--config", CONFIG])
    assert config.model.source == "tiny" and config.env.suite == "toy" and config.algo.name == "grpo"
    assert config.train.iterations == 80 and config.algo.ppo_epochs == 4 and config.optim.lr == pytest.approx(3e-3)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(["--config", str(path)])
    assert load_config(["--config", str(path)]) == config


def test_command_line_overrides_the_file_with_typed_values():
    config = load_config(["--config", CONFIG, "--algo.epsilon_high", "0.3", "--train.iterations", "7",
                          "--env.task_ids", "[0,2]", "--algo.value_clip", "null", "--log.wandb", "true",
                          "--algo.name", "ppo"])
    assert config.algo.epsilon_high == 0.3 and isinstance(config.algo.epsilon_high, float)
    assert config.train.iterations == 7 and isinstance(config.train.iterations, int)
    assert config.env.task_ids == [0, 2] and config.algo.value_clip is None and config.log.wandb is True
    assert config.algo.name == "ppo"
    assert config.env.groups_per_iteration == 16  # untouched values still come from the file
    assert load_config(["--config=" + CONFIG]).train.iterations == 80  # --config=FILE works as well


def test_dump_round_trips_exactly(tmp_path):
    config = load_config(["--config", CONFIG, "--env.task_ids", "[1]", "--algo.advantage_clamp", "5.0",
                          "--log.wandb_run_name", "run a", "--model.family", "oft", "--model.source", "tiny-oft"])
    path = tmp_path / "config.yaml"
    path.write_text(dump(config))
    reloaded = load_config(["--config", str(path)])
    assert reloaded == config
    assert dump(reloaded) == dump(config)


def test_every_problem_is_listed_in_one_error():
    args = ["--config", CONFIG, "--env.suite", "libero_nowhere", "--algo.name", "dpo", "--optim.lr=-1e-4",
            "--train.seed", "-1", "--optim.scheduler", "linear", "--lora.rank", "0", "--algo.gamma", "1.5",
            "--env.num_workers", "0", "--rollout.temperature", "0", "--train.eval_every", "-2",
            "--algo.bc_warmup_iterations", "-1", "--optim.max_grad_norm", "0", "--model.dtype", "fp8"]
    with pytest.raises(ConfigError) as caught:
        load_config(args)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working
    assert message.startswith("invalid config:")
    expected = [
        "env.suite = 'libero_nowhere'; expected one of", "algo.name = 'dpo'; expected one of ['grpo', 'ppo']",
        "optim.lr = -0.0001; expected > 0", "train.seed = -1; expected >= 0", "optim.scheduler = 'linear'",
        "lora.rank = 0; expected >= 1", "algo.gamma = 1.5; expected in [0, 1]", "env.num_workers must be >= 1",
        "rollout.temperature must be > 0", "train.eval_every = -2", "algo.bc_warmup_iterations = -1",
        "optim.max_grad_norm must be > 0", "model.dtype = 'fp8'",
    ]
    for text in expected:
        assert text in message, f"{text!r} missing from:\n{message}"
    assert message.count("\n  - ") == len(expected)  # one line per problem, nothing else
    for suite in ("toy", "libero_spatial"):
        assert suite in message  # the allowed values are named


@pytest.mark.parametrize("suite", SUITES)
def test_every_known_suite_is_accepted(suite):
    assert load_config(["--config", CONFIG, "--env.suite", suite]).env.suite == suite


def test_a_negative_value_written_with_a_space_gets_a_hint():
    with pytest.raises(ConfigError, match="--optim.lr") as caught:
        load_config(["--config", CONFIG, "--optim.lr", "-1e-4"])
    assert "--key=value" in str(caught.value)
    assert load_config(["--config", CONFIG, "--algo.value_coef=1e-2"]).algo.value_coef == 0.01


def test_nan_and_group_size_problems():
    with pytest.raises(ConfigError, match=r"optim.lr = nan"):
        load_config(["--config", CONFIG, "--optim.lr", "nan"])
    with pytest.raises(ConfigError, match="num_generations >= 2"):
        load_config(["--config", CONFIG, "--rollout.num_generations", "1"])
    # PPO (value baseline) needs no group: one sample per group is fine.
    assert load_config(["--config", CONFIG, "--rollout.num_generations", "1", "--algo.name", "ppo"])


@pytest.mark.parametrize("form", ["space", "equals"])
def test_missing_config_file_is_a_clear_error(tmp_path, form):
    missing = tmp_path / "nope.yaml"
    args = ["--config", str(missing)] if form == "space" else [f"--config={missing}"]
    with pytest.raises(FileNotFoundError, match=f"config file {missing} does not exist"):
        load_config(args)
    with pytest.raises(ConfigError):  # the same error is also a ConfigError (what the CLI reports without traceback)
        load_config(args)


@pytest.mark.parametrize("args, text", [
    (["--algo.nonexistent", "3"], "--algo.nonexistent"),
    (["--optim.lr", "fast"], "optim.lr"),
    (["--train.iterations", "2.5"], "train.iterations"),
])
def test_unknown_options_and_wrong_types_name_the_option(args, text):
    with pytest.raises(ConfigError, match="invalid config") as caught:
        load_config(["--config", CONFIG, *args])
    assert text in str(caught.value)


def test_typo_in_the_yaml_file_names_the_section_and_field(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("algo:\n  nmae: grpo\n")
    with pytest.raises(ConfigError) as caught:
        load_config(["--config", str(path)])
    assert "nmae" in str(caught.value) and "algo" in str(caught.value)
