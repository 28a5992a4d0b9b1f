"""Save and resume a run; export a merged model in the OpenVLA layout.

    <output_dir>/checkpoints/iter-000040/
        adapter_model.safetensors   LoRA weights (and fully trained heads) in PEFT's naming
        trainable.safetensors       other trainable weights (the value head)
        optimizer.pt, scheduler.pt  torch state dicts (read back with weights_only=True: no pickled code)
        optimizer.safetensors,      sharded backends (FSDP2, DeepSpeed ZeRO-2/3) instead of optimizer.pt: the optimizer
        optimizer.json              state gathered and keyed by parameter name ("<name>/exp_avg"), so it resumes on
                                    any world size or backend; the weight files are the same as a single process's
        rng-rank{r}.json            python / numpy / torch RNG state of every rank
        trainer_state.json          counters, phase, skip reasons
        config.yaml
    <output_dir>/checkpoints/latest  the name of the newest complete checkpoint

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
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER_BY_NAME = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _trainable_non_adapter(policy) -> dict[str, torch.Tensor]:
    """Trainable tensors that PEFT's adapter file does not hold (the value head)."""
    return {n: p.detach().cpu().contiguous() for n, p in policy.named_parameters()
            if p.requires_grad and not n.startswith("vla.")} if _is_peft(policy.vla) else {
        n: p.detach().cpu().contiguous() for n, p in policy.named_parameters() if p.requires_grad}


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


def save_checkpoint(output_dir, policy, optimizer, scheduler, state: dict, dist, config=None) -> Path:
    """Write iter-<N>/ for the state's iteration and point `latest` at it. Every rank must call this."""
    from peft import get_peft_model_state_dict

    root = Path(output_dir) / CHECKPOINTS
    name = f"iter-{state['iteration']:06d}"
    final = root / name
    staging = root / f".{name}.incomplete"
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    (staging / f"rng-rank{dist.rank}.json").write_text(json.dumps(_rng_state()))
    sharded = getattr(dist, "is_sharded", False)
    if sharded:  # every rank takes part in the gathers; rank 0 writes
        trainable = dist.full_trainable_state(policy)
        optimizer_state = dist.full_optimizer_state(policy, optimizer)
        if dist.is_main:
            _write_trainable(staging, policy, trainable)
            _write_optimizer_by_name(staging, optimizer_state)
    if dist.is_main:
        if not sharded:
            if _is_peft(policy.vla):
                adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(policy.vla).items()}
                save_file(adapter, str(staging / "adapter_model.safetensors"))
                policy.vla.peft_config["default"].save_pretrained(str(staging))
            extra = _trainable_non_adapter(policy)
            if extra:
                save_file(extra, str(staging / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if config is not None:
            from trainer.config import dump

            (staging / "config.yaml").write_text(dump(config))
    dist.barrier()
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _atomic_write_text(root / LATEST, name)
    dist.barrier()
    return final


def latest_checkpoint(output_dir) -> Path | None:
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist: the checkpoint folder was "
                                f"removed; delete {pointer} to start over")
    return path


def load_checkpoint(path: Path, policy, optimizer=None, scheduler=None, dist=None) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the trainer state (counters)."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    sharded = getattr(dist, "is_sharded", False)
    if sharded:
        dist.load_full_trainable_state(policy, _read_trainable(path, policy))
    elif _is_peft(policy.vla):
        adapter_file = path / "adapter_model.safetensors"
        if not adapter_file.is_file():
            raise FileNotFoundError(f"{adapter_file} is missing: this checkpoint was saved without LoRA adapters")
        result = set_peft_model_state_dict(policy.vla, load_file(str(adapter_file), device="cpu"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter in {path} has tensors this model does not: {unexpected[:10]}")
    extra_file = path / "trainable.safetensors"
    if extra_file.is_file() and not sharded:
        extra = load_file(str(extra_file), device="cpu")
        params = dict(policy.named_parameters())
        missing = sorted(set(extra) - set(params))
        if missing:
            raise ValueError(f"{extra_file} has tensors this model does not: {missing[:10]}")
        with torch.no_grad():
            for name, tensor in extra.items():
                params[name].copy_(tensor)
    if optimizer is not None:
        _load_optimizer(path, policy, optimizer, dist)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rank = dist.rank if dist is not None else 0
    rng_file = path / f"rng-rank{rank}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: streams derive from seeds anyway
        _set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / "trainer_state.json").read_text())


# --- sharded backends: weights and optimizer state gathered to full tensors, keyed by name ----------------------------


def _write_trainable(staging: Path, policy, trainable: dict[str, torch.Tensor]) -> None:
    """The same files a single process writes, from gathered full tensors (name -> tensor)."""
    from peft import get_peft_model_state_dict

    extra = trainable
    if _is_peft(policy.vla):
        vla = {name[len("vla."):]: t for name, t in trainable.items() if name.startswith("vla.")}
        adapter = get_peft_model_state_dict(policy.vla, state_dict=vla)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(staging / "adapter_model.safetensors"))
        policy.vla.peft_config["default"].save_pretrained(str(staging))
        extra = {name: t for name, t in trainable.items() if not name.startswith("vla.")}
    if extra:
        save_file(extra, str(staging / "trainable.safetensors"))


def _adapter_names(policy) -> dict[str, str]:
    """PEFT adapter-file key -> parameter name in the policy, from PEFT's own renaming (get_peft_model_state_dict
    keeps the tensor objects it is given, so distinct placeholders identify every key)."""
    from peft import get_peft_model_state_dict

    placeholders = {name: torch.empty(0) for name, _ in policy.vla.named_parameters()}
    owner = {id(t): name for name, t in placeholders.items()}
    renamed = get_peft_model_state_dict(policy.vla, state_dict=placeholders)
    return {key: "vla." + owner[id(t)] for key, t in renamed.items()}


def _read_trainable(path: Path, policy) -> dict[str, torch.Tensor]:
    """Trainable weights of a checkpoint (adapter + trainable.safetensors), keyed by parameter name."""
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
        tensors.update(load_file(str(extra_file), device="cpu"))
    return tensors


def _write_optimizer_by_name(staging: Path, optimizer_state: dict) -> None:
    tensors = {}
    for name, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(staging / OPTIMIZER_BY_NAME))
    groups = [{k: _jsonable(list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in optimizer_state["param_groups"]]
    (staging / OPTIMIZER_GROUPS).write_text(json.dumps({"param_groups": groups}, indent=1))


def _read_optimizer_by_name(path: Path) -> dict:
    state: dict[str, dict] = {}
    for key, value in load_file(str(path / OPTIMIZER_BY_NAME), device="cpu").items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    groups = json.loads((path / OPTIMIZER_GROUPS).read_text())["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _load_optimizer(path: Path, policy, optimizer, dist) -> None:
    """optimizer.pt (single / DDP runs: indexed like the optimizer) or the by-name files (sharded runs), into
    whatever backend this run uses."""
    indexed = path / "optimizer.pt"
    sharded = getattr(dist, "is_sharded", False)
    if indexed.is_file():
        saved = torch.load(indexed, map_location="cpu", weights_only=True)
        if not sharded:
            optimizer.load_state_dict(saved)
            return
        order = [name for names in dist.param_group_names for name in names]  # build_optimizer's parameter order
        saved = {"state": {order[int(i)]: entry for i, entry in saved["state"].items()},
                 "param_groups": [dict(g, params=[order[int(i)] for i in g["params"]]) for g in saved["param_groups"]]}
    elif (path / OPTIMIZER_BY_NAME).is_file():
        if dist is None:
            raise ValueError(f"{path} holds a sharded run's optimizer state: pass the run's Dist to load it")
        saved = _read_optimizer_by_name(path)
    else:
        raise FileNotFoundError(f"{path} has neither optimizer.pt nor {OPTIMIZER_BY_NAME}")
    dist.load_full_optimizer_state(policy, optimizer, saved)


def load_latest_checkpoint(output_dir, policy, optimizer, scheduler, dist) -> dict | None:
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    return load_checkpoint(path, policy, optimizer, scheduler, dist)


def export_merged_model(checkpoint: Path, config, out_dir: Path) -> Path:
    """Base model + the checkpoint's LoRA, merged, saved in the OpenVLA layout (readable by trainer.models.load_vla)."""
    from trainer.dist import Dist
    from trainer.models import save_vla
    from trainer.train import build_policy

    config.quant.mode = "none"  # merging needs full-precision base weights
    policy = build_policy(config, Dist.create())
    load_checkpoint(checkpoint, policy)
    merged = policy.vla.merge_and_unload() if _is_peft(policy.vla) else policy.vla
    return save_vla(merged, out_dir, tokenizer=policy.tokenizer)
