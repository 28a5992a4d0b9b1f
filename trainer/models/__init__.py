"""The OpenVLA family: model, checkpoint I/O, tokenizers, processor, the policy API, LoRA and 8-bit."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from trainer.models.action_tokenizer import ActionTokenizer
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


TINY_PRESETS = ("tiny", "tiny-oft")  # model.source values built here with random weights (no checkpoint)
SMOOTH_HEAD_FREQUENCIES = 4  # basis of the action rows: the bin value, then cos / sin of k·pi·value for k = 1..4
SMOOTH_HEAD_SCALE = 0.5  # random policy near-uniform (entropy ~5.3 of ln 256 = 5.55), confident once h aligns


def smooth_row_basis(config: VLAConfig) -> torch.Tensor:
    """phi(value(bin)) for the action ids in vocabulary order: [n_bins, 2K + 1] with columns v, cos(pi v), sin(pi v),
    ..., cos(K pi v), sin(K pi v) (K = SMOOTH_HEAD_FREQUENCIES), v the bin's action value in [-1, 1]."""
    tokenizer = ActionTokenizer(config.base_vocab_size, config.n_action_bins)
    ids = torch.arange(tokenizer.first_action_id, tokenizer.base_vocab_size)
    values = torch.from_numpy(tokenizer.decode(ids)).float()
    basis = [values]
    for k in range(1, SMOOTH_HEAD_FREQUENCIES + 1):
        basis += [torch.cos(math.pi * k * values), torch.sin(math.pi * k * values)]
    return torch.stack(basis, dim=1)


def smooth_action_rows(model: OpenVLA, seed: int) -> None:
    """Make the output rows of the 256 action tokens smooth functions of the action value each bin stands for.

        row(bin) = SMOOTH_HEAD_SCALE * sum_m phi_m(value(bin)) * u_m  +  a little of the random row,
        phi = [v, cos(pi v), sin(pi v), ..., cos(4 pi v), sin(4 pi v)],  u_m random directions of the hidden space,

    so the action logits are a smooth function of the action value whose shape (where the mass sits, how peaked it
    is) the hidden state sets, as a trained VLA's are: neighbouring bins mean nearly the same action. A random head
    has 256 unrelated rows; RL then has to raise "the bins of positive dx" one by one from the few episodes that
    sampled each, and most of each update fits sampling noise (measured on the toy task: docs/learning.md). Used by
    the tiny presets only (random weights); the released checkpoints' rows are trained.
    """
    basis = smooth_row_basis(model.config)  # [256, 2K + 1]
    head = model.language_model.lm_head.weight
    generator = torch.Generator().manual_seed(seed + 1)
    directions = torch.randn(basis.shape[1], head.shape[1], generator=generator) / math.sqrt(head.shape[1])
    with torch.no_grad():
        rows = head[model.first_action_id: model.first_action_id + model.config.n_action_bins]
        # A little of the random row keeps every bin distinguishable (the basis alone ties a few symmetric pairs).
        rows.copy_(0.02 * rows / rows.std() + SMOOTH_HEAD_SCALE * basis.to(head.dtype) @ directions.to(head.dtype))


def unbias_action_rows(policy: VLAPolicy, observations: list) -> None:
    """Remove from the action-token rows of the output layer the hidden-state directions that all `observations`
    share, one per action position (the mean hidden state there, teacher-forced on the policy's greedy tokens).

    For the tiny presets on the toy task (`model.tiny_unbiased_head`): their rows are smooth in the action value
    (`smooth_action_rows`) along random hidden directions, and the part of the hidden state every input shares
    projects onto them, so a seed could start with dx tilted to one side for every instruction (docs/learning.md,
    "Seeds"). Afterwards the action logits carry only what differs between inputs.
    """
    vla = policy.base_model
    head = vla.language_model.lm_head
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            inputs = policy.prepare(observations).to(policy.device)
            tokens = policy.act(inputs, greedy=True).token_ids
            captured.clear()
            policy.evaluate(inputs, tokens)
    finally:
        handle.remove()
        policy.train(was_training)
    shared = captured[-1].float().mean(0)  # [action positions, hidden]
    basis, _ = torch.linalg.qr(shared.T)  # [hidden, positions], orthonormal
    first = vla.first_action_id
    with torch.no_grad():
        rows = head.weight[first: first + vla.config.n_action_bins]
        rows.sub_(((rows.float() @ basis) @ basis.T).to(rows.dtype))


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
            if name in TINY_PRESETS:
                smooth_action_rows(model, seed)
    finally:
        torch.set_default_dtype(previous)
    return model, build_tiny_tokenizer(config.base_vocab_size)


def load_model_and_tokenizer(source: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", family: str | None = None,
                             num_images: int | None = None, stop_token: bool | None = None):
    """`source`: a tiny preset ("tiny", "tiny-oft": random init, seeded); "random:<preset>" (any preset with random
    weights, built directly on `device` — for benchmarks; its tokenizer is a synthetic one of the same vocabulary
    size); or a local checkpoint directory (`family`, `num_images`, `stop_token`: see trainer.models.loading)."""
    if source in TINY_PRESETS:
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
