"""The run config: dataclasses loaded from YAML with command-line overrides (draccus), validated up front.

    python -m trainer train --config configs/tiny_toy_cpu.yaml --algo.epsilon_high 0.3 --train.iterations 50

Option names follow TRL's GRPOConfig where the meaning is the same (num_generations, epsilon, epsilon_high, beta,
scale_rewards, loss_type).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import draccus

from trainer.models.lora import QUANT_MODES


@dataclass
class ModelConfig:
    source: str = "tiny"
    """"tiny" / "tiny-oft" (random init, seeded) or a local checkpoint directory (config.json + safetensors)."""
    family: str | None = None
    """Force "oft" for released OpenVLA-OFT directories (their config.json does not say so)."""
    dtype: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"."""
    gradient_checkpointing: bool = False
    use_l1_head_for_eval: bool = False
    """OFT: evaluate greedy actions with the L1 regression head instead of argmax tokens."""


@dataclass
class LoraSection:
    enabled: bool = True
    rank: int = 32
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "all-linear"
    """"all-linear", "llm-linear", or a comma-separated list of module-name suffixes."""
    include_lm_head: bool = False
    """LoRA on the output layer as well (needed by the random-initialised tiny presets, whose head is untrained)."""
    train_proprio_projector: bool = False
    train_action_head: bool = False


@dataclass
class QuantConfig:
    mode: str = "none"
    """"none" or "int8" (LLM.int8 base; single GPU or DDP only)."""
    optimizer_8bit: bool = False


@dataclass
class EnvConfig:
    suite: str = "toy"
    """toy, libero_spatial, libero_object, libero_goal, libero_10, libero_90."""
    task_ids: list[int] | None = None
    """Tasks to train on (default: all tasks of the suite)."""
    num_init_states: int = 50
    """Initial states used per task (the first N of the benchmark's 50), cycled over iterations."""
    groups_per_iteration: int = 32
    """(task, initial state) groups rolled out per iteration, over all ranks."""
    num_workers: int = 8
    """Env worker processes per rank."""
    step_timeout_s: float = 120.0
    max_steps: int | None = None
    """Override the suite's step limit (LIBERO: 220/280/300/520/400)."""
    render_backend: str | None = None
    """Force "egl" or "osmesa" (default: EGL on GPU hosts, OSMesa on CPU hosts)."""
    unnorm_key: str | None = None
    """norm_stats key for un-normalising actions (default: the suite name, then <suite>_no_noops)."""


@dataclass
class RolloutConfig:
    num_generations: int = 8
    """G: samples per (task, initial state) group."""
    temperature: float = 1.0
    video_episodes: int = 0
    """Record this many rollout episodes per evaluation as mp4 (0: none)."""
    merge_lora: bool = False
    """Fold the LoRA adapters into the base weights for each rollout and evaluation (faster acting: no adapter GEMMs
    per decoding step), then restore the base weights bit for bit. Costs a copy of every adapted weight while merged.
    Single-process and DDP runs only (ignored, with a notice, under FSDP / DeepSpeed); a no-op on an int8 base."""


@dataclass
class AlgoConfig:
    name: str = "grpo"
    """"grpo" (group-relative advantages) or "ppo" (value head + GAE)."""
    advantage: str = "relative"
    """GRPO: "relative" (r - group mean, scaled) or "absolute" (advantage = reward, no baseline)."""
    scale_rewards: str = "group"
    """"group", "batch" or "none": the std that divides relative advantages."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (all success or all failure)."""
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    log_ratio_clamp: float = 20.0
    advantage_clamp: float | None = None
    loss_type: str = "token_mean"
    """"token_mean" (over the global batch) or "seq_mean_token_mean"."""
    beta: float = 0.0
    """KL-to-reference coefficient (reference = base model with adapters disabled); 0 = off."""
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    """Optimizer steps per epoch: the iteration's samples are split into this many mini-batches."""
    micro_batch_size: int = 64
    """Policy steps per forward/backward."""
    gamma: float = 0.99
    lam: float = 0.95
    normalize_advantages: bool = True
    """PPO: whiten the GAE advantages, (A - mean) / std, with the mean and std of the whole global batch (all ranks),
    as CleanRL, TRL, veRL and RL4VLA do. With a sparse success reward and a critic that starts near 0, raw advantages
    are ~0 for every failed episode; centring gives failures a negative advantage. GRPO's are already normalised."""
    value_coef: float = 0.5
    value_clip: float | None = 0.2
    bc_warmup_iterations: int = 0
    """Behaviour-cloning warm-up: greedy rollouts, cross-entropy towards the greedy tokens of successful episodes."""
    handover_iterations: int = 0
    """Epsilon-greedy hand-over: the greedy share of actions decays linearly from epsilon_start to 0."""
    epsilon_start: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 5e-5
    value_lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    skip_factor: float = 1000.0
    """Skip the step when the global grad norm exceeds skip_factor × max_grad_norm (or is not finite)."""
    warn_factor: float = 100.0
    scheduler: str = "constant"
    """"constant" or "cosine"."""
    warmup_iterations: int = 0


@dataclass
class TrainSection:
    iterations: int = 100
    seed: int = 0
    output_dir: str = "runs/default"
    eval_every: int = 10
    eval_episodes_per_task: int = 16
    checkpoint_every: int = 10
    resume: bool = True
    """Resume from output_dir's latest checkpoint when there is one."""
    deterministic: bool = False
    backend: str = "auto"
    """Informational for checks: "auto" reads it from accelerate; "fsdp", "deepspeed_zero3", "ddp", "single"."""


@dataclass
class LogConfig:
    wandb: bool = False
    wandb_project: str = "vla-rl"
    wandb_run_name: str | None = None
    plots: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    quant: QuantConfig = field(default_factory=QuantConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogConfig = field(default_factory=LogConfig)


class ConfigError(ValueError):
    """A run config that cannot be used; the message lists every problem found, each with what was expected."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """`--config FILE` names a file that does not exist."""


def _one_of(name: str, value, allowed) -> list[str]:
    return [] if value in allowed else [f"{name} = {value!r}; expected one of {list(allowed)}"]


def _check(problems: list[str], ok: bool, name: str, value, expected: str) -> None:
    if not ok:  # written so that NaN fails every comparison
        problems.append(f"{name} = {value!r}; expected {expected}")


def _ranges(config: RunConfig) -> list[str]:
    """Numeric ranges of options that validate() did not check otherwise."""
    problems: list[str] = []
    c, a, o, t, e, lo = config, config.algo, config.optim, config.train, config.env, config.lora
    _check(problems, o.lr > 0, "optim.lr", o.lr, "> 0")
    _check(problems, o.value_lr > 0, "optim.value_lr", o.value_lr, "> 0")
    _check(problems, o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(problems, o.warmup_iterations >= 0, "optim.warmup_iterations", o.warmup_iterations, ">= 0")
    _check(problems, o.warn_factor > 0, "optim.warn_factor", o.warn_factor, "> 0")
    _check(problems, t.iterations >= 0, "train.iterations", t.iterations, ">= 0")
    _check(problems, t.seed >= 0, "train.seed", t.seed, ">= 0 (every random stream is derived from it)")
    _check(problems, t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0 (0 = no evaluation)")
    _check(problems, t.eval_episodes_per_task >= 1, "train.eval_episodes_per_task", t.eval_episodes_per_task, ">= 1")
    _check(problems, t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every,
           ">= 0 (0 = only at the end)")
    if lo.enabled:
        _check(problems, lo.rank >= 1, "lora.rank", lo.rank, ">= 1")
        _check(problems, lo.alpha > 0, "lora.alpha", lo.alpha, "> 0")
        _check(problems, 0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "in [0, 1)")
    _check(problems, 0 <= a.gamma <= 1, "algo.gamma", a.gamma, "in [0, 1]")
    _check(problems, 0 <= a.lam <= 1, "algo.lam", a.lam, "in [0, 1]")
    for name in ("beta", "entropy_coef", "value_coef", "bc_warmup_iterations", "handover_iterations"):
        value = getattr(a, name)
        _check(problems, value >= 0, f"algo.{name}", value, ">= 0")
    _check(problems, a.log_ratio_clamp > 0, "algo.log_ratio_clamp", a.log_ratio_clamp, "> 0")
    for name in ("value_clip", "advantage_clamp"):
        value = getattr(a, name)
        _check(problems, value is None or value > 0, f"algo.{name}", value, "> 0 or null (off)")
    _check(problems, 0 <= a.epsilon_start <= 1, "algo.epsilon_start", a.epsilon_start, "in [0, 1]")
    _check(problems, e.max_steps is None or e.max_steps >= 1, "env.max_steps", e.max_steps, ">= 1 or null")
    _check(problems, e.step_timeout_s > 0, "env.step_timeout_s", e.step_timeout_s, "> 0")
    _check(problems, e.task_ids is None or all(i >= 0 for i in e.task_ids), "env.task_ids", e.task_ids,
           "non-negative task indices")
    _check(problems, c.rollout.video_episodes >= 0, "rollout.video_episodes", c.rollout.video_episodes, ">= 0")
    problems += _one_of("model.family", c.model.family, (None, "openvla", "oft"))
    problems += _one_of("train.backend", t.backend, ("auto", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "ddp",
                                                     "single"))
    return problems


def validate(config: RunConfig) -> RunConfig:
    """All problems at once, each with what was expected."""
    from trainer.envs import SUITES

    problems = []
    problems += _one_of("algo.name", config.algo.name, ("grpo", "ppo"))
    problems += _one_of("algo.advantage", config.algo.advantage, ("relative", "absolute"))
    problems += _one_of("algo.scale_rewards", config.algo.scale_rewards, ("group", "batch", "none"))
    problems += _one_of("algo.loss_type", config.algo.loss_type, ("token_mean", "seq_mean_token_mean"))
    problems += _one_of("optim.scheduler", config.optim.scheduler, ("constant", "cosine"))
    problems += _one_of("quant.mode", config.quant.mode, QUANT_MODES)
    problems += _one_of("model.dtype", config.model.dtype, ("auto", "bf16", "fp32"))
    problems += _one_of("env.suite", config.env.suite, SUITES)
    problems += _one_of("env.render_backend", config.env.render_backend, (None, "egl", "osmesa"))
    if config.rollout.num_generations < 1:
        problems.append("rollout.num_generations must be >= 1")
    if config.algo.name == "grpo" and config.algo.advantage == "relative" and config.rollout.num_generations < 2:
        problems.append("GRPO relative advantages need rollout.num_generations >= 2 (a group of one has no baseline)")
    if config.rollout.temperature <= 0:
        problems.append("rollout.temperature must be > 0")
    if not 0 <= config.algo.epsilon < 1 or config.algo.epsilon_high < 0:
        problems.append("algo.epsilon must be in [0, 1) and algo.epsilon_high >= 0")
    for name in ("groups_per_iteration", "num_workers", "num_init_states"):
        if getattr(config.env, name) < 1:
            problems.append(f"env.{name} must be >= 1")
    for name in ("micro_batch_size", "ppo_epochs", "num_mini_batches"):
        if getattr(config.algo, name) < 1:
            problems.append(f"algo.{name} must be >= 1")
    if config.optim.max_grad_norm <= 0 or config.optim.skip_factor < 1:
        problems.append("optim.max_grad_norm must be > 0 and optim.skip_factor >= 1")
    if config.quant.mode == "int8" and config.train.backend in ("fsdp", "deepspeed_zero3"):
        from trainer.models.lora import check_quantization

        try:
            check_quantization(config.quant.mode, config.train.backend)
        except ValueError as error:
            problems.append(str(error))
    if config.model.use_l1_head_for_eval and not (config.model.source.endswith("oft") or config.model.family == "oft"):
        problems.append("model.use_l1_head_for_eval needs an OpenVLA-OFT model")
    problems += _ranges(config)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config


def load_config(args: list[str]) -> RunConfig:
    """`--config FILE` (YAML) then `--section.key value` overrides."""
    args = [a.replace("--config=", "--config_path=", 1) if a.startswith("--config=") else a for a in args]
    args = ["--config_path" if a == "--config" else a for a in args]
    for i, a in enumerate(args):
        path = args[i + 1] if a == "--config_path" and i + 1 < len(args) else (
            a.split("=", 1)[1] if a.startswith("--config_path=") else None)
        if path is not None and not Path(path).is_file():
            raise ConfigFileNotFoundError(f"config file {path} does not exist")
    try:
        config = draccus.parse(config_class=RunConfig, args=args, exit_on_error=False)
    except draccus.utils.DraccusException as error:  # unknown option, a value of the wrong type, a YAML typo
        raise ConfigError(f"invalid config: {error}") from error
    except argparse.ArgumentError as error:  # e.g. "--optim.lr -1e-4": argparse reads -1e-4 as an option
        raise ConfigError(f"invalid config: {error} (for a value that starts with '-', write --key=value)") from error
    return validate(config)


def dump(config: RunConfig) -> str:
    return draccus.dump(config)
