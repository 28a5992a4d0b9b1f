"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""

import torch


def randomize_lora_b(module: torch.nn.Module, std: float = 0.05) -> None:
    """lora_B starts at zero (the adapters would add nothing): give them a non-trivial, reproducible state."""
    for name, param in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=std, generator=torch.Generator().manual_seed(len(name)))
