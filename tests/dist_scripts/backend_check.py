"""One backend, end to end on the tiny policy: sharding, a fixed update, the NaN guard, a checkpoint round trip and
the collectives of a rollout, through the backend's engine (trainer.engine) as training sets it up. Launched by tests/test_distributed.py under torchrun (2 processes, gloo; the backend
comes from TRAINER_ACCELERATE_CONFIG, none = DDP) or as one plain process (the single-process reference).

    python tests/dist_scripts/backend_check.py --out DIR --split 5,3 [--nan-rank 1]

Every rank writes DIR/rank<r>.json; rank 0 also writes DIR/after_step.safetensors (the trainable weights after the
first update, gathered) and the checkpoint DIR/ckpt/checkpoints/iter-000003.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import (
    GLOBAL_SAMPLES,
    count_all_gathers,
    fixed_samples,
    flat_optimizer,
    max_abs_diff,
    rank_slice,
    run_update,
    tiny_config,
    tiny_engine,
    write_json,
)
from safetensors.torch import save_file

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.dist import Dist, DistConfig
from trainer.engine import Engine
from trainer.envs.inline import InlinePool
from trainer.envs.sharding import WorkItem
from trainer.rollout import Episode, collect_episodes
from trainer.train import TrainState, episode_advantages

# GRPO episodes of one iteration: 3 groups of 4. Group 0 is all successes (dropped by dynamic sampling), group 1 is
# mixed and split over the two ranks (episodes 0-5 on rank 0, 6-11 on rank 1), group 2 has an env error (excluded).
GROUP_REWARDS = [[1, 1, 1, 1], [1, 0, 0, 1], [0, 1, 0, 0]]
ENV_ERROR_EPISODE = 10


def sharding_report(dist: Dist, policy) -> dict:
    """Per-rank parameter storage vs the full model, and how FSDP2 / ZeRO-3 hold the parameters."""
    local_bytes = full_bytes = 0
    dtensors = placements = 0
    zero3_partitioned = 0
    for param in policy.parameters():
        if hasattr(param, "ds_tensor"):  # ZeRO-3: the module parameter is empty, ds_tensor is this rank's partition
            zero3_partitioned += 1
            local_bytes += param.ds_tensor.numel() * param.ds_tensor.element_size()
            full_bytes += param.ds_numel * param.ds_tensor.element_size()
            continue
        if hasattr(param, "to_local"):  # FSDP2 DTensor
            dtensors += 1
            placements += all(type(p).__name__ == "Shard" for p in param.placements)
            local = param.to_local()
            local_bytes += local.numel() * local.element_size()
        else:
            local_bytes += param.numel() * param.element_size()
        full_bytes += param.numel() * param.element_size()
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(m, FSDPModule) for m in policy.modules())
    return {"fsdp_units": units, "local_param_bytes": local_bytes, "full_param_bytes": full_bytes, "num_params": len(list(policy.parameters())),
            "dtensor_params": dtensors, "shard_placed_params": placements, "zero3_partitioned_params": zero3_partitioned}


def poison_local_gradients(engine: Engine) -> None:
    """A NaN in THIS rank's gradient storage only, after the gradient reduction (just before the norm)."""
    policy = engine.policy
    if engine.dist.backend.startswith("deepspeed"):
        optimizer = engine.model.optimizer
        for group in optimizer.averaged_gradients.values():
            for grad in group or []:
                if grad is not None and grad.numel():
                    grad.view(-1)[0] = float("nan")
                    return
        raise RuntimeError("no local DeepSpeed gradient partition to poison")
    for param in policy.parameters():
        if param.requires_grad and param.grad is not None:
            grad = param.grad._local_tensor if hasattr(param.grad, "_local_tensor") else param.grad
            if grad.numel():
                grad.view(-1)[0] = float("nan")
                return
    raise RuntimeError("no local gradient to poison")


def grpo_episodes(samples, rank: int, world: int) -> list[Episode]:
    episodes = []
    for group_id, rewards in enumerate(GROUP_REWARDS):
        for sample_index, reward in enumerate(rewards):
            index = len(episodes)
            steps = 1 + index % 2  # 1 or 2 policy steps
            episodes.append(Episode(
                item=WorkItem(task_id=group_id, init_state_id=0, sample_index=sample_index, group_id=group_id),
                seed=index, inputs=samples.inputs[:steps], token_ids=samples.token_ids[:steps],
                log_probs=samples.old_log_probs[:steps], token_masks=samples.token_masks[:steps],
                values=[0.0] * steps, rewards=[0.0] * steps, greedy=[False] * steps,
                success=bool(reward), length=steps,
                env_error="worker died" if index == ENV_ERROR_EPISODE else None))
    if world == 1:
        return episodes
    half = len(episodes) // 2
    return episodes[:half] if rank == 0 else episodes[half:]


def rollout_in_context(engine: Engine, max_steps: int) -> dict:
    """Toy-task episodes inside Engine.rollout_weights, with the all-gathers counted. Unequal work: rank 0 runs
    3 episodes, the others 1, so the ranks make different numbers of policy calls."""
    dist, policy, model = engine.dist, engine.policy, engine.model
    pool = InlinePool("toy", 2, {"max_steps": max_steps})
    items = [WorkItem(task_id=i % 3, init_state_id=0, sample_index=i, group_id=i)
             for i in range(3 if dist.rank == 0 else 1)]
    result = {}

    def run():
        with engine.rollout_weights():
            episodes, stats = collect_episodes(policy, pool, items, run_seed=5, rank=dist.rank, model=model,
                                               generator=torch.Generator().manual_seed(5 + dist.rank))
        result["policy_calls"] = stats.policy_calls
        result["episodes"] = len(episodes)

    result["all_gathers"] = count_all_gathers(run)
    return result


def forward_score(policy, model, samples) -> float:
    """A fixed no-grad forward over the global batch (the same on every rank): a weights fingerprint."""
    from trainer.models import PolicyInputs

    inputs = PolicyInputs.collate(samples.inputs, policy.config.pad_token_id)
    with torch.no_grad():
        out = policy.evaluate(inputs, torch.stack(samples.token_ids), model=model)
    return float(out.log_probs.double().sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default=None, help="samples per rank, e.g. 5,3 (default: even)")
    parser.add_argument("--nan-rank", type=int, default=1)
    parser.add_argument("--nan-via-loss", action="store_true",
                        help="inject the NaN through the loss (before any reduction) instead of into the reduced "
                             "gradients; for ZeRO offload, whose norms are computed while gradients are reduced")
    parser.add_argument("--foreign-checkpoint", default=None, help="a checkpoint of another run to load at the end")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.set_num_threads(1)

    dist = Dist.create(DistConfig(timeout_minutes=3))  # a hang becomes an error naming the collective, not a wait
    rank, world = dist.rank, dist.world_size
    split = [int(x) for x in args.split.split(",")] if args.split else [GLOBAL_SAMPLES // world] * world
    if world == 1:
        split = [GLOBAL_SAMPLES]
    assert len(split) == world and sum(split) == GLOBAL_SAMPLES, (split, world)
    report: dict = {"rank": rank, "world_size": world, "backend": dist.backend, "split": split, "phases": {}}
    clock = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        report["phases"][name] = round(now - clock[0], 2)
        clock[0] = now

    config = tiny_config()
    engine, scheduler = tiny_engine(config, dist)
    policy, model = engine.policy, engine.model
    report["sharding"] = sharding_report(dist, policy)
    report["model_type"] = type(model).__name__

    everything = fixed_samples(policy)
    local = rank_slice(everything, split, rank)
    state = TrainState()

    # 0. GRPO advantages from global group statistics (a group spans the two ranks)
    grpo_samples, grpo_metrics = episode_advantages(config.algo, grpo_episodes(everything, rank, world), dist,
                                                    bc_phase=False)
    report["grpo"] = {"advantages": grpo_samples.advantages, "metrics": grpo_metrics,
                      "all_advantages": dist.gather_objects(grpo_samples.advantages)}

    phase("setup")
    # 1. one update on the fixed batch
    policy.train()
    update = run_update(config, engine, local, iteration=0, padding_inputs=everything.inputs[0])
    state.count_skips(update.skip_reasons)
    metrics = update.metrics
    report["update"] = {"local_loss": metrics.get("train/loss", 0.0), "grad_norm": metrics["train/grad_norm"],
                        "global_loss": dist.sum(metrics.get("train/loss", 0.0)) / world,
                        "step_skipped": metrics["train/step_skipped"], "samples": metrics["train/samples"]}
    after_step = engine.trainable_state()
    report["after_step_checksum"] = float(sum(t.double().abs().sum() for t in after_step.values()))
    if dist.is_main:
        save_file(after_step, str(out / "after_step.safetensors"))

    phase("update")
    # 2. a NaN in one rank's gradients: the step is skipped everywhere and nothing moves
    optimizer_before = flat_optimizer(engine.optimizer_state())
    nan_rank = min(args.nan_rank, world - 1)
    plain_step = engine.step

    def poisoned_step():  # the gradients are reduced; the step starts with their norm
        if dist.rank == nan_rank:
            poison_local_gradients(engine)
        return plain_step()

    plain_backward = engine.backward

    def poisoned_backward(loss, last):
        if dist.rank == nan_rank:
            loss = loss * float("nan")
        return plain_backward(loss, last)

    if args.nan_via_loss:
        engine.backward = poisoned_backward
    else:
        engine.step = poisoned_step
    skipped_before = getattr(model, "skipped_steps", None)
    update = run_update(config, engine, local, iteration=1, padding_inputs=everything.inputs[0])
    state.count_skips(update.skip_reasons)
    metrics = update.metrics
    engine.step, engine.backward = plain_step, plain_backward
    after_skip = engine.trainable_state()
    optimizer_after = flat_optimizer(engine.optimizer_state())
    report["nan_step"] = {
        "poisoned_here": rank == nan_rank, "local_grad_norm": metrics["train/grad_norm"],
        "step_skipped": metrics["train/step_skipped"], "skipped_steps": state.skipped_steps,
        "skip_reasons": dict(state.skip_reasons), "weights_max_change": max_abs_diff(after_step, after_skip),
        "optimizer_max_change": max_abs_diff(optimizer_before, optimizer_after) if optimizer_before else None,
        "optimizer_entries": len(optimizer_before),
        "deepspeed_skipped_steps": (None if skipped_before is None else model.skipped_steps - skipped_before),
    }

    phase("nan_step")
    # 3. the next step is a normal one (the skip left no NaN behind)
    update = run_update(config, engine, local, iteration=2, padding_inputs=everything.inputs[0])
    state.count_skips(update.skip_reasons)
    metrics = update.metrics
    after_next = engine.trainable_state()
    report["next_step"] = {"grad_norm": metrics["train/grad_norm"], "step_skipped": metrics["train/step_skipped"],
                           "weights_max_change": max_abs_diff(after_skip, after_next),
                           "all_finite": all(bool(torch.isfinite(t).all()) for t in after_next.values())}

    phase("next_step")
    # 4. checkpoint, move on, load it back: weights, optimizer state and outputs are restored exactly
    checkpoint_root = out / "ckpt"
    saved_optimizer = flat_optimizer(engine.optimizer_state())
    score_at_save = forward_score(policy, model, everything)
    path = save_checkpoint(checkpoint_root, engine, scheduler, {**vars(state), "iteration": 3})
    state.count_skips(run_update(config, engine, local, iteration=3, padding_inputs=everything.inputs[0]).skip_reasons)
    moved = engine.trainable_state()
    load_checkpoint(path, engine, scheduler)
    loaded = engine.trainable_state()
    loaded_optimizer = flat_optimizer(engine.optimizer_state())
    if dist.is_main:  # references for the resume on another world size
        save_file(after_next, str(out / "at_save.safetensors"))
        save_file(saved_optimizer, str(out / "at_save_optimizer.safetensors"))
        save_file(moved, str(out / "moved.safetensors"))
    report["checkpoint"] = {
        "path": str(path), "files": sorted(p.name for p in path.iterdir()) if dist.is_main else [],
        "moved_before_load": max_abs_diff(after_next, moved),
        "weights_max_diff_after_load": max_abs_diff(after_next, loaded),
        "optimizer_max_diff_after_load": max_abs_diff(saved_optimizer, loaded_optimizer) if saved_optimizer else None,
        "optimizer_entries": len(saved_optimizer),
        "score_at_save": score_at_save, "score_after_load": forward_score(policy, model, everything),
    }

    phase("checkpoint")
    # 5. rollouts: all-gathers per forward without the gather context, once per phase with it
    policy.eval()
    inputs = everything.inputs[0]
    report["gathers_without_context"] = {
        str(n): count_all_gathers(lambda n=n: [policy.act(inputs, model=model) for _ in range(n)]) for n in (1, 2)}
    phase("acts_without_context")
    report["gathers_with_context"] = {str(steps): rollout_in_context(engine, steps) for steps in (2, 6)}
    phase("rollouts")
    report["score_after_rollout"] = forward_score(policy, model, everything)  # the weights are resharded and intact
    if args.foreign_checkpoint:  # e.g. a single process's checkpoint into this backend
        load_checkpoint(Path(args.foreign_checkpoint), engine, scheduler)
        foreign = engine.trainable_state()
        foreign_optimizer = flat_optimizer(engine.optimizer_state())
        if dist.is_main:
            save_file(foreign, str(out / "foreign_loaded.safetensors"))
            save_file(foreign_optimizer, str(out / "foreign_loaded_optimizer.safetensors"))
        report["foreign_score"] = forward_score(policy, model, everything)
    dist.barrier()
    report["seconds"] = time.perf_counter() - started
    write_json(out / f"rank{rank}.json", report)
    dist.close()


if __name__ == "__main__":
    main()
