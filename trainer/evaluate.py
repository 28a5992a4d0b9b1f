"""Evaluation with the LIBERO protocol: N trials per task on the benchmark's initial states 0..N-1, a per-task table,
JSON, and optional videos. The same function evaluates inside training (greedy and sampled) and from the CLI
(`python -m trainer eval`, in cli.py):

    python -m trainer eval --model.source /ckpts/openvla-7b-finetuned-libero-spatial --env.suite libero_spatial
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.envs import TOY_SUITES
from trainer.envs.sharding import WorkItem, shard_work_items
from trainer.rollout import collect_episodes, write_video


def protocol_items(task_ids: list[int], trials_per_task: int, init_states_per_task: list[int]) -> list[WorkItem]:
    """Trial k of a task starts from the task's initial state k (cycled when a task has fewer states than trials), in
    the official evaluation's scene of that state (evaluate() asks the envs for it)."""
    items = []
    for task_id in task_ids:
        count = init_states_per_task[task_id]
        for trial in range(trials_per_task):
            items.append(WorkItem(task_id=task_id, init_state_id=trial % count, sample_index=0, group_id=len(items)))
    return items


STOPPED = "stopped"  # the rollout's env_error for episodes a stop request cut short (they never ran to an end)


@dataclass
class EvalReport:
    """Counts as the official evaluation counts: an episode that crashed or hung is a failure (the official loop
    catches the exception and moves on with success False); the env errors are shown beside the rate. Episodes a stop
    request cut short are not counted (they were not run)."""

    mode: str
    per_task: dict[int, tuple[int, int]] = field(default_factory=dict)  # task -> (successes, trials counted)
    env_errors: int = 0  # crashed or hung episodes, counted as failures
    errors_per_task: dict[int, int] = field(default_factory=dict)
    stopped: int = 0
    instructions: dict[int, str] = field(default_factory=dict)
    actions: str = ""  # how actions were decoded (VLAPolicy.describe_actions)
    norm_stats: str = ""  # which statistics un-normalised them (VLAPolicy.describe_norm_stats)
    scenes: str = "the official scene of each initial state (env.seed(0), then one reset per earlier trial)"

    @property
    def success_rate(self) -> float:
        successes = sum(s for s, _ in self.per_task.values())
        trials = sum(n for _, n in self.per_task.values())
        return successes / trials if trials else float("nan")

    def table(self) -> str:
        lines = [f"{'task':>4}  {'success':>8}  {'trials':>6}  instruction", "-" * 72]
        for task, (successes, trials) in sorted(self.per_task.items()):
            rate = successes / trials if trials else float("nan")
            lines.append(f"{task:>4}  {rate:>8.3f}  {trials:>6}  {self.instructions.get(task, '')}")
        lines.append("-" * 72)
        lines.append(f"{'all':>4}  {self.success_rate:>8.3f}  {sum(n for _, n in self.per_task.values()):>6}  "
                     f"({self.mode}; env errors: {self.env_errors}, counted as failures)")
        failing = {t: n for t, n in sorted(self.errors_per_task.items()) if n}
        if failing:
            lines.append("      env errors per task: " + ", ".join(f"task {t}: {n}" for t, n in failing.items()))
        if self.stopped:
            lines.append(f"      {self.stopped} episode(s) not run: a stop was requested")
        lines.append(f"actions: {self.actions}")
        lines.append(f"norm stats: {self.norm_stats}")
        lines.append(f"scenes: {self.scenes}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"mode": self.mode, "success_rate": self.success_rate, "env_errors": self.env_errors,
                "env_errors_count_as_failures": True, "stopped": self.stopped, "actions": self.actions,
                "norm_stats": self.norm_stats, "scenes": self.scenes,
                "per_task": {str(t): {"successes": s, "trials": n, "env_errors": self.errors_per_task.get(t, 0),
                                      "success_rate": s / n if n else None,
                                      "instruction": self.instructions.get(t, "")}
                             for t, (s, n) in sorted(self.per_task.items())}}


def evaluate(policy, pool, items: list[WorkItem], dist, *, greedy: bool, temperature: float = 1.0, seed: int = 7,
             model=None, use_l1_head: bool | None = None, video_dir: Path | None = None, videos: int = 0,
             stop=None, pipeline: bool = False, decode: str = "dynamic") -> EvalReport:
    """Run this rank's share of `items`; the report holds the global (all-rank) counts.

    The official protocol: every episode in the official scene of its initial state; greedy actions decoded as the
    official code decodes them. `use_l1_head` (OFT, greedy only): None decodes as the policy says
    (`VLAPolicy.eval_uses_l1_head`: the L1 head of a released OFT checkpoint, the tokens of a policy trained here).
    `pipeline` and `decode`: collect_episodes' speed options.

    The built-in toy task has no official protocol: its episodes keep derived seeds, and greedy steps take the argmax
    over the action ids (the tiny presets' other vocabulary rows are random stand-ins that no training touches, so a
    whole-vocabulary argmax would measure them, not the policy).
    """
    official = pool.info.suite not in TOY_SUITES
    local = shard_work_items(items, dist.rank, dist.world_size)
    first = items.index(local[0]) if local else 0
    record = set(range(videos)) if video_dir is not None and dist.is_main else set()
    l1_head = greedy and (policy.eval_uses_l1_head if use_l1_head is None else use_l1_head)
    was_training = policy.training
    policy.eval()
    episodes, _ = collect_episodes(
        policy, pool, local, greedy_probability=1.0 if greedy else 0.0, temperature=temperature, run_seed=seed,
        rank=dist.rank, episode_offset=first, model=model, keep_trajectories=False, record_video_items=record,
        use_l1_head=l1_head, generator=torch.Generator().manual_seed(seed + 104729 * dist.rank),
        should_stop=stop, official_scenes=official, official_greedy=greedy and official, pipeline=pipeline,
        decode=decode)
    policy.train(was_training)
    counts = count_episodes(episodes)
    keys = sorted({f"{item.task_id}/{kind}" for item in items for kind in ("success", "trials", "errors")}
                  | {"stopped"})
    totals = dist.sum_metrics({k: counts.get(k, 0.0) for k in keys})
    report = EvalReport(mode="greedy" if greedy else f"sampled (T={temperature})", stopped=int(totals["stopped"]),
                        actions=policy.describe_actions(greedy, l1_head, temperature, official=official),
                        norm_stats=policy.describe_norm_stats())
    for task in sorted({item.task_id for item in items}):
        report.per_task[task] = (int(totals[f"{task}/success"]), int(totals[f"{task}/trials"]))
        report.errors_per_task[task] = int(totals[f"{task}/errors"])
        report.instructions[task] = pool.info.instructions[task]
    report.env_errors = sum(report.errors_per_task.values())
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
        for index in sorted(record):
            episode = episodes[index]
            if episode.frames:
                name = f"task{episode.item.task_id}_init{episode.item.init_state_id}_{'success' if episode.success else 'failure'}.mp4"
                write_video(episode.frames, video_dir / name, rotate_180=pool.info.image_pipeline == "libero")
    return report


def count_episodes(episodes) -> dict[str, float]:
    """Per task: successes, trials counted (an env error is a failed trial) and env errors; episodes not run."""
    counts = defaultdict(float)
    for episode in episodes:
        if episode.env_error == STOPPED:
            counts["stopped"] += 1
            continue
        task = episode.item.task_id
        counts[f"{task}/trials"] += 1
        counts[f"{task}/success"] += float(episode.success and episode.env_error is None)
        counts[f"{task}/errors"] += float(episode.env_error is not None)
    return counts

