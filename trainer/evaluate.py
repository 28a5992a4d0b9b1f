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

from trainer.envs.sharding import WorkItem, shard_work_items
from trainer.rollout import collect_episodes, write_video


def protocol_items(task_ids: list[int], trials_per_task: int, init_states_per_task: list[int]) -> list[WorkItem]:
    """Trial k of a task starts from the task's initial state k (cycled when a task has fewer states than trials)."""
    items = []
    for task_id in task_ids:
        count = init_states_per_task[task_id]
        for trial in range(trials_per_task):
            items.append(WorkItem(task_id=task_id, init_state_id=trial % count, sample_index=0, group_id=len(items)))
    return items


@dataclass
class EvalReport:
    mode: str
    per_task: dict[int, tuple[int, int]] = field(default_factory=dict)  # task -> (successes, valid trials)
    env_errors: int = 0
    instructions: dict[int, str] = field(default_factory=dict)

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
                     f"({self.mode}; env errors excluded: {self.env_errors})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"mode": self.mode, "success_rate": self.success_rate, "env_errors": self.env_errors,
                "per_task": {str(t): {"successes": s, "trials": n, "success_rate": s / n if n else None,
                                      "instruction": self.instructions.get(t, "")}
                             for t, (s, n) in sorted(self.per_task.items())}}


def evaluate(policy, pool, items: list[WorkItem], dist, *, greedy: bool, temperature: float = 1.0, seed: int = 7,
             model=None, use_l1_head: bool = False, video_dir: Path | None = None, videos: int = 0,
             stop=None) -> EvalReport:
    """Run this rank's share of `items`; the report holds the global (all-rank) counts."""
    local = shard_work_items(items, dist.rank, dist.world_size)
    first = items.index(local[0]) if local else 0
    record = set(range(videos)) if video_dir is not None and dist.is_main else set()
    was_training = policy.training
    policy.eval()
    episodes, _ = collect_episodes(
        policy, pool, local, greedy_probability=1.0 if greedy else 0.0, temperature=temperature, run_seed=seed,
        rank=dist.rank, episode_offset=first, model=model, keep_trajectories=False, record_video_items=record,
        use_l1_head=use_l1_head and greedy, generator=torch.Generator().manual_seed(seed + 104729 * dist.rank),
        should_stop=stop)
    policy.train(was_training)
    counts = defaultdict(float)
    for episode in episodes:
        if episode.env_error is None:
            counts[f"{episode.item.task_id}/success"] += episode.success
            counts[f"{episode.item.task_id}/trials"] += 1
        else:
            counts["env_errors"] += 1
    keys = sorted({f"{item.task_id}/{kind}" for item in items for kind in ("success", "trials")} | {"env_errors"})
    totals = dist.sum_metrics({k: counts.get(k, 0.0) for k in keys})
    report = EvalReport(mode="greedy" if greedy else f"sampled (T={temperature})", env_errors=int(totals["env_errors"]))
    for task in sorted({item.task_id for item in items}):
        report.per_task[task] = (int(totals[f"{task}/success"]), int(totals[f"{task}/trials"]))
        report.instructions[task] = pool.info.instructions[task]
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
        for index in sorted(record):
            episode = episodes[index]
            if episode.frames:
                name = f"task{episode.item.task_id}_init{episode.item.init_state_id}_{'success' if episode.success else 'failure'}.mp4"
                write_video(episode.frames, video_dir / name, rotate_180=pool.info.image_pipeline == "libero")
    return report
