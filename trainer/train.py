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
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer import algos
from trainer.checkpoint import load_latest_checkpoint, save_checkpoint
from trainer.config import RunConfig, dump
from trainer.dist import Dist
from trainer.envs import LIBERO_SUITES
from trainer.envs.seeding import iteration_seed
from trainer.envs.sharding import WorkItem, build_work_items, sample_groups, shard_work_items
from trainer.evaluate import evaluate, protocol_items
from trainer.logging import RunLogger
from trainer.models import EnvSettings, PolicyInputs, VLAPolicy, load_model_and_tokenizer
from trainer.models.lora import (
    LoraSettings,
    apply_lora,
    check_quantization,
    format_breakdown,
    int8_optimizer,
    quantize_int8,
    trainable_breakdown,
)
from trainer.rollout import Episode, collect_episodes

EPISODE_SEED_STRIDE = 1_000_003  # separates env seeds of different iterations (items per iteration stay below it)


# --- state that a checkpoint carries -------------------------------------------------------------------------------


@dataclass
class TrainState:
    iteration: int = 0  # iterations completed
    skipped_steps: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    env_errors: int = 0
    best_eval_success: float = -1.0


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop checks it at safe points, saves and exits cleanly."""

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


# --- set-up ----------------------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def env_settings(config: RunConfig) -> EnvSettings:
    if config.env.suite == "toy":
        return EnvSettings(image_pipeline="none", binarize_gripper=False, unnorm_key=config.env.unnorm_key or "toy")
    # LIBERO and its benchmark stand-in: the LIBERO image pipeline and gripper convention
    return EnvSettings(image_pipeline="libero", binarize_gripper=True, unnorm_key=config.env.unnorm_key or config.env.suite)


def compute_dtype(config: RunConfig, dist: Dist) -> torch.dtype:
    if config.model.dtype == "bf16" or (config.model.dtype == "auto" and dist.device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_policy(config: RunConfig, dist: Dist) -> VLAPolicy:
    """Model (tiny preset or local checkpoint) -> optional int8 base -> LoRA -> policy with optional value head."""
    check_quantization(config.quant.mode, dist.backend)
    model, tokenizer = load_model_and_tokenizer(config.model.source, seed=config.train.seed,
                                                dtype=compute_dtype(config, dist), family=config.model.family,
                                                device=dist.device)
    if config.quant.mode == "int8":
        quantize_int8(model, dist.device)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.lora.enabled:
        targets = config.lora.target_modules
        lora = LoraSettings(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                            target_modules=targets if targets in ("all-linear", "llm-linear") else targets.split(","),
                            include_lm_head=config.lora.include_lm_head,
                            train_proprio_projector=config.lora.train_proprio_projector,
                            train_action_head=config.lora.train_action_head)
        model = apply_lora(model, lora)
    policy = VLAPolicy(model, tokenizer, env_settings(config), value_head=config.algo.name == "ppo")
    if policy.value_head is not None:
        policy.value_head.to(torch.float32)
    return policy.to(dist.device)


def build_optimizer(config: RunConfig, policy: VLAPolicy):
    value_params = [p for n, p in policy.named_parameters() if p.requires_grad and n.startswith("value_head")]
    policy_params = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head")]
    if not policy_params:
        raise ValueError("nothing to train: enable LoRA (lora.enabled) or a trainable head")
    groups = [{"params": policy_params, "lr": config.optim.lr}]
    if value_params:
        groups.append({"params": value_params, "lr": config.optim.value_lr})
    if config.quant.optimizer_8bit:
        optimizer = int8_optimizer(groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay)

    def lr_scale(step: int) -> float:
        warmup = config.optim.warmup_iterations
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.optim.scheduler == "cosine":
            progress = (step - warmup) / max(config.train.iterations - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)


def make_env_pool(config: RunConfig, dist: Dist, num_workers: int | None = None):
    """This rank's env workers: subprocesses (crash-isolated) for LIBERO, in-process envs for the toy task."""
    num_workers = num_workers or config.env.num_workers
    env_kwargs = {} if config.env.max_steps is None else {"max_steps": config.env.max_steps}
    if config.env.suite != "toy":
        from trainer.envs.pool import EnvPool
        from trainer.envs.render import choose_render_env, detect_gpu_count

        render_env = {}
        if config.env.suite in LIBERO_SUITES:
            render_env = choose_render_env(os.environ, detect_gpu_count(), config.env.render_backend, dist.local_rank)
        return EnvPool(config.env.suite, num_workers, env_kwargs, env_vars=render_env,
                       step_timeout_s=config.env.step_timeout_s, reset_timeout_s=config.env.step_timeout_s)
    from trainer.envs.inline import InlinePool

    return InlinePool(config.env.suite, num_workers, env_kwargs)


# --- 1. work items --------------------------------------------------------------------------------------------------


def init_states_per_task(config: RunConfig, pool) -> list[int]:
    """How many initial states of each task are trained on (0 for tasks left out)."""
    task_ids = config.env.task_ids if config.env.task_ids is not None else range(pool.info.num_tasks)
    bad = [t for t in task_ids if not 0 <= t < pool.info.num_tasks]
    if bad:
        raise ValueError(f"env.task_ids {bad} are not tasks of {config.env.suite} (0..{pool.info.num_tasks - 1})")
    return [min(n, config.env.num_init_states) if t in set(task_ids) else 0
            for t, n in enumerate(pool.info.num_init_states)]


def iteration_items(config: RunConfig, counts: list[int], iteration: int) -> list[WorkItem]:
    """The same list on every rank: the (task, init state) groups are drawn from the iteration's shared seed."""
    groups = sample_groups(counts, min(config.env.groups_per_iteration, sum(counts)),
                           iteration_seed(config.train.seed, iteration))
    return build_work_items(groups, config.rollout.num_generations)


# --- 2. rollout ------------------------------------------------------------------------------------------------------


def merges_lora_for_rollout(config: RunConfig, dist: Dist) -> bool:
    """Whether rollouts and evaluations act with LoRA merged into the base weights (rollout.merge_lora).

    Only where every rank holds its parameters whole: one process or DDP. FSDP flattens and shards them, and
    DeepSpeed's engine owns them (ZeRO-3 partitions them; ZeRO-2 is left out as well, untried), so merging in place
    there would write into shards, not weights."""
    return config.rollout.merge_lora and dist.backend in ("single", "ddp")


def rollout_weights(config: RunConfig, policy: VLAPolicy, dist: Dist):
    """Context for a rollout or evaluation: the adapters merged for its duration (restored bit for bit on exit, see
    VLAPolicy.merged_adapters) when merges_lora_for_rollout, else the model as it is."""
    return policy.merged_adapters() if merges_lora_for_rollout(config, dist) else nullcontext()


# --- 3. advantages ---------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Policy steps to train on, flattened over episodes, with per-step targets."""

    inputs: list[PolicyInputs] = field(default_factory=list)
    token_ids: list[torch.Tensor] = field(default_factory=list)
    old_log_probs: list[torch.Tensor] = field(default_factory=list)
    token_masks: list[torch.Tensor] = field(default_factory=list)  # 1 for tokens of executed actions (Episode)
    advantages: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    old_values: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def add_episode(self, episode: Episode, advantages, returns=None, behaviour_cloning: bool = False) -> None:
        for t in range(episode.num_policy_steps):
            self.inputs.append(episode.inputs[t])
            self.token_ids.append(episode.token_ids[t])
            self.old_log_probs.append(episode.log_probs[t])
            # RL trains on sampled actions only (a hand-over's greedy steps are not the policy's draws); BC on all.
            self.token_masks.append(episode.token_masks[t] if behaviour_cloning
                                    else algos.rl_token_mask(episode.token_masks[t], episode.greedy[t]))
            self.advantages.append(float(advantages[t]))
            self.returns.append(float(returns[t]) if returns is not None else 0.0)
            self.old_values.append(episode.values[t])


def episode_advantages(config: RunConfig, episodes: list[Episode], dist: Dist, bc_phase: bool) -> tuple[Samples, dict]:
    """Per-step advantages (GRPO: the episode's advantage on each of its steps; PPO: GAE), after filtering."""
    valid = [e for e in episodes if e.env_error is None and e.num_policy_steps > 0]
    samples = Samples()
    metrics = {}
    if bc_phase:  # behaviour cloning towards the greedy tokens of successful episodes
        for episode in valid:
            if episode.success:
                samples.add_episode(episode, [1.0] * episode.num_policy_steps, behaviour_cloning=True)
        return samples, metrics
    if config.algo.name == "ppo":
        for episode in valid:
            rewards = torch.tensor(episode.rewards)[None]
            values = torch.tensor(episode.values)[None]
            dones = torch.zeros_like(rewards)
            dones[0, -1] = 1.0  # success and the step limit both end the task: no bootstrap beyond the last step
            advantages, returns = algos.gae(rewards, values, dones, config.algo.gamma, config.algo.lam)
            samples.add_episode(episode, advantages[0].tolist(), returns[0].tolist())
        # Statistics of the GLOBAL batch (one all-reduce): advantage normalisation and the rollout critic's quality.
        advantages, returns = torch.tensor(samples.advantages), torch.tensor(samples.returns)
        sums = dist.sum_metrics({**algos.moment_sums(advantages, "advantage/"), **algos.moment_sums(returns, "return/"),
                                 **algos.moment_sums(returns - torch.tensor(samples.old_values), "residual/")})
        if config.algo.normalize_advantages:
            mean, std = algos.mean_std_from_sums(sums, "advantage/")
            samples.advantages = algos.normalize_advantages(advantages, mean, std).tolist()
        metrics.update(algos.critic_diagnostics(algos.mean_std_from_sums(sums, "return/"),
                                                algos.mean_std_from_sums(sums, "residual/")))
        return samples, metrics
    # GRPO: group statistics over ALL ranks, keyed by group id.
    local = [(e.group_id, e.reward) for e in valid]
    everyone = dist.gather_objects(local)  # rank order: this rank's episodes start at `offset`
    offset = sum(dist.gather_objects([len(local)])[: dist.rank])
    group_ids = torch.tensor([g for g, _ in everyone], dtype=torch.long)
    rewards = torch.tensor([r for _, r in everyone], dtype=torch.float32)
    if config.algo.advantage == "absolute":
        advantages = algos.absolute_advantages(rewards)
    else:
        advantages = algos.grpo_advantages(rewards, group_ids, scale=config.algo.scale_rewards)
    keep = algos.dynamic_sampling_mask(rewards, group_ids) if config.algo.dynamic_sampling else torch.ones_like(
        rewards, dtype=torch.bool)
    metrics["train/groups_kept_fraction"] = float(keep.float().mean()) if len(keep) else 0.0
    for i, episode in enumerate(valid):
        if keep[offset + i]:
            samples.add_episode(episode, [float(advantages[offset + i])] * episode.num_policy_steps)
    return samples, metrics


# --- 4. update -------------------------------------------------------------------------------------------------------


def _dummy_batch(policy: VLAPolicy, like: PolicyInputs | None) -> tuple[PolicyInputs, torch.Tensor]:
    """A one-sample batch whose loss is multiplied by zero: keeps a rank's collective calls in step with the others."""
    config = policy.config
    if like is None:
        size = config.image_size
        like = PolicyInputs(torch.zeros(1, config.num_images, size, size, 3, dtype=torch.uint8),
                            torch.full((1, 1), config.trainer.space_token_id), torch.ones(1, 1, dtype=torch.long),
                            torch.zeros(1, 8) if config.is_oft and config.trainer.oft.use_proprio else None)
    tokens = policy.action_tokenizer.local_to_token_ids(torch.zeros(1, policy.base_model.num_action_slots,
                                                                    dtype=torch.long))
    return like, tokens


def update_policy(config: RunConfig, policy: VLAPolicy, model, optimizer, samples: Samples, dist: Dist,
                  iteration: int, bc_phase: bool, state: TrainState, progress=None, any_inputs=None) -> dict:
    """PPO epochs (or behaviour cloning): each epoch is split into `num_mini_batches` guarded optimizer steps, each
    accumulated over micro-batches. Every rank runs the same number of mini- and micro-batches."""
    algo = config.algo
    global_samples = dist.sum(len(samples))
    metrics: dict[str, float] = {"train/samples": global_samples}
    if global_samples == 0:
        metrics["train/update_skipped_no_samples"] = 1.0
        return metrics
    generator = torch.Generator().manual_seed(iteration_seed(config.train.seed, iteration) + dist.rank)
    totals: dict[str, float] = {}
    for epoch in range(algo.ppo_epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for mini_batch in np.array_split(np.array(order, dtype=np.int64), algo.num_mini_batches):
            mini_batch = mini_batch.tolist()
            # Losses are local sums divided by the mini-batch's GLOBAL token count over the world size: DDP / FSDP
            # average gradients over ranks, so the result is the exact token mean of the global mini-batch.
            mini_global = dist.sum(len(mini_batch))
            if mini_global == 0:
                continue
            tokens_global = dist.sum(sum(float(samples.token_masks[i].sum()) for i in mini_batch))
            count = dist.agreed_micro_batches(len(mini_batch), algo.micro_batch_size)
            for step_index in range(count):
                indices = mini_batch[step_index * algo.micro_batch_size:(step_index + 1) * algo.micro_batch_size]
                sync = step_index == count - 1
                with dist.no_sync(model, sync):  # gradients are reduced once, in the last micro-batch's backward
                    loss, parts = _micro_batch_loss(config, policy, model, samples, indices, mini_global / dist.world_size,
                                                    tokens_global / dist.world_size, bc_phase, any_inputs)
                    dist.backward(model, loss * (1.0 if indices else 0.0), sync=sync)
                if indices:
                    totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
                    for key, value in parts.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * len(indices)
                    totals["_count"] = totals.get("_count", 0.0) + len(indices)
                if progress is not None:
                    progress.update(1)
            metrics.update(_optimizer_step(config, policy, model, optimizer, dist, state))
    # Global figures: every rank's sums (a rank may have had no samples at all), then the means.
    merged: dict[str, float] = {}
    for part in dist.gather_objects([totals]):
        for key, value in part.items():
            merged[key] = merged.get(key, 0.0) + value
    count = max(merged.pop("_count", 0.0), 1.0)
    optimizer_steps = algo.ppo_epochs * algo.num_mini_batches
    for key, value in merged.items():  # each rank's loss is its share of the global mean, times the world size
        metrics[f"train/{key}"] = value / (optimizer_steps * dist.world_size if key == "loss" else count)
    return metrics


def _micro_batch_loss(config: RunConfig, policy: VLAPolicy, model, samples: Samples, indices: list[int],
                      sequences_denominator: float, tokens_denominator: float, bc_phase: bool,
                      any_inputs) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (an empty one is a zero-weight dummy that keeps collectives in step). The
    denominators are the mini-batch's global sequence and executed-token counts over the world size."""
    algo = config.algo
    if indices:
        inputs = PolicyInputs.collate([samples.inputs[i] for i in indices], policy.config.pad_token_id)
        token_ids = torch.stack([samples.token_ids[i] for i in indices])
    else:
        inputs, token_ids = _dummy_batch(policy, any_inputs)
    evaluated = policy.evaluate(inputs, token_ids, temperature=config.rollout.temperature, model=model)
    targets = _targets(samples, indices, evaluated)
    mask = targets["token_mask"]
    if bc_phase:
        local_ids = policy.action_tokenizer.token_ids_to_local(token_ids.to(evaluated.logits.device))
        return algos.behaviour_cloning_loss(evaluated.logits, local_ids, mask, num_tokens_global=tokens_denominator)
    loss, parts = algos.ppo_clip_loss(
        evaluated.log_probs, targets["old_log_probs"], targets["advantages"], mask, epsilon=algo.epsilon,
        epsilon_high=algo.epsilon_high, log_ratio_clamp=algo.log_ratio_clamp, advantage_clamp=algo.advantage_clamp,
        loss_type=algo.loss_type, **({"num_tokens_global": tokens_denominator} if algo.loss_type == "token_mean"
                                     else {"num_sequences_global": sequences_denominator}))
    parts["entropy"] = algos.masked_mean(evaluated.entropy.detach(), mask)
    if algo.entropy_coef > 0:
        entropy, _ = algos.entropy_bonus(evaluated.entropy, mask, num_tokens_global=tokens_denominator)
        loss = loss - algo.entropy_coef * entropy
    if algo.beta > 0:  # KL to the reference: the same model with the LoRA adapters switched off
        with torch.no_grad(), policy.vla.disable_adapter():
            reference = policy.evaluate(inputs, token_ids, temperature=config.rollout.temperature, model=model)
        kl, kl_parts = algos.kl_to_reference(evaluated.log_probs, reference.log_probs, mask,
                                             num_tokens_global=tokens_denominator)
        loss = loss + algo.beta * kl
        parts.update(kl_parts)
    if evaluated.values is not None:
        v_loss, v_parts = algos.value_loss(evaluated.values, targets["old_values"], targets["returns"],
                                           clip_range=algo.value_clip, num_values_global=sequences_denominator)
        loss = loss + algo.value_coef * v_loss
        parts["value_loss"] = 0.5 * ((evaluated.values.detach() - targets["returns"]) ** 2).mean()
        parts["explained_variance"] = algos.explained_variance(evaluated.values.detach(), targets["returns"])
        parts.update(v_parts)
    return loss, parts


def _targets(samples: Samples, indices: list[int], evaluated) -> dict[str, torch.Tensor]:
    """Rollout-time quantities of a micro-batch; a zero-weight (padding) batch gets neutral ones."""
    device = evaluated.log_probs.device
    if not indices:
        zeros = torch.zeros(evaluated.log_probs.shape[0], device=device)
        return {"old_log_probs": evaluated.log_probs.detach(), "advantages": zeros, "returns": zeros,
                "old_values": zeros, "token_mask": torch.ones_like(evaluated.log_probs)}
    return {
        "old_log_probs": torch.stack([samples.old_log_probs[i] for i in indices]).to(device),
        "token_mask": torch.stack([samples.token_masks[i] for i in indices]).to(device),
        "advantages": torch.tensor([samples.advantages[i] for i in indices], device=device),
        "returns": torch.tensor([samples.returns[i] for i in indices], device=device),
        "old_values": torch.tensor([samples.old_values[i] for i in indices], device=device),
    }


def _optimizer_step(config: RunConfig, policy, model, optimizer, dist: Dist, state: TrainState) -> dict:
    """Global grad norm -> guard (same decision on every rank) -> clip -> step; every skip is counted with its reason."""
    params = [p for p in policy.parameters() if p.requires_grad]
    # Global norm before clipping (FSDP2 / DeepSpeed reduce it over ranks; DeepSpeed clips inside its own step).
    grad_norm = dist.clip_grad_norm(model, params, config.optim.max_grad_norm)
    reason = dist.skip_decision(grad_norm, config.optim.max_grad_norm, config.optim.skip_factor)
    metrics = {"train/grad_norm": grad_norm, "train/step_skipped": 0.0}
    if reason is not None:
        state.skipped_steps += 1
        state.skip_reasons[reason] = state.skip_reasons.get(reason, 0) + 1
        metrics["train/step_skipped"] = 1.0
        metrics[f"guard/{reason}"] = 1.0
        dist.skip_step(model, optimizer)  # gradients dropped; weights and optimizer state untouched
    else:
        if grad_norm > config.optim.warn_factor * config.optim.max_grad_norm:
            metrics["guard/grad_norm_warning"] = 1.0
        dist.optimizer_step(model, optimizer)
    metrics["guard/skipped_steps_total"] = float(state.skipped_steps)
    return metrics


# --- 5. evaluation ---------------------------------------------------------------------------------------------------


def evaluate_policy(config: RunConfig, policy, model, pool, dist: Dist, counts: list[int], iteration: int,
                    stop=None) -> dict:
    """Greedy and sampled success on a fixed set: eval_episodes_per_task trials of every trained task."""
    items = protocol_items([t for t, n in enumerate(counts) if n], config.train.eval_episodes_per_task, counts)
    metrics = {}
    for greedy in (True, False):
        # FSDP / ZeRO-3: weights gathered once, not per forward; LoRA merged if rollout.merge_lora
        with dist.gathered_for_rollout(model), rollout_weights(config, policy, dist):
            report = evaluate(policy, pool, items, dist, greedy=greedy, temperature=config.rollout.temperature,
                              seed=config.train.seed + 1 + iteration, model=model,
                              use_l1_head=config.model.use_l1_head_for_eval, stop=stop)
        metrics[f"eval/{'greedy' if greedy else 'sampled'}_success_rate"] = report.success_rate
    return metrics


# --- the loop --------------------------------------------------------------------------------------------------------


def train(config: RunConfig) -> dict:
    dist = Dist.create()
    seed_everything(config.train.seed, config.train.deterministic)
    output_dir = Path(config.train.output_dir)
    logger = RunLogger(config, dist, output_dir)
    logger.write_config(dump(config))

    policy = build_policy(config, dist)
    logger.print("trainable parameters:\n" + format_breakdown(trainable_breakdown(policy)))
    optimizer, scheduler = build_optimizer(config, policy)
    # The scheduler is not prepared: it steps once per iteration, whatever the backend and world size (see Dist.prepare).
    model, optimizer = dist.prepare(policy, optimizer, max_grad_norm=config.optim.max_grad_norm)
    if config.rollout.merge_lora and not merges_lora_for_rollout(config, dist):
        logger.print(f"rollout.merge_lora is ignored with the {dist.backend} backend (single process or DDP only)")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the logged peak is training's, not the model build's
    state = TrainState()
    restored = None
    if config.train.resume:
        restored = load_latest_checkpoint(output_dir, policy, optimizer, scheduler, dist)
        if restored is not None:
            state = TrainState(**restored)
            logger.truncate_after(state.iteration)
            logger.print(f"resumed from iteration {state.iteration} in {output_dir}")
    if restored is None:
        logger.truncate_after(-1)  # a fresh run into a used output_dir starts a fresh metrics.jsonl

    schedule = algos.PhaseSchedule(config.algo.bc_warmup_iterations, config.algo.handover_iterations,
                                   config.algo.epsilon_start)
    pool = make_env_pool(config, dist)
    counts = init_states_per_task(config, pool)
    last_metrics: dict = {}
    with pool, StopRequested() as stop:
        # A signal may reach some ranks only: inside a rollout each rank stops on its own (no collectives there);
        # at the loop's safe points the ranks agree, so all of them stop together and none waits in a collective.
        def stop_agreed() -> bool:
            return dist.any(stop())

        # The baseline evaluation, once per run: a run resumed from a checkpoint of iteration 0 has logged it already.
        if state.iteration == 0 and restored is None and config.train.eval_every > 0:
            last_metrics = {"iteration": 0, **evaluate_policy(config, policy, model, pool, dist, counts, 0, stop)}
            if not stop_agreed():  # a stop mid-evaluation leaves a partial one: not logged
                logger.log(0, last_metrics)
        while state.iteration < config.train.iterations and not stop_agreed():
            iteration = state.iteration  # 0-based index of the iteration now running
            started = time.perf_counter()
            phase = algos.phase_at(iteration, schedule)
            bc_phase = phase.name == algos.BC_WARMUP

            # 1-2. rollout on this rank's share of the items
            items = shard_work_items(iteration_items(config, counts, iteration), dist.rank, dist.world_size)
            policy.eval()
            with (logger.progress(f"rollout {iteration + 1}", total=len(items)) as bar,
                  dist.gathered_for_rollout(model),  # FSDP / ZeRO-3: weights gathered once for the whole rollout
                  rollout_weights(config, policy, dist)):  # LoRA merged into the base (rollout.merge_lora)
                episodes, rollout_stats = collect_episodes(
                    policy, pool, items, greedy_probability=phase.epsilon, temperature=config.rollout.temperature,
                    run_seed=config.train.seed, rank=dist.rank, episode_offset=iteration * EPISODE_SEED_STRIDE,
                    model=model, generator=torch.Generator().manual_seed(
                        iteration_seed(config.train.seed, iteration) + 7919 * dist.rank),
                    progress=bar, should_stop=stop)
            if stop_agreed():
                break  # weights untouched this iteration: the checkpoint below resumes exactly here

            # 3. advantages (global group statistics), filtering
            samples, advantage_metrics = episode_advantages(config, episodes, dist, bc_phase)

            # 4. update
            policy.train()
            any_inputs = next((e.inputs[0] for e in episodes if e.inputs), None)
            with logger.progress(f"update {iteration + 1}", total=None) as bar:
                update_metrics = update_policy(config, policy, model, optimizer, samples, dist, iteration, bc_phase,
                                               state, progress=bar, any_inputs=any_inputs)
            lr = scheduler.get_last_lr()[0]  # the rate this iteration's update used (before the schedule moves on)
            scheduler.step()
            state.iteration += 1

            # 5. metrics, evaluation, checkpoint
            valid = [e for e in episodes if e.env_error is None]
            errors = len(episodes) - len(valid)
            totals = dist.sum_metrics({
                "success": sum(e.success for e in valid), "valid": len(valid), "env_errors": errors,
                "env_steps": rollout_stats.env_steps, "length": sum(e.length for e in valid)})
            state.env_errors += int(totals["env_errors"])
            metrics = {
                "iteration": state.iteration, "phase": phase.name, "phase/epsilon": phase.epsilon,
                "rollout/success_rate": totals["success"] / max(totals["valid"], 1),
                "rollout/episodes": totals["valid"], "rollout/env_errors": totals["env_errors"],
                "rollout/mean_length": totals["length"] / max(totals["valid"], 1),
                "rollout/env_steps": totals["env_steps"], "lr": lr,
                # Every line has the loss / grad-norm keys (null when no update ran: no samples) and the skip total.
                **advantage_metrics, "train/loss": None, "train/grad_norm": None, **update_metrics,
                "guard/skipped_steps_total": float(state.skipped_steps),
                "time/rollout_seconds": rollout_stats.wall_seconds,
                "time/policy_seconds": rollout_stats.policy_seconds,
                "time/env_seconds": rollout_stats.env_seconds,
            }
            if config.train.eval_every > 0 and (state.iteration % config.train.eval_every == 0
                                                or state.iteration == config.train.iterations):
                eval_metrics = evaluate_policy(config, policy, model, pool, dist, counts, state.iteration, stop)
                if not stop_agreed():  # a stop mid-evaluation leaves a partial one: not logged
                    metrics.update(eval_metrics)
            metrics["time/iteration_seconds"] = time.perf_counter() - started
            if torch.cuda.is_available():  # the largest peak over ranks, since the start of the run
                metrics["memory/peak_gb_per_gpu"] = dist.max(torch.cuda.max_memory_allocated() / 2**30)
            metrics["time/env_steps_per_second"] = totals["env_steps"] / max(metrics["time/iteration_seconds"], 1e-9)
            logger.log(state.iteration, metrics)
            last_metrics = metrics
            if config.train.checkpoint_every > 0 and state.iteration % config.train.checkpoint_every == 0:
                save_checkpoint(output_dir, policy, optimizer, scheduler, vars(state), dist, config)
        # Always leave a checkpoint of the last completed iteration (normal end, SIGTERM or Ctrl-C).
        save_checkpoint(output_dir, policy, optimizer, scheduler, vars(state), dist, config)
        if stop():
            logger.print(f"stop requested: checkpoint of iteration {state.iteration} saved in {output_dir}; exiting")
    logger.finish()
    return last_metrics


__all__ = ["TrainState", "build_policy", "train"]
