"""How much memory the update needs with and without gradient recompute, and the choices that follow from it.

Gradient checkpointing trades memory for time: on one H200, OpenVLA-OFT with LoRA on every linear layer and
micro-batch 16 peaked at 22 GB with recompute and 82 GB without, and the update took 15.3 instead of 24.2 s per
iteration (issue 13). `model.gradient_checkpointing: auto` turns recompute off when the estimate below fits the free
memory. Likewise `rollout.merge_lora: auto` merges the adapters for a rollout when the copy of the adapted weights
fits.

The estimate counts what autograd keeps for the backward, per token and layer, from the model's own shapes (h the
width, i the MLP width, e the bytes of an activation element):

- a Llama decoder layer: the fp32 input of both RMSNorms (they compute in fp32): 2 x 4h bytes; in the compute
  dtype the q/k/v input, the rotated q, k and v and the attention output (all kept by SDPA), the o_proj input and
  the MLP input (7h), the gate, up, activation and down_proj inputs (4i): 8h + e(7h + 4i);
- a ViT block (only when LoRA adapts the towers; a frozen tower keeps nothing): two LayerNorm inputs in fp32
  (autocast), qkv input and output, attention output, proj input, fc1 input (7h), the GELU input and fc2 input
  (2m): 8h + e(7h + 2m);
- with recompute (non-reentrant checkpointing of every decoder layer and tower block): each layer's input (e h),
  plus one layer's full activations while it is recomputed.

Against the H200 measurement above (OFT, LoRA on all linear layers, micro-batch 16, a 45-token prompt) the estimate
of the difference between the two is 62.9 GiB against the measured 60 (peaks 20.6 / 83.5 GiB with the weights and
the trainable state, against 22 / 82 measured). A test also checks the per-layer terms
against the bytes autograd really saves, on the tiny model on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GiB = 2**30
ROLLOUT_RESERVE_BYTES = 4 * GiB  # the rollout's caches and the allocator's fragmentation, beside the update
FREE_MEMORY_MARGIN = 0.1  # use at most 90% of what is free


@dataclass(frozen=True)
class UpdateMemory:
    """Bytes one micro-batch's forward + backward keeps, besides the weights."""

    activations_recompute: int
    activations_no_recompute: int
    trainable_state: int  # LoRA weights, their gradients and two AdamW moments, fp32


def _llama_shape(model) -> tuple[int, int, int]:
    config = model.language_model.config
    return config.hidden_size, config.intermediate_size, config.num_hidden_layers


def _tower_shapes(model) -> list[tuple[int, int, int, int]]:
    """(width, MLP width, blocks run, tokens per image) of each vision tower (the last block is never run)."""
    shapes = []
    for vit in (model.vision_backbone.featurizer, model.vision_backbone.fused_featurizer):
        tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
        shapes.append((vit.embed_dim, vit.blocks[0].mlp.fc1.out_features, len(vit.blocks) - 1, tokens))
    return shapes


def sequence_length(model, text_tokens: int) -> int:
    """Tokens of one training sample: BOS, patches of every view, proprio (OFT), the prompt, action slots, stop (OFT)."""
    patches = model.config.num_images * model.vision_backbone.featurizer.patch_embed.num_patches
    proprio = 1 if getattr(model, "proprio_projector", None) is not None else 0
    stop = 1 if model.config.is_oft else 0
    return 1 + patches + proprio + text_tokens + model.num_action_slots + stop


def lora_parameter_count(model, rank: int, towers: bool) -> int:
    """LoRA parameters r x (in + out) of every linear layer of the language model (and of the towers and the
    projector when `towers`), lm_head excepted."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith("language_model.lm_head"):
            continue
        if name.startswith("language_model.") or (towers and name.startswith(("vision_backbone.", "projector."))):
            count += rank * (module.in_features + module.out_features)
    return count


def decoder_layer_bytes(width: int, mlp_width: int, element_bytes: int) -> int:
    """Bytes a Llama decoder layer keeps per token for the backward (module docstring): 8h + e(7h + 4i)."""
    return 8 * width + element_bytes * (7 * width + 4 * mlp_width)


def vit_block_bytes(width: int, mlp_width: int, element_bytes: int) -> int:
    """Bytes a ViT block keeps per token for the backward (module docstring): 8h + e(7h + 2m)."""
    return 8 * width + element_bytes * (7 * width + 2 * mlp_width)


def update_memory(model, micro_batch: int, *, text_tokens: int = 48, lora_rank: int = 32, lora_on_towers: bool = True,
                  element_bytes: int = 2) -> UpdateMemory:
    """The estimate (module docstring) for an OpenVLA / OpenVLA-OFT model (its structure only: a meta model works)."""
    h, i, layers = _llama_shape(model)
    tokens = micro_batch * sequence_length(model, text_tokens)
    per_layer_token = decoder_layer_bytes(h, i, element_bytes)
    language_full = tokens * layers * per_layer_token
    language_inputs = tokens * layers * element_bytes * h
    towers_full = towers_inputs = towers_largest = 0
    if lora_on_towers:
        images = micro_batch * model.config.num_images
        for width, mlp, blocks, per_image in _tower_shapes(model):
            per_block = images * per_image * vit_block_bytes(width, mlp, element_bytes)
            towers_full += blocks * per_block
            towers_inputs += blocks * images * per_image * element_bytes * width
            towers_largest = max(towers_largest, per_block)
    recompute = language_inputs + towers_inputs + max(tokens * per_layer_token, towers_largest)
    state = 16 * lora_parameter_count(model, lora_rank, lora_on_towers)
    return UpdateMemory(activations_recompute=recompute, activations_no_recompute=language_full + towers_full,
                        trainable_state=state)


def choose_gradient_checkpointing(setting, free_bytes: int | None, memory: UpdateMemory,
                                  reserve_bytes: int = ROLLOUT_RESERVE_BYTES) -> bool:
    """Whether to recompute: `setting` True / False as given; "auto": recompute unless the update without it (its
    activations, the trainable state and a reserve for the rollout) fits in 90% of `free_bytes`. None (no GPU to
    budget: the CPU runs of the tiny models) means no recompute, as before "auto" existed."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"gradient_checkpointing must be true, false or 'auto', got {setting!r}")
    if free_bytes is None:
        return False
    needed = memory.activations_no_recompute + memory.trainable_state + reserve_bytes
    return needed > (1 - FREE_MEMORY_MARGIN) * free_bytes


def merge_fits(free_bytes: int | None, copy_bytes: int, reserve_bytes: int = ROLLOUT_RESERVE_BYTES) -> bool:
    """Whether the copy of the adapted base weights that a merged rollout keeps (VLAPolicy.merged_adapters) fits in
    90% of `free_bytes` beside a reserve for the rollout (None: unknown, no)."""
    return free_bytes is not None and copy_bytes + reserve_bytes <= (1 - FREE_MEMORY_MARGIN) * free_bytes


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on `device` can use: the CUDA device's free memory plus what PyTorch's allocator
    holds unused; None on other devices (CPU runs have no GPU memory to budget)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
