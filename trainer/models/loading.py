"""Build, load and save OpenVLA checkpoints in the Hugging Face layout, without remote code and without the hub.

A checkpoint directory holds ``config.json`` (with ``norm_stats``), ``model.safetensors`` or sharded
``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, and the tokenizer files. OpenVLA-OFT
checkpoints add the proprio projector and the L1 action head as separate files (OFT ships
``proprio_projector--{step}_checkpoint.pt`` / ``action_head--{step}_checkpoint.pt``; we write ``.safetensors``).

Action statistics: a ``dataset_statistics.json`` in the directory replaces config.json's ``norm_stats``, as the
official evaluation code does (fine-tuned releases keep openvla-7b's config.json, whose statistics know only the
pre-training mixture, and carry the fine-tuning data's statistics in that file).

Released OpenVLA-OFT directories say nothing about how they were trained (their config.json is openvla-7b's). A
directory with OFT's component files loads as OFT by itself; one without them (an OFT fine-tune on the tokens) needs
``family="oft"``. The layout is read from the files present (docs/fidelity.md, "released layouts"):
- with OFT's ``action_head`` / ``proprio_projector`` files (moojink/openvla-7b-oft-finetuned-libero-*): the OFT
  LIBERO configuration, two views (agentview + wrist), proprio and the L1 head;
- with neither (OFT fine-tunes on the action tokens: SimpleVLA-RL's SFT checkpoints, RLinf's LoRA bases): OFT's
  fine-tuning defaults, one view, no proprio, tokens;
- the proprio projector is used only together with the action head: the official evaluation feeds proprio only on
  the L1-head path.
``num_images`` and ``stop_token`` override what cannot be read from the files.

Full-size models are built on the meta device (no memory) and the tensors are streamed in one at a time, so loading
OpenVLA-7B never holds two copies of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.models.config import OFTConfig, VLAConfig
from trainer.models.openvla import OpenVLA

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DATASET_STATISTICS_FILE = "dataset_statistics.json"
COMPONENTS = ("proprio_projector", "action_head")  # OFT parts stored beside the VLA, as the OFT release does


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it should fill; the message names every offending key."""


def build_model(config: VLAConfig, on_meta: bool = False, seed: int | None = None) -> OpenVLA:
    """Parameters on the meta device (to be streamed in) or randomly initialised on the CPU (seeded)."""
    if on_meta:
        with init_empty_weights(include_buffers=False):
            return OpenVLA(config)
    if seed is not None:
        torch.manual_seed(seed)
    return OpenVLA(config)


def manifest(model: torch.nn.Module) -> dict:
    """{"total_params": N, "shapes": {name: [dims]}} of the state dict; works on meta models (nothing allocated)."""
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    total = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    return {"total_params": total, "shapes": shapes}


def _component_of(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return head if head in COMPONENTS else None


# --- reading --------------------------------------------------------------------------------------------------------


def _vla_shards(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are not in {directory}: {missing}")
        return [directory / s for s in shards]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(f"no weights in {directory}: expected {INDEX_FILE} with its shards, or {SINGLE_FILE}")


def _component_tensors(directory: Path, component: str) -> Iterator[tuple[str, torch.Tensor]]:
    """OFT component weights from our .safetensors or OFT's own ``{component}--{step}_checkpoint.pt``."""
    path = directory / f"{component}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield f"{component}.{key}", f.get_tensor(key)
        return
    released = sorted(directory.glob(f"{component}--*_checkpoint.pt"))
    if not released:
        return
    # Plain tensors only (weights_only): no pickled code runs. DDP-saved files prefix every key with "module.".
    state = torch.load(released[-1], map_location="cpu", weights_only=True)
    for key, tensor in state.items():
        yield f"{component}.{key.removeprefix('module.')}", tensor


def _checkpoint_tensors(directory: Path, components: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in _vla_shards(directory):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    for component in components:
        yield from _component_tensors(directory, component)


def _describe(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: OpenVLA, directory: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """Stream every tensor of the checkpoint into `model`; any missing, unexpected or mis-shaped tensor is an error."""
    directory = Path(directory)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    components = sorted({c for name in expected if (c := _component_of(name))})
    unexpected, misshaped, loaded = [], [], set()
    for name, tensor in _checkpoint_tensors(directory, components):
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            misshaped.append(f"{name}: checkpoint {list(tensor.shape)} vs model {list(expected[name])}")
            continue
        set_module_tensor_to_device(model, name, device, value=tensor, dtype=dtype)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_describe(sorted(unexpected))}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {_describe(misshaped)}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match the {model.config.trainer.family} model: "
                              + "; ".join(problems) + ". Nothing was re-initialised.")
    return model


def read_norm_stats(directory: Path, config: VLAConfig) -> tuple[dict | None, str]:
    """The action / proprio statistics of a checkpoint and the file they came from (official precedence)."""
    path = directory / DATASET_STATISTICS_FILE
    if path.is_file():
        return json.loads(path.read_text()), DATASET_STATISTICS_FILE
    return config.norm_stats, "config.json"


def _has_component(directory: Path, component: str) -> bool:
    return (directory / f"{component}.safetensors").is_file() or any(directory.glob(f"{component}--*_checkpoint.pt"))


def released_oft_config(config: VLAConfig, directory: Path, num_images: int | None = None) -> VLAConfig:
    """openvla-7b's config.json of a released OFT directory, read as OpenVLA-OFT from the files present."""
    has_head = _has_component(directory, "action_head")
    has_proprio = _has_component(directory, "proprio_projector")
    views = num_images if num_images is not None else (2 if has_head or has_proprio else 1)
    return config.as_oft(OFTConfig(num_images=views, use_proprio=has_proprio and has_head, use_l1_head=has_head))


def load_vla(directory: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             family: str | None = None, num_images: int | None = None, stop_token: bool | None = None) -> OpenVLA:
    """Load a local checkpoint directory. `family` ("openvla" / "oft") overrides what config.json says, because the
    released OFT checkpoints keep openvla-7b's config.json; `num_images` and `stop_token` override the OFT layout
    (module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = VLAConfig.load(directory)
    config.norm_stats, config.norm_stats_source = read_norm_stats(directory, config)
    if family is None and not config.is_oft and any(_has_component(directory, c) for c in COMPONENTS):
        family = "oft"  # OFT's head / projector files beside openvla-7b's config.json: the OFT release layout
    if family == "oft" and not config.is_oft:
        config = released_oft_config(config, directory, num_images)
    elif family == "openvla" and config.is_oft:
        raise CheckpointError(f"{directory} holds an OpenVLA-OFT model (config.json trainer.family = 'oft')")
    if config.is_oft:
        if num_images is not None:
            config.trainer.oft.num_images = num_images
        if stop_token is not None:
            config.trainer.oft.stop_token = stop_token
    elif num_images not in (None, 1) or stop_token is not None:
        raise ValueError(f"{directory} is a standard OpenVLA model (one view, autoregressive): num_images and "
                         f"stop_token apply to OpenVLA-OFT only; pass family='oft' for a released OFT directory")
    model = build_model(config, on_meta=True)
    return load_weights(model, directory, dtype=dtype, device=device)


# --- writing --------------------------------------------------------------------------------------------------------


def save_vla(model: OpenVLA, directory: str | Path, tokenizer=None, max_shard_size: str | int = "7GB",
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json, the VLA's safetensors shards with their index (HF layout) and OFT component files.

    `state_dict` may be given (e.g. gathered from a sharded model); by default it is `model.state_dict()`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    vla_state = {k: v for k, v in state.items() if _component_of(k) is None}
    split = split_torch_state_dict_into_shards(vla_state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: vla_state[n] for n in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in vla_state.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    for component in COMPONENTS:
        part = {k.split(".", 1)[1]: v for k, v in state.items() if _component_of(k) == component}
        if part:
            save_file(part, str(directory / f"{component}.safetensors"), metadata={"format": "pt"})
    model.config.save(directory)
    if model.config.norm_stats is not None:  # where the official loaders look first, too
        (directory / DATASET_STATISTICS_FILE).write_text(json.dumps(model.config.norm_stats, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
