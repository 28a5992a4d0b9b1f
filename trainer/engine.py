"""One engine per backend: the policy, the model as the backend runs it, and the optimizer, with the few operations
the training loop needs from them.

    engine = setup_engine(dist, policy, optimizer, config.optim, merge_lora=config.rollout.merge_lora)
    with engine.accumulating(last):        # a micro-batch; gradients are reduced in the last one's backward
        engine.backward(loss, last)
    outcome = engine.step()                 # global grad norm -> agreed guard -> clip -> step, or skip on every rank
    with engine.rollout_weights():          # full weights for a rollout or evaluation (gathered once / LoRA merged)
        ...
    engine.trainable_state(), engine.optimizer_state()   # full tensors keyed by parameter name, for checkpoints

    SingleEngine     one process
    DDPEngine        replicas (accelerate's DDP); gradient reduction waits for the last micro-batch
    FSDPEngine       FSDP2 through accelerate; parameters, gradients and optimizer state are DTensor shards
    DeepSpeedEngine  ZeRO-2 / ZeRO-3; DeepSpeed's engine is driven directly so that the guard decides before its step

`engine.policy` is the module as built (its parameter names are the checkpoint's); `engine.model` is what the
backend wrapped (DDP / FSDP module / DeepSpeed engine): forwards that train go through it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from trainer.config import Choice, check
from trainer.dist import Dist
from trainer.models.memory import free_device_bytes, merge_fits


class Scheduler(Choice):
    CONSTANT = "constant"
    COSINE = "cosine"


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or 8-bit AdamW with quant.optimizer_8bit), its schedule, and the gradient guard."""

    lr: float = 5e-5
    """Learning rate of the policy's trainable parameters (LoRA adapters, fully trained heads)."""
    value_lr: float = 1e-4
    """Learning rate of the value head (PPO only)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (over all ranks) to this before each step."""
    skip_factor: float = 1000.0
    """Skip the step, on every rank, when the global grad norm exceeds skip_factor × max_grad_norm (or is not finite):
    gradients are dropped, weights and optimizer state stay as they were, the skip is counted with its reason."""
    warn_factor: float = 100.0
    """Log `guard/grad_norm_warning` when a step is taken with a norm above warn_factor × max_grad_norm."""
    scheduler: Scheduler = Scheduler.CONSTANT
    """Learning-rate schedule after the warm-up, stepped once per iteration: "constant" or "cosine" (to 0 at the last
    iteration)."""
    warmup_iterations: int = 0
    """Linear warm-up: iteration i < warmup_iterations uses lr × (i + 1) / (warmup_iterations + 1)."""
    min_lr_ratio: float = 0.0
    """"cosine" only: decay to lr × min_lr_ratio at the last iteration instead of to 0 (transformers' min_lr_rate), so
    that the last iterations still learn what they find."""

    def problems(self) -> list[str]:
        found: list[str] = []
        check(found, self.lr > 0, "lr", self.lr, "> 0")
        check(found, self.value_lr > 0, "value_lr", self.value_lr, "> 0")
        check(found, self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(found, self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        check(found, self.skip_factor >= 1, "skip_factor", self.skip_factor, ">= 1")
        check(found, self.warn_factor > 0, "warn_factor", self.warn_factor, "> 0")
        check(found, self.warmup_iterations >= 0, "warmup_iterations", self.warmup_iterations, ">= 0")
        check(found, 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        return found


MERGING_BACKENDS = ("single", "ddp", "fsdp")  # where the rollout acts on whole parameters (FSDP2: gathered once)


def merges_lora_for_rollout(merge_lora: bool | str, backend: str, policy=None, free_bytes: int | None = None) -> bool:
    """Whether rollouts and evaluations act with LoRA merged into the base weights (rollout.merge_lora; "auto": when
    the policy's copy of the adapted weights fits `free_bytes`, the GPU memory free now, see trainer/models/memory.py).

    Where the rollout acts on whole parameters: one process, DDP, and FSDP2 inside its rollout weights (every unit
    gathered once; the merge and its restore write into the gathered copies, which are dropped on exit, never into
    the shards). Not DeepSpeed: its engine owns the parameters (ZeRO-3 partitions them; ZeRO-2 is left out as well,
    untried)."""
    if backend not in MERGING_BACKENDS or not merge_lora:
        return False
    if merge_lora == "auto":
        return policy is not None and merge_fits(free_bytes, policy.merge_copy_bytes())
    return True


@dataclass(frozen=True)
class StepOutcome:
    grad_norm: float  # global, before clipping; inf / nan as measured
    skip_reason: str | None  # None: the step was taken; else why it was skipped (the same on every rank)
    grad_norm_warning: bool  # taken, with a norm above warn_factor × max_grad_norm


class Engine:
    """What every backend provides; see the module docstring. Built by `setup_engine`."""

    def __init__(self, dist: Dist, policy: torch.nn.Module, model, optimizer, optim: OptimConfig,
                 param_group_names: list[list[str]], merge_lora: bool | str = False):
        self.dist = dist
        self.policy = policy
        self.model = model
        self.optimizer = optimizer
        self.optim = optim
        # Names of the optimizer's parameters, per param group, in build_optimizer's order: optimizer state is saved
        # keyed by these names, which do not depend on world size or backend.
        self.param_group_names = param_group_names
        # rollout.merge_lora where this backend can merge (True or "auto", decided at each rollout), else False
        self.merge_lora = merge_lora if dist.backend in MERGING_BACKENDS else False

    @property
    def parameter_names(self) -> list[str]:
        """The optimizer's parameters in order (param group by param group)."""
        return [name for names in self.param_group_names for name in names]

    # --- one optimizer step ---------------------------------------------------------------------------------------

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward; gradients are reduced in the `last` one's backward."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.dist.accelerator.backward(loss)

    def step(self) -> StepOutcome:
        """The global gradient norm -> the guard's decision (identical on every rank) -> clip and step, or skip."""
        grad_norm = self._global_grad_norm_then_clip()
        reason = self.dist.skip_decision(grad_norm, self.optim.max_grad_norm, self.optim.skip_factor)
        if reason is not None:
            self._skip()
            return StepOutcome(grad_norm, reason, False)
        self._step()
        return StepOutcome(grad_norm, None, grad_norm > self.optim.warn_factor * self.optim.max_grad_norm)

    def _global_grad_norm_then_clip(self) -> float:
        """The norm BEFORE clipping (returned as is when not finite, for the guard), then clipping to max_grad_norm."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return float(self.dist.accelerator.clip_grad_norm_(params, self.optim.max_grad_norm))

    def _step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _skip(self) -> None:
        """Drop the accumulated gradients: weights and optimizer state stay exactly as they are."""
        self.optimizer.zero_grad(set_to_none=True)

    # --- rollout -----------------------------------------------------------------------------------------------------

    def rollout_weights(self):
        """Context for a rollout or evaluation phase: full weights on every rank, in the fastest form for acting.

        Single / DDP / FSDP2: the LoRA adapters merged into the base for its duration when rollout.merge_lora (true,
        or "auto" and the copy fits the free GPU memory now; restored bit for bit on exit, see
        VLAPolicy.merged_adapters). Sharded backends gather the weights once on entry (FSDP2 before merging), so
        forwards inside make no collective calls and ranks may make different numbers of them; every rank must
        enter together (the gather is a collective)."""
        merge = merges_lora_for_rollout(self.merge_lora, self.dist.backend, self.policy,
                                        free_device_bytes(self.dist.device))
        return self.policy.merged_adapters() if merge else contextlib.nullcontext()

    # --- full state, keyed by parameter name ----------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """name -> full CPU copy of every trainable parameter. A collective on sharded backends (every rank calls)."""
        return {name: param.detach().cpu().clone() for name, param in self.policy.named_parameters()
                if param.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write full tensors (the same on every rank) into the trainable parameters."""
        params = _named_parameters_for(self.policy, tensors)
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def optimizer_state(self) -> dict:
        """{"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}, independent of world size and
        backend. A collective on sharded backends; complete on rank 0."""
        saved = _torch_optimizer(self.optimizer).state_dict()
        order = self.parameter_names
        return {"state": {order[index]: entry for index, entry in saved["state"].items()},
                "param_groups": [dict(group, params=[order[i] for i in group["params"]])
                                 for group in saved["param_groups"]]}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore optimizer_state()'s dict (the same on every rank)."""
        order = self.parameter_names
        check_optimizer_names(state, order)
        index = {name: i for i, name in enumerate(order)}
        _torch_optimizer(self.optimizer).load_state_dict({
            "state": {index[name]: entry for name, entry in state["state"].items()},
            "param_groups": [dict(group, params=[index[n] for n in group["params"]]) for group in state["param_groups"]],
        })


class SingleEngine(Engine):
    """One process: the policy is the model."""


class DDPEngine(Engine):
    """Replicas: every rank holds the whole model; gradients are averaged over ranks in the last backward."""

    def accumulating(self, last: bool):
        if last or self.dist.world_size == 1:
            return contextlib.nullcontext()
        return self.dist.accelerator.no_sync(self.model)


class FSDPEngine(DDPEngine):
    """FSDP2: parameters, gradients and optimizer state are DTensor shards; one unit per transformer / ViT block."""

    def _global_grad_norm_then_clip(self) -> float:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        norm = self.dist.accelerator.clip_grad_norm_(params, self.optim.max_grad_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor: partial until reduced

    @contextlib.contextmanager
    def rollout_weights(self):
        with _fsdp_unsharded(self.model), super().rollout_weights():  # gathered, then merged into the gathered copies
            yield

    def trainable_state(self) -> dict[str, torch.Tensor]:
        self._resharded()
        return {name: (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().cpu().clone()
                for name, param in self.policy.named_parameters() if param.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self._resharded()
        _named_parameters_for(self.policy, tensors)
        set_model_state_dict(self.policy, dict(tensors), options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self) -> dict:
        self._resharded()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.policy, _torch_optimizer(self.optimizer), options=options)

    def load_optimizer_state(self, state: dict) -> None:
        self._resharded()
        check_optimizer_names(state, self.parameter_names)
        set_optimizer_state_dict(self.policy, _torch_optimizer(self.optimizer), state,
                                 options=StateDictOptions(full_state_dict=True))

    def _resharded(self) -> None:
        """FSDP2 leaves the root unit unsharded after a forward without backward (evaluation): the module then shows
        plain tensors instead of the optimizer's DTensors. Resharding is local (no collective) and idempotent."""
        for module in _fsdp_modules(self.policy):
            module.reshard()


class DeepSpeedEngine(Engine):
    """ZeRO-2 / ZeRO-3. accelerate's DeepSpeed backward would also take the optimizer step before the guard could
    decide, so the DeepSpeed engine (`self.model`) is driven directly; it clips to the JSON's gradient_clipping, which
    setup_engine sets from optim.max_grad_norm."""

    @property
    def zero_stage(self) -> int:
        return self.model.zero_optimization_stage()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.set_gradient_accumulation_boundary(last)  # gradients are reduced at the boundary
        self.model.backward(loss, scale_wrt_gas=False)

    def _global_grad_norm_then_clip(self) -> float:
        return _deepspeed_grad_norm(self.model)  # DeepSpeed clips inside its own step

    def _step(self) -> None:
        self.model.step()  # clips to gradient_clipping, steps, zeroes the gradients
        self.optimizer.zero_grad(set_to_none=True)

    def _skip(self) -> None:
        _deepspeed_skip_step(self.model)
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def rollout_weights(self):
        with _zero3_gathered(self.model) if self.zero_stage == 3 else contextlib.nullcontext():
            yield

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (what the optimizer updates), not the bf16 working copies."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(param).detach().cpu().clone()
                for name, param in self.policy.named_parameters() if param.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        params = _named_parameters_for(self.policy, tensors)
        gathered = _zero3_modifiable([params[n] for n in tensors]) if self.zero_stage == 3 else \
            contextlib.nullcontext()
        with gathered, torch.no_grad():  # the working (module) copies; ZeRO-3 re-partitions them on exit
            for name, value in tensors.items():
                params[name].data.copy_(value.to(params[name].dtype).view_as(params[name].data))
        for name, value in tensors.items():  # the fp32 master copy the optimizer updates
            safe_set_full_fp32_param(params[name], value.to(self.dist.device, torch.float32))

    def optimizer_state(self) -> dict:
        return _deepspeed_optimizer_state(self.policy, self.optimizer, self.param_group_names)

    def load_optimizer_state(self, state: dict) -> None:
        check_optimizer_names(state, self.parameter_names)
        _load_deepspeed_optimizer_state(self.policy, self.optimizer, state)


ENGINES = {"single": SingleEngine, "ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed_zero2": DeepSpeedEngine,
           "deepspeed_zero3": DeepSpeedEngine}


def setup_engine(dist: Dist, policy: torch.nn.Module, optimizer, optim: OptimConfig,
                 merge_lora: bool | str = False) -> Engine:
    """Wrap the policy and its optimizer for the launch's backend and return the backend's engine.

    The LR scheduler is deliberately not prepared: accelerate would step it once per process per call, and DeepSpeed
    once per optimizer step, while the recipe steps it once per iteration. It keeps working on the prepared optimizer
    because every backend keeps the same torch param groups (learning rates) underneath."""
    names = {id(p): n for n, p in policy.named_parameters()}
    group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    backend = dist.backend
    if backend.startswith("deepspeed"):
        _configure_deepspeed(dist.accelerator.state.deepspeed_plugin.deepspeed_config, optim.max_grad_norm)
    if backend == "deepspeed_zero3":
        _reentrant_recompute(policy)
    model, optimizer = dist.accelerator.prepare(policy, optimizer)
    return ENGINES[backend](dist, policy, model, optimizer, optim, group_names, merge_lora=merge_lora)


def check_optimizer_names(state: dict, expected: list[str]) -> None:
    """Saved optimizer state must cover exactly the parameters this run optimizes (both ways named on failure)."""
    saved = {name for group in state["param_groups"] for name in group["params"]}
    missing, unknown = sorted(set(expected) - saved), sorted(saved - set(expected))
    if missing or unknown:
        raise ValueError("the checkpoint's optimizer state does not match this run's trainable parameters: "
                         + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
                         + (f"unknown {unknown[:5]}{' ...' if len(unknown) > 5 else ''}" if unknown else "")
                         + "; was it saved with other LoRA targets, another algorithm (value head) or model?")
    stray = sorted(set(state["state"]) - saved)
    if stray:
        raise ValueError(f"the checkpoint's optimizer has state for parameters in no param group: {stray[:5]}")


def _named_parameters_for(policy: torch.nn.Module, tensors: dict) -> dict[str, torch.nn.Parameter]:
    params = dict(policy.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"checkpoint tensors this model does not have: {unknown[:10]}")
    return params


def _torch_optimizer(optimizer):
    """The torch optimizer under accelerate's (and DeepSpeed's) wrappers."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


# --- FSDP2 -----------------------------------------------------------------------------------------------------------


def _fsdp_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _fsdp_param_groups(module) -> list:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.12: one group per module
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


@contextlib.contextmanager
def _fsdp_unsharded(model):
    """Every shard unit unsharded ONCE (one all-gather each, the same order on every rank) and kept so: no reshard
    after forward. Restored on exit."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    root_state = modules[0]._get_fsdp_state()
    if getattr(root_state, "_is_root", True) is None:
        root_state._lazy_init()  # what the first forward would do: fixes the root's own reshard policy first
    # set_reshard_after_forward is public; it has no getter, so the exact per-group setting is kept to restore it.
    saved = [(group, group.post_forward_mesh_info) for m in modules for group in _fsdp_param_groups(m)]
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
        for module in modules:
            module.unshard()
        yield
    finally:
        for module in modules:
            module.reshard()
        for group, info in saved:
            group.post_forward_mesh_info = info


# --- DeepSpeed (imported lazily: an optional package) ---------------------------------------------------------------


def _configure_deepspeed(config: dict, max_grad_norm: float) -> None:
    """The DeepSpeed JSON's clipping comes from optim.max_grad_norm; the trainer accumulates micro-batches itself."""
    clipping = config.get("gradient_clipping", "auto")
    if clipping == "auto":
        config["gradient_clipping"] = float(max_grad_norm)
    elif not math.isclose(float(clipping), float(max_grad_norm)):
        raise ValueError(f"the DeepSpeed config clips gradients at {clipping} but optim.max_grad_norm is "
                         f"{max_grad_norm}: set gradient_clipping to \"auto\" in the JSON")
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation == "auto":
        config["gradient_accumulation_steps"] = 1
    elif int(accumulation) != 1:
        raise ValueError("gradient_accumulation_steps must be 1 (or \"auto\") in the DeepSpeed config: the trainer "
                         "accumulates micro-batches itself and normalises losses by the global token count")


def _reentrant_recompute(policy) -> None:
    """ZeRO-3 with gradient recompute: switch the policy's checkpoints to their reentrant form, before DeepSpeed
    installs its hooks. With the non-reentrant form the recomputed forward inside the backward defeats ZeRO-3's
    parameter prefetch (its trace of the module order), so every module's parameters are gathered on their own,
    synchronously, in the forward and again in the recompute: on the tiny policy, one update of 2 micro-batches per
    rank made 66 all-gathers with it, 4 with the reentrant form, as many as without recompute (same loss and weights;
    tests/test_update_comms.py). DeepSpeed's leaf modules (`zero_optimization.leaf_module`, at decoder-layer or LoRA-
    layer level) were tried as well: the backward then found released parameters (size 0); the output dataclass that
    ZeRO-3 warns about (VLAOutput) changed nothing when made visible to its hooks."""
    model = getattr(policy, "base_model", None)
    if getattr(model, "checkpointing_enabled", False) and not model.reentrant_checkpointing:
        model.gradient_checkpointing_enable(reentrant=True)


def _deepspeed_grad_norm(engine) -> float:
    """The global norm of the accumulated gradients, before DeepSpeed's step clips them (a collective)."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        norm = combine_grad_norm_groups(optimizer._get_norm_groups())
    else:
        norm = optimizer.scaled_global_norm()
    value = float(norm) / float(getattr(optimizer, "loss_scale", 1.0))
    return value if math.isfinite(value) and value >= 0 else float("inf")  # DeepSpeed marks inf/nan as -1 or inf


@contextlib.contextmanager
def _instance_overrides(obj, **attributes):
    missing = object()
    previous = {name: obj.__dict__.get(name, missing) for name in attributes}
    for name, value in attributes.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def _deepspeed_skip_step(engine) -> None:
    """Take DeepSpeed's own overflow path for this step (gradients dropped, no update, engine.skipped_steps + 1).

    The guard has already decided (identically on every rank); DeepSpeed is told it overflowed, which is the one way
    its ZeRO optimizers discard accumulated gradient partitions without touching weights or optimizer state.
    """
    optimizer = engine.optimizer
    skipped_before = engine.skipped_steps

    def overflowed(*args, **kwargs):
        optimizer.overflow = True
        return True

    if engine.zero_optimization_stage() == 3:
        overrides = {"_overflow_check_and_loss_scale_update": overflowed}
    else:
        overrides = {"check_overflow": overflowed, "check_grad_overflow": True}
    with _instance_overrides(optimizer, **overrides):
        engine.step()
    if engine.skipped_steps != skipped_before + 1:
        raise RuntimeError("DeepSpeed applied an optimizer step that the guard skipped; this DeepSpeed version's "
                           "ZeRO optimizer no longer takes the overflow path it is told to")


@contextlib.contextmanager
def _zero3_gathered(engine):
    """All ZeRO-3 parameters gathered once, the per-module fetch/release hooks off, restored on exit."""
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def _zero3_modifiable(params):
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def _deepspeed_optimizer_state(policy, optimizer, group_names: list[list[str]]) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    torch_optimizer = _torch_optimizer(optimizer)
    flat_states = [s for s in torch_optimizer.state.values() if s]
    step = next((s["step"] for s in flat_states if "step" in s), None)
    keys = sorted({k for s in flat_states for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    state = {}
    for name, param in policy.named_parameters():
        if not param.requires_grad:
            continue
        entry = {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone() for key in keys}
        if step is not None:
            entry["step"] = step.detach().cpu().clone() if torch.is_tensor(step) else torch.tensor(float(step))
        state[name] = entry
    groups = []
    for index, group in enumerate(torch_optimizer.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(group_names[index]) if index < len(group_names) else []})
    return {"state": state, "param_groups": groups}


def _load_deepspeed_optimizer_state(policy, optimizer, saved: dict) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    torch_optimizer = _torch_optimizer(optimizer)
    params = dict(policy.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved["state"])
    if missing:
        raise ValueError(f"the checkpoint's optimizer has no state for {missing[:10]}")
    step = None
    for name, entry in saved["state"].items():
        for key, value in entry.items():
            if key == "step":
                step = value
                continue
            safe_set_full_optimizer_state(params[name], value.to(torch.float32), key)
    if step is not None:
        for flat_state in torch_optimizer.state.values():
            if "step" in flat_state:
                old = flat_state["step"]
                value = step if torch.is_tensor(step) else torch.tensor(float(step))
                flat_state["step"] = value.to(old.device, old.dtype).clone() if torch.is_tensor(old) else \
                    type(old)(float(value))
    for group, saved_group in zip(torch_optimizer.param_groups, saved["param_groups"]):
        for key, value in saved_group.items():
            if key != "params" and key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value


__all__ = ["DDPEngine", "DeepSpeedEngine", "Engine", "FSDPEngine", "OptimConfig", "Scheduler", "SingleEngine",
           "StepOutcome", "check_optimizer_names", "merges_lora_for_rollout", "setup_engine"]
