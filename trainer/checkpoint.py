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
        manifest.json               size and SHA-256 of every file above, written last: resume verifies it
    <output_dir>/checkpoints/latest  the name of the newest complete checkpoint

Every backend writes the same files through its engine (`Engine.trainable_state`, `Engine.optimizer_state`: full
tensors, gathered on sharded backends). Checkpoints of earlier versions hold `optimizer.pt` instead of the two
optimizer files: the optimizer's own state dict, keyed by position in build_optimizer's parameter order; they still
load, translated to names by that order.

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced atomically, so a
crash mid-save never leaves a half-written checkpoint that resume would pick. Re-saving an iteration that exists
moves the old folder aside (`.iter-N.old`) before the new one is renamed in, and removes it only after; a kill
between the steps leaves either folder complete, and `latest_checkpoint` takes the aside copy back. Resume checks
each file against the manifest; when the newest checkpoint is missing or damaged it falls back to the newest complete
one and says which (see docs/reliability.md).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from trainer.config import ConfigError
from trainer.engine import Engine
from trainer.models import save_vla

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"
OLD_OPTIMIZER = "optimizer.pt"  # earlier versions, single process and DDP: keyed by position
MANIFEST = "manifest.json"
CHECKPOINT_NAME = re.compile(r"iter-(\d{6,})")
LOW_DISK_BYTES = 64 * 2**20  # a write that fails with less free space than this is reported as a full disk


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, damaged, or of other settings); the message names the file and
    what to do. A user error: the command line prints it without a traceback."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """`latest` names a checkpoint that is not there, and no other complete checkpoint exists."""


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
    try:
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
    except (OSError, RuntimeError) as error:
        if _disk_full(error, root):
            raise CheckpointError(
                f"no space left on the device of {root} while writing checkpoint {name} ({error}); free some space "
                f"and start the same command again: it resumes from {_latest_name(root) or 'the start'}") from error
        raise
    dist.barrier()
    if dist.is_main:
        _write_manifest(staging)
        _replace_folder(staging, final)
        _atomic_write_text(root / LATEST, name)
        shutil.rmtree(_aside(final), ignore_errors=True)
    dist.barrier()
    return final


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _replace_folder(staging: Path, final: Path) -> None:
    """Rename staging to final. An existing final is first renamed aside (removed by the caller once `latest` is
    written): at every moment one complete copy is in place or aside, never a half-deleted folder."""
    aside = _aside(final)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staging, final)


def _write_manifest(folder: Path) -> None:
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    _atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the chain, or a failed write with (almost) no free space left: torch.save then reports
    only "unexpected pos ..." and safetensors an I/O error."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < LOW_DISK_BYTES
    except OSError:
        return False


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def _write_trainable(staging: Path, policy, trainable: dict[str, torch.Tensor]) -> None:
    """LoRA adapters in PEFT's layout (adapter_model.safetensors + adapter_config.json), the rest by name."""
    extra = trainable
    if _is_peft(policy.vla):
        vla = {name[len("vla."):]: t for name, t in trainable.items() if name.startswith("vla.")}
        adapter = _peft_state_dict(policy.vla, vla)
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


def latest_checkpoint(output_dir, report=None) -> Path | None:
    """The checkpoint `latest` names, checked against its manifest; None when the run has no `latest`.

    When the folder `latest` names is missing or damaged, the newest complete checkpoint is used instead and `report`
    (default: print to stderr) gets a message naming both; with none complete, a CheckpointError says what to do."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = _latest_name(root) or ""
    named = root / name
    problem = checkpoint_problem(named) if CHECKPOINT_NAME.fullmatch(name) else (
        f"that is not a checkpoint name (iter-NNNNNN)" if name else "it is empty")
    if problem is None:
        return named
    aside = _aside(named)
    if CHECKPOINT_NAME.fullmatch(name) and not named.exists() and aside.is_dir() and checkpoint_problem(aside) is None:
        return aside  # a re-save of this iteration was interrupted between its renames: the previous copy is whole
    fallback = next((folder for folder in _checkpoint_folders(root)
                     if folder.name != name and checkpoint_problem(folder) is None), None)
    if fallback is None:
        error = MissingCheckpointError if not named.is_dir() else CheckpointError
        raise error(f"{pointer} names {name!r}, but {problem}, and {root} holds no other complete "
                              f"checkpoint; to start over, remove {root} (or choose another train.output_dir)")
    (report or _print_stderr)(f"{pointer} names {name!r}, but {problem}; using {fallback.name}, the newest complete "
                              "checkpoint")
    return fallback


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file matches its manifest (size and SHA-256).
    Checkpoints written before manifests existed pass unchecked."""
    if not folder.is_dir():
        return f"{folder.name} does not exist"
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        return None if (folder / "trainer_state.json").is_file() else f"{folder.name} is incomplete (no {MANIFEST})"
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as error:
        return f"{manifest_file} is damaged ({error})"
    for file_name, expected in files.items():
        path = folder / file_name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes where {expected['bytes']} were written (truncated or overwritten)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match the SHA-256 written with it (the file changed on disk)"
    return None


def verify_checkpoint(folder) -> Path:
    """The folder, when it is a complete checkpoint; else a CheckpointError naming the damaged file."""
    folder = Path(folder)
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} cannot be used: {problem}; use another checkpoint of the run "
                              f"(the folders in {folder.parent})")
    return folder


def _checkpoint_folders(root: Path) -> list[Path]:
    """iter-NNNNNN folders, newest first."""
    folders = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(folders, key=lambda p: int(p.name[len("iter-"):]), reverse=True)


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_checkpoint(path, engine: Engine, scheduler=None) -> dict:
    """Resume: weights, optimizer state, scheduler and this rank's RNG; returns the trainer state (counters)."""
    return _load_checkpoint(verify_checkpoint(path), engine, scheduler)


def _load_checkpoint(path: Path, engine: Engine, scheduler) -> dict:
    engine.load_trainable_state(read_trainable(path, engine.policy))
    engine.load_optimizer_state(read_optimizer(path, engine.param_group_names))
    if scheduler is not None:
        with _reading(path / "scheduler.pt"):
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng-rank{engine.dist.rank}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: streams derive from seeds anyway
        with _reading(rng_file):
            _set_rng_state(json.loads(rng_file.read_text()))
    return _trainer_state(path)


def load_latest_checkpoint(output_dir, engine: Engine, scheduler) -> dict | None:
    report = _print_stderr if engine.dist.is_main else (lambda message: None)
    path = latest_checkpoint(output_dir, report)
    return None if path is None else _load_checkpoint(path, engine, scheduler)


def load_weights(path, policy) -> dict:
    """Only the trainable weights, into a policy as built (not wrapped by a backend): evaluation and export.
    Returns the checkpoint's trainer state."""
    path = verify_checkpoint(path)
    tensors = read_trainable(path, policy)
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return _trainer_state(path)


def _trainer_state(path: Path) -> dict:
    with _reading(path / "trainer_state.json"):
        return json.loads((path / "trainer_state.json").read_text())


class _reading:
    """Turns a library's error while reading a checkpoint file (a truncated safetensors or pickle, bad JSON) into a
    CheckpointError that names the file and what to do."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, CheckpointError) or not isinstance(error, Exception):
            return False
        folder = self.file.parent
        raise CheckpointError(
            f"{self.file} cannot be read ({type(error).__name__}: {str(error).strip()[:200]}): the file is damaged or "
            f"incomplete; remove {folder} and start the same command again (resume then uses the newest complete "
            f"checkpoint before it)") from error


def _saved_lora(path: Path) -> str:
    """The lora section of a checkpoint's config.yaml, for messages ("" when unreadable)."""
    try:
        import yaml

        lora = yaml.safe_load((path / "config.yaml").read_text()).get("lora", {})
        return ", ".join(f"{key} {value}" for key, value in lora.items())
    except Exception:  # noqa: BLE001 -- only a hint in an error message
        return ""


def read_trainable(path: Path, policy) -> dict[str, torch.Tensor]:
    """Trainable weights of a checkpoint (adapter + trainable.safetensors), keyed by the policy's parameter names;
    refused (CheckpointError) when a tensor is not finite or its shape is not the parameter's."""
    tensors = {}
    params = dict(policy.named_parameters())
    if _is_peft(policy.vla):
        adapter_file = path / "adapter_model.safetensors"
        if not adapter_file.is_file():
            saved = _saved_lora(path)
            if "enabled False" in saved:
                raise CheckpointError(f"{path} was saved without LoRA adapters (its config.yaml: lora.enabled "
                                      "false); load it with --lora.enabled false")
            raise CheckpointError(f"{adapter_file} is missing (the checkpoint is incomplete); remove {path} and "
                                  "resume from the checkpoint before it")
        with _reading(adapter_file):
            adapter = load_file(str(adapter_file), device="cpu")
        names = _adapter_names(policy)
        unexpected = sorted(set(adapter) - set(names))
        if unexpected:
            raise CheckpointError(f"{adapter_file} has tensors this model does not: {unexpected[:5]}; it was saved "
                                  f"with other LoRA settings ({_saved_lora(path)}): use the same ones")
        tensors.update(_checked(adapter_file, {names[key]: value for key, value in adapter.items()}, params, path))
    extra_file = path / "trainable.safetensors"
    if extra_file.is_file():
        with _reading(extra_file):
            extra = load_file(str(extra_file), device="cpu")
        unexpected = sorted(set(extra) - set(params))
        if unexpected:
            raise CheckpointError(f"{extra_file} has tensors this model does not: {unexpected[:5]}; it was saved "
                                  "with other settings (algo.name: a value head; model): use its config.yaml's")
        tensors.update(_checked(extra_file, extra, params, path))
    return tensors


def _checked(file: Path, tensors: dict[str, torch.Tensor], params: dict, path: Path) -> dict[str, torch.Tensor]:
    for name, value in tensors.items():
        # ZeRO-3 partitions a parameter in place (shape [0]); DeepSpeed keeps the full shape as ds_shape
        expected = tuple(getattr(params[name], "ds_shape", params[name].shape))
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"{file}: {name} has shape {list(value.shape)} but this run's parameter has {list(expected)}: the "
                f"checkpoint was saved with other LoRA or model settings (its config.yaml: lora: {_saved_lora(path)}); "
                "resume or load it with those settings, or give this run another train.output_dir")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{file}: {name} holds inf or nan values: the file is damaged or was saved by a run "
                                  f"that diverged; remove {path} and use the checkpoint before it")
    return tensors


def read_optimizer(path: Path, param_group_names: list[list[str]]) -> dict:
    """The checkpoint's optimizer state keyed by parameter name; an old optimizer.pt is translated by position
    (param_group_names: this run's parameter names per param group, in build_optimizer's order)."""
    if (path / OPTIMIZER_TENSORS).is_file():
        with _reading(path / OPTIMIZER_TENSORS):
            return _read_optimizer_by_name(path)
    if (path / OLD_OPTIMIZER).is_file():
        with _reading(path / OLD_OPTIMIZER):
            indexed = torch.load(path / OLD_OPTIMIZER, map_location="cpu", weights_only=True)
        return _optimizer_by_name(indexed, param_group_names, path / OLD_OPTIMIZER)
    raise CheckpointError(f"{path} has neither {OPTIMIZER_TENSORS} nor {OLD_OPTIMIZER}: not a complete checkpoint; "
                          "remove it and resume from the checkpoint before it")


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
        raise CheckpointError(f"{source} holds {sizes} parameters per param group but this run optimizes "
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


def _peft_state_dict(vla, state_dict: dict) -> dict:
    """PEFT's adapter naming of `state_dict`. PEFT warns at every call that it saves a targeted lm_head ("Setting
    `save_embedding_layers` to `True`", then "Could not identify embedding layer(s)"): nothing a user can act on,
    and the adapter tensors are the same either way; silenced here, at the call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`")
        warnings.filterwarnings("ignore", message="Could not identify embedding layer")
        return get_peft_model_state_dict(vla, state_dict=state_dict)


def _adapter_names(policy) -> dict[str, str]:
    """PEFT adapter-file key -> parameter name in the policy, from PEFT's own renaming (get_peft_model_state_dict
    keeps the tensor objects it is given, so distinct placeholders identify every key)."""
    placeholders = {name: torch.empty(0) for name, _ in policy.vla.named_parameters()}
    owner = {id(t): name for name, t in placeholders.items()}
    renamed = _peft_state_dict(policy.vla, placeholders)
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


__all__ = ["CHECKPOINTS", "LATEST", "MANIFEST", "OLD_OPTIMIZER", "OPTIMIZER_GROUPS", "OPTIMIZER_TENSORS",
           "CheckpointError", "MissingCheckpointError", "checkpoint_problem", "latest_checkpoint", "load_checkpoint",
           "load_latest_checkpoint", "load_weights", "read_optimizer", "read_trainable", "save_checkpoint",
           "save_merged_model", "verify_checkpoint"]
