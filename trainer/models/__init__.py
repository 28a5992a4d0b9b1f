"""The OpenVLA family: model, checkpoint I/O, tokenizers, processor, the policy API, LoRA and 8-bit."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.models.config import PRESETS, VLAConfig, preset
from trainer.models.loading import build_model, load_vla, manifest, save_vla
from trainer.models.openvla import OpenVLA
from trainer.models.policy import ActResult, EnvSettings, EvalResult, PolicyInputs, VLAPolicy
from trainer.models.tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "ActResult",
    "EnvSettings",
    "EvalResult",
    "OpenVLA",
    "PolicyInputs",
    "VLAConfig",
    "VLAPolicy",
    "build_model",
    "build_tiny_tokenizer",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "load_vla",
    "manifest",
    "preset",
    "save_tiny_checkpoint",
    "save_vla",
]


RANDOM_PREFIX = "random:"


def _identity_norm_stats() -> dict:
    """Bounds that leave actions in [-1, 1], under every suite's key: random models have no dataset statistics."""
    from trainer.envs import SUITES

    stats = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
             "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8}}
    return {suite: stats for suite in SUITES if suite != "toy"}


def _random_model(name: str, seed: int, device="cpu", benchmark_stats: bool = False, dtype: torch.dtype = torch.float32):
    config = preset(name)
    if benchmark_stats:  # random weights for benchmarks: identity bounds under every suite's key
        config.norm_stats = {**(config.norm_stats or {}), **_identity_norm_stats()}
        config.norm_stats_source = "identity bounds for random weights"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its final dtype: a 7B model built in fp32 first would need 30 GB
    try:
        with torch.device(device):
            model = build_model(config, seed=seed)
    finally:
        torch.set_default_dtype(previous)
    return model, build_tiny_tokenizer(config.base_vocab_size)


def load_model_and_tokenizer(source: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", family: str | None = None,
                             num_images: int | None = None, stop_token: bool | None = None):
    """`source`: a tiny preset ("tiny", "tiny-oft": random init, seeded); "random:<preset>" (any preset with random
    weights, built directly on `device` — for benchmarks; its tokenizer is a synthetic one of the same vocabulary
    size); or a local checkpoint directory (`family`, `num_images`, `stop_token`: see trainer.models.loading)."""
    if source in ("tiny", "tiny-oft"):
        model, tokenizer = _random_model(source, seed)
        return model.to(device=device, dtype=dtype), tokenizer
    if source.startswith(RANDOM_PREFIX) and source[len(RANDOM_PREFIX):] in PRESETS:
        model, tokenizer = _random_model(source[len(RANDOM_PREFIX):], seed, device=device, benchmark_stats=True, dtype=dtype)
        return model.to(dtype=dtype), tokenizer
    if source in PRESETS:
        raise ValueError(
            f"preset {source!r} has no weights here (no model hub): pass the local directory of the checkpoint "
            f"(config.json, *.safetensors, tokenizer files), 'random:{source}' for random weights (benchmarks), or "
            f"the 'tiny' / 'tiny-oft' presets")
    model = load_vla(source, dtype=dtype, device=device, family=family, num_images=num_images, stop_token=stop_token)
    return model, load_tokenizer(source)


def save_tiny_checkpoint(directory: str | Path, name: str = "tiny", seed: int = 0, max_shard_size="7GB") -> Path:
    model, tokenizer = _random_model(name, seed)
    return save_vla(model, directory, tokenizer=tokenizer, max_shard_size=max_shard_size)
