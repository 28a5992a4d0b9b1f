"""The run config: YAML + command-line overrides (draccus), validation that lists every problem, clear file errors."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
import warnings
from pathlib import Path

import pytest

from trainer.config import ConfigError, RenamedOptionWarning, config_problems, dump
from trainer.envs import SUITES
from trainer.train import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_toy_cpu.yaml")


def test_defaults_and_the_shipped_config_are_valid():
    assert config_problems(RunConfig()) == []
    config = load_config(["--config", CONFIG])
    assert config.model.source == "tiny" and config.env.suite == "toy" and config.algo.name == "grpo"
    assert config.train.iterations == 70 and config.algo.num_mini_batches == 4 and config.optim.lr == pytest.approx(3e-3)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RenamedOptionWarning)  # the shipped configs use the current names
        config = load_config(["--config", str(path)])
    assert load_config(["--config", str(path)]) == config


def test_command_line_overrides_the_file_with_typed_values():
    config = load_config(["--config", CONFIG, "--algo.epsilon_high", "0.3", "--train.iterations", "7",
                          "--env.task_ids", "[0,2]", "--algo.ppo.value_clip", "null", "--log.wandb", "true",
                          "--algo.name", "ppo"])
    assert config.algo.epsilon_high == 0.3 and isinstance(config.algo.epsilon_high, float)
    assert config.train.iterations == 7 and isinstance(config.train.iterations, int)
    assert config.env.task_ids == [0, 2] and config.algo.ppo.value_clip is None and config.log.wandb is True
    assert config.algo.name == "ppo"
    assert config.env.groups_per_iteration == 32  # untouched values still come from the file
    assert load_config(["--config=" + CONFIG]).train.iterations == 70  # --config=FILE works as well


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
            "--train.seed", "-1", "--optim.scheduler", "linear", "--lora.rank", "0", "--algo.ppo.gamma", "1.5",
            "--env.num_workers", "0", "--rollout.temperature", "0", "--train.eval_every", "-2",
            "--optim.max_grad_norm", "0", "--model.dtype", "fp8"]
    with pytest.raises(ConfigError) as caught:
        load_config(args)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working
    assert message.startswith("invalid config:")
    expected = [
        "env.suite = 'libero_nowhere'; expected one of", "algo.name = 'dpo'; expected one of ['grpo', 'ppo']",
        "optim.lr = -0.0001; expected > 0", "train.seed = -1; expected >= 0", "optim.scheduler = 'linear'",
        "lora.rank = 0; expected >= 1", "algo.ppo.gamma = 1.5; expected in [0, 1]", "env.num_workers = 0; expected >= 1",
        "rollout.temperature = 0.0; expected > 0", "train.eval_every = -2",
        "optim.max_grad_norm = 0.0; expected > 0", "model.dtype = 'fp8'",
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
    assert load_config(["--config", CONFIG, "--algo.ppo.value_coef=1e-2"]).algo.ppo.value_coef == 0.01


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


def test_the_phase_schedule_refuses_its_bad_values_when_the_config_is_read():
    """algo.phases is algos.PhaseSchedule itself, which validates on construction: its problem is reported alone."""
    with pytest.raises(ConfigError) as caught:
        load_config(["--config", CONFIG, "--algo.phases.bc_warmup_iterations", "-1"])
    assert "algo.phases: bc_warmup_iterations = -1; expected an integer >= 0" in str(caught.value)
    with pytest.raises(ConfigError, match="algo.phases: handover_greedy_start = 1.5"):
        load_config(["--config", CONFIG, "--algo.phases.handover_greedy_start", "1.5"])


def test_the_unbiased_tiny_head_is_refused_outside_the_tiny_presets_on_the_toy_task():
    assert load_config(["--config", CONFIG, "--model.tiny_unbiased_head", "true"]).model.tiny_unbiased_head
    with pytest.raises(ConfigError, match="model.tiny_unbiased_head is for the tiny presets on the toy task .* "
                                          "env.suite libero_spatial"):
        load_config(["--config", CONFIG, "--model.tiny_unbiased_head", "true", "--env.suite", "libero_spatial"])


def test_options_under_their_old_names_load_under_the_new_ones_with_a_warning(tmp_path):
    """Run directories written before the rename (config.yaml) and old command lines keep working; the warning names
    each old option with its new name."""
    path = tmp_path / "old.yaml"
    path.write_text("algo:\n  name: ppo\n  gamma: 0.9\n  epsilon_start: 0.5\n  handover_iterations: 3\n"
                    "  dynamic_sampling: false\ntrain:\n  backend: ddp\n")
    with pytest.warns(RenamedOptionWarning) as caught:
        config = load_config(["--config", str(path), "--algo.value_clip", "0.1", "--algo.lam=0.8"])
    messages = " ".join(str(w.message) for w in caught)
    for old, new in (("algo.gamma", "algo.ppo.gamma"), ("algo.epsilon_start", "algo.phases.handover_greedy_start"),
                     ("algo.handover_iterations", "algo.phases.handover_iterations"), ("train.backend", "dist.backend"),
                     ("algo.dynamic_sampling", "algo.grpo.dynamic_sampling"), ("algo.value_clip", "algo.ppo.value_clip"),
                     ("algo.lam", "algo.ppo.lam")):
        assert f"{old} -> {new}" in messages, (old, messages)
    assert config.algo.ppo.gamma == 0.9 and config.algo.ppo.lam == 0.8 and config.algo.ppo.value_clip == 0.1
    assert config.algo.phases.handover_greedy_start == 0.5 and config.algo.phases.handover_iterations == 3
    assert config.algo.grpo.dynamic_sampling is False and config.dist.backend == "ddp"
    # the dump has the new names only, and loads again without a warning
    dumped = tmp_path / "new.yaml"
    dumped.write_text(dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RenamedOptionWarning)
        assert load_config(["--config", str(dumped)]) == config


def test_an_option_set_under_its_old_and_its_new_name_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("algo:\n  gamma: 0.9\n  ppo:\n    gamma: 0.8\n")
    with pytest.raises(ConfigError, match="both algo.gamma and its new name algo.ppo.gamma are set"):
        load_config(["--config", str(path)])


def test_an_old_run_directorys_config_loads_with_its_values(tmp_path):
    """config.yaml as the code before the rename wrote it (tests/fixtures/old_run_e165e4f, made at commit e165e4f)."""
    with pytest.warns(RenamedOptionWarning, match="algo.epsilon_start -> algo.phases.handover_greedy_start"):
        config = load_config(["--config", str(ROOT / "tests" / "fixtures" / "old_run_e165e4f" / "config.yaml")])
    assert config.algo.name == "ppo" and config.algo.ppo.gamma == 0.99 and config.algo.ppo.value_clip == 0.2
    assert config.algo.entropy_coef == 0.01 and config.algo.phases.handover_greedy_start == 1.0
    assert config.lora.rank == 2 and config.optim.scheduler == "cosine" and config.dist.backend == "auto"


def _sections(cls, seen=None):
    seen = set() if seen is None else seen
    if dataclasses.is_dataclass(cls) and cls not in seen:
        seen.add(cls)
        for field in dataclasses.fields(cls):
            _sections(typing.get_type_hints(cls)[field.name], seen)
    return seen


def test_every_option_of_every_section_is_documented_where_it_is_defined():
    """TRL's GRPOConfig is the bar: a docstring under every field (what draccus shows in --help)."""
    from trainer.cli import EvalConfig

    def documented(cls) -> set[str]:  # fields followed by a string: draccus's attribute docstrings
        names = set()
        for base in cls.__mro__:
            if dataclasses.is_dataclass(base):
                body = ast.parse(textwrap.dedent(inspect.getsource(base))).body[0].body
                names |= {node.target.id for node, after in itertools.pairwise(body)
                          if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                          and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}
        return names

    undocumented = [f"{cls.__name__}.{f.name}" for cls in _sections(EvalConfig) for f in dataclasses.fields(cls)
                    if f.name not in documented(cls)]
    assert len(_sections(EvalConfig)) >= 15
    assert undocumented == []


def test_each_choice_is_an_enum_defined_once():
    """Choice options come from the field's type (no lists retyped in validation); some derive from the library's
    own constants, so the config cannot drift from what the functions accept."""
    from trainer.algos import GRPO_SCALES, LOSS_TYPES
    from trainer.build import QuantMode, Suite
    from trainer.models.lora import QUANT_MODES
    from trainer.train import LossType, ScaleRewards

    assert ScaleRewards.values() == list(GRPO_SCALES) and LossType.values() == list(LOSS_TYPES)
    assert QuantMode.values() == list(QUANT_MODES) and Suite.values() == list(SUITES)
    config = load_config(["--config", CONFIG, "--algo.loss_type", "seq_mean_token_mean"])
    assert config.algo.loss_type == LossType.SEQ_MEAN_TOKEN_MEAN and "loss_type: seq_mean_token_mean" in dump(config)
    with pytest.raises(ConfigError, match=r"algo.grpo.scale_rewards = 'std'; expected one of \['group', 'batch', 'none'\]"):
        load_config(["--config", CONFIG, "--algo.grpo.scale_rewards", "std"])
    with pytest.raises(ConfigError, match=r"env.render_backend = 'vulkan'; expected one of \[None, 'egl', 'osmesa'\]"):
        load_config(["--config", CONFIG, "--env.render_backend", "vulkan"])


def test_the_collective_and_peer_timeouts_are_options():
    config = load_config(["--config", CONFIG, "--dist.timeout_minutes", "5", "--dist.peer_timeout_s", "20"])
    assert config.dist.timeout_minutes == 5.0 and config.dist.peer_timeout_s == 20.0
    assert RunConfig().dist.timeout_minutes == 30.0 and RunConfig().dist.peer_timeout_s == 60.0
    with pytest.raises(ConfigError) as caught:
        load_config(["--config", CONFIG, "--dist.timeout_minutes", "0", "--dist.peer_timeout_s=-1"])
    assert "dist.timeout_minutes = 0.0; expected > 0" in str(caught.value)
    assert "dist.peer_timeout_s = -1.0; expected >= 0" in str(caught.value)


def test_cosine_schedule_decays_to_its_floor_and_the_default_floor_is_zero():
    """optim.min_lr_ratio: warm-up, then cosine from lr to lr × min_lr_ratio at the last iteration (0 by default)."""
    import math

    import torch

    from trainer.build import build_optimizer
    from trainer.engine import OptimConfig

    def rates(min_lr_ratio):
        module = torch.nn.Linear(2, 1)
        optim = OptimConfig(lr=1e-3, scheduler="cosine", warmup_iterations=2, min_lr_ratio=min_lr_ratio)
        optimizer, scheduler = build_optimizer(optim, module, iterations=12)
        seen = []
        for _ in range(13):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    plain, floored = rates(0.0), rates(0.1)
    assert plain[:2] == pytest.approx([1e-3 / 3, 2e-3 / 3]) and floored[:2] == pytest.approx(plain[:2])
    assert plain[2] == pytest.approx(1e-3) and floored[2] == pytest.approx(1e-3)
    assert plain[12] == pytest.approx(0.0, abs=1e-12) and floored[12] == pytest.approx(1e-4)
    halfway = 0.5 * (1 + math.cos(math.pi * 5 / 10))
    assert floored[7] == pytest.approx(1e-3 * (0.1 + 0.9 * halfway)) and plain[7] == pytest.approx(1e-3 * halfway)
    assert OptimConfig().min_lr_ratio == 0.0
    assert "min_lr_ratio = 1.5; expected in [0, 1]" in OptimConfig(min_lr_ratio=1.5).problems()
