"""Everything that knows about ranks: the Accelerator per backend, global gathers, agreed decisions, balanced
micro-batches, and the few places where FSDP2 and DeepSpeed need handling of their own.

The rest of the code calls these helpers and never torch.distributed directly, so the invariants of DESIGN.md hold in
one place: every rank makes the same collective calls, group statistics and guard decisions come from globally
reduced values, and only rank 0 writes logs.

Backends (chosen by the launcher, reported by `Dist.backend`):

    single            python -m trainer ...                       one process
    ddp               accelerate launch (multi_gpu / cpu_2proc) or plain torchrun
    fsdp              FSDP2 through accelerate's plugin (fsdp_version: 2, one shard unit per transformer / ViT block)
    deepspeed_zero2   DeepSpeed ZeRO-2 (optimizer state and gradients partitioned)
    deepspeed_zero3   DeepSpeed ZeRO-3 (parameters partitioned too)

Processes started by torchrun or srun (not by `accelerate launch`) pick a backend with
TRAINER_ACCELERATE_CONFIG=accelerate_configs/<file>.yaml: the file's backend settings are put into the environment
exactly where `accelerate launch --config_file <file>` would put them (values already set win).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

ACCELERATE_CONFIG_ENV = "TRAINER_ACCELERATE_CONFIG"
SHARDED_BACKENDS = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")

# accelerate config keys that describe the launch (processes, machines, rendezvous): torchrun / srun own those.
_LAUNCH_ONLY_KEYS = {
    "compute_environment", "debug", "distributed_type", "downcast_bf16", "machine_rank", "main_training_function",
    "num_machines", "num_processes", "rdzv_backend", "same_network", "tpu_env", "tpu_use_cluster", "tpu_use_sudo",
    "use_cpu", "gpu_ids", "main_process_ip", "main_process_port", "enable_cpu_affinity", "dynamo_config",
}
_DEEPSPEED_ENV = {
    "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
}


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _requested(kind: str) -> bool:
    """Whether the launcher asked for FSDP or DEEPSPEED (accelerate launch's environment, or our YAML translation)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def _fsdp_on_cpu(accelerator) -> None:
    """accelerate only turns FSDP on for accelerator devices; on a CPU host (tests, CI) its state says MULTI_CPU.
    FSDP2 itself runs on CPU with gloo, so the state is switched to FSDP with the plugin built from the environment."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ does


def _env_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def accelerate_config_env(path) -> dict[str, str]:
    """The backend part of the environment that `accelerate launch --config_file PATH` gives its processes.

    Only the backend (FSDP / DeepSpeed settings, mixed precision) is translated; the launch topology (process count,
    machine rank, rendezvous) is left to torchrun or srun. A relative `deepspeed_config_file` is resolved against the
    working directory, then against the folder above the YAML's (the repository root for accelerate_configs/).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{ACCELERATE_CONFIG_ENV}={path}: no such accelerate config file")
    settings = yaml.safe_load(path.read_text()) or {}
    kind = str(settings.get("distributed_type", "NO")).upper()
    env: dict[str, str] = {}
    if settings.get("mixed_precision") is not None:
        env["ACCELERATE_MIXED_PRECISION"] = _env_value(settings["mixed_precision"])
    if kind == "FSDP":
        env["ACCELERATE_USE_FSDP"] = "true"
        for key, value in (settings.get("fsdp_config") or {}).items():
            name = key.upper() if key.startswith("fsdp_") else f"FSDP_{key.upper()}"
            env[name.replace("TRANSFORMER_LAYER_CLS_TO_WRAP", "TRANSFORMER_CLS_TO_WRAP")] = _env_value(value)
    elif kind == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        for key, value in (settings.get("deepspeed_config") or {}).items():
            if key == "deepspeed_multinode_launcher":
                continue
            if key not in _DEEPSPEED_ENV:
                raise ValueError(f"{path}: deepspeed_config.{key} is not supported for torchrun / srun launches; "
                                 f"put it in the DeepSpeed JSON or launch with accelerate launch --config_file {path}")
            if key == "deepspeed_config_file":
                value = _resolve_next_to(Path(value), path)
            env[_DEEPSPEED_ENV[key]] = _env_value(value)
    elif kind not in ("NO", "MULTI_GPU", "MULTI_CPU"):
        raise ValueError(f"{path}: distributed_type {kind} is not one of NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED")
    unknown = set(settings) - _LAUNCH_ONLY_KEYS - {"mixed_precision", "fsdp_config", "deepspeed_config"}
    if unknown:
        raise ValueError(f"{path}: keys {sorted(unknown)} are not translated for torchrun / srun launches")
    return env


def _resolve_next_to(value: Path, config_path: Path) -> str:
    if value.is_absolute() or value.exists():
        return str(value)
    candidate = config_path.resolve().parent.parent / value
    return str(candidate if candidate.exists() else value)


@dataclass
class Dist:
    accelerator: object  # accelerate.Accelerator
    # Names of the optimizer's parameters, per param group, recorded by prepare(): checkpoints key optimizer state by
    # these names, which do not depend on world size or backend.
    param_group_names: list[list[str]] = field(default_factory=list)

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, mixed_precision: str | None = None, timeout_minutes: float = 30.0) -> Dist:
        """The Accelerator for however the run was launched (python, accelerate launch, torchrun, srun).

        mixed_precision None takes the launcher's choice (the YAML's `mixed_precision`), else "no".
        On a host without GPUs (tests, CI) accelerate picks no backend for a multi-process launch, so every rank
        believes it is rank 0, and it never turns FSDP on (PLATFORM_NOTES): the process state is created with gloo
        first and FSDP is switched on explicitly. A requested backend that accelerate did not set up is an error,
        never a silent fall-back to unsharded training.
        """
        config_file = os.environ.get(ACCELERATE_CONFIG_ENV)
        if config_file:
            for key, value in accelerate_config_env(config_file).items():
                os.environ.setdefault(key, value)
        from accelerate import Accelerator, PartialState
        from accelerate.utils import InitProcessGroupKwargs

        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=timeout_minutes))
        cpu_host = not torch.cuda.is_available()
        if _launched_distributed() and cpu_host:
            # DeepSpeed: naming the backend lets accelerate initialise deepspeed.comm on gloo. Others: cpu=True makes
            # it MULTI_CPU (DDP on gloo); without it accelerate says NO and prepare() would not even wrap DDP.
            PartialState(cpu=not _requested("DEEPSPEED"), backend="gloo", timeout=timeout.timeout)
        accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[timeout])
        if cpu_host and _requested("FSDP") and _launched_distributed():
            _fsdp_on_cpu(accelerator)
        dist = cls(accelerator)
        dist._check_requested_backend()
        return dist

    def _check_requested_backend(self) -> None:
        requested = "FSDP" if _requested("FSDP") else "DEEPSPEED" if _requested("DEEPSPEED") else None
        kind = self._distributed_type
        if requested is not None and self.world_size > 1 and kind != requested:
            raise RuntimeError(
                f"the launch asked for {requested} but accelerate set up {kind} on {self.world_size} processes: "
                "training would silently run without sharding. Launch with accelerate launch --config_file "
                f"accelerate_configs/... or torchrun with {ACCELERATE_CONFIG_ENV} set, and check the backend's "
                "packages (deepspeed) are installed.")
        if kind == "FSDP" and int(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)) != 2:
            raise ValueError("only FSDP2 is supported: set fsdp_version: 2 in the accelerate config "
                             "(accelerate_configs/fsdp_1node.yaml)")

    # --- who am I -------------------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def local_rank(self) -> int:
        return self.accelerator.local_process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def _distributed_type(self) -> str:
        return str(self.accelerator.distributed_type).split(".")[-1]

    @property
    def backend(self) -> str:
        """"fsdp", "deepspeed_zero2", "deepspeed_zero3", "ddp" or "single"."""
        kind = self._distributed_type
        if kind == "FSDP":
            return "fsdp"
        if kind == "DEEPSPEED":
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            return f"deepspeed_zero{stage}"
        if kind.startswith("MULTI") or self.world_size > 1:
            return "ddp"
        return "single"

    @property
    def is_deepspeed(self) -> bool:
        return self.backend.startswith("deepspeed")

    @property
    def is_sharded(self) -> bool:
        """Parameters, gradients or optimizer state live in pieces across ranks (checkpoints gather them)."""
        return self.backend in SHARDED_BACKENDS

    # --- wrapping the model -------------------------------------------------------------------------------------

    def prepare(self, policy: torch.nn.Module, optimizer, max_grad_norm: float | None = None):
        """Wrap the policy and its optimizer for the backend; returns (model, optimizer).

        The LR scheduler is deliberately not prepared: accelerate would step it once per process per call, and
        DeepSpeed once per optimizer step, while the recipe steps it once per iteration. It keeps working on the
        prepared optimizer because every backend keeps the same torch param groups (learning rates) underneath.
        Under DeepSpeed the JSON's gradient_clipping comes from the run config (max_grad_norm).
        """
        names = {id(p): n for n, p in policy.named_parameters()}
        self.param_group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        if self.is_deepspeed:
            self._configure_deepspeed(max_grad_norm)
        return self.accelerator.prepare(policy, optimizer)

    def _configure_deepspeed(self, max_grad_norm: float | None) -> None:
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        clipping = config.get("gradient_clipping", "auto")
        if max_grad_norm is not None:
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

    # --- backward, clipping, step ---------------------------------------------------------------------------------

    def no_sync(self, model, sync: bool):
        """Context for one micro-batch's forward and backward: gradient reduction waits for the last (sync) one."""
        if sync or self.world_size == 1 or self.is_deepspeed:  # DeepSpeed: the accumulation boundary in backward()
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, model, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward of one micro-batch; `sync` marks the last micro-batch before an optimizer step.

        DeepSpeed's engine is driven directly: accelerate's DeepSpeed backward would also take the optimizer step,
        before the skip guard could decide.
        """
        if self.is_deepspeed:
            model.set_gradient_accumulation_boundary(sync)
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, model, parameters, max_norm: float) -> float:
        """The global gradient norm BEFORE clipping, then clipping to max_norm (DeepSpeed clips inside its step).

        FSDP2 and DeepSpeed reduce the norm over all ranks; DDP gradients are already averaged. A non-finite value is
        returned as is (inf or nan) for the guard.
        """
        if self.is_deepspeed:
            return _deepspeed_grad_norm(model)
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor (FSDP2): a partial norm until reduced
            norm = norm.full_tensor()
        return float(norm)

    def optimizer_step(self, model, optimizer) -> None:
        if self.is_deepspeed:
            model.step()  # clips to gradient_clipping, steps, zeroes the gradients
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def skip_step(self, model, optimizer) -> None:
        """Drop the accumulated gradients: weights and optimizer state stay exactly as they are."""
        if self.is_deepspeed:
            _deepspeed_skip_step(model)
        optimizer.zero_grad(set_to_none=True)

    # --- rollout ------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gathered_for_rollout(self, model):
        """Full weights on every rank for a rollout or evaluation phase: gathered ONCE on entry, released on exit.

        Under FSDP2 every shard unit is unsharded and kept so (no reshard after forward); under ZeRO-3 all parameters
        are gathered and DeepSpeed's per-module fetch hooks are taken off. Forwards inside then make no collective
        calls, so ranks may make different numbers of policy calls (episodes of different lengths) without hanging.
        Every rank must enter together (the gather is a collective). Other backends: nothing to do.
        """
        backend = self.backend
        if backend == "fsdp":
            with _fsdp_unsharded(model):
                yield
        elif backend == "deepspeed_zero3":
            with _zero3_gathered(model):
                yield
        else:
            yield

    # --- full (gathered) state for checkpoints --------------------------------------------------------------------

    def full_trainable_state(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        """name -> full CPU tensor of every trainable parameter. A collective: every rank calls it, in the same order.

        DeepSpeed: the fp32 master weights (what the optimizer updates), not the bf16 working copies.
        """
        self._resharded(policy)
        out = {}
        for name, param in policy.named_parameters():
            if not param.requires_grad:
                continue
            if self.is_deepspeed:
                from deepspeed.utils import safe_get_full_fp32_param

                full = safe_get_full_fp32_param(param)
            elif hasattr(param, "full_tensor"):
                full = param.full_tensor()
            else:
                full = param
            out[name] = full.detach().cpu().clone()  # a copy: later steps must not change what was taken
        return out

    def load_full_trainable_state(self, policy: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Write full tensors (the same on every rank) into the trainable parameters, whatever the sharding."""
        self._resharded(policy)
        params = dict(policy.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ValueError(f"checkpoint tensors this model does not have: {unknown[:10]}")
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(policy, dict(tensors), options=StateDictOptions(full_state_dict=True, strict=False))
            return
        if self.is_deepspeed:
            from deepspeed.utils import safe_set_full_fp32_param

            gathered = _zero3_modifiable([params[n] for n in tensors]) if self.backend == "deepspeed_zero3" else \
                contextlib.nullcontext()
            with gathered, torch.no_grad():  # the working (module) copies; ZeRO-3 re-partitions them on exit
                for name, value in tensors.items():
                    params[name].data.copy_(value.to(params[name].dtype).view_as(params[name].data))
            for name, value in tensors.items():  # the fp32 master copy the optimizer updates
                safe_set_full_fp32_param(params[name], value.to(self.device, torch.float32))
            return
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def full_optimizer_state(self, policy: torch.nn.Module, optimizer) -> dict:
        """{"state": {name: {key: full tensor}}, "param_groups": [{..., "params": [names]}]}: the optimizer state keyed
        by parameter name, independent of world size and backend. A collective; the result is complete on rank 0."""
        if self.is_deepspeed:
            return _deepspeed_optimizer_state(policy, optimizer, self.param_group_names)
        self._resharded(policy)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.backend == "fsdp")
        return get_optimizer_state_dict(policy, _torch_optimizer(optimizer), options=options)

    def load_full_optimizer_state(self, policy: torch.nn.Module, optimizer, state: dict) -> None:
        """Restore full_optimizer_state()'s dict (the same on every rank) into this backend's optimizer."""
        if self.is_deepspeed:
            _load_deepspeed_optimizer_state(policy, optimizer, state)
            return
        self._resharded(policy)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy, _torch_optimizer(optimizer), state,
                                 options=StateDictOptions(full_state_dict=True))

    def _resharded(self, policy) -> None:
        """FSDP2 leaves the root unit unsharded after a forward without backward (evaluation): the module then shows
        plain tensors instead of the optimizer's DTensors. Resharding is local (no collective) and idempotent."""
        if self.backend == "fsdp":
            for module in _fsdp_modules(policy):
                module.reshard()

    # --- collectives ------------------------------------------------------------------------------------------------

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.to(self.device)
        torch_dist.all_reduce(tensor, op=op)
        return tensor

    def sum(self, value: float) -> float:
        return float(self._reduce(torch.tensor([float(value)], dtype=torch.float64), torch_dist.ReduceOp.SUM))

    def max(self, value: float) -> float:
        return float(self._reduce(torch.tensor([float(value)], dtype=torch.float64), torch_dist.ReduceOp.MAX))

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0.0

    def gather_objects(self, items: list) -> list:
        """Concatenation of every rank's list, in rank order (small metadata only: ids, rewards, counts)."""
        if self.world_size == 1:
            return list(items)
        gathered: list = [None] * self.world_size
        torch_dist.all_gather_object(gathered, list(items))
        return [x for part in gathered for x in part]

    def sum_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Element-wise sums over ranks of a dict with the same keys on every rank (sorted for a fixed order)."""
        if self.world_size == 1:
            return dict(metrics)
        keys = sorted(metrics)
        values = self._reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64),
                              torch_dist.ReduceOp.SUM)
        return {k: float(v) for k, v in zip(keys, values.tolist())}

    # --- agreed decisions -------------------------------------------------------------------------------------------

    def agreed_micro_batches(self, local_samples: int, micro_batch_size: int) -> int:
        """Micro-batches every rank runs: the most any rank needs. Ranks with fewer samples pad with zero-weight
        micro-batches, so all ranks make the same number of forward/backward (and collective) calls."""
        return int(self.max(math.ceil(local_samples / micro_batch_size)))

    def skip_decision(self, grad_norm: float, max_grad_norm: float, skip_factor: float) -> str | None:
        """The reason to skip this optimizer step, identical on every rank, or None to take it.

        Decided from globally reduced values: any rank seeing a non-finite norm, or the largest norm over ranks
        above skip_factor × max_grad_norm, skips the step everywhere.
        """
        finite = math.isfinite(grad_norm)
        any_nonfinite = self.any(not finite)
        if any_nonfinite:
            return "nonfinite_grad_norm"
        largest = self.max(grad_norm)
        if largest > skip_factor * max_grad_norm:
            return "grad_norm_above_threshold"
        return None

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


# --- FSDP2 -----------------------------------------------------------------------------------------------------------


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

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
            module.unshard()  # one all-gather per shard unit, the same order on every rank
        yield
    finally:
        for module in modules:
            module.reshard()
        for group, info in saved:
            group.post_forward_mesh_info = info


# --- DeepSpeed -------------------------------------------------------------------------------------------------------


def _torch_optimizer(optimizer):
    """The torch optimizer under accelerate's (and DeepSpeed's) wrappers."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def _zero_optimizer(engine):
    return engine.optimizer


def _deepspeed_grad_norm(engine) -> float:
    """The global norm of the accumulated gradients, before DeepSpeed's step clips them (a collective)."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    optimizer = _zero_optimizer(engine)
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
    optimizer = _zero_optimizer(engine)
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
                flat_state["step"] = step.to(old.device, old.dtype).clone() if torch.is_tensor(old) else \
                    type(old)(float(step))
    for group, saved_group in zip(torch_optimizer.param_groups, saved["param_groups"]):
        for key, value in saved_group.items():
            if key != "params" and key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
