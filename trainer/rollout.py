"""Drive a rank's env pool with batched policy inference and record trajectories. Nothing about the loss lives here.

Each policy step makes ONE batched policy call for every live env of the rank; OFT chunks (8 actions) are executed
open-loop by the env worker in one message. When an episode ends, its worker takes the next work item at once, so
workers stay busy while long episodes finish.

The same function serves training rollouts (sampled, or epsilon-greedy during the hand-over), evaluation (greedy or
sampled, no trajectories kept) and the benchmark.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.envs.pool import EnvPool, ResetRequest
from trainer.envs.seeding import derive_seed, sampling_seed
from trainer.envs.sharding import WorkItem
from trainer.models.policy import PolicyInputs, VLAPolicy


@dataclass
class Episode:
    item: WorkItem
    seed: int
    inputs: list[PolicyInputs] = field(default_factory=list)  # one entry per policy step (batch of 1)
    token_ids: list[torch.Tensor] = field(default_factory=list)  # [n_tokens] per policy step
    log_probs: list[torch.Tensor] = field(default_factory=list)
    # [n_tokens] per policy step: 1 for the tokens of actions the env executed. An OFT chunk cut short by the end of
    # the episode leaves its later actions unexecuted; their tokens had no effect and are not trained on.
    token_masks: list[torch.Tensor] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # per policy step: 1.0 on the step that succeeded
    greedy: list[bool] = field(default_factory=list)
    success: bool = False
    length: int = 0  # env steps (actions) executed
    env_error: str | None = None
    frames: list[np.ndarray] = field(default_factory=list)  # primary camera frames when a video is recorded

    @property
    def group_id(self) -> int:
        return self.item.group_id

    @property
    def reward(self) -> float:
        return float(self.success)

    @property
    def num_policy_steps(self) -> int:
        return len(self.token_ids)


@dataclass
class RolloutStats:
    policy_seconds: float = 0.0
    prepare_seconds: float = 0.0
    env_seconds: float = 0.0  # wall time of batched env calls, as the parent sees them
    policy_calls: int = 0
    env_steps: int = 0  # actions executed
    wall_seconds: float = 0.0

    def as_metrics(self, prefix: str = "rollout") -> dict[str, float]:
        return {
            f"{prefix}/policy_seconds": self.policy_seconds,
            f"{prefix}/prepare_seconds": self.prepare_seconds,
            f"{prefix}/env_seconds": self.env_seconds,
            f"{prefix}/env_steps": float(self.env_steps),
            f"{prefix}/env_steps_per_second": self.env_steps / max(self.wall_seconds, 1e-9),
            f"{prefix}/seconds": self.wall_seconds,
        }


def collect_episodes(
    policy: VLAPolicy,
    pool: EnvPool,
    items: list[WorkItem],
    *,
    greedy_probability: float = 0.0,
    temperature: float = 1.0,
    run_seed: int = 0,
    rank: int = 0,
    episode_offset: int = 0,
    model: torch.nn.Module | None = None,
    keep_trajectories: bool = True,
    record_video_items: set[int] | None = None,
    use_l1_head: bool = False,
    generator: torch.Generator | None = None,
    progress=None,
    should_stop=None,
) -> tuple[list[Episode], RolloutStats]:
    """Run every item as one episode on `pool`; return the episodes in `items` order and timing stats.

    greedy_probability: chance that a policy step takes the greedy action (1.0: fully greedy, 0.0: sampled;
        between: the epsilon-greedy hand-over). Chosen per env and step from `generator`.
    episode_offset: added to the item index to derive each episode's env seed (keeps seeds unique across iterations).
    record_video_items: indices into `items` whose primary camera frames are kept for a video.
    progress: an object with update(n) (e.g. tqdm), advanced once per finished episode.
    should_stop: a callable; when it returns True the rollout ends early (unfinished episodes get env_error "stopped").
    """
    started = time.perf_counter()
    stats = RolloutStats()
    tokens_per_action = policy.config.trainer.action_dim
    # Each rank draws its own actions (train and evaluation pass their own generator; this is the default).
    generator = generator or torch.Generator().manual_seed(sampling_seed(run_seed, rank, episode_offset))
    record_video_items = record_video_items or set()
    episodes = [Episode(item=item, seed=0) for item in items]
    pending = deque(range(len(items)))
    running: dict[int, int] = {}  # worker -> episode index
    observations: dict[int, object] = {}  # worker -> latest observation

    def finish(worker: int, error: str | None = None) -> None:
        episode = episodes[running.pop(worker)]
        episode.env_error = episode.env_error or error
        observations.pop(worker, None)
        if progress is not None:
            progress.update(1)

    def start_episodes(workers: list[int]) -> None:
        requests = {}
        for worker in workers:
            if not pending:
                break
            index = pending.popleft()
            episode = episodes[index]
            episode.seed = derive_seed(run_seed, rank, worker, episode_offset + index)
            running[worker] = index
            requests[worker] = ResetRequest(episode.item.task_id, episode.item.init_state_id, episode.seed,
                                            record_frames=index in record_video_items)
        if not requests:
            return
        tick = time.perf_counter()
        replies = pool.reset(requests)
        stats.env_seconds += time.perf_counter() - tick
        failed = []
        for worker, reply in replies.items():
            if reply.ok:
                observations[worker] = reply.observation
                if running[worker] in record_video_items:
                    episodes[running[worker]].frames.append(reply.observation.primary_image)
            else:
                finish(worker, reply.env_error)
                failed.append(worker)
        if failed:
            start_episodes(failed)  # the replacement worker takes the next item

    start_episodes(list(range(pool.num_workers)))
    while running:
        if should_stop is not None and should_stop():
            for worker in list(running):
                finish(worker, "stopped")
            for index in pending:
                episodes[index].env_error = "stopped"
            break
        workers = sorted(running)
        tick = time.perf_counter()
        inputs = policy.prepare([observations[w] for w in workers])
        stats.prepare_seconds += time.perf_counter() - tick
        greedy = torch.rand(len(workers), generator=generator) < greedy_probability
        tick = time.perf_counter()
        result = policy.act(inputs, greedy=greedy, temperature=temperature, model=model, use_l1_head=use_l1_head,
                            generator=generator)
        stats.policy_seconds += time.perf_counter() - tick
        stats.policy_calls += 1
        tick = time.perf_counter()
        replies = pool.step({w: result.env_actions[i] for i, w in enumerate(workers)})
        stats.env_seconds += time.perf_counter() - tick
        ended = []
        for i, worker in enumerate(workers):
            reply = replies[worker]
            episode = episodes[running[worker]]
            if not reply.ok:
                finish(worker, reply.env_error)
                ended.append(worker)
                continue
            step = reply.result
            stats.env_steps += step.steps_executed
            episode.length += step.steps_executed
            if keep_trajectories:
                episode.inputs.append(inputs.select([i]))
                episode.token_ids.append(result.token_ids[i].cpu())
                episode.log_probs.append(result.log_probs[i].cpu())
                episode.token_masks.append(executed_token_mask(result.token_ids.shape[1], tokens_per_action,
                                                               step.steps_executed))
                episode.values.append(float(result.values[i]) if result.values is not None else 0.0)
                episode.rewards.append(float(step.reward))
                episode.greedy.append(bool(greedy[i]))
            if running[worker] in record_video_items:  # every action's frame, not only the chunk's last
                episode.frames.extend(step.frames if step.frames is not None else [step.observation.primary_image])
            if step.done:
                episode.success = bool(step.success)
                finish(worker)
                ended.append(worker)
            else:
                observations[worker] = step.observation
        if ended:
            start_episodes(ended)
    stats.wall_seconds = time.perf_counter() - started
    return episodes, stats


def executed_token_mask(num_tokens: int, tokens_per_action: int, actions_executed: int) -> torch.Tensor:
    """1.0 for the tokens of the first `actions_executed` actions of a chunk (tokens are laid out action by action)."""
    return (torch.arange(num_tokens) < actions_executed * tokens_per_action).float()


def success_rate(episodes: list[Episode]) -> float:
    """Share of successful episodes among those without an env error (errors are no evidence either way)."""
    valid = [e for e in episodes if e.env_error is None]
    return float(np.mean([e.success for e in valid])) if valid else float("nan")


def write_video(frames: list[np.ndarray], path, fps: int = 20, rotate_180: bool = False) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=7, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame[::-1, ::-1] if rotate_180 else frame))
