"""Shared pieces of the multi-process test scripts: the tiny run config, a fixed global batch, collective counting.

The scripts run under torchrun (2 processes, gloo) or as one plain process (the reference); every rank builds the same
global batch from fixed seeds and keeps its own slice.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.build import build_optimizer
from trainer.dist import Dist
from trainer.engine import Engine, setup_engine
from trainer.envs.base import Observation
from trainer.learner import Learner, Samples
from trainer.train import RunConfig, build_run_policy, objective

GLOBAL_SAMPLES = 8
INSTRUCTIONS = ["move to the red target", "go to the blue one", "reach green", "x"]


def tiny_config(**overrides) -> RunConfig:
    config = RunConfig()
    config.model.source = "tiny"
    config.lora.rank = 4
    config.lora.alpha = 8
    config.lora.include_lm_head = True
    config.algo.name = "grpo"
    config.algo.micro_batch_size = 2  # several micro-batches per rank: exercises no_sync / accumulation boundaries
    config.algo.ppo_epochs = 1
    config.optim.lr = 1e-3
    config.optim.max_grad_norm = 1.0
    config.train.seed = 0
    config.env.suite = "toy"
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


def tiny_engine(config: RunConfig, dist: Dist) -> tuple[Engine, object]:
    """Policy, optimizer and engine set up as train() sets them up; also the LR scheduler."""
    policy = build_run_policy(config, dist)
    optimizer, scheduler = build_optimizer(config.optim, policy, config.train.iterations, config.quant.optimizer_8bit)
    return setup_engine(dist, policy, optimizer, config.optim), scheduler


def run_update(config: RunConfig, engine: Engine, samples: Samples, iteration: int, padding_inputs=None):
    """One training update (the recipe's objective through the Learner), as train() runs it."""
    learner = Learner(engine, epochs=config.algo.ppo_epochs, mini_batches=config.algo.num_mini_batches,
                      micro_batch_size=config.algo.micro_batch_size, seed=config.train.seed)
    loss_fn = functools.partial(objective, config.algo, engine.policy, engine.model,
                                temperature=config.rollout.temperature, bc_phase=False)
    return learner.update(samples, loss_fn, iteration, padding_inputs=padding_inputs)


def random_observation(rng: np.random.Generator, instruction: str) -> Observation:
    return Observation(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       rng.uniform(-1, 1, 8).astype(np.float32), instruction)


def fixed_observations(count: int, seed: int = 99) -> list[Observation]:
    """`count` observations with fixed random images and proprio, the test instructions in turn."""
    rng = np.random.default_rng(seed)
    return [random_observation(rng, INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(count)]


def fixed_samples(policy) -> Samples:
    """GLOBAL_SAMPLES policy steps with fixed images, prompts, action tokens, old log-probs and advantages."""
    rng = np.random.default_rng(1234)
    generator = torch.Generator().manual_seed(1234)
    samples = Samples()
    for i in range(GLOBAL_SAMPLES):
        obs = random_observation(rng, INSTRUCTIONS[i % len(INSTRUCTIONS)])
        inputs = policy.prepare([obs])
        local = torch.randint(0, policy.config.n_action_bins, (policy.base_model.num_action_slots,),
                              generator=generator)
        samples.inputs.append(inputs)
        samples.token_ids.append(policy.action_tokenizer.local_to_token_ids(local))
        samples.old_log_probs.append(-5.55 + 0.3 * torch.randn(policy.base_model.num_action_slots,
                                                              generator=generator))
        samples.token_masks.append(torch.ones(policy.base_model.num_action_slots))
        samples.advantages.append(float(rng.normal()))
        samples.returns.append(0.0)
        samples.old_values.append(0.0)
    return samples


def rank_slice(samples: Samples, split: list[int], rank: int) -> Samples:
    """The rank's contiguous share of the global batch: `split` gives each rank's sample count."""
    start = sum(split[:rank])
    out = Samples()
    for name in ("inputs", "token_ids", "old_log_probs", "token_masks", "advantages", "returns", "old_values"):
        setattr(out, name, getattr(samples, name)[start:start + split[rank]])
    return out


COLLECTIVE_KINDS = ("allgather", "reduce_scatter", "allreduce")  # c10d dispatcher op names contain these


def count_collectives(fn) -> dict[str, int]:
    """Collective calls (c10d dispatcher ops: FSDP2's, DDP's and DeepSpeed's alike) fn() issues on this rank, by kind."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = dict.fromkeys(COLLECTIVE_KINDS, 0)

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            for kind in COLLECTIVE_KINDS:
                if kind in name:
                    counts[kind] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return counts


def count_all_gathers(fn) -> int:
    """Number of all-gather collectives (c10d dispatcher ops: FSDP2's and DeepSpeed's alike) fn() issues on this rank."""
    return count_collectives(fn)["allgather"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max((float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0) for k in a)


def flat_optimizer(state: dict) -> dict[str, torch.Tensor]:
    return {f"{name}/{key}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().float().clone()
            for name, entry in state.get("state", {}).items() for key, v in entry.items()}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)
