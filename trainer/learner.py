"""The update's mechanics around an objective: epochs, mini-batches (one guarded optimizer step each), micro-batches
(one forward and backward each, the same number on every rank), the global denominators, and the update's metrics
reduced over ranks once.

    learner = Learner(engine, epochs=4, mini_batches=2, micro_batch_size=64, seed=run_seed)
    result = learner.update(samples, loss_fn, iteration)      # loss_fn(batch, counts) -> (loss, diagnostics)

The objective (`loss_fn`, the recipe's) sees one micro-batch and the mini-batch's global counts; it never sees ranks,
padding or accumulation. Losses are local sums divided by the mini-batch's GLOBAL counts over the world size: DDP and
FSDP average gradients over ranks, so the accumulated gradient is the exact mean over the global mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer import algos
from trainer.engine import Engine
from trainer.envs.seeding import iteration_seed
from trainer.models import PolicyInputs, VLAPolicy
from trainer.rollout import Episode


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


@dataclass
class Batch:
    """One micro-batch: the policy's inputs and the rollout-time targets ([B] or [B, T], on the training device)."""

    inputs: PolicyInputs
    token_ids: torch.Tensor  # [B, T] the action tokens taken
    old_log_probs: torch.Tensor  # [B, T] their log-probs at rollout
    token_mask: torch.Tensor  # [B, T] 1 for tokens of executed actions
    advantages: torch.Tensor  # [B]
    returns: torch.Tensor  # [B] value targets (PPO)
    old_values: torch.Tensor  # [B] values at rollout (PPO)
    size: int  # samples of this rank in it; 0 for a zero-weight padding batch


@dataclass(frozen=True)
class Counts:
    """A mini-batch's global sequence and executed-token counts, over the world size: the losses' denominators."""

    sequences: float
    tokens: float


LossFn = Callable[[Batch, Counts], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class UpdateResult:
    metrics: dict = field(default_factory=dict)  # "train/..." means over the global batch, the last step's guard
    skip_reasons: list[str] = field(default_factory=list)  # one entry per skipped optimizer step
    stopped: bool = False  # abandoned at a micro-batch boundary on a stop request (every rank agreed)
    steps_taken: int = 0  # optimizer steps applied before the stop (or in all)


class Learner:
    """Runs an objective over the iteration's samples on one engine; see the module docstring."""

    def __init__(self, engine: Engine, *, epochs: int, mini_batches: int, micro_batch_size: int, seed: int):
        self.engine = engine
        self.dist = engine.dist
        self.epochs, self.mini_batches, self.micro_batch_size = epochs, mini_batches, micro_batch_size
        self.seed = seed

    def update(self, samples: Samples, loss_fn: LossFn, iteration: int, progress=None,
               padding_inputs: PolicyInputs | None = None, should_stop=None) -> UpdateResult:
        """`epochs` passes over the samples in a fresh random order, each split into `mini_batches` optimizer steps.

        padding_inputs: any observation's inputs, for the zero-weight micro-batches of a rank with fewer samples
        (default: blank inputs of the model's shapes).
        should_stop: a stop request (SIGTERM under a launcher). Checked before every micro-batch and agreed over
        ranks (one scalar all-reduce: the loop already waits for every micro-batch's loss, so it adds no sync of its
        own); on a stop the update is abandoned there, the unfinished mini-batch's gradients are never applied, and
        `stopped` is set. A launcher kills its ranks a fixed time after SIGTERM (torchrun: 30 s), which one
        micro-batch fits in and a whole update may not."""
        dist = self.dist
        global_samples = dist.sum(len(samples))
        result = UpdateResult(metrics={"train/samples": global_samples})
        if global_samples == 0:
            result.metrics["train/update_skipped_no_samples"] = 1.0
            return result
        stats = _UpdateStats()
        generator = torch.Generator().manual_seed(iteration_seed(self.seed, iteration) + dist.rank)
        for _ in range(self.epochs):
            order = torch.randperm(len(samples), generator=generator).tolist()
            for mini_batch in np.array_split(np.array(order, dtype=np.int64), self.mini_batches):
                mini_batch = mini_batch.tolist()
                sequences = dist.sum(len(mini_batch))
                if sequences == 0:
                    continue
                tokens = dist.sum(sum(float(samples.token_masks[i].sum()) for i in mini_batch))
                counts = Counts(sequences=sequences / dist.world_size, tokens=tokens / dist.world_size)
                steps = dist.agreed_micro_batches(len(mini_batch), self.micro_batch_size)
                for step in range(steps):
                    if should_stop is not None and dist.any(should_stop()):
                        result.stopped = True
                        return result
                    indices = mini_batch[step * self.micro_batch_size:(step + 1) * self.micro_batch_size]
                    last = step == steps - 1
                    batch = (collate(samples, indices, self.engine.policy, self.dist.device) if indices
                             else self._padding_batch(padding_inputs))
                    with self.engine.accumulating(last):  # gradients are reduced once, in the last backward
                        loss, diagnostics = loss_fn(batch, counts)
                        self.engine.backward(loss * (1.0 if batch.size else 0.0), last)
                    stats.add(loss, diagnostics, batch.size)
                    if progress is not None:
                        progress.update(1)
                outcome = self.engine.step()
                stats.steps += 1
                result.steps_taken = stats.steps
                result.metrics.update({"train/grad_norm": outcome.grad_norm,
                                       "train/step_skipped": float(outcome.skip_reason is not None)})
                if outcome.skip_reason is not None:
                    result.skip_reasons.append(outcome.skip_reason)
                    result.metrics[f"guard/{outcome.skip_reason}"] = 1.0
                if outcome.grad_norm_warning:
                    result.metrics["guard/grad_norm_warning"] = 1.0
        result.metrics.update(stats.means(dist))
        return result

    def _padding_batch(self, like: PolicyInputs | None) -> Batch:
        """One sample whose loss is multiplied by zero: keeps a rank's forward, backward and collective calls in step
        with the ranks that have more samples. Neutral targets (zero advantages, returns and values) keep it finite."""
        inputs, token_ids = padding_inputs(self.engine.policy, like)
        zeros = torch.zeros(1, device=self.dist.device)
        tokens = torch.zeros(token_ids.shape, device=self.dist.device)
        return Batch(inputs=inputs, token_ids=token_ids, old_log_probs=tokens, token_mask=torch.ones_like(tokens),
                     advantages=zeros, returns=zeros, old_values=zeros, size=0)


def collate(samples: Samples, indices: list[int], policy: VLAPolicy, device: torch.device) -> Batch:
    """The micro-batch of `samples[indices]`: inputs padded to one prompt length, targets on `device`."""

    def stacked(values):
        return torch.stack([values[i] for i in indices]).to(device)

    def per_sample(values):
        return torch.tensor([values[i] for i in indices], device=device)

    return Batch(inputs=PolicyInputs.collate([samples.inputs[i] for i in indices], policy.config.pad_token_id),
                 token_ids=torch.stack([samples.token_ids[i] for i in indices]),
                 old_log_probs=stacked(samples.old_log_probs), token_mask=stacked(samples.token_masks),
                 advantages=per_sample(samples.advantages), returns=per_sample(samples.returns),
                 old_values=per_sample(samples.old_values), size=len(indices))


def padding_inputs(policy: VLAPolicy, like: PolicyInputs | None) -> tuple[PolicyInputs, torch.Tensor]:
    """Inputs and action tokens of a one-sample batch: `like` (any real observation's inputs) or blank inputs."""
    config = policy.config
    if like is None:
        size = config.image_size
        like = PolicyInputs(torch.zeros(1, config.num_images, size, size, 3, dtype=torch.uint8),
                            torch.full((1, 1), config.trainer.space_token_id), torch.ones(1, 1, dtype=torch.long),
                            torch.zeros(1, 8) if config.is_oft and config.trainer.oft.use_proprio else None)
    tokens = policy.action_tokenizer.local_to_token_ids(torch.zeros(1, policy.base_model.num_action_slots,
                                                                    dtype=torch.long))
    return like, tokens


class _UpdateStats:
    """Sums over this rank's micro-batches of the loss and of every diagnostic (weighted by samples), reduced over
    ranks in one collective at the end of the update."""

    def __init__(self):
        self.loss_sum = 0.0
        self.weighted_sums: dict[str, float] = {}
        self.samples = 0
        self.steps = 0

    def add(self, loss: torch.Tensor, diagnostics: dict[str, torch.Tensor], size: int) -> None:
        for key in diagnostics:  # a padding batch adds its keys (every rank then reduces the same ones), no values
            self.weighted_sums.setdefault(key, 0.0)
        if size == 0:
            return
        self.loss_sum += float(loss.detach())
        for key, value in diagnostics.items():
            self.weighted_sums[key] += float(value) * size
        self.samples += size

    def means(self, dist) -> dict[str, float]:
        """train/loss: the mean over optimizer steps of each step's global loss (each rank's loss is its share of
        the global mean times the world size); every diagnostic: its mean over the global batch's samples."""
        totals = dist.sum_metrics({"loss": self.loss_sum, "samples": float(self.samples),
                                   **{f"diagnostic/{key}": value for key, value in self.weighted_sums.items()}})
        samples = max(totals["samples"], 1.0)
        means = {"train/loss": totals["loss"] / (self.steps * dist.world_size)}
        for key in self.weighted_sums:
            means[f"train/{key}"] = totals[f"diagnostic/{key}"] / samples
        return means


__all__ = ["Batch", "Counts", "Learner", "LossFn", "Samples", "UpdateResult", "collate", "padding_inputs"]
