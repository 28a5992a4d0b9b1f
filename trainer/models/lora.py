"""LoRA through PEFT, an LLM.int8 base through bitsandbytes, and the report of what is trainable."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from trainer.models.openvla import OpenVLA

ALL_LINEAR = "all-linear"
LLM_LINEAR = "llm-linear"


@dataclass
class LoraSettings:
    """LoRA adapters through PEFT (the run config's `lora` section)."""

    enabled: bool = True
    """Train LoRA adapters on a frozen base. Off: nothing of the base is trained (only a value head or fully trained
    OFT heads, if any); `eval` of a released checkpoint turns it off."""
    rank: int = 32
    """r, the adapters' inner dimension."""
    alpha: int = 16
    """Scaling numerator: the adapter's output is scaled by alpha / rank. The OpenVLA / OFT releases use
    alpha = min(rank, 16)."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    target_modules: str = ALL_LINEAR
    """"all-linear": every linear layer the forward uses (ViTs, projector, LLM), not lm_head or OFT's heads;
    "llm-linear": the language model's linear layers only (the towers stay frozen: a faster update);
    or a comma-separated list of module-name suffixes for PEFT."""
    include_lm_head: bool = False
    """LoRA on the output layer too. The released checkpoints' output rows for the action tokens are trained; a
    random-initialised head (the tiny presets) gives logits within about ±1 whatever the hidden state, so without
    this a tiny policy cannot become confident."""
    train_proprio_projector: bool = False
    """OFT: train the proprio projector fully (not through LoRA); saved with the adapter."""
    train_action_head: bool = False
    """OFT: train the L1 regression head fully; saved with the adapter."""

    def problems(self) -> list[str]:
        if not self.enabled:
            return []
        found = []
        if not self.rank >= 1:
            found.append(f"rank = {self.rank!r}; expected >= 1")
        if not self.alpha > 0:
            found.append(f"alpha = {self.alpha!r}; expected > 0")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"dropout = {self.dropout!r}; expected in [0, 1)")
        return found


def _linear_layers_in_use(model: OpenVLA, llm_only: bool, include_lm_head: bool = False) -> list[str]:
    """Names of the linear layers the forward pass runs: skips lm_head (its rows are the action vocabulary, left
    as released), OFT's own heads, SigLIP's unused attention-pooling head and each ViT's unused last block (LoRA
    there would get no gradient, which also trips DDP's unused-parameter check)."""
    skipped_prefixes = [] if include_lm_head else ["language_model.lm_head"]
    skipped_prefixes += ["proprio_projector", "action_head",
                        "vision_backbone.fused_featurizer.attn_pool"]
    for tower in ("featurizer", "fused_featurizer"):
        last = len(getattr(model.vision_backbone, tower).blocks) - 1
        skipped_prefixes.append(f"vision_backbone.{tower}.blocks.{last}.")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and type(module).__name__ != "Linear8bitLt":
            continue
        if any(name.startswith(p) for p in skipped_prefixes):
            continue
        if llm_only and not name.startswith("language_model."):
            continue
        names.append(name)
    return names


def apply_lora(model: OpenVLA, settings: LoraSettings) -> PeftModel:
    """Freeze the base and add LoRA adapters; OFT's heads optionally trained fully (saved with the adapter)."""
    problems = settings.problems()
    if problems:
        raise ValueError(f"invalid LoRA settings: {'; '.join(problems)}")
    if settings.target_modules in (ALL_LINEAR, LLM_LINEAR):
        targets = _linear_layers_in_use(model, llm_only=settings.target_modules == LLM_LINEAR,
                                        include_lm_head=settings.include_lm_head)
    else:
        targets = [name.strip() for name in settings.target_modules.split(",") if name.strip()]
    modules_to_save = []
    if settings.train_proprio_projector:
        if model.proprio_projector is None:
            raise ValueError("lora.train_proprio_projector is set but the model has no proprio projector (not OFT)")
        modules_to_save.append("proprio_projector")
    if settings.train_action_head:
        if model.action_head is None:
            raise ValueError("lora.train_action_head is set but the model has no L1 action head")
        modules_to_save.append("action_head")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, modules_to_save=modules_to_save or None, bias="none")
    return get_peft_model(model, config)


def trainable_breakdown(module: nn.Module) -> dict[str, int]:
    """Trainable parameter counts grouped by part of the model (and the total / frozen counts)."""
    groups: dict[str, int] = defaultdict(int)
    frozen = 0
    for name, param in module.named_parameters():
        if not param.requires_grad:
            frozen += param.numel()
            continue
        clean = name.replace("base_model.model.", "").replace("vla.", "", 1)
        if clean.startswith("value_head"):
            group = "value head"
        elif "lora_" in clean:
            part = clean.split(".")[0] if not clean.startswith("vision_backbone") else ".".join(clean.split(".")[:2])
            group = f"LoRA {part}"
        else:
            group = clean.split(".")[0]
        groups[group] += param.numel()
    groups["trainable total"] = sum(groups.values())
    groups["frozen"] = frozen
    return dict(groups)


def format_breakdown(breakdown: dict[str, int]) -> str:
    total = breakdown["trainable total"] + breakdown["frozen"]
    lines = [f"{'part':<42}{'parameters':>15}{'share':>9}"]
    for group, count in breakdown.items():
        lines.append(f"{group:<42}{count:>15,}{100 * count / max(total, 1):>8.3f}%")
    return "\n".join(lines)


# --- 8-bit base ------------------------------------------------------------------------------------------------------

QUANT_MODES = ("none", "int8")
# Backends that shard parameters flatten int8 and bf16 tensors together, which LLM.int8 weights do not allow
# (peft#2833, bitsandbytes#1709, accelerate#1415).
SHARDING_BACKENDS = ("fsdp", "deepspeed_zero3")


def check_quantization(mode: str, backend: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {QUANT_MODES}")
    if mode == "int8" and backend in SHARDING_BACKENDS:
        raise ValueError(
            f"an int8 (LLM.int8) base cannot be sharded with {backend}: bitsandbytes int8 weights cannot be flattened "
            "together with bf16 ones. Working alternatives: accelerate_configs/single_gpu_8bit.yaml (one GPU), "
            "accelerate_configs/ddp_2gpu_8bit.yaml (a replica per GPU), or a bf16 base with "
            "accelerate_configs/fsdp_1node.yaml / deepspeed_zero3.yaml.")


def quantize_int8(model: OpenVLA, device: str | torch.device, threshold: float = 6.0) -> OpenVLA:
    """Swap the language model's linear layers (not lm_head) for bitsandbytes Linear8bitLt; quantised on `device`.

    The vision towers and projector stay in bf16: they are 10% of the weights and most sensitive to rounding.
    """
    import bitsandbytes as bnb

    for name, module in list(model.language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full == "lm_head":
                continue
            quantized = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=threshold)
            quantized.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                                 has_fp16_weights=False)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, quantized.to(device))
    return model


def int8_optimizer(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas)


__all__ = [
    "QUANT_MODES",
    "LoraSettings",
    "apply_lora",
    "check_quantization",
    "format_breakdown",
    "int8_optimizer",
    "quantize_int8",
    "trainable_breakdown",
]
