"""Drive a rank's env pool with batched policy inference and record trajectories. Nothing about the loss lives here.

Each policy step makes ONE batched policy call for every live env of the rank; OFT chunks (8 actions) are executed
open-loop by the env worker in one message. When an episode ends, its worker takes the next work item at once, so
workers stay busy while long episodes finish. With `pipeline`, the workers are split into two halves and the policy
acts for one half while the other half's envs step (RLinf-style); every episode samples from its own random stream,
so the pipelined loop collects the same episodes as the plain one.

The same function serves training rollouts (sampled, or epsilon-greedy during the hand-over), evaluation (greedy or
sampled, no trajectories kept) and the benchmark.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.envs.pool import EnvPool, ResetRequest
from trainer.envs.seeding import OFFICIAL_SCENE, derive_seed, episode_sampling_seed, sampling_seed
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
    env_seconds: float = 0.0  # wall time the parent waits in batched env calls (pipelined: in step_end and resets)
    # the rest of the parent's time, in parts: sampling draws (greedy choices, noise), sending steps to the workers,
    # storing the replies in the episodes (what a GPU run's rollout spends outside policy calls and env waits)
    draw_seconds: float = 0.0
    send_seconds: float = 0.0
    record_seconds: float = 0.0
    # time inside the workers' env.step (summed over workers): against env_seconds it tells whether a slow env wait
    # is slow envs or envs left idle
    worker_step_seconds: float = 0.0
    worker_steps: int = 0  # step replies (action chunks) those seconds cover
    policy_calls: int = 0
    env_steps: int = 0  # actions executed
    wall_seconds: float = 0.0

    @property
    def worker_chunk_seconds(self) -> float:
        """Mean time inside a worker's env.step per action chunk."""
        return self.worker_step_seconds / max(self.worker_steps, 1)

    @contextmanager
    def timing(self, part: str):
        """Add the block's wall time to `<part>_seconds`."""
        start = time.perf_counter()
        yield
        setattr(self, f"{part}_seconds", getattr(self, f"{part}_seconds") + time.perf_counter() - start)

    def time_metrics(self, prefix: str = "time") -> dict[str, float]:
        """Where the rollout's time went, as the training loop logs it: its wall time, the parts measured in the
        trainer, and the time inside the workers' env.step (summed over them, and per action chunk)."""
        return {
            f"{prefix}/rollout_seconds": self.wall_seconds,
            f"{prefix}/policy_seconds": self.policy_seconds,
            f"{prefix}/env_seconds": self.env_seconds,
            f"{prefix}/prepare_seconds": self.prepare_seconds,
            f"{prefix}/draw_seconds": self.draw_seconds,
            f"{prefix}/send_seconds": self.send_seconds,
            f"{prefix}/record_seconds": self.record_seconds,
            f"{prefix}/worker_step_seconds": self.worker_step_seconds,
            f"{prefix}/worker_chunk_seconds": self.worker_chunk_seconds,
        }


DECODE_MODES = ("dynamic", "static", "graphs")


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
    official_scenes: bool = False,
    official_greedy: bool = False,
    pipeline: bool = False,
    decode: str = "dynamic",
) -> tuple[list[Episode], RolloutStats]:
    """Run every item as one episode on `pool`; return the episodes in `items` order and timing stats.

    greedy_probability: chance that a policy step takes the greedy action (1.0: fully greedy, 0.0: sampled;
        between: the epsilon-greedy hand-over). Chosen per env and step from the episode's sampling stream.
    generator: where the episodes' sampling streams come from (one seed is drawn from it); default: a seed derived
        from (run_seed, rank, episode_offset). Each episode draws its greedy choices and sampling noise from its own
        stream, so its actions do not depend on which other envs shared its policy calls.
    episode_offset: added to the item index to derive each episode's env seed (keeps seeds unique across iterations).
    record_video_items: indices into `items` whose primary camera frames are kept for a video.
    progress: an object with update(n) (e.g. tqdm), advanced once per finished episode.
    should_stop: a callable; when it returns True the rollout ends early (unfinished episodes get env_error "stopped").
    official_scenes: reset every episode to the official evaluation's scene of its initial state (seeding.OFFICIAL_SCENE)
        instead of a derived seed. For evaluation.
    official_greedy: greedy steps decode as the official code does (VLAPolicy.act). For evaluation: the tokens may lie
        outside the action ids, so no trajectories are kept.
    pipeline: split the workers into two halves and run the policy on one half while the other half's envs step
        (the pool's step_begin / step_end). The same episodes, seeds and actions as without (the sampling streams
        are per episode); only the batching of the policy calls differs.
    decode: standard OpenVLA's decoding steps: "dynamic" (transformers' cache), "static" (a static cache), or
        "graphs" (the static cache with each step a CUDA graph replay; CUDA only). No effect on OpenVLA-OFT.
    """
    rollout = Rollout(policy, pool, items, greedy_probability=greedy_probability, temperature=temperature,
                      run_seed=run_seed, rank=rank, episode_offset=episode_offset, model=model,
                      keep_trajectories=keep_trajectories, record_video_items=record_video_items,
                      use_l1_head=use_l1_head, generator=generator, official_scenes=official_scenes,
                      official_greedy=official_greedy)
    return rollout.collect(progress=progress, should_stop=should_stop, pipeline=pipeline, decode=decode)


def worker_halves(num_workers: int) -> list[list[int]]:
    """Workers [0, n/2) and [n/2, n): the lower half first, so that ended episodes take new items in worker order,
    as in the lockstep loop."""
    middle = (num_workers + 1) // 2
    return [list(range(middle)), list(range(middle, num_workers))]


@dataclass
class _Acted:
    """One policy call for some workers, with what the recording of their step needs (on the CPU)."""

    workers: list[int]
    inputs: PolicyInputs
    env_actions: np.ndarray
    token_ids: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor | None
    greedy: torch.Tensor


class Rollout:
    """One rollout: which worker runs which episode, the episodes' seeds and sampling streams, and the loops that drive
    them (`collect_episodes` documents the arguments). The training loop makes the next iteration's before its update
    and calls `send_first_resets`, so that the env workers reset while the update runs instead of idling."""

    def __init__(self, policy: VLAPolicy, pool, items: list[WorkItem], *, greedy_probability: float = 0.0,
                 temperature: float = 1.0, run_seed: int = 0, rank: int = 0, episode_offset: int = 0, model=None,
                 keep_trajectories: bool = True, record_video_items: set[int] | None = None,
                 use_l1_head: bool = False, generator: torch.Generator | None = None, official_scenes: bool = False,
                 official_greedy: bool = False, keep_tasks: bool | None = None):
        if official_greedy and keep_trajectories:
            raise ValueError("official_greedy decodes over the whole vocabulary (evaluation); its tokens cannot be "
                             "trained on: pass keep_trajectories=False")
        if generator is None:
            self.base_seed = sampling_seed(run_seed, rank, episode_offset)
        else:
            self.base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.policy, self.pool, self.items = policy, pool, items
        self.greedy_probability, self.temperature = greedy_probability, temperature
        self.run_seed, self.rank, self.episode_offset = run_seed, rank, episode_offset
        self.model, self.keep_trajectories = model, keep_trajectories
        self.record_video_items = record_video_items or set()
        self.use_l1_head, self.decoder, self.progress = use_l1_head, None, None
        self.official_scenes, self.official_greedy = official_scenes, official_greedy
        self.tokens_per_action = policy.config.trainer.action_dim
        self.stats = RolloutStats()
        self.episodes = [Episode(item=item, seed=0) for item in items]
        self.streams: dict[int, torch.Generator] = {}  # episode index -> its sampling stream
        self.pending = deque(range(len(items)))
        self.worker_tasks: dict[int, int] = {}  # worker -> the task its env has a simulator for (its last reset's)
        self.episodes_per_task: Counter[int] = Counter()  # episodes given to workers so far, by task
        self.running: dict[int, int] = {}  # worker -> episode index
        self.observations: dict[int, object] = {}  # worker -> latest observation
        self.first_resets = None  # what send_first_resets sent, until collect receives it
        # `next_item`'s rule: keep each worker on its task where a task change rebuilds the env's simulator (the
        # pool's envs say so: LIBERO), else the earliest pending item
        info = getattr(pool, "info", None)
        self.keep_tasks = keep_tasks if keep_tasks is not None else bool(getattr(info, "simulator_per_task", False))

    def send_first_resets(self) -> None:
        """Give every worker its first item and send the resets without waiting for them (pool.reset_begin); the
        pool takes no other call for those workers until `collect`. The episodes are the same as without."""
        requests = self.assign_items(list(range(self.pool.num_workers)))
        if requests:
            self.first_resets = self.pool.reset_begin(requests)

    def collect(self, *, progress=None, should_stop=None, pipeline: bool = False,
                decode: str = "dynamic") -> tuple[list[Episode], RolloutStats]:
        """Run every item as one episode; the episodes in `items` order and timing stats (collect_episodes)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        started = time.perf_counter()
        halves = worker_halves(self.pool.num_workers) if pipeline else [list(range(self.pool.num_workers))]
        if decode != "dynamic":
            self.decoder = self.policy.static_decoder(max(len(half) for half in halves), graphs=decode == "graphs")
        self.progress = progress
        if self.first_resets is not None:
            with self.stats.timing("env"):
                replies = self.pool.reset_end(self.first_resets)
            self.first_resets = None
            self.start_episodes(self.receive_resets(replies))  # a failed reset's worker takes the next item
        else:
            self.start_episodes(list(range(self.pool.num_workers)))
        if pipeline:
            self.pipelined(halves, should_stop)
        else:
            self.lockstep(should_stop)
        self.stats.wall_seconds = time.perf_counter() - started
        return self.episodes, self.stats

    # --- the two loops ------------------------------------------------------------------------------------------

    def lockstep(self, should_stop) -> None:
        """One policy call for every live env, then one batched step of all of them."""
        while self.running:
            if should_stop is not None and should_stop():
                self.stop()
                return
            acted = self.act(sorted(self.running))
            with self.stats.timing("env"):
                replies = self.pool.step(dict(zip(acted.workers, acted.env_actions)))
            with self.stats.timing("record"):
                ended = self.record(acted, replies)
            self.start_episodes(ended)

    def pipelined(self, halves: list[list[int]], should_stop) -> None:
        """Alternate between the halves: collect a half's step, act for it and send its next step, then the other
        half. Each policy call runs while the other half's workers step. A half's ended episodes are reset before
        its act, as in lockstep: the items go to workers in the same order, so the episodes are the same."""
        in_flight: list[tuple[_Acted, object] | None] = [None] * len(halves)
        while self.running:
            for turn, half in enumerate(halves):
                if in_flight[turn] is not None:
                    acted, pending = in_flight[turn]
                    in_flight[turn] = None
                    with self.stats.timing("env"):
                        replies = self.pool.step_end(pending)
                    with self.stats.timing("record"):
                        ended = self.record(acted, replies)
                    self.start_episodes(ended)
                if should_stop is not None and should_stop():
                    for other in in_flight:  # let the steps already sent finish and count, as in lockstep
                        if other is not None:
                            self.record(other[0], self.pool.step_end(other[1]))
                    self.stop()
                    return
                workers = [w for w in half if w in self.running]
                if workers:
                    acted = self.act(workers)
                    with self.stats.timing("send"):
                        in_flight[turn] = (acted, self.pool.step_begin(dict(zip(acted.workers, acted.env_actions))))

    # --- pieces -------------------------------------------------------------------------------------------------

    def start_episodes(self, workers: list[int]) -> None:
        """Reset the given workers to the next pending items, in worker order, and wait for them; a failed reset
        passes its item's turn on (the replacement worker takes the next item)."""
        while requests := self.assign_items(workers):
            with self.stats.timing("env"):
                replies = self.pool.reset(requests)
            workers = self.receive_resets(replies)

    def assign_items(self, workers: list[int]) -> dict[int, ResetRequest]:
        """Give the given workers pending items, in worker order (`next_item`); returns their reset requests."""
        requests = {}
        for worker in workers:
            if not self.pending:
                break
            index = self.next_item(worker)
            episode = self.episodes[index]
            episode.seed = (OFFICIAL_SCENE if self.official_scenes
                            else derive_seed(self.run_seed, self.rank, worker, self.episode_offset + index))
            self.running[worker] = index
            self.streams[index] = torch.Generator().manual_seed(episode_sampling_seed(self.base_seed, index))
            requests[worker] = ResetRequest(episode.item.task_id, episode.item.init_state_id, episode.seed,
                                            record_frames=index in self.record_video_items)
        return requests

    def next_item(self, worker: int) -> int:
        """Where a task change rebuilds the simulator (`keep_tasks`): the earliest pending item of the task this
        worker's env already has a simulator for; if none is left, the earliest of the task given out least so far.
        Elsewhere (the toy task): the earliest pending item. A LIBERO reset to another task builds a new simulator
        (1.3 s with EGL, 2.4 s with OSMesa, against 0.2-0.4 s to reset the same task's): spreading the tasks over
        the workers at the start and keeping each worker on its task avoids most rebuilds. The choice depends only
        on the order in which workers ask, so the pipelined and the lockstep loops still give the same episodes."""
        if not self.keep_tasks:
            index = self.pending[0]
        else:
            task = self.worker_tasks.get(worker)
            index = next((i for i in self.pending if self.items[i].task_id == task), None)
            if index is None:
                fewest = min(self.episodes_per_task[self.items[i].task_id] for i in self.pending)
                index = next(i for i in self.pending if self.episodes_per_task[self.items[i].task_id] == fewest)
        self.pending.remove(index)
        self.worker_tasks[worker] = self.items[index].task_id
        self.episodes_per_task[self.items[index].task_id] += 1
        return index

    def receive_resets(self, replies) -> list[int]:
        """Store the first observations of new episodes; returns the workers whose reset failed (their episodes end
        with the error; the workers are free for the next items)."""
        failed = []
        for worker, reply in replies.items():
            if reply.ok:
                self.observations[worker] = reply.observation
                if self.running[worker] in self.record_video_items:
                    self.episodes[self.running[worker]].frames.append(reply.observation.primary_image)
            else:
                self.finish(worker, reply.env_error)
                failed.append(worker)
        return failed

    def act(self, workers: list[int]) -> _Acted:
        """One batched policy call for these workers' envs, each sampling from its own episode's stream."""
        with self.stats.timing("prepare"):
            inputs = self.policy.prepare([self.observations[w] for w in workers])
        with self.stats.timing("draw"):
            greedy, noise = self.draws(workers)
        with self.stats.timing("policy"):
            result = self.policy.act(inputs, greedy=greedy, temperature=self.temperature, model=self.model,
                                     use_l1_head=self.use_l1_head, noise=noise, decoder=self.decoder,
                                     official_greedy=self.official_greedy)
            # One copy to the host per tensor and call (not one per env): each copy waits for the device.
            acted = _Acted(workers, inputs, result.env_actions, result.token_ids.cpu(), result.log_probs.cpu(),
                           None if result.values is None else result.values.float().cpu(), greedy)
        self.stats.policy_calls += 1
        return acted

    def draws(self, workers: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per env, from its episode's stream: whether this step is greedy, then the step's sampling noise (not
        drawn when every step is greedy: a greedy evaluation has no randomness)."""
        streams = [self.streams[self.running[w]] for w in workers]
        greedy = torch.stack([torch.rand((), generator=s) < self.greedy_probability for s in streams])
        if self.greedy_probability >= 1.0:
            return greedy, None
        return greedy, torch.cat([self.policy.sampling_noise(1, s) for s in streams])

    def record(self, acted: _Acted, replies) -> list[int]:
        """Store one step of each of these workers' episodes; returns the workers whose episode ended."""
        ended = []
        for i, worker in enumerate(acted.workers):
            reply = replies[worker]
            episode = self.episodes[self.running[worker]]
            if not reply.ok:
                self.finish(worker, reply.env_error)
                ended.append(worker)
                continue
            step = reply.result
            self.stats.env_steps += step.steps_executed
            self.stats.worker_step_seconds += reply.env_seconds
            self.stats.worker_steps += 1
            episode.length += step.steps_executed
            if self.keep_trajectories:
                episode.inputs.append(acted.inputs.select(slice(i, i + 1)))
                episode.token_ids.append(acted.token_ids[i])
                episode.log_probs.append(acted.log_probs[i])
                episode.token_masks.append(executed_token_mask(acted.token_ids.shape[1], self.tokens_per_action,
                                                               step.steps_executed))
                episode.values.append(float(acted.values[i]) if acted.values is not None else 0.0)
                episode.rewards.append(float(step.reward))
                episode.greedy.append(bool(acted.greedy[i]))
            if self.running[worker] in self.record_video_items:  # every action's frame, not only the chunk's last
                episode.frames.extend(step.frames if step.frames is not None else [step.observation.primary_image])
            if step.done:
                episode.success = bool(step.success)
                self.finish(worker)
                ended.append(worker)
            else:
                self.observations[worker] = step.observation
        return ended

    def finish(self, worker: int, error: str | None = None) -> None:
        if error is not None:  # a failed worker is replaced by a fresh process: no simulator yet
            self.worker_tasks.pop(worker, None)
        episode = self.episodes[self.running.pop(worker)]
        episode.env_error = episode.env_error or error
        self.observations.pop(worker, None)
        if self.progress is not None:
            self.progress.update(1)

    def stop(self) -> None:
        for worker in list(self.running):
            self.finish(worker, "stopped")
        for index in self.pending:
            self.episodes[index].env_error = "stopped"


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
