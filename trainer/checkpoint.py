"""Save and resume a run, one path for every backend; load a checkpoint's weights for evaluation; save a merged model.

    <output_dir>/checkpoints/iter-000040/
        adapter_model.safetensors   LoRA weights (and fully trained heads) in PEFT's naming
        adapter_config.json
        trainable.safetensors       other trainable weights (the value head)
        optimizer.safetensors       the optimizer state gathered to full tensors and keyed by parameter name
                                    ("<name>/exp_avg"), so it resumes on any world size and backend
        optimizer.json              its param groups (hyper-parameters, parameter names) and non-tensor values
        scheduler.pt                the LR scheduler's state dict (read back with weights_only=True: no pickled code)
        rng-rank{r}.json            python / numpy / torch RNG state of every rank
        trainer_state.json          counters, skip reasons
        config.yaml
    <output_dir>/checkpoints/latest  the name of the newest complete checkpoint

Every backend writes the same files through its engine (`Engine.trainable_state`, `Engine.optimizer_state`: full
tensors, gathered on sharded backends). Checkpoints of earlier versions hold `optimizer.pt` instead of the two
optimizer files: the optimizer's own state dict, keyed by position in build_optimizer's parameter order; they still
load, translated to names by that order.

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced atomically, so a
crash mid-save never leaves a half-written checkpoint that resume would pick.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from trainer.engine import Engine
from trainer.models import save_vla

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"
OLD_OPTIMIZER = "optimizer.pt"  # earlier versions, single process and DDP: keyed by position


# --- save ------------------------------------------------------------------------------------------------------------


def save_checkpoint(output_dir, engine: Engine, scheduler, state: dict, config_text: str | None = None) -> Path:
    """Write iter-<N>/ for the state's iteration and point `latest` at it. Every rank must call this (the gathers of
    sharded backends are collectives); rank 0 writes everything but the RNG state of the other ranks."""
    dist = engine.dist
    root = Path(output_dir) / CHECKPOINTS
    name = f"iter-{state['iteration']:06d}"
    final = root / name
    staging = root / f".{name}.incomplete"
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    (staging / f"rng-rank{dist.rank}.json").write_text(json.dumps(_rng_state()))
    trainable = engine.trainable_state()
    optimizer_state = engine.optimizer_state()
    if dist.is_main:
        _write_trainable(staging, engine.policy, trainable)
        _write_optimizer(staging, optimizer_state)
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if config_text is not None:
            (staging / "config.yaml").write_text(config_text)
    dist.barrier()
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _atomic_write_text(root / LATEST, name)
    dist.barrier()
    return final


def _write_trainable(staging: Path, policy, trainable: dict[str, torch.Tensor]) -> None:
    """LoRA adapters in PEFT's layout (adapter_model.safetensors + adapter_config.json), the rest by name."""
    extra = trainable
    if _is_peft(policy.vla):
        vla = {name[len("vla."):]: t for name, t in trainable.items() if name.startswith("vla.")}
        adapter = get_peft_model_state_dict(policy.vla, state_dict=vla)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(staging / "adapter_model.safetensors"))
        policy.vla.peft_config["default"].save_pretrained(str(staging))
        extra = {name: t for name, t in trainable.items() if not name.startswith("vla.")}
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, str(staging / "trainable.safetensors"))


def _write_optimizer(staging: Path, optimizer_state: dict) -> None:
    """Tensors (nested entries too, e.g. bitsandbytes' quantisation state) to safetensors under
    "<name>/<key>[/<key>...]"; plain values (an int step count) and the param groups to JSON."""
    tensors, scalars = {}, {}

    def flatten(name: str, path: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(name, f"{path}/{key}" if path else str(key), item)
        elif torch.is_tensor(value):
            tensors[f"{name}/{path}"] = value.detach().cpu().contiguous()
        else:
            scalars.setdefault(name, {})[path] = value

    for name, entry in optimizer_state["state"].items():
        flatten(name, "", entry)
    save_file(tensors, str(staging / OPTIMIZER_TENSORS))
    groups = [{k: _jsonable(v) for k, v in group.items()} for group in optimizer_state["param_groups"]]
    (staging / OPTIMIZER_GROUPS).write_text(json.dumps({"param_groups": groups, "scalars": scalars}, indent=1))


# --- load ------------------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir) -> Path | None:
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist: the checkpoint folder was "
                                f"removed; delete {pointer} to start over")
    return path


def load_checkpoint(path, engine: Engine, scheduler=None) -> dict:
    """Resume: weights, optimizer state, scheduler and this rank's RNG; returns the trainer state (counters)."""
    path = Path(path)
    engine.load_trainable_state(read_trainable(path, engine.policy))
    engine.load_optimizer_state(read_optimizer(path, engine.param_group_names))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng-rank{engine.dist.rank}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: streams derive from seeds anyway
        _set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / "trainer_state.json").read_text())


def load_latest_checkpoint(output_dir, engine: Engine, scheduler) -> dict | None:
    path = latest_checkpoint(output_dir)
    return None if path is None else load_checkpoint(path, engine, scheduler)


def load_weights(path, policy) -> dict:
    """Only the trainable weights, into a policy as built (not wrapped by a backend): evaluation and export.
    Returns the checkpoint's trainer state."""
    path = Path(path)
    tensors = read_trainable(path, policy)
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return json.loads((path / "trainer_state.json").read_text())


def read_trainable(path: Path, policy) -> dict[str, torch.Tensor]:
    """Trainable weights of a checkpoint (adapter + trainable.safetensors), keyed by the policy's parameter names."""
    tensors = {}
    if _is_peft(policy.vla):
        adapter_file = path / "adapter_model.safetensors"
        if not adapter_file.is_file():
            raise FileNotFoundError(f"{adapter_file} is missing: this checkpoint was saved without LoRA adapters")
        adapter = load_file(str(adapter_file), device="cpu")
        names = _adapter_names(policy)
        unexpected = sorted(set(adapter) - set(names))
        if unexpected:
            raise ValueError(f"adapter in {path} has tensors this model does not: {unexpected[:10]}")
        tensors.update({names[key]: value for key, value in adapter.items()})
    extra_file = path / "trainable.safetensors"
    if extra_file.is_file():
        extra = load_file(str(extra_file), device="cpu")
        unexpected = sorted(set(extra) - {name for name, _ in policy.named_parameters()})
        if unexpected:
            raise ValueError(f"{extra_file} has tensors this model does not: {unexpected[:10]}")
        tensors.update(extra)
    return tensors


def read_optimizer(path: Path, param_group_names: list[list[str]]) -> dict:
    """The checkpoint's optimizer state keyed by parameter name; an old optimizer.pt is translated by position
    (param_group_names: this run's parameter names per param group, in build_optimizer's order)."""
    if (path / OPTIMIZER_TENSORS).is_file():
        return _read_optimizer_by_name(path)
    if (path / OLD_OPTIMIZER).is_file():
        return _optimizer_by_name(torch.load(path / OLD_OPTIMIZER, map_location="cpu", weights_only=True),
                                  param_group_names, path / OLD_OPTIMIZER)
    raise FileNotFoundError(f"{path} has neither {OPTIMIZER_TENSORS} nor {OLD_OPTIMIZER}: not a complete checkpoint")


def _read_optimizer_by_name(path: Path) -> dict:
    meta = json.loads((path / OPTIMIZER_GROUPS).read_text())
    state: dict[str, dict] = {}

    def place(name: str, keys: list[str], value) -> None:
        entry = state.setdefault(name, {})
        for key in keys[:-1]:
            entry = entry.setdefault(key, {})
        entry[keys[-1]] = value

    for key, value in load_file(str(path / OPTIMIZER_TENSORS), device="cpu").items():
        name, _, rest = key.partition("/")
        place(name, rest.split("/"), value)
    for name, values in meta.get("scalars", {}).items():
        for rest, value in values.items():
            place(name, rest.split("/"), value)
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _optimizer_by_name(indexed: dict, param_group_names: list[list[str]], source: Path) -> dict:
    """A torch optimizer state dict (parameters numbered in param-group order) keyed by parameter name."""
    sizes = [len(group["params"]) for group in indexed["param_groups"]]
    if sizes != [len(names) for names in param_group_names]:
        raise ValueError(f"{source} holds {sizes} parameters per param group but this run optimizes "
                         f"{[len(names) for names in param_group_names]}: it was saved by a run with other trainable "
                         "parameters (LoRA targets or rank, algorithm, model)")
    order = [name for names in param_group_names for name in names]
    return {"state": {order[int(index)]: entry for index, entry in indexed["state"].items()},
            "param_groups": [dict(group, params=[order[int(i)] for i in group["params"]])
                             for group in indexed["param_groups"]]}


# --- export ----------------------------------------------------------------------------------------------------------


def save_merged_model(policy, out_dir: Path) -> Path:
    """The policy's LoRA merged into its base weights, saved in the OpenVLA layout (readable by models.load_vla)."""
    merged = policy.vla.merge_and_unload() if _is_peft(policy.vla) else policy.vla
    return save_vla(merged, out_dir, tokenizer=policy.tokenizer)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _adapter_names(policy) -> dict[str, str]:
    """PEFT adapter-file key -> parameter name in the policy, from PEFT's own renaming (get_peft_model_state_dict
    keeps the tensor objects it is given, so distinct placeholders identify every key)."""
    placeholders = {name: torch.empty(0) for name, _ in policy.vla.named_parameters()}
    owner = {id(t): name for name, t in placeholders.items()}
    renamed = get_peft_model_state_dict(policy.vla, state_dict=placeholders)
    return {key: "vla." + owner[id(t)] for key, t in renamed.items()}


def _rng_state() -> dict:
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["CHECKPOINTS", "LATEST", "OLD_OPTIMIZER", "OPTIMIZER_GROUPS", "OPTIMIZER_TENSORS", "latest_checkpoint",
           "load_checkpoint", "load_latest_checkpoint", "load_weights", "read_optimizer", "read_trainable",
           "save_checkpoint", "save_merged_model"]
