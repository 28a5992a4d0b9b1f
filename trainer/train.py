"""The training recipe, top to bottom: rollout -> advantages -> PPO epochs -> guarded step -> eval -> checkpoint.

    accelerate launch --config_file accelerate_configs/fsdp_1node.yaml -m trainer train --config configs/x.yaml
    python -m trainer train --config configs/tiny_toy_cpu.yaml        # one process, CPU

Every iteration:
 1. work items (task, initial state, sample k of G) for this iteration, the same on every rank, split over ranks;
 2. rollout on this rank's env workers with one batched policy call per step (sampled; greedy during the
    behaviour-cloning warm-up; epsilon-greedy during the hand-over);
 3. advantages from GLOBAL group statistics (a group may span ranks); dynamic sampling drops groups whose rewards
    are all equal; env errors never become training signal;
 4. PPO epochs over micro-batches (the same number on every rank), gradients accumulated, then the global gradient
    norm, the skip guard (decided identically on all ranks), clipping and one optimizer step;
 5. evaluation (greedy and sampled) every eval_every iterations, checkpoint every checkpoint_every, log every one.

The library does the rest: build.py builds, engine.py holds the backend's model and optimizer, learner.py runs the
objective over micro-batches, dist.py knows about ranks. The run config is defined first (every option documented);
the algorithm follows.
"""

from __future__ import annotations

import functools
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import algos
from trainer.algos import PhaseSchedule
from trainer.build import (
    EnvConfig,
    ModelConfig,
    QuantConfig,
    QuantMode,
    build_optimizer,
    build_policy,
    init_states_per_task,
    make_env_pool,
    seed_everything,
)
from trainer.checkpoint import load_latest_checkpoint, save_checkpoint
from trainer.config import Choice, ConfigError, check, dump, load
from trainer.dist import BackendName, Dist, DistConfig
from trainer.engine import Engine, OptimConfig, setup_engine
from trainer.envs.pool import EnvPool
from trainer.envs.seeding import iteration_seed
from trainer.envs.sharding import WorkItem, build_work_items, sample_groups, shard_work_items
from trainer.evaluate import evaluate, protocol_items
from trainer.learner import Batch, Counts, Learner, Samples
from trainer.logging import LogConfig, RunLogger
from trainer.models import TINY_PRESETS, VLAPolicy
from trainer.models.lora import LoraSettings, check_quantization, format_breakdown, trainable_breakdown
from trainer.rollout import Episode, Rollout

EPISODE_SEED_STRIDE = 1_000_003  # separates env seeds of different iterations (items per iteration stay below it)


# --- the run config: the sections this recipe owns, then all of them together ------------------------------------


class AlgoName(Choice):
    GRPO = "grpo"
    PPO = "ppo"


class Advantage(Choice):
    RELATIVE = "relative"
    ABSOLUTE = "absolute"


ScaleRewards = Choice("ScaleRewards", {scale.upper(): scale for scale in algos.GRPO_SCALES}, module=__name__)
LossType = Choice("LossType", {loss.upper(): loss for loss in algos.LOSS_TYPES}, module=__name__)


@dataclass
class GRPOConfig:
    """GRPO only: advantages from the rewards of each group of num_generations episodes."""

    advantage: Advantage = Advantage.RELATIVE
    """"relative": the reward minus its group's mean, divided by the std chosen by scale_rewards; "absolute": the
    reward itself (no baseline)."""
    scale_rewards: ScaleRewards = ScaleRewards.GROUP
    """The std that divides relative advantages: "group" (each group's), "batch" (the whole iteration's) or "none"."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (all success or all failure): they carry no signal (DAPO)."""


@dataclass
class PPOConfig:
    """PPO only: a value head on the shared backbone and GAE."""

    gamma: float = 0.99
    """Discount per policy step."""
    lam: float = 0.95
    """GAE lambda (1 = Monte-Carlo returns minus the value, 0 = one-step TD error)."""
    normalize_advantages: bool = True
    """Whiten the GAE advantages, (A - mean) / std, with the mean and std of the whole global batch (all ranks), as
    CleanRL, TRL, veRL and RL4VLA do. With a sparse success reward and a critic that starts near 0, raw advantages are
    ~0 for every failed episode; centring gives failures a negative advantage. (GRPO's are normalised by their group.)"""
    value_coef: float = 0.5
    """Weight of the value loss in the total loss."""
    value_clip: float | None = 0.2
    """Clip of the value prediction's change from its rollout value (PPO2); null = plain 0.5 × MSE."""
    critic_warmup_iterations: int = 0
    """RL iterations, from the first, whose update trains only the critic: the value loss alone, no policy term
    (veRL's critic_warmup, NeMo RL's policy_training_start_step). The rollouts still run with the current policy, and
    the value loss still moves the shared LoRA weights. What it did on the toy task is in docs/learning.md."""

    def problems(self) -> list[str]:
        found: list[str] = []
        check(found, 0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]")
        check(found, 0 <= self.lam <= 1, "lam", self.lam, "in [0, 1]")
        check(found, self.value_coef >= 0, "value_coef", self.value_coef, ">= 0")
        check(found, self.value_clip is None or self.value_clip > 0, "value_clip", self.value_clip, "> 0 or null (off)")
        check(found, self.critic_warmup_iterations >= 0, "critic_warmup_iterations", self.critic_warmup_iterations,
              ">= 0")
        return found


@dataclass
class AlgoConfig:
    """The RL algorithm: the clipped objective both share, the update's batching, and each one's own options.
    Names follow TRL's GRPOConfig where the meaning is the same (epsilon, epsilon_high, beta, loss_type)."""

    name: AlgoName = AlgoName.GRPO
    """"grpo" (group-relative advantages, `grpo` options) or "ppo" (value head + GAE, `ppo` options)."""
    epsilon: float = 0.2
    """PPO clip range below 1: the ratio is clipped at 1 - epsilon."""
    epsilon_high: float = 0.28
    """PPO clip range above 1: the ratio is clipped at 1 + epsilon_high (DAPO's clip-higher; = epsilon for plain
    PPO)."""
    log_ratio_clamp: float = 20.0
    """|log ratio| bound before exp(): keeps a token whose probability moved enormously finite."""
    advantage_clamp: float | None = None
    """Clamp advantages to [-c, c]; null = off."""
    loss_type: LossType = LossType.TOKEN_MEAN
    """"token_mean": every executed action token of the global batch weighs the same (DAPO);
    "seq_mean_token_mean": every policy step weighs the same (original GRPO)."""
    beta: float = 0.0
    """Weight of the KL to the reference (the base model with the adapters switched off); 0 = off."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss); 0 = off."""
    ppo_epochs: int = 1
    """Passes over each iteration's samples."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch: the iteration's samples are split into this many mini-batches."""
    micro_batch_size: int = 64
    """Policy steps per forward/backward; a mini-batch's gradients accumulate over its micro-batches."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO's own options (read when name is "grpo")."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO's own options (read when name is "ppo")."""
    phases: PhaseSchedule = field(default_factory=PhaseSchedule)
    """Behaviour-cloning warm-up and epsilon-greedy hand-over before RL (algos/phases.py)."""

    def problems(self) -> list[str]:
        found: list[str] = []
        check(found, 0 <= self.epsilon < 1, "epsilon", self.epsilon, "in [0, 1)")
        check(found, self.epsilon_high >= 0, "epsilon_high", self.epsilon_high, ">= 0")
        check(found, self.log_ratio_clamp > 0, "log_ratio_clamp", self.log_ratio_clamp, "> 0")
        check(found, self.advantage_clamp is None or self.advantage_clamp > 0, "advantage_clamp",
              self.advantage_clamp, "> 0 or null (off)")
        for name in ("beta", "entropy_coef"):
            check(found, getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("ppo_epochs", "num_mini_batches", "micro_batch_size"):
            check(found, getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        return found


class DecodeMode(Choice):
    AUTO = "auto"
    DYNAMIC = "dynamic"
    STATIC = "static"
    GRAPHS = "graphs"


@dataclass
class RolloutConfig:
    """How episodes are collected."""

    num_generations: int = 8
    """G: episodes per (task, initial state) group."""
    temperature: float = 1.0
    """Sampling temperature of rollouts, sampled evaluation and the update's log-probs."""
    video_episodes: int = 0
    """At each evaluation during training, record this many episodes of the greedy evaluation (rank 0's first ones)
    as mp4 in output_dir/videos/iter-XXXXXX/; 0: none."""
    merge_lora: bool | str = "auto"
    """Fold the LoRA adapters into the base weights for each rollout and evaluation (faster acting: no adapter GEMMs
    per decoding step), then restore the base weights bit for bit. Costs a copy of every adapted weight while merged.
    Single-process, DDP and FSDP2 runs (FSDP2: into the weights gathered for the rollout; ignored, with a notice, under
    DeepSpeed); a no-op on an int8 base.
    true, false, or "auto": merge when the copy fits the free GPU memory at the rollout (never on CPU runs)."""
    pipeline: bool = True
    """Step half of a rank's env workers while the policy acts for the other half (subprocess env pools only; the
    same episodes and actions as without)."""
    compile_blocks: bool = True
    """OpenVLA-OFT: act through the blocks compiled for the update (model.compile_blocks) in training rollouts too,
    not only in the update (no effect where the blocks are not compiled, on standard OpenVLA and in evaluations).
    On one H200 with real LIBERO: policy calls 6.7-7.3 -> 5.1-5.8 s per iteration (docs/benchmarks.md, 2026-12-01 s5)."""
    reset_ahead: bool = True
    """Send the next iteration's first resets to the env workers before the update, so that they reset (building
    simulators for new tasks: seconds with LIBERO) while the update runs instead of at the next rollout's start.
    Subprocess env pools only; skipped when an evaluation comes between. The same episodes as without."""
    decode: DecodeMode = DecodeMode.AUTO
    """Standard OpenVLA's decoding steps: "dynamic" (transformers' cache), "static" (static cache), "graphs" (static
    cache, CUDA graphs), "auto" (graphs on CUDA with one process or DDP, else dynamic). No effect on OFT."""

    def problems(self) -> list[str]:
        found: list[str] = []
        check(found, self.merge_lora in (True, False, "auto"), "merge_lora", self.merge_lora, "true, false or auto")
        check(found, self.num_generations >= 1, "num_generations", self.num_generations, ">= 1")
        check(found, self.temperature > 0, "temperature", self.temperature, "> 0")
        check(found, self.video_episodes >= 0, "video_episodes", self.video_episodes, ">= 0")
        return found


@dataclass
class TrainConfig:
    """The loop: how long, where its outputs go, how often it evaluates and saves."""

    iterations: int = 100
    """Iterations (rollout + update) to run, counting those of a resumed run."""
    seed: int = 0
    """Every random stream (model init, work items, env seeds, sampling, mini-batch order) derives from it."""
    output_dir: str = "runs/default"
    """config.yaml, metrics.jsonl, checkpoints/, plots/, videos/."""
    eval_every: int = 10
    """Evaluate (greedy and sampled) before training and every N iterations and at the end; 0 = never."""
    eval_episodes_per_task: int = 16
    """Evaluation trials per trained task (initial states 0..N-1, cycled)."""
    checkpoint_every: int = 10
    """Save every N iterations; 0 = only at the end. A SIGTERM / Ctrl-C always saves the last completed iteration."""
    resume: bool = True
    """Resume from output_dir's latest checkpoint when there is one."""
    deterministic: bool = False
    """torch's deterministic algorithms (slower; bit-identical resumes on GPU)."""

    def problems(self) -> list[str]:
        found: list[str] = []
        check(found, self.iterations >= 0, "iterations", self.iterations, ">= 0")
        check(found, self.seed >= 0, "seed", self.seed, ">= 0 (every random stream is derived from it)")
        check(found, self.eval_every >= 0, "eval_every", self.eval_every, ">= 0 (0 = no evaluation)")
        check(found, self.eval_episodes_per_task >= 1, "eval_episodes_per_task", self.eval_episodes_per_task, ">= 1")
        check(found, self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0 (0 = only at the end)")
        return found


@dataclass
class RunConfig:
    """Everything a run reads; each section is defined (and documented) by the module that uses it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model and how it runs (build.py)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (models/lora.py)."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """int8 base and 8-bit optimizer (build.py)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Benchmark, tasks, env workers (build.py)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Episode collection (this recipe)."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL algorithm (this recipe)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule, gradient guard (engine.py)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop, outputs, evaluation and checkpoint cadence (this recipe)."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Collective timeout and the watch on peer ranks (dist.py)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Console, wandb, plots (logging.py)."""

    def problems(self) -> list[str]:
        """Checks across sections (each section checks its own values)."""
        found = []
        if (self.algo.name == AlgoName.GRPO and self.algo.grpo.advantage == Advantage.RELATIVE
                and self.rollout.num_generations < 2):
            found.append("GRPO relative advantages need rollout.num_generations >= 2 (a group of one has no baseline)")
        if self.quant.mode == QuantMode.INT8 and self.dist.backend in (BackendName.FSDP, BackendName.DEEPSPEED_ZERO3):
            try:
                check_quantization(self.quant.mode, self.dist.backend)
            except ValueError as error:
                found.append(str(error))
        if self.model.tiny_unbiased_head and not (self.model.source in TINY_PRESETS and self.env.suite == "toy"):
            found.append("model.tiny_unbiased_head is for the tiny presets on the toy task (model.source tiny or "
                         f"tiny-oft, env.suite toy); this run has model.source {self.model.source}, "
                         f"env.suite {self.env.suite}")
        if self.algo.beta > 0 and not self.lora.enabled:
            found.append(f"algo.beta = {self.algo.beta}: the KL reference is the base model with the LoRA adapters "
                         "switched off, so it needs lora.enabled true; set algo.beta 0 to train without LoRA")
        return found


def load_config(args: list[str]) -> RunConfig:
    """`--config FILE` (YAML) then `--section.key value` overrides, validated."""
    return load(RunConfig, args)


def build_run_policy(config: RunConfig, dist: Dist) -> VLAPolicy:
    try:
        return build_policy(config.model, config.lora, config.quant, config.env, dist,
                            value_head=config.algo.name == AlgoName.PPO, seed=config.train.seed,
                            micro_batch_size=config.algo.micro_batch_size)
    except KeyError as error:  # the model has no action statistics for the suite (processor.select_norm_stats)
        if "unnorm_key" not in str(error):
            raise
        raise ConfigError(f"invalid config:\n  - env.unnorm_key: {error.args[0]} (model.source {config.model.source}, "
                          f"env.suite {config.env.suite}); give --env.unnorm_key one of those (the tiny presets know "
                          "only `toy`), or a model fine-tuned on this suite") from error


# --- state that a checkpoint carries -------------------------------------------------------------------------------


@dataclass
class TrainState:
    iteration: int = 0  # iterations completed
    skipped_steps: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    env_errors: int = 0
    best_eval_success: float = -1.0

    def count_skips(self, reasons: list[str]) -> None:
        for reason in reasons:
            self.skipped_steps += 1
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop checks it at safe points and before every micro-batch of the update
    (a launcher SIGKILLs its ranks soon after SIGTERM: docs/reliability.md), saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.requested


# --- 1. work items --------------------------------------------------------------------------------------------------


def iteration_items(config: RunConfig, counts: list[int], iteration: int) -> list[WorkItem]:
    """The same list on every rank: the (task, init state) groups are drawn from the iteration's shared seed."""
    groups = sample_groups(counts, min(config.env.groups_per_iteration, sum(counts)),
                           iteration_seed(config.train.seed, iteration))
    return build_work_items(groups, config.rollout.num_generations)


# --- 2. rollout ------------------------------------------------------------------------------------------------------


def rollout_options(config: RunConfig, dist: Dist, pool) -> dict:
    """collect_episodes' speed options: pipelined env steps (subprocess pools only: in-process envs cannot step
    while the policy runs) and standard OpenVLA's decoding (rollout.decode; "auto": CUDA graphs on CUDA with one
    process or DDP, whose parameters stay where they are for the whole rollout)."""
    decode = str(config.rollout.decode)
    if decode == DecodeMode.AUTO:
        graphs_ok = dist.device.type == "cuda" and dist.backend in ("single", "ddp")
        decode = str(DecodeMode.GRAPHS if graphs_ok else DecodeMode.DYNAMIC)
    return {"pipeline": config.rollout.pipeline and isinstance(pool, EnvPool), "decode": decode}


def resets_ahead(config: RunConfig, pool, next_iteration: int) -> bool:
    """Whether the next rollout's first resets are sent before this iteration's update (rollout.reset_ahead):
    subprocess pools only (in-process envs would reset on the spot), not after the last iteration, and not when an
    evaluation comes first (it needs the workers)."""
    return (config.rollout.reset_ahead and isinstance(pool, EnvPool) and next_iteration < config.train.iterations
            and not evaluation_due(config, next_iteration))


def evaluation_due(config: RunConfig, iterations_done: int) -> bool:
    """Whether an evaluation follows the iteration that brings the count to `iterations_done` (train.eval_every,
    and always after the last one)."""
    every = config.train.eval_every
    return every > 0 and (iterations_done % every == 0 or iterations_done == config.train.iterations)


# --- 3. advantages ---------------------------------------------------------------------------------------------------


def episode_advantages(algo: AlgoConfig, episodes: list[Episode], dist: Dist, bc_phase: bool) -> tuple[Samples, dict]:
    """Per-step advantages (GRPO: the episode's advantage on each of its steps; PPO: GAE), after filtering."""
    valid = [e for e in episodes if e.env_error is None and e.num_policy_steps > 0]
    samples = Samples()
    if bc_phase:  # behaviour cloning towards the greedy tokens of successful episodes
        for episode in valid:
            if episode.success:
                samples.add_episode(episode, [1.0] * episode.num_policy_steps, behaviour_cloning=True)
        return samples, {}
    if algo.name == AlgoName.PPO:
        for episode in valid:
            rewards = torch.tensor(episode.rewards)[None]
            values = torch.tensor(episode.values)[None]
            dones = torch.zeros_like(rewards)
            dones[0, -1] = 1.0  # success and the step limit both end the task: no bootstrap beyond the last step
            advantages, returns = algos.gae(rewards, values, dones, algo.ppo.gamma, algo.ppo.lam)
            samples.add_episode(episode, advantages[0].tolist(), returns[0].tolist())
        # Statistics of the GLOBAL batch (one all-reduce): advantage normalisation and the rollout critic's quality.
        advantages, returns = torch.tensor(samples.advantages), torch.tensor(samples.returns)
        sums = dist.sum_metrics({**algos.moment_sums(advantages, "advantage/"), **algos.moment_sums(returns, "return/"),
                                 **algos.moment_sums(returns - torch.tensor(samples.old_values), "residual/")})
        if algo.ppo.normalize_advantages:
            mean, std = algos.mean_std_from_sums(sums, "advantage/")
            samples.advantages = algos.normalize_advantages(advantages, mean, std).tolist()
        metrics = algos.critic_diagnostics(algos.mean_std_from_sums(sums, "return/"),
                                           algos.mean_std_from_sums(sums, "residual/"))
        return samples, metrics
    # GRPO: group statistics over ALL ranks, keyed by group id.
    local = [(e.group_id, e.reward) for e in valid]
    everyone = dist.gather_objects(local)  # rank order: this rank's episodes start at `offset`
    offset = sum(dist.gather_objects([len(local)])[: dist.rank])
    group_ids = torch.tensor([g for g, _ in everyone], dtype=torch.long)
    rewards = torch.tensor([r for _, r in everyone], dtype=torch.float32)
    if algo.grpo.advantage == Advantage.ABSOLUTE:
        advantages = algos.absolute_advantages(rewards)
    else:
        advantages = algos.grpo_advantages(rewards, group_ids, scale=str(algo.grpo.scale_rewards))
    keep = algos.dynamic_sampling_mask(rewards, group_ids) if algo.grpo.dynamic_sampling else torch.ones_like(
        rewards, dtype=torch.bool)
    metrics = {"train/groups_kept_fraction": float(keep.float().mean()) if len(keep) else 0.0}
    for i, episode in enumerate(valid):
        if keep[offset + i]:
            samples.add_episode(episode, [float(advantages[offset + i])] * episode.num_policy_steps)
    return samples, metrics


# --- 4. the objective ------------------------------------------------------------------------------------------------


def objective(algo: AlgoConfig, policy: VLAPolicy, model, batch: Batch, counts: Counts, *, temperature: float,
              bc_phase: bool, critic_only: bool = False) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch, to minimise, and its diagnostics.

    Warm-up: cross-entropy towards the rollout's greedy tokens. RL: PPO's clipped surrogate with an asymmetric clip
    (DAPO), minus the entropy bonus, plus beta × KL to the reference, plus the clipped value loss when there is a
    value head (PPO). critic_only (PPO's critic warm-up): the value loss alone. Token terms are divided by the
    mini-batch's executed-token count, per-step terms by its step count (`counts`: global, over the world size; see
    learner.py)."""
    new = policy.evaluate(batch.inputs, batch.token_ids, temperature=temperature, model=model)
    mask = batch.token_mask
    if bc_phase:
        targets = policy.action_tokenizer.token_ids_to_local(batch.token_ids.to(new.logits.device))
        return algos.behaviour_cloning_loss(new.logits, targets, mask, num_tokens_global=counts.tokens)
    if critic_only:
        value_loss, diagnostics = _critic_loss(algo, new.values, batch, counts)
        return algo.ppo.value_coef * value_loss, diagnostics
    per_step = algo.loss_type == LossType.SEQ_MEAN_TOKEN_MEAN
    loss, diagnostics = algos.ppo_clip_loss(
        new.log_probs, batch.old_log_probs, batch.advantages, mask, epsilon=algo.epsilon,
        epsilon_high=algo.epsilon_high, log_ratio_clamp=algo.log_ratio_clamp, advantage_clamp=algo.advantage_clamp,
        loss_type=str(algo.loss_type), num_tokens_global=None if per_step else counts.tokens,
        num_sequences_global=counts.sequences if per_step else None)
    diagnostics["entropy"] = algos.masked_mean(new.entropy.detach(), mask)
    if algo.entropy_coef > 0:
        entropy, _ = algos.entropy_bonus(new.entropy, mask, num_tokens_global=counts.tokens)
        loss = loss - algo.entropy_coef * entropy
    if algo.beta > 0:  # KL to the reference: the same model with the LoRA adapters switched off
        with torch.no_grad(), policy.vla.disable_adapter():
            reference = policy.evaluate(batch.inputs, batch.token_ids, temperature=temperature, model=model)
        kl, kl_diagnostics = algos.kl_to_reference(new.log_probs, reference.log_probs, mask,
                                                   num_tokens_global=counts.tokens)
        loss = loss + algo.beta * kl
        diagnostics.update(kl_diagnostics)
    if new.values is not None:  # PPO's critic
        value_loss, value_diagnostics = _critic_loss(algo, new.values, batch, counts)
        loss = loss + algo.ppo.value_coef * value_loss
        diagnostics.update(value_diagnostics)
    return loss, diagnostics


def _critic_loss(algo: AlgoConfig, values: torch.Tensor, batch: Batch, counts: Counts) -> tuple[torch.Tensor, dict]:
    """PPO's clipped value loss over the mini-batch's steps, and the critic's explained variance on it."""
    loss, diagnostics = algos.value_loss(values, batch.old_values, batch.returns, clip_range=algo.ppo.value_clip,
                                         num_values_global=counts.sequences)
    diagnostics["explained_variance"] = algos.explained_variance(values.detach(), batch.returns)
    return loss, diagnostics


# --- 5. evaluation ---------------------------------------------------------------------------------------------------


def evaluate_policy(config: RunConfig, engine: Engine, pool, counts: list[int], iteration: int, stop=None) -> dict:
    """Greedy and sampled success on a fixed set: eval_episodes_per_task trials of every trained task; the first
    rollout.video_episodes greedy episodes recorded in output_dir/videos/iter-XXXXXX/."""
    items = protocol_items([t for t, n in enumerate(counts) if n], config.train.eval_episodes_per_task, counts)
    videos = Path(config.train.output_dir) / "videos" / f"iter-{iteration:06d}"
    metrics = {}
    for greedy in (True, False):
        recorded = config.rollout.video_episodes if greedy else 0
        with engine.rollout_weights():  # gathered once (FSDP / ZeRO-3), LoRA merged (rollout.merge_lora)
            report = evaluate(engine.policy, pool, items, engine.dist, greedy=greedy,
                              temperature=config.rollout.temperature, seed=config.train.seed + 1 + iteration,
                              model=engine.model, use_l1_head=config.model.use_l1_head_for_eval, stop=stop,
                              video_dir=videos if recorded else None, videos=recorded,
                              **rollout_options(config, engine.dist, pool))
        metrics[f"eval/{'greedy' if greedy else 'sampled'}_success_rate"] = report.success_rate
    return metrics


# --- the loop --------------------------------------------------------------------------------------------------------


def train(config: RunConfig) -> dict:
    dist = Dist.create(config.dist)
    seed_everything(config.train.seed, config.train.deterministic)
    output_dir = Path(config.train.output_dir)
    logger = RunLogger(config, dist, output_dir)

    policy = build_run_policy(config, dist)
    logger.print("trainable parameters:\n" + format_breakdown(trainable_breakdown(policy)))
    logger.print(policy.summary())
    optimizer, scheduler = build_optimizer(config.optim, policy, config.train.iterations, config.quant.optimizer_8bit)
    engine = setup_engine(dist, policy, optimizer, config.optim, merge_lora=config.rollout.merge_lora)
    if config.rollout.merge_lora is True and not engine.merge_lora:
        logger.print(f"rollout.merge_lora is ignored with the {dist.backend} backend (single process, DDP or FSDP2 only)")
    learner = Learner(engine, epochs=config.algo.ppo_epochs, mini_batches=config.algo.num_mini_batches,
                      micro_batch_size=config.algo.micro_batch_size, seed=config.train.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the logged peak is training's, not the model build's
    state = TrainState()
    restored = None
    if config.train.resume:
        restored = load_latest_checkpoint(output_dir, engine, scheduler)
        if restored is not None:
            state = TrainState(**restored)
            logger.truncate_after(state.iteration)
            logger.print(f"resumed from iteration {state.iteration} in {output_dir}")
    if restored is None:
        logger.truncate_after(-1)  # a fresh run into a used output_dir starts a fresh metrics.jsonl
    logger.write_config(dump(config))  # after the resume: a refused one leaves the run's config.yaml as it was
    saved_iteration = None  # the iteration whose state the last checkpoint of this process holds

    pool = make_env_pool(config.env, dist, policy=policy)
    counts = init_states_per_task(config.env, pool)
    last_metrics: dict = {}
    with pool, StopRequested() as stop:
        # A signal may reach some ranks only: inside a rollout each rank stops on its own (no collectives there);
        # at the loop's safe points the ranks agree, so all of them stop together and none waits in a collective.
        def stop_agreed() -> bool:
            return dist.any(stop())

        # The baseline evaluation, once per run: a run resumed from a checkpoint of iteration 0 has logged it already.
        if state.iteration == 0 and restored is None and config.train.eval_every > 0:
            last_metrics = {"iteration": 0, **evaluate_policy(config, engine, pool, counts, 0, stop)}
            if not stop_agreed():  # a stop mid-evaluation leaves a partial one: not logged
                logger.log(0, last_metrics)

        def iteration_rollout(index: int) -> Rollout:
            """Iteration `index`'s episodes on this rank's share of its items (seeds, sampling streams)."""
            items = shard_work_items(iteration_items(config, counts, index), dist.rank, dist.world_size)
            return Rollout(policy, pool, items,
                           greedy_probability=algos.phase_at(index, config.algo.phases).greedy_probability,
                           temperature=config.rollout.temperature, run_seed=config.train.seed, rank=dist.rank,
                           episode_offset=index * EPISODE_SEED_STRIDE, model=engine.model,
                           generator=torch.Generator().manual_seed(iteration_seed(config.train.seed, index)
                                                                   + 7919 * dist.rank))

        next_rollout = None  # the next iteration's, when its first resets were sent before this one's update
        while state.iteration < config.train.iterations and not stop_agreed():
            iteration = state.iteration  # 0-based index of the iteration now running
            started = time.perf_counter()
            phase = algos.phase_at(iteration, config.algo.phases)
            bc_phase = phase.name == algos.BC_WARMUP

            # 1-2. rollout on this rank's share of the items
            rollout, next_rollout = next_rollout or iteration_rollout(iteration), None
            policy.eval()
            with (logger.progress(f"rollout {iteration + 1}", total=len(rollout.items)) as bar,
                  engine.rollout_weights(),  # gathered once (FSDP / ZeRO-3), LoRA merged (rollout.merge_lora)
                  policy.compiled_acting(config.rollout.compile_blocks)):
                episodes, rollout_stats = rollout.collect(progress=bar, should_stop=stop,
                                                          **rollout_options(config, dist, pool))
            if stop_agreed():
                break  # weights untouched this iteration: the checkpoint below resumes exactly here

            # 3. advantages (global group statistics), filtering
            samples, advantage_metrics = episode_advantages(config.algo, episodes, dist, bc_phase)

            # (the next rollout's first resets go out now: the env workers reset while the update runs)
            if resets_ahead(config, pool, iteration + 1):
                next_rollout = iteration_rollout(iteration + 1)
                next_rollout.send_first_resets()

            # 4. update: the objective over PPO epochs and micro-batches, one guarded step per mini-batch
            policy.train()
            critic_only = (config.algo.name == AlgoName.PPO and not bc_phase
                           and iteration - config.algo.phases.bc_warmup_iterations
                           < config.algo.ppo.critic_warmup_iterations)
            loss_fn = functools.partial(objective, config.algo, policy, engine.model,
                                        temperature=config.rollout.temperature, bc_phase=bc_phase,
                                        critic_only=critic_only)
            update_started = time.perf_counter()
            with logger.progress(f"update {iteration + 1}", total=None) as bar:
                update = learner.update(samples, loss_fn, iteration, progress=bar,
                                        padding_inputs=next((e.inputs[0] for e in episodes if e.inputs), None),
                                        should_stop=stop)
            update_seconds = time.perf_counter() - update_started  # ends in a metric reduction: the GPU is done
            if update.stopped:  # abandoned between micro-batches: iteration not counted, schedule not moved
                if update.steps_taken:
                    saved_iteration = None  # the weights moved since: save them
                    logger.print(f"stop requested during the update: {update.steps_taken} of its optimizer steps "
                                 "were taken and are kept; the resumed run redoes this iteration from them")
                break
            state.count_skips(update.skip_reasons)
            lr = scheduler.get_last_lr()[0]  # the rate this iteration's update used (before the schedule moves on)
            scheduler.step()
            state.iteration += 1

            # 5. metrics, evaluation, checkpoint
            valid = [e for e in episodes if e.env_error is None]
            totals = dist.sum_metrics({
                "success": sum(e.success for e in valid), "valid": len(valid), "env_errors": len(episodes) - len(valid),
                "env_steps": rollout_stats.env_steps, "length": sum(e.length for e in valid)})
            state.env_errors += int(totals["env_errors"])
            metrics = {
                "iteration": state.iteration, "phase": "critic_warmup" if critic_only else phase.name,
                "phase/greedy_probability": phase.greedy_probability,
                "rollout/success_rate": totals["success"] / max(totals["valid"], 1),
                "rollout/episodes": totals["valid"], "rollout/env_errors": totals["env_errors"],
                "rollout/mean_length": totals["length"] / max(totals["valid"], 1),
                "rollout/env_steps": totals["env_steps"], "lr": lr,
                # Every line has the loss / grad-norm keys (null when no update ran: no samples) and the skip total.
                **advantage_metrics, "train/loss": None, "train/grad_norm": None, **update.metrics,
                "guard/skipped_steps_total": float(state.skipped_steps),
                **rollout_stats.time_metrics("time"), "time/update_seconds": update_seconds,
            }
            if evaluation_due(config, state.iteration):
                eval_metrics = evaluate_policy(config, engine, pool, counts, state.iteration, stop)
                if not stop_agreed():  # a stop mid-evaluation leaves a partial one: not logged
                    metrics.update(eval_metrics)
            metrics["time/iteration_seconds"] = time.perf_counter() - started
            if torch.cuda.is_available():  # the largest peak over ranks, since the start of the run
                metrics["memory/peak_gb_per_gpu"] = dist.max(torch.cuda.max_memory_allocated() / 2**30)
            metrics["time/env_steps_per_second"] = totals["env_steps"] / max(metrics["time/iteration_seconds"], 1e-9)
            logger.log(state.iteration, metrics)
            last_metrics = metrics
            if config.train.checkpoint_every > 0 and state.iteration % config.train.checkpoint_every == 0:
                save_checkpoint(output_dir, engine, scheduler, vars(state), dump(config))
                saved_iteration = state.iteration
        # Always leave a checkpoint of the last completed iteration (normal end, SIGTERM or Ctrl-C), unless the one
        # just written holds this state: re-saving it would only open a window for a kill.
        if saved_iteration != state.iteration:
            save_checkpoint(output_dir, engine, scheduler, vars(state), dump(config))
        if stop():
            logger.print(f"stop requested: checkpoint of iteration {state.iteration} saved in {output_dir}; exiting")
    logger.finish()
    dist.close()
    return last_metrics


__all__ = ["AlgoConfig", "RunConfig", "TrainState", "build_run_policy", "load_config", "objective", "train"]
