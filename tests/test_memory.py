"""The update-memory estimate behind `model.gradient_checkpointing: auto` and `rollout.merge_lora: auto`
(trainer/models/memory.py): its per-layer terms against what autograd really keeps (tiny model, CPU), its totals
against the H200 measurement of issue 13, and the decisions taken from it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trainer.build
from trainer.engine import merges_lora_for_rollout
from trainer.envs.base import Observation
from trainer.models import EnvSettings, VLAPolicy, load_model_and_tokenizer
from trainer.models.config import preset
from trainer.models.loading import build_model
from trainer.models.lora import LoraSettings, apply_lora
from trainer.models.memory import (
    GiB,
    UpdateMemory,
    choose_gradient_checkpointing,
    decoder_layer_bytes,
    merge_fits,
    update_memory,
    vit_block_bytes,
)


def saved_bytes_per_block(policy: VLAPolicy, inputs, token_ids, block_types: tuple[str, ...]) -> dict[int, int]:
    """Bytes of the tensors autograd saves inside each module of these types (parameters excluded; a storage
    counted once per module)."""
    parameters = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    inside: list[int] = []
    saved: dict[int, dict[int, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside and storage.data_ptr() not in parameters:
            saved.setdefault(inside[-1], {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    def enter(module, args):
        inside.append(id(module))

    def leave(module, args, output):
        inside.pop()

    handles = [hook for m in policy.modules() if type(m).__name__ in block_types
               for hook in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        policy.evaluate(inputs, token_ids)
    for handle in handles:
        handle.remove()
    return {module: sum(storages.values()) for module, storages in saved.items()}


def test_per_layer_terms_match_what_autograd_keeps():
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    policy = VLAPolicy(apply_lora(model, LoraSettings(rank=4)), tokenizer, EnvSettings("none", False, "toy"))
    rng = np.random.default_rng(0)
    observations = [Observation(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                                rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), np.zeros(8, np.float32),
                                "move to the red target") for _ in range(8)]
    inputs = policy.prepare(observations)
    token_ids = policy.act(inputs, greedy=True).token_ids
    policy.train()
    saved = saved_bytes_per_block(policy, inputs, token_ids, ("LlamaDecoderLayer", "Block"))
    base = policy.base_model
    from trainer.models.memory import sequence_length

    text = base.language_model.config
    tokens = 8 * sequence_length(base, inputs.text_ids.shape[1])
    layers = base.language_model.model.layers
    assert len(layers) == 2 and all(id(layer) in saved for layer in layers)
    expected = decoder_layer_bytes(text.hidden_size, text.intermediate_size, element_bytes=4)  # fp32 on the CPU
    for layer in layers:
        assert saved[id(layer)] / tokens == pytest.approx(expected, rel=0.02)
    for tower in (base.vision_backbone.featurizer, base.vision_backbone.fused_featurizer):
        per_token = saved[id(tower.blocks[0])] / (8 * (tower.patch_embed.num_patches + tower.num_prefix_tokens))
        formula = vit_block_bytes(tower.embed_dim, tower.blocks[0].mlp.fc1.out_features, element_bytes=4)
        assert 0.85 * formula <= per_token <= formula  # the estimate errs on the side of recompute


def test_the_estimate_reproduces_the_h200_measurement():
    """OpenVLA-OFT, LoRA r=32 on all linear layers, micro-batch 16, bf16: peak 22 GB with recompute, 82 GB without
    (issue 13); the weights are 15.2e9 bytes."""
    model = build_model(preset("openvla-7b-oft"), on_meta=True)
    memory = update_memory(model, 16, text_tokens=45)
    weights = sum(p.numel() for p in model.parameters()) * 2
    with_recompute = (weights + memory.trainable_state + memory.activations_recompute) / GiB
    without = (weights + memory.trainable_state + memory.activations_no_recompute) / GiB
    assert with_recompute == pytest.approx(22, rel=0.15)
    assert without == pytest.approx(82, rel=0.1)
    assert without >= 80  # no lower than measured: it must not turn recompute off where the update would not fit
    # LoRA on the language model only: the frozen towers keep nothing
    llm_only = update_memory(model, 16, text_tokens=45, lora_on_towers=False)
    assert llm_only.activations_no_recompute < 0.8 * memory.activations_no_recompute
    assert llm_only.trainable_state < memory.trainable_state


def test_checkpointing_choice():
    memory = update_memory(build_model(preset("openvla-7b-oft"), on_meta=True), 16)
    h200_after_loading_the_weights = 125 * GiB
    assert choose_gradient_checkpointing("auto", h200_after_loading_the_weights, memory) is False
    assert choose_gradient_checkpointing("auto", 60 * GiB, memory) is True  # an 80 GB card
    assert choose_gradient_checkpointing(True, h200_after_loading_the_weights, memory) is True  # explicit wins
    assert choose_gradient_checkpointing(False, 10 * GiB, memory) is False
    assert choose_gradient_checkpointing("auto", None, memory) is False  # CPU runs, as before "auto"
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        choose_gradient_checkpointing("sometimes", 1, memory)
    big = update_memory(build_model(preset("openvla-7b-oft"), on_meta=True), 32)
    assert choose_gradient_checkpointing("auto", h200_after_loading_the_weights, big) is True  # micro-batch 32


def test_merge_choice():
    assert merge_fits(40 * GiB, 13 * GiB) is True
    assert merge_fits(15 * GiB, 13 * GiB) is False
    assert merge_fits(None, 1) is False


def test_train_setup_uses_the_choices(monkeypatch):
    model = build_model(preset("tiny"), on_meta=True)
    lora = LoraSettings(rank=32, target_modules="all-linear")
    cuda = SimpleNamespace(device=torch.device("cuda"), max=lambda value: value, backend="single")
    monkeypatch.setattr(trainer.build, "free_device_bytes", lambda device: 100 * GiB)
    assert trainer.build.recomputes_activations("auto", model, lora, cuda, 16) is False
    monkeypatch.setattr(trainer.build, "update_memory", lambda *a, **k: UpdateMemory(0, 200 * GiB, 0))
    assert trainer.build.recomputes_activations("auto", model, lora, cuda, 16) is True
    assert trainer.build.recomputes_activations(False, model, lora, cuda, 16) is False

    policy = SimpleNamespace(merge_copy_bytes=lambda: 13 * GiB)
    assert merges_lora_for_rollout("auto", "single", policy, 100 * GiB) is True
    assert merges_lora_for_rollout("auto", "ddp", policy, 16 * GiB) is False
    assert merges_lora_for_rollout("auto", "single", policy, None) is False  # CPU
    assert merges_lora_for_rollout("auto", "fsdp", policy, 100 * GiB) is True  # into the gathered weights
    assert merges_lora_for_rollout("auto", "deepspeed_zero3", policy, 100 * GiB) is False
    assert merges_lora_for_rollout(True, "single", policy, None) is True  # explicit wins


def test_engine_decides_the_merge_at_each_rollout(monkeypatch):
    """Engine.rollout_weights reads the free memory when a rollout starts ("auto"), so a run merges once it fits."""
    import trainer.engine

    merged = []
    policy = SimpleNamespace(merge_copy_bytes=lambda: 13 * GiB, merged_adapters=lambda: merged.append(1) or
                             __import__("contextlib").nullcontext())
    dist = SimpleNamespace(backend="single", device=torch.device("cuda"))
    engine = trainer.engine.SingleEngine(dist, policy, policy, None, None, [], merge_lora="auto")
    monkeypatch.setattr(trainer.engine, "free_device_bytes", lambda device: 16 * GiB)
    with engine.rollout_weights():
        pass
    assert merged == []
    monkeypatch.setattr(trainer.engine, "free_device_bytes", lambda device: 100 * GiB)
    with engine.rollout_weights():
        pass
    assert merged == [1]
    fsdp = trainer.engine.Engine(SimpleNamespace(backend="fsdp", device=dist.device), policy, policy, None, None, [],
                                 merge_lora="auto")
    assert fsdp.merge_lora == "auto"  # into the weights FSDP2 gathers for the rollout
    zero3 = trainer.engine.Engine(SimpleNamespace(backend="deepspeed_zero3", device=dist.device), policy, policy, None,
                                  None, [], merge_lora="auto")
    assert zero3.merge_lora is False


def test_merge_copy_bytes_counts_the_adapted_weights():
    model, tokenizer = load_model_and_tokenizer("tiny", seed=0)
    policy = VLAPolicy(apply_lora(model, LoraSettings(rank=4, target_modules="llm-linear")), tokenizer,
                       EnvSettings("none", False, "toy"))
    expected = sum(m.weight.numel() * 4 for n, m in model.language_model.model.layers.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora" not in n)
    assert policy.merge_copy_bytes() == expected > 0
