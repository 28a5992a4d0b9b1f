"""Builders the recipe, the commands and the benchmark share: the policy, its optimizer, this rank's env workers,
and the sections of the run config that describe them (model, quant, env).

    policy = build_policy(config.model, config.lora, config.quant, config.env, dist, value_head=..., seed=...)
    optimizer, scheduler = build_optimizer(config.optim, policy, iterations=config.train.iterations)
    pool = make_env_pool(config.env, dist)
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import Choice, check
from trainer.dist import Dist
from trainer.engine import OptimConfig, Scheduler
from trainer.envs import LIBERO_SUITES, SUITES
from trainer.envs.inline import InlinePool
from trainer.envs.pool import EnvPool
from trainer.envs.render import choose_render_env, detect_gpu_count
from trainer.envs.toy import toy_observations
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer, unbias_action_rows
from trainer.models.lora import QUANT_MODES, LoraSettings, apply_lora, check_quantization, int8_optimizer, quantize_int8
from trainer.models.memory import choose_gradient_checkpointing, free_device_bytes, update_memory
from trainer.models.openvla import compile_blocks_for_training

# --- config sections -------------------------------------------------------------------------------------------------


class Family(Choice):
    OPENVLA = "openvla"
    OFT = "oft"


class Dtype(Choice):
    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


QuantMode = Choice("QuantMode", {mode.upper(): mode for mode in QUANT_MODES}, module=__name__)
Suite = Choice("Suite", {suite.upper(): suite for suite in SUITES}, module=__name__)


class RenderBackend(Choice):
    EGL = "egl"
    OSMESA = "osmesa"


@dataclass
class ModelConfig:
    """Which model to load and how to run it."""

    source: str = "tiny"
    """"tiny" / "tiny-oft" (random init, seeded by train.seed), "random:<preset>" (full-size random weights, for
    benchmarks), or a local checkpoint directory (config.json + safetensors, OpenVLA layout)."""
    family: Family | None = None
    """Force "oft" for released OpenVLA-OFT directories without OFT's head files (their config.json does not say so;
    directories with the action_head / proprio_projector files load as OFT by themselves); None: from the files."""
    dtype: Dtype = Dtype.AUTO
    """Weights' dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"."""
    gradient_checkpointing: bool | str = "auto"
    """Recompute activations in the backward instead of keeping them (less memory, about a third more compute):
    true, false, or "auto" (recompute only when the update without it does not fit the free GPU memory, the smallest
    over ranks; trainer/models/memory.py estimates it; no recompute on CPU runs)."""
    use_l1_head_for_eval: bool | None = None
    """OFT greedy evaluation: true = the L1 regression head, false = the action tokens, null = as the checkpoint says
    (the L1 head of a released OFT checkpoint, as the official LIBERO evaluation; the tokens of a policy trained here).
    The evaluation report names the path used."""
    num_images: int | None = None
    """OFT camera views of a released OFT directory (its config.json does not say): null = 2 when the directory has
    OFT's action_head / proprio_projector files (the OFT LIBERO release), else 1 (SimpleVLA-RL, RLinf)."""
    oft_stop_token: bool | None = None
    """OFT: </s> after the action slots (null: as the checkpoint says, else true, as OpenVLA-OFT); false for
    checkpoints trained with RLinf's OFT port."""
    compile_blocks: bool | str = "auto"
    """torch.compile every ViT block and language-model layer for the update's forward and backward: fused kernels,
    about a third fewer launches; measured 1.41-1.42x update throughput on an H200 (docs/benchmarks.md). The first
    updates pay the compilation (10-20 s at full size, and recompiles for new prompt lengths in the next iteration or
    two). Rollouts and evaluation run the blocks eagerly, unchanged; a block that fails to compile runs eagerly.
    true, false, or "auto": on for a GPU run with one process, DDP or FSDP2 and a bf16/fp32 base, else off (FSDP2:
    the same numbers and collectives on CPU ranks; update 16.5-17.9 s per OFT iteration against 21.0-23.2 s eager on
    2 H200s); refused under DeepSpeed (its hooks inside the blocks are untried) and with an int8 base."""
    tiny_unbiased_head: bool = False
    """Tiny presets on the toy task only: take out of the action-token rows the hidden-state directions that every toy
    input shares, so that the random policy prefers no action whatever the seed (off: seeds 1 and 2 start with dx
    tilted to one side for every instruction). An experiment, off by default: on GRPO it took seed 1 to the bar and
    seed 2 to two tasks, but seed 0 learned less (docs/learning.md, "Seeds")."""

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.use_l1_head_for_eval and not (self.source.endswith("oft") or self.family == Family.OFT):
            found.append("use_l1_head_for_eval needs an OpenVLA-OFT model (model.source *-oft or model.family: oft)")
        check(found, self.num_images is None or self.num_images >= 1, "num_images", self.num_images, ">= 1 or null")
        check(found, self.gradient_checkpointing in (True, False, "auto"), "gradient_checkpointing",
              self.gradient_checkpointing, "true, false or auto")
        check(found, self.compile_blocks in (True, False, "auto"), "compile_blocks", self.compile_blocks,
              "true, false or auto")
        return found


@dataclass
class QuantConfig:
    """An LLM.int8 base and an 8-bit optimizer, for memory-limited GPUs."""

    mode: QuantMode = QuantMode.NONE
    """"none" or "int8": the language model's linear layers in LLM.int8 (bitsandbytes; the towers stay bf16).
    One GPU or DDP only: FSDP and ZeRO-3 cannot shard int8 weights and are refused with the working alternatives."""
    optimizer_8bit: bool = False
    """bitsandbytes' 8-bit AdamW instead of torch's AdamW (optimizer state in 8 bits)."""


@dataclass
class EnvConfig:
    """The benchmark, which of its tasks and initial states are trained on, and this rank's env workers."""

    suite: Suite = Suite.TOY
    """"toy" (built in, fast, for demos and tests), a LIBERO suite (libero_spatial, libero_object, libero_goal,
    libero_10, libero_90) or "libero_standin" (LIBERO's shapes and step cost without a simulator: GPU benchmarks)."""
    task_ids: list[int] | None = None
    """Tasks to train on (default: all tasks of the suite)."""
    num_init_states: int = 50
    """Initial states used per task (the first N of the benchmark's 50)."""
    groups_per_iteration: int = 32
    """(task, initial state) groups rolled out per iteration, over all ranks; each group is rollout.num_generations
    episodes."""
    num_workers: int = 8
    """Env worker processes per rank (LIBERO: about 2.5 GB of RAM each)."""
    step_timeout_s: float = 120.0
    """A worker that does not answer a reset or a step within this is killed and replaced; its episode is marked as
    an env error (never a training signal)."""
    max_steps: int | None = None
    """Override the suite's step limit (LIBERO: 220/280/300/520/400)."""
    render_backend: RenderBackend | None = None
    """Force "egl" or "osmesa" (default: EGL on GPU hosts, OSMesa on CPU hosts)."""
    unnorm_key: str | None = None
    """norm_stats key for un-normalising actions (default: the suite name, then <suite>_no_noops)."""
    preprocess_in_workers: bool = True
    """Run the policy's image pipeline (resize, crop, normalise) in the env worker processes, in parallel, so that the
    trainer process only stacks tensors (subprocess env pools only; the same inputs as in the trainer)."""

    def problems(self) -> list[str]:
        found: list[str] = []
        for name in ("groups_per_iteration", "num_workers", "num_init_states"):
            check(found, getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        check(found, self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, ">= 1 or null")
        check(found, self.step_timeout_s > 0, "step_timeout_s", self.step_timeout_s, "> 0")
        check(found, self.task_ids is None or all(i >= 0 for i in self.task_ids), "task_ids", self.task_ids,
              "non-negative task indices")
        return found


# model.compile_blocks: where the blocks' forwards can be compiled (FSDP2's hooks stay outside the compiled forward:
# the same numbers and collectives on 2 CPU ranks, tests/test_update_comms.py); "auto" turns it on on every one of
# them, each measured faster (FSDP2 on 2 H200s, OFT end to end: update 16.5 / 17.9 s per iteration compiled against
# 21.0-23.2 s eager)
COMPILING_BACKENDS = ("single", "ddp", "fsdp")


# --- builders --------------------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def env_settings(env: EnvConfig) -> EnvSettings:
    if env.suite == Suite.TOY:
        return EnvSettings(image_pipeline="none", binarize_gripper=False, unnorm_key=env.unnorm_key or "toy",
                           official_decode=False)
    # LIBERO and its benchmark stand-in: the LIBERO image pipeline and gripper convention
    return EnvSettings(image_pipeline="libero", binarize_gripper=True, unnorm_key=env.unnorm_key or str(env.suite))


def compute_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    if model.dtype == Dtype.BF16 or (model.dtype == Dtype.AUTO and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_policy(model: ModelConfig, lora: LoraSettings, quant: QuantConfig, env: EnvConfig, dist: Dist, *,
                 value_head: bool, seed: int, micro_batch_size: int = 64) -> VLAPolicy:
    """Model (tiny preset or local checkpoint) -> optional int8 base -> LoRA -> policy with optional value head.
    `micro_batch_size`: the update's, for model.gradient_checkpointing "auto"."""
    check_quantization(quant.mode, dist.backend)
    compiles = compiles_blocks(model.compile_blocks, dist, quant)
    vla, tokenizer = load_model_and_tokenizer(model.source, seed=seed, dtype=compute_dtype(model, dist.device),
                                              family=model.family, device=dist.device, num_images=model.num_images,
                                              stop_token=model.oft_stop_token)
    if quant.mode == QuantMode.INT8:
        quantize_int8(vla, dist.device)
    if recomputes_activations(model.gradient_checkpointing, vla, lora, dist, micro_batch_size):
        vla.gradient_checkpointing_enable()
    if lora.enabled:
        vla = apply_lora(vla, lora)
    policy = VLAPolicy(vla, tokenizer, env_settings(env), value_head=value_head)
    if compiles:
        compile_blocks_for_training(policy.base_model)
    if model.tiny_unbiased_head:
        unbias_action_rows(policy, toy_observations())
    if policy.value_head is not None:
        policy.value_head.to(torch.float32)
    return policy.to(dist.device)


def compiles_blocks(setting: bool | str, dist: Dist, quant: QuantConfig) -> bool:
    """model.compile_blocks: "auto" compiles on a GPU where it is supported; true where it is not is refused."""
    if setting == "auto":
        return (dist.backend in COMPILING_BACKENDS and quant.mode != QuantMode.INT8
                and dist.device.type == "cuda")
    if setting and dist.backend not in COMPILING_BACKENDS:
        raise ValueError(f"model.compile_blocks works with one process, DDP or FSDP2, not {dist.backend}: set "
                         "model.compile_blocks false (or auto)")
    if setting and quant.mode == QuantMode.INT8:
        raise ValueError("model.compile_blocks with an int8 base (quant.mode int8) is untried: set one of them off")
    return bool(setting)


def recomputes_activations(setting: bool | str, vla, lora: LoraSettings, dist: Dist, micro_batch_size: int) -> bool:
    """model.gradient_checkpointing, with "auto" decided from the free GPU memory (the smallest over ranks, so that
    every rank decides the same) and the update's estimated memory (trainer/models/memory.py)."""
    if setting != "auto":
        return bool(setting)
    free = free_device_bytes(dist.device)
    free = None if free is None else int(-dist.max(-float(free)))
    memory = update_memory(vla, micro_batch_size, lora_rank=lora.rank,
                           lora_on_towers=lora.enabled and lora.target_modules != "llm-linear")
    return choose_gradient_checkpointing(setting, free, memory)


def build_optimizer(optim: OptimConfig, policy: VLAPolicy, iterations: int, optimizer_8bit: bool = False):
    """AdamW over the trainable parameters (the value head in a group of its own, at optim.value_lr) and the
    learning-rate schedule, stepped once per iteration."""
    value_params = [p for n, p in policy.named_parameters() if p.requires_grad and n.startswith("value_head")]
    policy_params = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head")]
    if not policy_params:
        raise ValueError("nothing to train: enable LoRA (lora.enabled) or a trainable head")
    groups = [{"params": policy_params, "lr": optim.lr}]
    if value_params:
        groups.append({"params": value_params, "lr": optim.value_lr})
    if optimizer_8bit:
        optimizer = int8_optimizer(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)

    def lr_scale(step: int) -> float:
        warmup = optim.warmup_iterations
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.scheduler == Scheduler.COSINE:
            progress = (step - warmup) / max(iterations - warmup, 1)
            cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)


def make_env_pool(env: EnvConfig, dist: Dist, num_workers: int | None = None, policy: VLAPolicy | None = None):
    """This rank's env workers: subprocesses (crash-isolated) for LIBERO, in-process envs for the toy task. With
    `policy` and env.preprocess_in_workers, the subprocess workers run its image pipeline."""
    num_workers = num_workers or env.num_workers
    transform = policy.worker_transform() if policy is not None and env.preprocess_in_workers else None
    env_kwargs = {} if env.max_steps is None else {"max_steps": env.max_steps}
    if env.suite == Suite.TOY:
        return InlinePool(str(env.suite), num_workers, env_kwargs)
    render_env = {}
    if env.suite in LIBERO_SUITES:
        render_env = choose_render_env(os.environ, detect_gpu_count(), env.render_backend, dist.local_rank)
    pool = EnvPool(str(env.suite), num_workers, env_kwargs, env_vars=render_env,
                   step_timeout_s=env.step_timeout_s, reset_timeout_s=env.step_timeout_s,
                   observation_transform=transform)
    if dist.device.type == "cuda":
        leave_cores_to_env_workers(num_workers)
    return pool


def leave_cores_to_env_workers(num_workers: int) -> int:
    """On a GPU run with subprocess env workers, cap this process's torch intra-op threads at the cores the workers
    leave free (at least one); returns the cap. Its CPU work is small (stacking inputs, sampling noise), and a
    parallel op waits for every one of its threads: next to workers on every core each such op waited for
    descheduled threads (17 ms per noise draw on the H200 host, docs/benchmarks.md 2026-12-01). DeepSpeed's CPU
    Adam (the offload configs) runs on these threads too: give such runs cores beyond their env workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(torch.get_num_threads(), cores - num_workers))
    torch.set_num_threads(threads)
    return threads


def init_states_per_task(env: EnvConfig, pool) -> list[int]:
    """How many initial states of each task are trained on (0 for tasks left out)."""
    task_ids = env.task_ids if env.task_ids is not None else range(pool.info.num_tasks)
    bad = [t for t in task_ids if not 0 <= t < pool.info.num_tasks]
    if bad:
        raise ValueError(f"env.task_ids {bad} are not tasks of {env.suite} (0..{pool.info.num_tasks - 1})")
    return [min(n, env.num_init_states) if t in set(task_ids) else 0
            for t, n in enumerate(pool.info.num_init_states)]


__all__ = ["Dtype", "EnvConfig", "Family", "ModelConfig", "QuantConfig", "QuantMode", "RenderBackend", "Suite",
           "build_optimizer", "build_policy", "compute_dtype", "env_settings", "init_states_per_task",
           "leave_cores_to_env_workers", "make_env_pool", "recomputes_activations", "seed_everything"]
